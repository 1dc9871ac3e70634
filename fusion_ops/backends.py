"""Backend registry: which implementation runs an op, per call.

Every op of ``torch.ops.fusion_ops`` runs through :func:`run_op` (called from the op's kernel,
registered per dispatch key), which picks an implementation from the device type of the call's
tensors and from what is importable:

1. ``aiter``     on ROCm GPUs, when ``import aiter`` works and the op has an AITER implementation;
2. ``triton``    on CUDA/ROCm GPUs, when ``import triton`` works and the op has a Triton kernel;
3. ``reference`` everywhere (pure torch, defines the numerics).

An override forces one backend for every op: the environment variable
``FUSION_OPS_BACKEND=<name>`` (read at every call), or the API :func:`set_backend` /
:func:`use_backend` (which wins over the variable). A forced backend that has no implementation
for an op, or that cannot run on the tensors' device, raises instead of silently falling back.

Backends add themselves with :func:`register_impl`; callers never change.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

BACKENDS = ("aiter", "triton", "reference")  # auto-selection preference order
ENV_VAR = "FUSION_OPS_BACKEND"

_IMPLS: dict[str, dict[str, Callable[..., Any]]] = {}
_FORCED: str | None = None
# op -> (backend, CLOCK_MONOTONIC ns) of its last run through run_op
_LAST_USED: dict[str, tuple[str, int]] = {}
# fusion_ops.native when its C++ kernels are loaded: they run backends without run_op, so they
# are told of forced backends and asked when they last ran
_NATIVE: Any = None
_IMPORTABLE: dict[str, bool] = {}
# (op, device type, forced backend) -> (backend, implementation): what is registered and
# importable does not change between calls, so the search runs once per key (cleared when a
# backend registers); the per-call cost is one env read and one dict lookup
_SELECTED: dict[tuple[str, str, str | None], tuple[str, Callable[..., Any]]] = {}


def register_impl(op_name: str, backend: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register ``fn`` as ``backend``'s implementation of ``fusion_ops::<op_name>``."""
    if backend not in BACKENDS:
        raise ValueError(f"register_impl: unknown backend {backend!r}; expected one of {BACKENDS}")

    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        _IMPLS.setdefault(op_name, {})[backend] = fn
        _SELECTED.clear()
        return fn

    return decorator


def set_backend(name: str | None) -> None:
    """Force ``name`` for every op (``None`` restores automatic selection)."""
    if name is not None and name not in BACKENDS:
        raise ValueError(
            f"set_backend: unknown backend {name!r}; expected one of {BACKENDS} or None"
        )
    global _FORCED
    _FORCED = name
    if _NATIVE is not None:
        _NATIVE.set_forced(name)


def use_native_kernels(native: Any) -> None:
    """Called once by :mod:`fusion_ops.library.define` when the C++ kernels are loaded."""
    global _NATIVE
    _NATIVE = native
    native.set_forced(_FORCED)


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Context manager form of :func:`set_backend`."""
    previous = _FORCED
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


_environ_get = os.environ.get
_monotonic_ns = time.monotonic_ns


def forced_backend() -> str | None:
    """The backend forced by the API or by ``FUSION_OPS_BACKEND``, or ``None``."""
    if _FORCED is not None:
        return _FORCED
    raw = _environ_get(ENV_VAR)
    return _parse_env(raw) if raw else None


def _parse_env(raw: str) -> str | None:
    env = raw.strip().lower()
    if not env or env == "auto":
        return None
    if env not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={env!r}: expected one of {BACKENDS} or 'auto'")
    return env


def _importable(module: str) -> bool:
    if module not in _IMPORTABLE:
        try:
            ok = importlib.util.find_spec(module) is not None
            if ok and module == "aiter":  # aiter's __init__ needs ROCm: only a real import tells
                importlib.import_module("aiter")
        except Exception:
            ok = False
        _IMPORTABLE[module] = ok
    return _IMPORTABLE[module]


# modules that register a GPU backend's implementations, imported on first GPU use
_BACKEND_MODULES = {"triton": "fusion_ops.triton_backend", "aiter": "fusion_ops.aiter_backend"}
_LOADED: set[str] = set()


def _can_run(backend: str, device: torch.device) -> bool:
    if backend == "reference":
        return True
    if device.type != "cuda":
        return False
    if backend == "aiter":
        ok = torch.version.hip is not None and _importable("aiter")
    else:
        ok = _importable("triton")
    if ok and backend not in _LOADED and backend in _BACKEND_MODULES:
        _LOADED.add(backend)
        importlib.import_module(_BACKEND_MODULES[backend])
    return ok


def select_backend(op_name: str, device: torch.device) -> str:
    """Name of the backend that runs ``op_name`` on ``device`` now."""
    return _selected(op_name, device.type, forced_backend())[0]


def _selected(op_name: str, device_type: str, forced: str | None) -> tuple[str, Callable[..., Any]]:
    key = (op_name, device_type, forced)
    selected = _SELECTED.get(key)
    if selected is None:
        backend = _select(op_name, torch.device(device_type), forced)
        selected = _SELECTED[key] = (backend, _IMPLS[op_name][backend])
    return selected


def _select(op_name: str, device: torch.device, forced: str | None) -> str:
    if device.type == "cuda":  # load the GPU backends before looking at what is registered
        for backend in _BACKEND_MODULES:
            _can_run(backend, device)
    impls = _IMPLS.get(op_name, {})
    if forced is not None:
        if forced not in impls:
            raise NotImplementedError(
                f"fusion_ops.{op_name}: backend {forced!r} is forced but has no implementation of "
                f"this op (available: {sorted(impls)})"
            )
        if not _can_run(forced, device):
            raise RuntimeError(
                f"fusion_ops.{op_name}: backend {forced!r} is forced but cannot run on device "
                f"{device} (triton/aiter need a CUDA/ROCm GPU; aiter needs ROCm and `import aiter`)"
            )
        return forced
    for backend in BACKENDS:
        if backend in impls and _can_run(backend, device):
            return backend
    raise NotImplementedError(f"fusion_ops.{op_name}: no backend can run on device {device}")


def run_op(op_name: str, device_type: str, args: tuple[Any, ...]) -> Any:
    """Run ``op_name`` on ``args`` (validated, defaults filled in) with the backend selected for
    ``device_type``: the hot path of every op call (an env read and a dict lookup)."""
    backend, impl = _selected(op_name, device_type, forced_backend())
    _LAST_USED[op_name] = (backend, _monotonic_ns())
    return impl(*args)


def implementation(op_name: str, backend: str) -> Callable[..., Any]:
    """``backend``'s implementation of ``op_name`` (its module is imported if needed); used by
    backends that hand the calls they do not cover to another backend."""
    if backend in _BACKEND_MODULES and backend not in _LOADED:
        _LOADED.add(backend)
        importlib.import_module(_BACKEND_MODULES[backend])
    return _IMPLS[op_name][backend]


def last_backend(op_name: str) -> str | None:
    """The backend that ran ``op_name`` most recently in this process (``None`` if never run)."""
    backend, ran_ns = _LAST_USED.get(op_name, (None, 0))
    if _NATIVE is not None:
        native_ns, native_backend = _NATIVE.last_run(op_name)
        if native_ns > ran_ns:  # a C++ kernel ran it last
            return native_backend
    return backend


def implementations(op_name: str) -> tuple[str, ...]:
    """The backends that implement ``op_name``."""
    return tuple(b for b in BACKENDS if b in _IMPLS.get(op_name, {}))
