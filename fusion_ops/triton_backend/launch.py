"""Launch our Triton kernels through their compiled binaries, not through ``JITFunction.run``.

``kernel[grid](*args, **meta)`` re-derives on every call what does not change between calls of
one op at one shape class: the options (reading Triton's knobs from the environment), the current
device and stream through the driver, the specialization of every argument, the cache key, the
launch metadata. For a decode-size row kernel that host work costs more than the kernel.
:class:`Launcher` keeps, per specialization, the ``CompiledKernel`` that the first
``JITFunction.run`` produced and launches it directly with its C launcher (what Inductor's own
launcher does for the kernels it generates).

The specialization key reproduces Triton's own rule for the argument kinds our kernels take:
tensors by dtype and 16-byte alignment of the data pointer (plus, on ROCm, whether the buffer
fits 2 GiB, for buffer ops), ints by ``== 1``, divisibility by 16 and whether they need 64 bits,
floats not at all, and every constexpr and launch option by value. A key this launcher has not
seen goes through ``JITFunction.run`` (compiling if Triton has not either), so a specialization
is never guessed. When a Triton launch hook is installed (profilers such as proton), every call
goes through ``JITFunction.run`` so the hook sees it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from triton import knobs
from triton.runtime.jit import JITFunction

IS_HIP = torch.version.hip is not None
# (absent from CPU-only builds of torch, where nothing launches; the module still imports)
_get_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)
_get_device = getattr(torch._C, "_cuda_getDevice", None)
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1
_TWO_GIB = 2**31


# the launches of the current recording (see recording()), None when not recording
_recorded: list[tuple[Any, tuple[int, ...], tuple[Any, ...]] | None] | None = None
_dry = False  # recording without launching


@contextlib.contextmanager
def recording(
    dry: bool = False,
) -> Iterator[list[tuple[Any, tuple[int, ...], tuple[Any, ...]] | None]]:
    """Collect every launch made inside: ``(CompiledKernel, grid, runtime args)``, or None for a
    launch that went through Triton's JIT path (launch hooks installed) or, ``dry``, one of a
    specialization not compiled yet. ``dry``: record only, launch nothing (what a kernel would
    launch for other argument values)."""
    global _recorded, _dry
    previous = _recorded, _dry
    _recorded, _dry = [], dry
    try:
        yield _recorded
    finally:
        _recorded, _dry = previous


def _launch_hooks_installed() -> bool:
    """A launch-enter hook is set (Triton 3.5+ keeps an empty HookChain there; older, None)."""
    hook = knobs.runtime.launch_enter_hook
    return hook is not None and bool(getattr(hook, "calls", True))


def _specialization(args: tuple[Any, ...]) -> list[Any]:
    """What Triton specializes the runtime arguments on (see the module docstring), one loop and
    no call per argument: this runs on every launch."""
    key: list[Any] = []
    append = key.append
    for a in args:
        t = type(a)
        if t is int:
            append((a == 1, a % 16 == 0, _INT32_MIN <= a <= _INT32_MAX))
        elif t is float:
            append(float)
        elif t is bool or a is None:
            append(a)
        else:  # a tensor (or subclass)
            append(a.dtype)
            append(a.data_ptr() & 15 == 0)
            if IS_HIP:  # buffer ops: whether the tensor fits 2 GiB
                append(a.numel() * a.element_size() <= _TWO_GIB)
    return key


#: compile options our bytes were verified with, set explicitly (Triton 3.10 flips the default of
#: FP fusion, i.e. contracting a·b + c into an FMA, to off; the kernels' rounding relies on it)
PINNED_OPTIONS: tuple[tuple[str, Any], ...] = (("enable_fp_fusion", True),)


def _with_pinned(meta: tuple[tuple[str, Any], ...]) -> dict[str, Any]:
    return {**dict(PINNED_OPTIONS), **dict(meta)}


class Launcher:
    """A Triton kernel launched through its cached ``CompiledKernel``.

    ``launcher(grid, args, meta)``: ``args`` are the kernel's runtime arguments in order, ``meta``
    the constexprs and launch options (``num_warps``, ``enable_fp_fusion``, ...) as a tuple of
    ``(name, value)`` pairs. Launches go to the current device's current stream, as with
    ``kernel[grid](...)``.
    """

    def __init__(self, fn: JITFunction) -> None:
        n_runtime = len(fn.arg_names) - len(fn.constexprs)
        if sorted(fn.constexprs) != list(range(n_runtime, len(fn.arg_names))):
            raise TypeError(f"Launcher({fn.__name__}): constexpr parameters must come last")
        self.fn = fn
        self._constexpr_names = fn.arg_names[n_runtime:]
        self._compiled: dict[tuple[Any, ...], tuple[Any, Any, Any, tuple[Any, ...], Any]] = {}

    def __call__(
        self, grid: tuple[int, ...], args: tuple[Any, ...], meta: tuple[tuple[str, Any], ...]
    ) -> None:
        if _dry:  # record what would be launched, launch nothing
            entry = self._compiled.get((_get_device(), meta, *_specialization(args)))
            assert _recorded is not None
            _recorded.append(None if entry is None else (entry[4], grid, args))
            return
        if _launch_hooks_installed():  # let profilers see the launch
            self.fn[grid](*args, **_with_pinned(meta))
            if _recorded is not None:
                _recorded.append(None)
            return
        device = _get_device()
        key = (device, meta, *_specialization(args))
        entry = self._compiled.get(key)
        if entry is None:
            by_name = _with_pinned(meta)
            compiled = self.fn[grid](*args, **by_name)  # compiles (or finds) and launches
            compiled._init_handles()
            constexprs = tuple(by_name.get(n) for n in self._constexpr_names)
            # the launcher object (Triton's driver launcher), the CUfunction, the metadata
            self._compiled[key] = (
                compiled.run,
                compiled.function,
                compiled.packed_metadata,
                constexprs,
                compiled,
            )
            if _recorded is not None:
                _recorded.append((compiled, grid, args))
            return
        run, function, packed_metadata, constexprs, compiled = entry
        if _recorded is not None:
            _recorded.append((compiled, grid, args))
        run(
            grid[0],
            grid[1] if len(grid) > 1 else 1,
            grid[2] if len(grid) > 2 else 1,
            _get_stream(device),
            function,
            packed_metadata,
            None,  # launch metadata: only built for launch hooks
            None,
            None,
            *args,
            *constexprs,  # the C launcher skips them, but they keep their places
        )
