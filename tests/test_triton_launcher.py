"""The cached Triton launcher's specialization key (CPU-checkable; launches: pytest -m gpu)."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton", reason="the Triton backend needs triton")
launch = pytest.importorskip("fusion_ops.triton_backend.launch")
from fusion_ops import launch_policy  # noqa: E402


def test_next_power_of_2_equals_tritons() -> None:
    for n in [*range(1, 5000), 7168, 8191, 8192, 8193, 2**20 + 1]:
        assert launch_policy.next_power_of_2(n) == triton.next_power_of_2(n), n


def test_key_separates_what_triton_specializes_on() -> None:
    base = torch.zeros(64, dtype=torch.bfloat16)
    key = launch._specialization
    assert key((base, 7168, 1e-6)) == key((torch.zeros(64, dtype=torch.bfloat16), 7168, 0.5))
    assert key((base,)) != key((base.float(),))  # dtype
    assert key((base,)) != key((base[1:],))  # a 2-byte offset: no 16-byte alignment
    assert key((base[8:],)) == key((base,))  # 16 bytes in: still aligned
    assert key((16,)) != key((17,)) != key((1,))  # divisible by 16 / neither / equal to 1
    assert key((2**31,)) != key((2**31 - 16,))  # 64-bit ints
    assert key((True,)) != key((False,))  # bools by value


def test_launcher_requires_trailing_constexprs() -> None:
    from fusion_ops.triton_backend import kernels

    launch.Launcher(kernels.norm_quant_kernel)  # runtime arguments, then constexprs: fine

    @triton.jit
    def interleaved(x_ptr, N: triton.language.constexpr, y_ptr):
        pass

    with pytest.raises(TypeError, match="constexpr parameters must come last"):
        launch.Launcher(interleaved)
