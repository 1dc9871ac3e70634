"""The op vocabulary: every ``torch.ops.fusion_ops`` op, its schema, validation and fake.

Each op is defined once here: schema → validation → dispatch to a backend (see
:mod:`fusion_ops.backends`). Fakes validate too, so bad input fails at trace time under
``torch.compile`` with the same message as in eager.

Standalone ops (what models call)::

    rms_norm(x, weight, eps) -> y
    fused_add_rms_norm(x, residual, weight, eps) -> (y, residual_out)
    <scheme>_quant(x, *scheme_params) -> (q, scales)            (schemes: fusion_ops.schemes)
    rope(positions, x, cos_sin_cache, rope_dim, is_neox) -> x_rotated
    mla_cache_write(kv, kv_cache!, slot_mapping, layout) -> ()
    dequant_cache(kv_cache, block_ids, layout) -> kv [len(block_ids)·block_size, head_dim]

Fused ops (what the passes substitute; same numbers as the standalone sequence)::

    rms_norm_<scheme>_quant(x, weight, eps, *scheme_params, return_normed=False,
                            weight_after_rounding=False) -> (q, scales, normed_or_empty)
    add_rms_norm_<scheme>_quant(x, residual, weight, eps, *scheme_params, return_normed=False,
                                weight_after_rounding=False, norm_unrounded_sum=False)
        -> (q, scales, residual_out, normed_or_empty)
    rope_mla_cache_write(positions, q, kv, cos_sin_cache, kv_cache!, slot_mapping, rope_dim,
                         is_neox, layout) -> (q_rotated, kv_rotated)
    dequant_cache_fp8(kv_cache, block_ids, layout, fp8_dtype) -> fp8 [n·block_size, head_dim]
    rms_norm_rope_mla_cache_write(positions, x, weight, eps, cos_sin_cache, kv_cache!,
                                  slot_mapping, rope_dim, is_neox, layout, out_dtype=None)
        -> kv_rotated      (a kv-only chain: rms_norm → [cast to out_dtype] → rope → write)

Two norms of the same rows in one op (q_kv_norm: the q-lora and kv norms of one split
projection; the first may be quantized, flags as ``rms_norm_<scheme>_quant``'s)::

    q_kv_rms_norm(q, q_weight, q_eps, kv, kv_weight, kv_eps) -> (q_normed, kv_normed)
    q_kv_rms_norm_<scheme>_quant(q, q_weight, q_eps, kv, kv_weight, kv_eps, *scheme_params,
                                 return_normed=False, weight_after_rounding=False)
        -> (q_codes, q_scales, q_normed_or_empty, kv_normed)

Tensor-parallel fused ops (the sum of x over the ranks of ``group_name`` first, as the
functional ``all_reduce(x, "sum", group_name)`` + ``wait_tensor`` would give it; then the op
above; :mod:`fusion_ops.reference.collective`)::

    all_reduce_fused_add_rms_norm(x, residual, weight, eps, group_name) -> (y, residual_out)
    all_reduce_add_rms_norm_<scheme>_quant(x, residual, weight, eps, group_name,
                                           *scheme_params, <the add op's flags>)
        -> (q, scales, residual_out, normed_or_empty)

One module per subject (:mod:`.norm`, :mod:`.quant`, :mod:`.rope_cache`), each op declared there
once with :func:`.define.define`.
"""

from __future__ import annotations

import torch

from . import norm, quant, rope_cache  # noqa: F401  (each defines its ops on import)
from .define import NAMESPACE, NOT_REPLAYED_PREFIX, OP_SCHEMAS, QUICK_CHECKS, native_kernels

ops = torch.ops.fusion_ops

__all__ = [
    "NAMESPACE",
    "native_kernels",
    "NOT_REPLAYED_PREFIX",
    "OP_SCHEMAS",
    "QUICK_CHECKS",
    "ops",
]
