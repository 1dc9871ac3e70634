"""fusion_ops' C++ kernels: no Python in the op call where C++ can give the same result.

* ``norm_cpu.cpp``: CPU kernels of ``rms_norm`` and ``fused_add_rms_norm``. They run the
  reference math as the same ATen calls in the same order, so the op costs about what its ATen
  calls cost (the Python kernel adds argument filling, validation, backend selection and the
  cost of each ATen call made from Python; benchmarks/overhead.py).
* ``replay_cuda.cpp`` (NVIDIA builds of torch): CUDA kernels of the norm/quant ops that replay
  the Triton launch the op's Python kernel made for the same argument signature (dtypes,
  devices, sizes, strides, alignment, non-float arguments): outputs allocated and the kernel
  launched with ``cuLaunchKernelEx`` from C++. The first call of each signature runs the Python
  kernel, recorded (:func:`offer_plan`); a signature whose Python run did more than allocate,
  view and launch through the recorder is never replayed.

Bad input and forced backends always reach the op's Python kernel (registered as the hidden op
``fusion_ops::_python_<name>``), so messages, ``FUSION_OPS_BACKEND`` / ``use_backend`` and
``last_backend`` behave as before. Replayed launches do not call Triton's launch hooks (proton):
profile with ``FUSION_OPS_NATIVE=0`` there (torch's profiler sees them).

The library is built at the first call of an op that may have a C++ kernel (or of
``fusion_ops.library.native_kernels()``, which a deployment can call at start-up), with torch's
JIT extension builder (a C++ compiler and ``ninja`` are needed; about 20 s, once per machine),
and cached in torch's extension directory (``$TORCH_EXTENSIONS_DIR``, default
``~/.cache/torch_extensions``); a later process only loads it. ``FUSION_OPS_NATIVE=0`` skips it;
a failed build warns and leaves the Python kernels in place.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

#: ops with a C++ CPU kernel (norm_cpu.cpp)
NATIVE_CPU_OPS = ("rms_norm", "fused_add_rms_norm")
ENV_VAR = "FUSION_OPS_NATIVE"
#: backend name -> the code the C++ side uses (native_common.h)
BACKEND_CODES = {None: 0, "reference": 1, "triton": 2, "aiter": 3}
_BACKEND_NAMES = {v: k for k, v in BACKEND_CODES.items()}
_DIR = Path(__file__).parent
# parameter sources of a replayed launch (replay_cuda.cpp ParamKind)
PARAM_INPUT, PARAM_OUTPUT, PARAM_I32, PARAM_I64, PARAM_F32_CONST, PARAM_F32_ARG = range(6)
PARAM_F32 = -1  # an fp32 parameter not yet known to be a constant or a float argument
# aten ops a replayable Python run may make: allocations and views (nothing that computes)
_ALLOCATIONS_AND_VIEWS = frozenset(
    {
        "aten::empty.memory_format",
        "aten::empty_strided",
        "aten::new_empty",
        "aten::new_empty_strided",
        "aten::view",
        "aten::_unsafe_view",
        "aten::_reshape_alias",
        "aten::as_strided",
        "aten::alias",
        "aten::detach",
    }
)
# the Triton versions whose launch convention replay_cuda.cpp follows (two scratch pointers
# after the kernel's own parameters)
_TRITON_VERSIONS = ("3.5.", "3.6.")
_built_with_cuda_h = False  # set by load()


@functools.cache
def _cuda_header_dir() -> str | None:
    """Triton ships cuda.h (for its own launchers); found without importing triton (once: the
    ops' definitions ask for each op at import)."""
    spec = importlib.util.find_spec("triton")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "backends/nvidia/include"
    return str(path) if (path / "cuda.h").exists() else None


def enabled() -> bool:
    """Whether the C++ kernels may be used (``FUSION_OPS_NATIVE`` is not 0)."""
    return os.environ.get(ENV_VAR, "1").strip() != "0"


def may_replay_cuda() -> bool:
    """Whether CUDA kernels would replay Triton launches once loaded: an NVIDIA build of torch
    and Triton's cuda.h at hand (what :func:`replays_cuda` says after :func:`load`)."""
    return _nvidia_torch() and bool(_cuda_header_dir())


def _nvidia_torch() -> bool:
    """A CUDA build of torch (not ROCm's)."""
    return torch.version.cuda is not None and torch.version.hip is None


def load() -> bool:
    """Build (once) and load the C++ kernels; False when disabled or the build failed."""
    if not enabled():
        return False
    global _built_with_cuda_h
    include = _cuda_header_dir()
    try:
        from torch.utils import cpp_extension

        cpp_extension.load(
            name="fusion_ops_native",
            sources=[str(_DIR / f) for f in ("common.cpp", "norm_cpu.cpp", "replay_cuda.cpp")],
            extra_cflags=["-O2", *(["-DFUSION_OPS_HAVE_CUDA_H"] if include else [])],
            extra_include_paths=[str(_DIR), *([include] if include else [])],
            is_python_module=False,
            verbose=False,
        )
    except Exception as e:  # no compiler, no ninja, an unsupported platform
        warnings.warn(
            f"fusion_ops: the C++ kernels were not built ({e}); the Python kernels run instead "
            f"(set {ENV_VAR}=0 to skip the build)",
            stacklevel=2,
        )
        return False
    _built_with_cuda_h = include is not None
    return True


def replays_cuda() -> bool:
    """Whether CUDA kernels replay Triton launches in this process: NVIDIA builds of torch, the
    library built with cuda.h (Triton's copy)."""
    return _built_with_cuda_h and _nvidia_torch()


def set_forced(backend: str | None) -> None:
    """Tell the C++ kernels which backend the API forces (None: none)."""
    torch.ops.fusion_ops_native.set_forced(BACKEND_CODES.get(backend, len(BACKEND_CODES)))


def last_run(op_name: str) -> tuple[int, str | None]:
    """(CLOCK_MONOTONIC ns, backend) of the C++ kernels' last run of ``op_name`` ((0, None):
    never)."""
    ns, code = torch.ops.fusion_ops_native.last_native_run(op_name)
    return ns, _BACKEND_NAMES.get(code)


def register_cuda_replay(op_name: str) -> None:
    torch.ops.fusion_ops_native.register_cuda_replay(op_name)


def plan_count(op_name: str) -> int:
    """How many argument signatures of ``op_name`` the CUDA kernel replays (-1: not registered)."""
    return torch.ops.fusion_ops_native.plan_count(op_name)


class _AtenOps(TorchDispatchMode):
    """Names of the aten ops run inside; ``dry``: an op other than an allocation or a view
    raises instead of running (a dry run must not compute or write anything)."""

    def __init__(self, dry: bool = False) -> None:
        super().__init__()
        self.names: set[str] = set()
        self.dry = dry

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = func.name()
        if self.dry and name not in _ALLOCATIONS_AND_VIEWS | {"aten::reshape"}:
            raise _NotReplayable(f"the Python kernel ran aten op {name}")
        out = func(*args, **(kwargs or {}))
        # reshape reaches a dispatch mode un-decomposed in some contexts (Inductor's compiled
        # code): a view when it shares its input's memory, else a copy
        if name == "aten::reshape" and _same_memory(out, args[0]):
            name = "aten::view"
        if self.dry and name not in _ALLOCATIONS_AND_VIEWS:
            raise _NotReplayable(f"the Python kernel ran aten op {name}")
        self.names.add(name)
        return out


class _NotReplayable(Exception):
    pass


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def recording_kernel(op_name: str, kernel: Any) -> Any:
    """The op's Python CUDA kernel; when the C++ kernel asks (the first call of a signature), it
    records the run and offers the plan of it (:func:`offer_plan`)."""
    from ..triton_backend import launch

    def run(*args: Any) -> Any:
        if not torch.ops.fusion_ops_native.wants_plan():
            return kernel(*args)
        aten = _AtenOps()
        with launch.recording() as launches, aten:
            out = kernel(*args)
        refusal = offer_plan(op_name, args, out, launches, aten.names, kernel)
        if refusal is not None:
            REFUSALS[op_name] = refusal
        return out

    return run


#: op -> why the last signature recorded for it got no plan (debugging: "why is my call slow?")
REFUSALS: dict[str, str] = {}

Launches = Sequence[tuple[Any, tuple[int, ...], tuple[Any, ...]] | None]


def offer_plan(
    op_name: str,
    args: Sequence[Any],
    out: Any,
    launches: Launches,
    aten_ops: set[str],
    kernel: Any,
) -> str | None:
    """Hand the C++ kernel the plan of one recorded Python run of ``op_name`` on ``args`` (every
    schema argument in order), if the run can be replayed from its signature alone. Returns
    None when a plan was offered, else why not (the caller keeps it in :data:`REFUSALS`);
    without a plan the signature always runs the Python kernel.

    Float arguments are not part of the signature. Which kernel parameter carries which float
    argument is found by running ``kernel`` again *dry* (recording its launches, launching
    nothing, computing nothing) once per float argument with that argument changed: a
    parameter that takes exactly the changed value is that argument, one that never changes is
    a constant, and anything else (a parameter computed from a float, launches that depend on
    one) gets no plan. The plan admits a float argument from ``INV_RMS_BY_FMA_MIN_EPS``
    on (the floats are eps values; below that the norm kernels take other 1/rms steps, a
    constexpr): one more dry run at that value must give the same launches, and a run with a
    smaller value gets no plan.
    """
    from .. import backends
    from ..launch_policy import INV_RMS_BY_FMA_MIN_EPS

    if not aten_ops <= _ALLOCATIONS_AND_VIEWS:
        return f"the Python kernel ran aten ops {sorted(aten_ops - _ALLOCATIONS_AND_VIEWS)}"
    backend = backends.last_backend(op_name)
    if backend != "triton":
        return f"backend {backend!r} ran it"
    import triton

    if not triton.__version__.startswith(_TRITON_VERSIONS):
        return f"Triton {triton.__version__}: launch convention not verified"
    inputs = {i: a.data_ptr() for i, a in enumerate(args) if _is_data(a)}
    if len(set(inputs.values())) != len(inputs):
        return "aliased inputs: pointer sources ambiguous"
    base = _encode_run(args, out, launches)
    if isinstance(base, str):
        return base
    floats = [i for i, a in enumerate(args) if isinstance(a, float)]
    float_params: dict[tuple[int, int], int] = {}  # (launch, parameter) -> float argument
    float_min = INV_RMS_BY_FMA_MIN_EPS
    for i in floats:
        if not args[i] >= float_min:
            return f"float argument {i} is {args[i]}, below {float_min}"
        changed = list(args)
        changed[i] = abs(args[i]) * 2 + 0.5 + 0.125 * i
        if not changed[i] > args[i]:  # inf: no other value to tell it by
            return f"float argument {i} is {args[i]}"
        lowest = list(args)
        lowest[i] = float_min
        other = _dry_run(kernel, changed, base)
        if isinstance(other, str):
            return f"with another value of float argument {i}: {other}"
        at_min = _dry_run(kernel, lowest, base)
        if isinstance(at_min, str):
            return f"with float argument {i} at {float_min}: {at_min}"
        for li, ((_, p0), (_, p1)) in enumerate(zip(base, other, strict=True)):
            for pi, ((kind, a0), (_, a1)) in enumerate(zip(p0, p1, strict=True)):
                if a0 == a1:
                    continue
                if kind != PARAM_F32 or a0 != args[i] or a1 != changed[i]:
                    return f"a kernel parameter is computed from float argument {i}"
                if (li, pi) in float_params:
                    return "a kernel parameter depends on two float arguments"
                float_params[(li, pi)] = i
    ints: list[int] = [len(base)]
    consts: list[float] = []
    for li, (header, params) in enumerate(base):
        ints += header
        ints.append(len(params))
        for pi, (kind, a) in enumerate(params):
            if kind == PARAM_F32:
                if (li, pi) in float_params:
                    kind, a = PARAM_F32_ARG, float_params[(li, pi)]
                else:
                    kind, a = PARAM_F32_CONST, len(consts)
                    consts.append(params[pi][1])
            ints += [kind, int(a)]
    outputs = _outputs(out)
    assert not isinstance(outputs, str)
    torch.ops.fusion_ops_native.offer_plan(ints, consts, list(outputs), floats, float_min)
    return None


def _dry_run(kernel: Any, args: list[Any], base: Any) -> Any:
    """The encoded launches of ``kernel(*args)`` run dry, or why they cannot stand for ``base``'s
    (another launch sequence, kernel or parameter kinds)."""
    from ..triton_backend import launch

    aten = _AtenOps(dry=True)
    try:
        with launch.recording(dry=True) as dry_launches, aten:
            dry_out = kernel(*args)
    except Exception as e:  # _NotReplayable, or the kernel refused the value
        return f"{type(e).__name__}: {e}"
    run = _encode_run(args, dry_out, dry_launches)
    if isinstance(run, str):
        return run
    if [(h, [k for k, _ in p]) for h, p in run] != [(h, [k for k, _ in p]) for h, p in base]:
        return "it changes the launches"
    return run


def _outputs(out: Any) -> tuple[torch.Tensor, ...] | str:
    """The run's outputs as the C++ kernel returns them (None: an op returning nothing)."""
    outputs = () if out is None else tuple(out) if isinstance(out, (tuple, list)) else (out,)
    if not all(_fresh_contiguous(t) for t in outputs):
        return "an output is not a whole fresh contiguous buffer"
    return outputs


def _encode_run(
    args: Sequence[Any], out: Any, launches: Launches
) -> list[tuple[list[int], list[tuple[int, Any]]]] | str:
    """Each launch of one run as (its header in replay_cuda.cpp's encoding: function, grid,
    warps, shared memory, PDL; its parameters as (kind, a), fp32 ones as (PARAM_F32, value)
    until resolved), or why it cannot be replayed."""
    if any(launch is None for launch in launches):
        return "a launch went through Triton's JIT path (launch hooks installed, or not compiled)"
    outputs = _outputs(out)
    if isinstance(outputs, str):
        return outputs
    by_ptr = {a.data_ptr(): (PARAM_INPUT, i) for i, a in enumerate(args) if _is_data(a)}
    outs = {a.data_ptr(): (PARAM_OUTPUT, k) for k, a in enumerate(outputs) if _is_data(a)}
    if set(by_ptr) & set(outs):
        return "an output shares an input's memory"
    by_ptr.update(outs)
    encoded = []
    for compiled, grid, values in launches:  # type: ignore[misc]
        params = _encode_params(compiled, values, by_ptr)
        if isinstance(params, str):
            return params
        header = _launch_header(compiled, grid)
        if isinstance(header, str):
            return header
        encoded.append((header, params))
    return encoded


def _is_data(a: Any) -> bool:
    return isinstance(a, torch.Tensor) and a.numel() > 0


def _fresh_contiguous(t: Any) -> bool:
    """An output the C++ kernel can allocate itself: a whole fresh contiguous buffer."""
    if not isinstance(t, torch.Tensor):
        return False
    if t.numel() == 0:
        return True
    return (
        t.is_contiguous()
        and t.storage_offset() == 0
        and t.untyped_storage().nbytes() == t.numel() * t.element_size()
    )


def _launch_header(compiled: Any, grid: tuple[int, ...]) -> list[int] | str:
    md = compiled.metadata
    if (
        getattr(md, "num_ctas", 1) != 1
        or getattr(md, "global_scratch_size", 0)
        or getattr(md, "profile_scratch_size", 0)
        or getattr(md, "launch_cooperative_grid", False)
    ):
        return "a launch needs clusters, scratch memory or a cooperative grid"
    g = (*grid, 1, 1)[:3]
    return [
        int(compiled.function),
        *map(int, g),
        int(md.num_warps),
        int(md.shared),
        int(bool(getattr(md, "launch_pdl", False))),
    ]


def _encode_params(
    compiled: Any, values: Sequence[Any], by_ptr: dict[int, tuple[int, int]]
) -> list[tuple[int, Any]] | str:
    """A launch's runtime parameters as (kind, a); fp32 ones as (PARAM_F32, value)."""
    types = list(compiled.src.signature.values())
    params: list[tuple[int, Any]] = []
    for value, ty in zip(values, types, strict=False):
        if ty == "constexpr":
            continue
        if ty.startswith("*"):
            if not _is_data(value) or value.data_ptr() not in by_ptr:
                return "a pointer parameter is neither an input's nor an output's memory"
            params.append(by_ptr[value.data_ptr()])
        elif ty in ("i32", "i64") and type(value) is int:
            params.append((PARAM_I32 if ty == "i32" else PARAM_I64, value))
        elif ty == "fp32" and isinstance(value, float):
            params.append((PARAM_F32, value))
        else:
            return f"a parameter of type {ty} ({type(value).__name__})"
    return params
