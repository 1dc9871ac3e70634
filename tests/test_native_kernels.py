"""The C++ CPU kernels of ``rms_norm`` / ``fused_add_rms_norm`` (fusion_ops/native) behave as
the Python kernels they replace: the reference's bytes, the same errors, the same backend
selection and ``last_backend``."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fusion_ops
from fusion_ops import backends, native
from fusion_ops.library import QUICK_CHECKS, native_kernels
from fusion_ops.reference import norm as ref_norm

from .test_quick_validation import norm_args

ops = torch.ops.fusion_ops
REFERENCE = {"rms_norm": ref_norm.rms_norm, "fused_add_rms_norm": ref_norm.fused_add_rms_norm}
FLOATS = [torch.bfloat16, torch.float16, torch.float32]


def test_native_kernels_are_built_here() -> None:
    """The suite runs the C++ kernels (a failed build would silently test the Python ones)."""
    if os.environ.get(native.ENV_VAR, "1").strip() == "0":
        pytest.skip(f"{native.ENV_VAR}=0")
    assert native_kernels()
    for name in native.NATIVE_CPU_OPS:
        assert hasattr(ops, f"_python_{name}")
        assert "CPU: registered at" in torch._C._dispatch_dump(f"fusion_ops::{name}")


needs_native = pytest.mark.skipif(not native_kernels(), reason="C++ CPU kernels not loaded")


def outputs(result: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return result if isinstance(result, tuple) else (result,)


def assert_bit_equal(a, b) -> None:  # type: ignore[no-untyped-def]
    for u, v in zip(outputs(a), outputs(b), strict=True):
        assert u.dtype == v.dtype and u.shape == v.shape
        if u.numel():  # bytes, so that NaNs compare too
            assert torch.equal(u.contiguous().view(torch.uint8), v.contiguous().view(torch.uint8))


@st.composite
def valid_norm_args(draw, with_residual: bool) -> tuple:
    """Random values, any float dtypes, 1-3 dims, strided (sliced/transposed) inputs."""
    k = draw(st.sampled_from([1, 16, 40, 256, 1000]))
    lead = tuple(draw(st.lists(st.integers(0, 5), max_size=2)))
    dtype = draw(st.sampled_from(FLOATS))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    scale = draw(st.sampled_from([1e-3, 1.0, 300.0]))

    def tensor(shape: tuple[int, ...], dt: torch.dtype) -> torch.Tensor:
        t = torch.randn(shape, generator=gen) * scale
        if draw(st.booleans()) and len(shape) >= 1:  # a non-contiguous view of the same values
            t = torch.randn((*shape[:-1], shape[-1] + 3), generator=gen)[..., :k] * scale
        return t.to(dt)

    x = tensor((*lead, k), dtype)
    w = (1 + 0.1 * torch.randn(k, generator=gen)).to(draw(st.sampled_from(FLOATS)))
    eps = draw(st.sampled_from([1e-6, 1e-5, 0.0, 0.5]))
    if not with_residual:
        return (x, w, eps)
    return (x, tensor((*lead, k), dtype), w, eps)


@needs_native
@settings(max_examples=150, deadline=None, derandomize=True)
@given(data=st.data())
def test_native_equals_reference_bit_for_bit(data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(native.NATIVE_CPU_OPS))
    args = data.draw(valid_norm_args(with_residual=name == "fused_add_rms_norm"))
    got = getattr(ops, name)(*args)
    assert backends._LAST_USED.get(name, ("", 0))[1] < native.last_run(name)[0]  # C++ ran it
    assert_bit_equal(got, REFERENCE[name](*args))
    assert_bit_equal(got, getattr(ops, f"_python_{name}")(*args))


@needs_native
@settings(max_examples=200, deadline=None, derandomize=True)
@given(data=st.data())
def test_native_errors_are_the_python_kernels(data: st.DataObject) -> None:
    """Whatever the full validation rejects, the op rejects with the same type and message."""
    name = data.draw(st.sampled_from(native.NATIVE_CPU_OPS))
    args = data.draw(norm_args(with_residual=name == "fused_add_rms_norm"))
    validate, _ = QUICK_CHECKS[name]
    try:
        validate(*args)
    except (TypeError, ValueError) as expected:
        with pytest.raises(type(expected)) as raised:
            getattr(ops, name)(*args)
        assert str(raised.value) == str(expected)
    else:
        assert_bit_equal(getattr(ops, name)(*args), REFERENCE[name](*args))


def _single_faults() -> list[tuple[str, tuple]]:
    """Valid arguments with exactly one check broken: every clause of the C++ quick test."""
    x, w, r = torch.zeros(2, 16), torch.ones(16), torch.zeros(2, 16)
    norm = [
        (x, w, -1.0),
        (x, w, float("nan")),
        (x, w[:8], 1e-6),
        (x, w[None], 1e-6),
        (torch.tensor(1.0), w[:1], 1e-6),
        (x.int(), w, 1e-6),
        (x, w.int(), 1e-6),
        (x.double(), w, 1e-6),
    ]
    add = [(a[0], r if a[0].shape == r.shape else a[0], *a[1:]) for a in norm]
    add += [(x, r[:, :8], w, 1e-6), (x, r[:1], w, 1e-6), (x, r.half(), w, 1e-6)]
    return [("rms_norm", a) for a in norm] + [("fused_add_rms_norm", a) for a in add]


@needs_native
@pytest.mark.parametrize(("name", "args"), _single_faults())
def test_each_rejected_argument_raises_the_python_message(name: str, args: tuple) -> None:
    validate, _ = QUICK_CHECKS[name]
    with pytest.raises((TypeError, ValueError)) as expected:
        validate(*args)
    with pytest.raises(expected.type) as raised:
        getattr(ops, name)(*args)
    assert str(raised.value) == str(expected.value)


@pytest.fixture
def x_w() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(2, 64, dtype=torch.bfloat16), torch.ones(64, dtype=torch.bfloat16)


@needs_native
@pytest.mark.parametrize("value", ["reference", " AUTO ", "", "Reference\n"])
def test_env_values_that_allow_the_reference_take_the_fast_path(
    monkeypatch: pytest.MonkeyPatch, x_w: tuple[torch.Tensor, torch.Tensor], value: str
) -> None:
    monkeypatch.setenv(fusion_ops.backends.ENV_VAR, value)
    before = native.last_run("rms_norm")[0]
    ops.rms_norm(*x_w, 1e-6)
    assert native.last_run("rms_norm")[0] > before


@needs_native
def test_forced_backends_go_to_the_python_kernel(
    monkeypatch: pytest.MonkeyPatch, x_w: tuple[torch.Tensor, torch.Tensor]
) -> None:
    before = native.last_run("rms_norm")[0]
    monkeypatch.setenv(fusion_ops.backends.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="FUSION_OPS_BACKEND='bogus'"):
        ops.rms_norm(*x_w, 1e-6)
    monkeypatch.setenv(fusion_ops.backends.ENV_VAR, "triton")
    with pytest.raises((NotImplementedError, RuntimeError), match="backend 'triton' is forced"):
        ops.rms_norm(*x_w, 1e-6)
    monkeypatch.delenv(fusion_ops.backends.ENV_VAR)
    with (
        fusion_ops.use_backend("triton"),
        pytest.raises((NotImplementedError, RuntimeError), match="backend 'triton' is forced"),
    ):
        ops.fused_add_rms_norm(x_w[0], x_w[0], x_w[1], 1e-6)
    assert native.last_run("rms_norm")[0] == before  # none of these ran the C++ math
    with fusion_ops.use_backend("reference"):
        ops.rms_norm(*x_w, 1e-6)
    assert native.last_run("rms_norm")[0] > before


@needs_native
def test_last_backend_is_whichever_kernel_ran_last(
    monkeypatch: pytest.MonkeyPatch, x_w: tuple[torch.Tensor, torch.Tensor]
) -> None:
    """A GPU call through the Python kernel, then a CPU call in C++, then the GPU again: the
    Python side's record stands in for the GPU call (no GPU here)."""
    monkeypatch.setitem(backends._LAST_USED, "rms_norm", ("triton", time.monotonic_ns()))
    assert fusion_ops.last_backend("rms_norm") == "triton"
    ops.rms_norm(*x_w, 1e-6)
    assert fusion_ops.last_backend("rms_norm") == "reference"
    backends._LAST_USED["rms_norm"] = ("triton", time.monotonic_ns())
    assert fusion_ops.last_backend("rms_norm") == "triton"


