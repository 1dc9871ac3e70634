"""How an op is defined: schema, validation, fake and the backends' dispatch, in one call
(:func:`define`), and the C++ kernels of :mod:`fusion_ops.native` wired in where they exist.

The C++ kernels are built and loaded lazily: until then, the dispatch keys they will take
(``CPU`` of ``native.NATIVE_CPU_OPS``; ``CUDA`` of every replayable op on NVIDIA builds) hold a
first-call kernel. The first call of any of them (or :func:`native_kernels`) builds/loads the
library once and puts every op's final kernel in place of the first-call ones: the C++ kernel
where it loaded, else the Python kernel. Importing ``fusion_ops`` builds nothing."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch

from .. import native
from ..backends import register_impl, run_op, use_native_kernels

NAMESPACE = "fusion_ops"
_LIB = torch.library.Library(NAMESPACE, "DEF")
#: the C++ kernels may be used in this process (``FUSION_OPS_NATIVE`` is not 0)
NATIVE_ENABLED = native.enabled()
# (op, dispatch key) -> the op's Python kernel there, for every key that holds a first-call
# kernel until the C++ kernels are loaded (or found unavailable)
_PENDING: dict[tuple[str, str], Callable[..., Any]] = {}
_FIRST_CALL_LIBS: list[torch.library.Library] = []
_SWITCH_LOCK = threading.Lock()
_native_loaded: bool | None = None  # None: not tried yet
# ops whose CUDA kernel replays their Triton launch from C++ (fusion_ops.native; NVIDIA): every
# op but the tensor-parallel ones (their kernel uses a per-group workspace and may take NCCL)
NOT_REPLAYED_PREFIX = "all_reduce_"


#: name -> schema, every op defined by this module (tests iterate over it)
OP_SCHEMAS: dict[str, str] = {}
#: name -> (validate, quick) of every op with a one-expression fast path (tests check that
#: quick(*args) is True only where validate(*args) passes)
QUICK_CHECKS: dict[str, tuple[Callable[..., None], Callable[..., bool]]] = {}


def define(
    name: str,
    schema: str,
    validate: Callable[..., None],
    fake: Callable[..., Any],
    reference: Callable[..., Any],
    device_arg: int = 0,
    quick: Callable[..., bool] | None = None,
) -> None:
    """Define ``fusion_ops::name``: real kernel = validate + run the selected backend, fake =
    validate + fake.

    The real kernel is registered for the ``CPU`` and ``CUDA`` dispatch keys (the device type
    comes from the key: no per-call device lookup) and for ``CompositeExplicitAutograd`` (any
    other device); ``native.NATIVE_CPU_OPS`` have a C++ ``CPU`` kernel and, on NVIDIA, every
    op but the ``all_reduce_*`` ones a C++ ``CUDA`` kernel instead, which call this one
    (registered as ``_python_<name>``) for what they do not take themselves. ``quick(*args)``
    is an optional one-expression test that every check of ``validate`` passes; when it says False,
    ``validate`` runs and raises with the full message. The fake always runs ``validate``
    (trace time is not the hot path).
    """
    OP_SCHEMAS[name] = schema
    if quick is not None:
        QUICK_CHECKS[name] = (validate, quick)
    _LIB.define(name + schema)
    register_impl(name, "reference")(reference)
    arguments = torch._C.parse_schema(f"{NAMESPACE}::{name}{schema}").arguments
    n_args = len(arguments)
    defaults = tuple(a.default_value for a in arguments)

    def positional(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
        """Every schema argument in order, defaults filled in (the dispatcher leaves trailing
        defaults out)."""
        out = list(args)
        for a in arguments[len(args) :]:
            out.append(kwargs[a.name] if a.name in kwargs else a.default_value)
        return tuple(out)

    def kernel_for(device_type: str | None) -> Callable[..., Any]:
        def kernel(*args: Any, **kwargs: Any) -> Any:
            if kwargs:
                args = positional(args, kwargs)
            elif len(args) != n_args:
                args = (*args, *defaults[len(args) :])
            if quick is None or not quick(*args):
                validate(*args)
            return run_op(name, device_type or args[device_arg].device.type, args)

        return kernel

    def fake_impl(*args: Any, **kwargs: Any) -> Any:
        args = positional(args, kwargs)
        validate(*args)
        return fake(*args)

    _LIB.impl(name, kernel_for(None), "CompositeExplicitAutograd")
    # a C++ kernel (fusion_ops.native) hands what it does not take itself (bad input, forced
    # backends, a signature seen for the first time) to this Python kernel, under a hidden name
    native_cpu = NATIVE_ENABLED and name in native.NATIVE_CPU_OPS
    native_cuda = (
        NATIVE_ENABLED and not name.startswith(NOT_REPLAYED_PREFIX) and native.may_replay_cuda()
    )
    # (the replay admits a float argument where it is >= 0, every eps check's rule: replayed ops
    # take eps floats only, tests/test_native_kernels.py)
    if native_cpu or native_cuda:
        _LIB.define(f"_python_{name}{schema}")
    for key, device_type, lazy in (("CPU", "cpu", native_cpu), ("CUDA", "cuda", native_cuda)):
        kernel = kernel_for(device_type)
        if not lazy:
            _LIB.impl(name, kernel, key)
            continue
        recorded = native.recording_kernel(name, kernel) if key == "CUDA" else kernel
        _LIB.impl(f"_python_{name}", recorded, key)
        _PENDING[(name, key)] = kernel
        first = torch.library.Library(NAMESPACE, "IMPL")
        first.impl(name, _first_call(name), key)
        _FIRST_CALL_LIBS.append(first)
    torch.library.register_fake(f"{NAMESPACE}::{name}", fake_impl, lib=_LIB)


def _first_call(name: str) -> Callable[..., Any]:
    def kernel(*args: Any, **kwargs: Any) -> Any:
        native_kernels()
        return getattr(torch.ops.fusion_ops, name).default(*args, **kwargs)

    return kernel


def native_kernels() -> bool:
    """Build (once per machine) and load the C++ kernels of :mod:`fusion_ops.native` if that has
    not been tried in this process, and put every op's final kernels in place; True when the C++
    kernels are loaded. The first call of an op that may have a C++ kernel calls this."""
    global _native_loaded
    with _SWITCH_LOCK:
        if _native_loaded is not None:
            return _native_loaded
        # the first-call kernels go before the library loads: its static CPU registrations
        # would otherwise override kernels registered from Python (a dispatcher warning)
        for lib in _FIRST_CALL_LIBS:
            lib._destroy()
        _FIRST_CALL_LIBS.clear()
        loaded = NATIVE_ENABLED and native.load()
        for (name, key), kernel in _PENDING.items():
            if loaded and key == "CUDA" and native.replays_cuda():
                native.register_cuda_replay(name)
            elif not (loaded and key == "CPU"):  # (CPU: norm_cpu.cpp registered itself)
                _LIB.impl(name, kernel, key)
        _PENDING.clear()
        if loaded:
            use_native_kernels(native)
        _native_loaded = loaded
        return loaded
