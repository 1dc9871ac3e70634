"""fusion_ops.linear on an NVIDIA GPU: FP8 activations through torch._scaled_mm (row-wise and
block-wise), against the same codes dequantized and multiplied in fp32."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fusion_ops.linear import ActQuantConfig, ActQuantLinear, dequantize, scaled_mm_kind

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
        reason="needs an NVIDIA GPU with FP8 GEMMs (compute capability 8.9+)",
    ),
]


def weight_dequantized(layer: ActQuantLinear) -> torch.Tensor:
    w, s = layer.weight_fp8.float(), layer.weight_scale
    if layer.kind == "rowwise":  # one scale per output channel [N]
        return w * s.unsqueeze(-1)
    return w * s.repeat_interleave(128, 0).repeat_interleave(128, 1)


@pytest.mark.parametrize(
    ("scheme", "kind"), [("fp8_per_token", "rowwise"), ("fp8_group", "blockwise")]
)
@pytest.mark.parametrize("tokens", [1, 17, 64, 130, 300])  # 17, 130: padded to 4k rows
def test_scaled_mm_matches_the_dequantized_product(scheme: str, kind: str, tokens: int) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(1024, 512, bias=False, device="cuda", dtype=torch.bfloat16)
    config = ActQuantConfig(scheme)
    layer = ActQuantLinear(linear, config)
    assert layer.kind == kind == scaled_mm_kind(config, linear.weight)
    x = torch.randn(tokens, 1024, device="cuda", dtype=torch.bfloat16)
    y = layer(x)
    q, s = config.quantize(x)
    expected = dequantize(q, s, scheme, torch.float32) @ weight_dequantized(layer).t()
    err = (y.float() - expected).abs().max() / expected.abs().max()
    assert y.dtype == torch.bfloat16 and y.shape == (tokens, 512)
    assert err < 1e-2, err


def test_other_schemes_fall_back_to_the_dequantized_activation() -> None:
    linear = nn.Linear(256, 128, bias=True, device="cuda", dtype=torch.bfloat16)
    for config in (
        ActQuantConfig("mxfp4"),
        ActQuantConfig("fp8_group", use_ue8m0=False, fp8_dtype=torch.float8_e4m3fnuz),
    ):
        layer = ActQuantLinear(linear, config)
        assert layer.kind is None
        x = torch.randn(4, 256, device="cuda", dtype=torch.bfloat16)
        q, s = config.quantize(x)
        expected = nn.functional.linear(
            dequantize(q, s, config.scheme, x.dtype), linear.weight, linear.bias
        )
        assert torch.equal(layer(x), expected)