def test_import_builds_nothing_and_the_first_call_switches() -> None:
    """``import fusion_ops`` loads no C++ library; the first CPU call of a native op loads it,
    returns the reference's bytes, and leaves the C++ kernel registered, without a warning."""
    if not native.enabled():
        pytest.skip(f"{native.ENV_VAR}=0")
    code = (
        "import warnings, torch, fusion_ops\n"
        "from fusion_ops.library import define\n"
        "from fusion_ops.reference import norm\n"
        "warnings.simplefilter('error')\n"
        "assert define._native_loaded is None\n"
        "assert not hasattr(torch.ops.fusion_ops_native, 'set_forced')\n"
        "dump = lambda: torch._C._dispatch_dump('fusion_ops::rms_norm')\n"
        "assert 'norm_cpu.cpp' not in dump()\n"
        "x, w = torch.randn(3, 64).half(), torch.rand(64)\n"
        "assert torch.equal(torch.ops.fusion_ops.rms_norm(x, w, 1e-6), norm.rms_norm(x, w, 1e-6))\n"
        "assert define._native_loaded is True and 'norm_cpu.cpp' in dump()\n"
        "assert fusion_ops.last_backend('rms_norm') == 'reference'\n"
        "assert torch.equal(torch.ops.fusion_ops.rms_norm(x, w, 1e-6), norm.rms_norm(x, w, 1e-6))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)


def test_without_native_kernels_the_python_kernels_run() -> None:
    """``FUSION_OPS_NATIVE=0``: no C++ kernel, no hidden op, same bytes and messages."""
    code = (
        "import torch, fusion_ops\n"
        "from fusion_ops.library import native_kernels\n"
        "from fusion_ops.reference import norm\n"
        "assert not native_kernels() and not hasattr(torch.ops.fusion_ops, '_python_rms_norm')\n"
        "x, w = torch.randn(3, 64).half(), torch.rand(64)\n"
        "assert torch.equal(torch.ops.fusion_ops.rms_norm(x, w, 1e-6), norm.rms_norm(x, w, 1e-6))\n"
        "try:\n"
        "    torch.ops.fusion_ops.rms_norm(x, w[:3], 1e-6)\n"
        "except ValueError as e:\n"
        "    print(e)\n"
    )
    env = {**os.environ, native.ENV_VAR: "0"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == (
        "fusion_ops.rms_norm: argument 'weight': has 3 elements; expected x's last dim 64"
    )


def test_replayed_ops_take_only_eps_floats() -> None:
    """The CUDA replay admits a call's float arguments where they are >= 0 (replay_cuda.cpp),
    which is every eps check's rule: every op it may serve has eps floats only."""
    from fusion_ops.library import NAMESPACE, NOT_REPLAYED_PREFIX, OP_SCHEMAS

    for name in OP_SCHEMAS:
        if name.startswith(NOT_REPLAYED_PREFIX):
            continue
        schema = torch._C.parse_schema(f"{NAMESPACE}::{name}{OP_SCHEMAS[name]}")
        floats = [a.name for a in schema.arguments if a.type.kind() == "FloatType"]
        assert all(f.endswith("eps") for f in floats), (name, floats)
