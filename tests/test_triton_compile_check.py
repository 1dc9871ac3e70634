"""The AMD/NVIDIA compile check covers every Triton kernel (CI runs the check itself: .ci/run)."""

from __future__ import annotations

import inspect

import pytest

triton = pytest.importorskip("triton", reason="the compile check needs triton (CI installs it)")
compile_check = pytest.importorskip("fusion_ops.triton_backend.compile_check")
from fusion_ops.triton_backend import kernels  # noqa: E402


def launched_kernels() -> set[str]:
    """Every @triton.jit kernel the backend launches (names end in _kernel)."""
    return {
        name
        for name, obj in inspect.getmembers(kernels)
        if isinstance(obj, triton.runtime.jit.JITFunction) and name.endswith("_kernel")
    }


def test_every_kernel_has_compile_cases() -> None:
    covered = {case.kernel.__name__ for case in compile_check.cases()}
    assert launched_kernels() - covered == set()


def test_every_case_names_each_runtime_argument_and_constexpr() -> None:
    for case in compile_check.cases():
        names = case.kernel.arg_names
        given = [*case.types, *case.constexprs]
        assert sorted(given) == sorted(names), case.name


def test_one_kernel_compiles_for_every_target() -> None:
    """A real compile per target (the full matrix runs in CI: ~2 minutes on 2 cores)."""
    case = next(c for c in compile_check.cases() if "mxfp4" in c.name)
    for name, target in compile_check.TARGETS.items():
        sizes = compile_check.compile_to_isa(case, target, with_cubin=False)
        assert list(sizes)[-1] == ("amdgcn" if target.backend == "hip" else "ptx"), name
