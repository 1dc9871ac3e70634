"""Triton kernels of every fusion_ops op (NVIDIA and AMD: no vendor-only launch options).

Bit-exactness with the reference backend rests on three rules:
* exponents are taken from float bits and powers of two are built from bits (no log2/exp2 calls,
  whose last ulp differs between vendors); no float is ever cast straight to an unsigned int
  (AITER's MXFP4 scale bug on NVIDIA: a negative fp32 → uint8 cast saturates to 0 in PTX);
* RoPE kernels are compiled with ``enable_fp_fusion=False`` so ``a·cos − b·sin`` rounds after
  each operation like the torch reference, not through an FMA;
* clamps keep NaN explicitly (hardware min/max drop it).
The norm's sum of squares comes from a load used only for it (see _sum_of_squares), so the
fused and the standalone norm kernels round identically.

One module per subject: :mod:`.numerics` (primitives), :mod:`.quant` (quantizers of a tile),
:mod:`.norm_quant` (row kernels), :mod:`.all_reduce` (tensor parallel), :mod:`.rope_cache`
(RoPE, cache write, dequant). Launchers name a kernel as ``kernels.<name>``.
"""

from .all_reduce import (
    _await_row,
    _await_sum,
    _send_row,
    _slot_row,
    all_reduce_norm_quant_kernel,
)
from .norm_quant import (
    _add_and_norm,
    _load_piece,
    _norm_quant_part,
    _norm_quant_pieces,
    _norm_quant_row,
    _norm_quant_split,
    _pdl_start_with_weight,
    _row_inv_rms,
    _row_normed_amax_bits,
    norm_quant_kernel,
    q_kv_norm_quant_kernel,
)
from .numerics import (
    _approx_f32,
    _bits,
    _ceil_log2,
    _ceil_log2_ratio_448,
    _clamp_keep_nan,
    _inv_rms,
    _mean_by_fma,
    _mul_rn,
    _pdl_start,
    _pow2,
    _rcp_by_fma,
    _rcp_sqrt_by_fma,
    _sum_of_squares,
    _sum_of_squares_of,
)
from .quant import (
    SCHEME_FP8,
    SCHEME_MXFP4,
    SCHEME_MXFP8,
    SCHEME_NONE,
    _amax_bits_and_nan,
    _div_by_rcp,
    _e2m1_code,
    _e2m1_code_short,
    _fp8_groups,
    _fp8_scale,
    _fp8_token_part,
    _fp8_values,
    _mxfp4,
    _mxfp8,
)
from .rope_cache import (
    _cast_fp8_like_compiled,
    _requested_block,
    _rope_row,
    _rope_write_kv,
    _write_dsv4_slot,
    _write_slot,
    cache_write_kernel,
    dequant_dsv4_kernel,
    gather_rows_kernel,
    norm_rope_cache_kernel,
    qnorm_rope_cache_kernel,
    rope_cache_kernel,
    rope_kernel,
)

__all__ = [
    "_pow2",
    "_ceil_log2_ratio_448",
    "_ceil_log2",
    "_clamp_keep_nan",
    "_sum_of_squares",
    "_sum_of_squares_of",
    "_inv_rms",
    "_mean_by_fma",
    "_rcp_sqrt_by_fma",
    "_rcp_by_fma",
    "_approx_f32",
    "_bits",
    "_pdl_start",
    "_mul_rn",
    "SCHEME_NONE",
    "SCHEME_MXFP4",
    "SCHEME_MXFP8",
    "SCHEME_FP8",
    "_mxfp4",
    "_amax_bits_and_nan",
    "_e2m1_code",
    "_e2m1_code_short",
    "_mxfp8",
    "_fp8_groups",
    "_fp8_scale",
    "_fp8_token_part",
    "_fp8_values",
    "_div_by_rcp",
    "norm_quant_kernel",
    "_pdl_start_with_weight",
    "_norm_quant_row",
    "_norm_quant_pieces",
    "_row_inv_rms",
    "_load_piece",
    "_norm_quant_part",
    "_norm_quant_split",
    "_row_normed_amax_bits",
    "_add_and_norm",
    "q_kv_norm_quant_kernel",
    "all_reduce_norm_quant_kernel",
    "_await_row",
    "_send_row",
    "_await_sum",
    "_slot_row",
    "_rope_row",
    "rope_kernel",
    "_write_dsv4_slot",
    "_write_slot",
    "cache_write_kernel",
    "rope_cache_kernel",
    "_rope_write_kv",
    "norm_rope_cache_kernel",
    "qnorm_rope_cache_kernel",
    "_cast_fp8_like_compiled",
    "_requested_block",
    "dequant_dsv4_kernel",
    "gather_rows_kernel",
]
