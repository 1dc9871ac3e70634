"""Independent scalar encoders of the documented formats, written from the contract (README /
shared DESIGN.md), not from fusion_ops' code: plain Python floats and bytes, one value at a time.

torch is used only to round an fp32 value to an FP8 format (``fp8_byte``), which is torch's
conversion, not the code under test.
"""

from __future__ import annotations

import math
import struct

import torch

FP4 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def f32(v: float) -> float:
    """Round a Python float to fp32."""
    return struct.unpack("<f", struct.pack("<f", v))[0]


def f32_bits(v: float) -> int:
    return struct.unpack("<I", struct.pack("<f", v))[0]


def bits_f32(b: int) -> float:
    return struct.unpack("<f", struct.pack("<I", b & 0xFFFFFFFF))[0]


def fp8_byte(v: float, dtype: torch.dtype) -> int:
    """torch's RNE conversion of the fp32 value v to ``dtype`` (v already within range)."""
    return int(torch.tensor([v], dtype=torch.float32).to(dtype).view(torch.uint8)[0])


def fp4_code(q: float) -> int:
    """Nearest E2M1 magnitude, ties away from zero, saturating at 6; sign in bit 3."""
    sign = 8 if math.copysign(1.0, q) < 0 else 0
    if math.isnan(q):
        return sign
    mag = abs(q)
    best = 0
    for i, v in enumerate(FP4):
        if abs(mag - v) <= abs(mag - FP4[best]):  # '<=' → the larger value wins a tie
            best = i
    return best | sign


def mxfp4_block(values: list[float]) -> tuple[list[int], int]:
    """32 fp32 values -> (32 codes, scale byte)."""
    if any(math.isnan(v) for v in values):
        return [fp4_code(math.copysign(0.0, v)) for v in values], 255
    amax = max(abs(v) for v in values)
    rounded = bits_f32((f32_bits(amax) + 0x200000) & 0xFF800000)
    if rounded == 0:
        u = -127
    elif math.isinf(rounded):
        u = 127
    else:
        u = max(-127, min(127, int(math.floor(math.log2(rounded))) - 2))
    return [fp4_code(v * 2.0**-u) for v in values], u + 127


def mxfp8_block(values: list[float]) -> tuple[list[int], int]:
    """32 fp32 values -> (32 e4m3fn bytes, scale byte)."""
    amax = max((abs(v) for v in values), default=0.0)
    if any(math.isnan(v) for v in values):
        byte = 255
    elif math.isinf(amax):
        byte = 254
    else:
        a = max(amax, 2.0**-126)
        e = math.ceil(math.log2(a / 448.0))
        byte = max(0, min(254, e + 127))
    exp = 127 if byte == 255 else byte - 127
    codes = []
    for v in values:
        q = v * 2.0**-exp
        q = q if math.isnan(q) else max(-448.0, min(448.0, q))
        codes.append(fp8_byte(q, torch.float8_e4m3fn))
    return codes, byte


def fp8_group(values: list[float], use_ue8m0: bool, dtype: torch.dtype) -> tuple[list[int], float]:
    """One group of fp32 values -> (fp8 bytes, fp32 scale)."""
    fmax = float(torch.finfo(dtype).max)
    amax = max(abs(v) for v in values)
    if any(math.isnan(v) for v in values):
        s = math.nan
    else:
        s = max(f32(amax / fmax), f32(1.0 / (fmax * 512.0)))
        if use_ue8m0 and math.isfinite(s):
            s = 2.0 ** math.ceil(math.log2(s))
    codes = []
    for v in values:
        q = f32(v / s) if not (math.isinf(v) and math.isinf(s)) else math.nan
        q = q if math.isnan(q) else max(-fmax, min(fmax, q))
        codes.append(fp8_byte(q, dtype))
    return codes, s


def dsv4_encode_token(kv: list[float], rope_bf16_bytes: bytes) -> tuple[bytes, bytes]:
    """One token (512 bf16-exact values, plus the bf16 bytes of dims 448..511) ->
    (576 data bytes, 8 scale bytes), as vLLM 0.33.0's fp8_ds_mla cache lays it out
    (vllm/models/deepseek_v4/attention.py, cache_utils.py)."""
    data = bytearray()
    scales = bytearray()
    for tile in range(7):
        vals = kv[tile * 64 : (tile + 1) * 64]
        if not all(math.isfinite(v) for v in vals):
            data += bytes([0x7F] * 64)
            scales.append(255)
            continue
        amax = max(max(abs(v) for v in vals), f32(1e-4))
        e = math.ceil(math.log2(amax / 448.0))
        for v in vals:
            data.append(fp8_byte(max(-448.0, min(448.0, v * 2.0**-e)), torch.float8_e4m3fn))
        scales.append(max(0, min(255, e + 127)))
    data += rope_bf16_bytes
    scales.append(0)
    return bytes(data), bytes(scales)
