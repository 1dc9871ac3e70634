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
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from . import checks, native
from .backends import register_impl, run_op, use_native_kernels
from .formats import CACHE_LAYOUTS, DSV4_HEAD_DIM, DSV4_SLOT_BYTES
from .reference import cache as ref_cache
from .reference import collective as ref_collective
from .reference import norm as ref_norm
from .reference import rope as ref_rope
from .reference.norm import split_fused_params
from .schemes import SCHEMES, QuantScheme

NAMESPACE = "fusion_ops"
_LIB = torch.library.Library(NAMESPACE, "DEF")
#: True when the C++ kernels of fusion_ops.native are loaded
NATIVE_KERNELS = native.load()
if NATIVE_KERNELS:
    use_native_kernels(native)
# ops whose CUDA kernel replays their Triton launch from C++ (fusion_ops.native; NVIDIA): every
# op but the tensor-parallel ones (their kernel uses a per-group workspace and may take NCCL)
_NOT_REPLAYED_PREFIX = "all_reduce_"


#: name -> schema, every op defined by this module (tests iterate over it)
OP_SCHEMAS: dict[str, str] = {}
#: name -> (validate, quick) of every op with a one-expression fast path (tests check that
#: quick(*args) is True only where validate(*args) passes)
QUICK_CHECKS: dict[str, tuple[Callable[..., None], Callable[..., bool]]] = {}


def _define(
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
    native_cpu = NATIVE_KERNELS and name in native.NATIVE_CPU_OPS
    native_cuda = (
        NATIVE_KERNELS and not name.startswith(_NOT_REPLAYED_PREFIX) and native.replays_cuda()
    )
    # (the replay admits a float argument where it is >= 0, every eps check's rule: replayed ops
    # take eps floats only, tests/test_native_kernels.py)
    if native_cpu or native_cuda:
        _LIB.define(f"_python_{name}{schema}")
    if native_cpu:
        _LIB.impl(f"_python_{name}", kernel_for("cpu"), "CPU")
    else:
        _LIB.impl(name, kernel_for("cpu"), "CPU")
    if native_cuda:
        _LIB.impl(f"_python_{name}", native.recording_kernel(name, kernel_for("cuda")), "CUDA")
        native.register_cuda_replay(name)
    else:
        _LIB.impl(name, kernel_for("cuda"), "CUDA")
    torch.library.register_fake(f"{NAMESPACE}::{name}", fake_impl, lib=_LIB)


# --- norms --------------------------------------------------------------------------------------
def _check_norm(
    op: str, x: torch.Tensor, weight: torch.Tensor, eps: float, prefix: str = ""
) -> None:
    """``prefix``: the argument names' prefix (``q_`` → 'q', 'q_weight', 'q_eps')."""
    xa, wa, ea = (prefix.rstrip("_") or "x"), f"{prefix}weight", f"{prefix}eps"
    checks.check_min_dim(op, xa, x, 1)
    checks.check_dtype(op, xa, x, checks.FLOAT_DTYPES)
    checks.check_dtype(op, wa, weight, checks.FLOAT_DTYPES)
    checks.check_dim(op, wa, weight, 1)
    checks.check(
        op,
        wa,
        weight.shape[0] == x.shape[-1],
        lambda: f"has {weight.shape[0]} elements; expected {xa}'s last dim {x.shape[-1]}",
    )
    checks.check(op, ea, eps >= 0, lambda: f"got {eps}; expected >= 0")
    checks.check_same_device(op, **{xa: x, wa: weight})


def _check_add_norm(
    op: str, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> None:
    _check_norm(op, x, weight, eps)
    checks.check_same_dtype(op, "residual", residual, "x", x)
    checks.check(
        op,
        "residual",
        residual.shape == x.shape,
        lambda: f"has shape {tuple(residual.shape)}; expected x's shape {tuple(x.shape)}",
    )


_FLOATS = frozenset(checks.FLOAT_DTYPES)


def _quick_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> bool:
    """Every check of _check_norm passes (one expression: this runs on every call)."""
    return (
        x.dtype in _FLOATS
        and weight.dtype in _FLOATS
        and weight.dim() == 1
        and x.dim() >= 1
        and weight.shape[0] == x.shape[-1]
        and eps >= 0
        and weight.device == x.device
    )


_define(
    "rms_norm",
    "(Tensor x, Tensor weight, float eps) -> Tensor",
    lambda x, w, eps: _check_norm("rms_norm", x, w, eps),
    lambda x, w, eps: torch.empty_like(x, memory_format=torch.contiguous_format),
    ref_norm.rms_norm,
    quick=_quick_norm,
)


def _check_weightless_norm(op: str, x: torch.Tensor, eps: float, x_arg: str = "x") -> None:
    checks.check_min_dim(op, x_arg, x, 1)
    checks.check_dtype(op, x_arg, x, checks.FLOAT_DTYPES)
    ea = "eps" if x_arg == "x" else f"{x_arg}_eps"
    checks.check(op, ea, eps >= 0, lambda: f"got {eps}; expected >= 0")


_define(
    "weightless_rms_norm",
    "(Tensor x, float eps) -> Tensor",
    lambda x, eps: _check_weightless_norm("weightless_rms_norm", x, eps),
    lambda x, eps: torch.empty_like(x, memory_format=torch.contiguous_format),
    ref_norm.weightless_rms_norm,
    quick=lambda x, eps: x.dtype in _FLOATS and x.dim() >= 1 and eps >= 0,
)


def _quick_add_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> bool:
    """Every check of _check_add_norm passes."""
    return (
        _quick_norm(x, weight, eps)
        and residual.dtype == x.dtype
        and residual.shape == x.shape
        and residual.device == x.device
    )


_define(
    "fused_add_rms_norm",
    "(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)",
    lambda x, r, w, eps: _check_add_norm("fused_add_rms_norm", x, r, w, eps),
    lambda x, r, w, eps: (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        torch.empty_like(x, memory_format=torch.contiguous_format),
    ),
    ref_norm.fused_add_rms_norm,
    quick=_quick_add_norm,
)


def _check_group(op: str, group_name: str) -> None:
    checks.check(
        op,
        "group_name",
        isinstance(group_name, str) and ref_collective.group_exists(group_name),
        lambda: f"got {group_name!r}; expected the name of an initialized process group",
    )


def _ar_fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, group_name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    return ref_norm.fused_add_rms_norm(
        ref_collective.all_reduce_sum(x, group_name), residual, weight, eps
    )


def _check_ar_add_norm(op: str, x, r, w, eps, group_name) -> None:  # type: ignore[no-untyped-def]
    _check_add_norm(op, x, r, w, eps)
    _check_group(op, group_name)


_define(
    "all_reduce_fused_add_rms_norm",
    "(Tensor x, Tensor residual, Tensor weight, float eps, str group_name) -> (Tensor, Tensor)",
    lambda x, r, w, eps, g: _check_ar_add_norm("all_reduce_fused_add_rms_norm", x, r, w, eps, g),
    lambda x, r, w, eps, g: (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        torch.empty_like(x, memory_format=torch.contiguous_format),
    ),
    _ar_fused_add_rms_norm,
)


# --- two norms of the same rows in one launch (q_kv_norm) ---------------------------------------
def _check_q_kv(op, q, q_weight, q_eps, kv, kv_weight, kv_eps) -> None:  # type: ignore[no-untyped-def]
    _check_norm(op, q, q_weight, q_eps, prefix="q_")
    _check_norm(op, kv, kv_weight, kv_eps, prefix="kv_")
    checks.check(
        op,
        "kv",
        kv.shape[:-1] == q.shape[:-1],
        lambda: (
            f"has shape {tuple(kv.shape)}; expected the leading dims of 'q' {tuple(q.shape[:-1])}"
            " (one row per row of q)"
        ),
    )
    checks.check_same_device(op, q=q, kv=kv)


def _quick_q_kv(q, q_weight, q_eps, kv, kv_weight, kv_eps) -> bool:  # type: ignore[no-untyped-def]
    """Every check of _check_q_kv passes."""
    return (
        _quick_norm(q, q_weight, q_eps)
        and _quick_norm(kv, kv_weight, kv_eps)
        and kv.shape[:-1] == q.shape[:-1]
        and kv.device == q.device
    )


_define(
    "q_kv_rms_norm",
    "(Tensor q, Tensor q_weight, float q_eps, Tensor kv, Tensor kv_weight, float kv_eps)"
    " -> (Tensor, Tensor)",
    lambda q, qw, qe, kv, kvw, kve: _check_q_kv("q_kv_rms_norm", q, qw, qe, kv, kvw, kve),
    lambda q, qw, qe, kv, kvw, kve: (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        torch.empty_like(kv, memory_format=torch.contiguous_format),
    ),
    ref_norm.q_kv_rms_norm,
    quick=_quick_q_kv,
)


# --- quant family: standalone + fused, generated per scheme -------------------------------------
def _normed_or_empty(y: torch.Tensor, return_normed: bool) -> torch.Tensor:
    return y if return_normed else y.new_empty((0,))


_NORM_FLAGS = "bool return_normed=False, bool weight_after_rounding=False"


def _define_scheme(s: QuantScheme) -> None:
    """``<s>_quant``, ``rms_norm_<s>_quant``, ``add_rms_norm_<s>_quant`` and its tensor-parallel
    form ``all_reduce_add_rms_norm_<s>_quant`` (x summed over ``group_name`` first).

    The fused ops end with flags (:class:`fusion_ops.reference.norm.NormNumerics`):
    ``return_normed`` (also return the unquantized normed value, for graphs where it has other
    users, e.g. a router gate; else an empty tensor in that place), ``weight_after_rounding``
    and, for the add op, ``norm_unrounded_sum`` (other libraries' rounding points, see
    :mod:`fusion_ops.reference.norm`). Params below are ``(*scheme_params, *flags)``.
    """

    def quant_ref(x: torch.Tensor, *params: Any) -> Any:
        return s.reference(x, *params)

    def rms_ref(x: torch.Tensor, w: torch.Tensor, eps: float, *p: Any) -> Any:
        params, f = split_fused_params(p, add=False)
        y = ref_norm.rms_norm(x, w, eps, f.weight_after_rounding)
        return (*s.reference(y, *params), _normed_or_empty(y, f.return_normed))

    def add_rms_ref(x: torch.Tensor, r: torch.Tensor, w: torch.Tensor, eps: float, *p: Any) -> Any:
        params, f = split_fused_params(p, add=True)
        y, residual_out = ref_norm.fused_add_rms_norm(
            x, r, w, eps, f.weight_after_rounding, f.norm_unrounded_sum
        )
        return (*s.reference(y, *params), residual_out, _normed_or_empty(y, f.return_normed))

    def ar_add_rms_ref(
        x: torch.Tensor, r: torch.Tensor, w: torch.Tensor, eps: float, group: str, *p: Any
    ) -> Any:
        return add_rms_ref(ref_collective.all_reduce_sum(x, group), r, w, eps, *p)

    def check_rms(x: torch.Tensor, w: torch.Tensor, eps: float, *p: Any) -> None:
        _check_norm(s.rms_op, x, w, eps)
        s.check(s.rms_op, x, split_fused_params(p, add=False)[0])

    def check_add_rms(
        x: torch.Tensor, r: torch.Tensor, w: torch.Tensor, eps: float, *p: Any
    ) -> None:
        _check_add_norm(s.add_rms_op, x, r, w, eps)
        s.check(s.add_rms_op, x, split_fused_params(p, add=True)[0])

    def check_ar_add_rms(
        x: torch.Tensor, r: torch.Tensor, w: torch.Tensor, eps: float, group: str, *p: Any
    ) -> None:
        _check_ar_add_norm(s.ar_add_rms_op, x, r, w, eps, group)
        s.check(s.ar_add_rms_op, x, split_fused_params(p, add=True)[0])

    def fake_normed(x: torch.Tensor, return_normed: bool) -> torch.Tensor:
        if return_normed:
            return torch.empty_like(x, memory_format=torch.contiguous_format)
        return x.new_empty((0,))

    def fake_rms(x: torch.Tensor, w: torch.Tensor, eps: float, *p: Any) -> Any:
        params, f = split_fused_params(p, add=False)
        return (*s.fake(x, params), fake_normed(x, f.return_normed))

    def fake_add_rms(x: torch.Tensor, r: torch.Tensor, w: torch.Tensor, eps: float, *p: Any) -> Any:
        params, f = split_fused_params(p, add=True)
        residual_out = torch.empty_like(x, memory_format=torch.contiguous_format)
        return (*s.fake(x, params), residual_out, fake_normed(x, f.return_normed))

    _define(
        s.quant_op,
        f"(Tensor x{s.params_schema}) -> (Tensor, Tensor)",
        lambda x, *p: s.check(s.quant_op, x, p),
        lambda x, *p: s.fake(x, p),
        quant_ref,
        quick=lambda x, *p: s.quick(x, p),
    )
    _define(
        s.rms_op,
        f"(Tensor x, Tensor weight, float eps{s.params_schema}, {_NORM_FLAGS})"
        " -> (Tensor, Tensor, Tensor)",
        check_rms,
        fake_rms,
        rms_ref,
        quick=lambda x, w, eps, *p: _quick_norm(x, w, eps) and s.quick(x, p[:-2]),
    )
    _define(
        s.add_rms_op,
        f"(Tensor x, Tensor residual, Tensor weight, float eps{s.params_schema}, {_NORM_FLAGS}, "
        "bool norm_unrounded_sum=False) -> (Tensor, Tensor, Tensor, Tensor)",
        check_add_rms,
        fake_add_rms,
        add_rms_ref,
        quick=lambda x, r, w, eps, *p: _quick_add_norm(x, r, w, eps) and s.quick(x, p[:-3]),
    )

    def q_kv_ref(q, qw, q_eps, kv, kvw, kv_eps, *p):  # type: ignore[no-untyped-def]
        return (*rms_ref(q, qw, q_eps, *p), ref_norm.rms_norm(kv, kvw, kv_eps))

    def check_q_kv(q, qw, q_eps, kv, kvw, kv_eps, *p):  # type: ignore[no-untyped-def]
        _check_q_kv(s.q_kv_rms_op, q, qw, q_eps, kv, kvw, kv_eps)
        s.check(s.q_kv_rms_op, q, split_fused_params(p, add=False)[0])

    _define(
        s.q_kv_rms_op,
        f"(Tensor q, Tensor q_weight, float q_eps, Tensor kv, Tensor kv_weight, float kv_eps"
        f"{s.params_schema}, {_NORM_FLAGS}) -> (Tensor, Tensor, Tensor, Tensor)",
        check_q_kv,
        lambda q, qw, q_eps, kv, kvw, kv_eps, *p: (
            *fake_rms(q, qw, q_eps, *p),
            torch.empty_like(kv, memory_format=torch.contiguous_format),
        ),
        q_kv_ref,
        quick=lambda q, qw, q_eps, kv, kvw, kv_eps, *p: (
            _quick_q_kv(q, qw, q_eps, kv, kvw, kv_eps) and s.quick(q, p[:-2])
        ),
    )
    _define(
        s.ar_add_rms_op,
        f"(Tensor x, Tensor residual, Tensor weight, float eps, str group_name{s.params_schema}, "
        f"{_NORM_FLAGS}, bool norm_unrounded_sum=False) -> (Tensor, Tensor, Tensor, Tensor)",
        check_ar_add_rms,
        lambda x, r, w, eps, group, *p: fake_add_rms(x, r, w, eps, *p),
        ar_add_rms_ref,
    )


for _scheme in SCHEMES.values():
    _define_scheme(_scheme)


# --- RoPE ---------------------------------------------------------------------------------------
def _check_rope(
    op: str,
    positions: torch.Tensor,
    x: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    rope_dim: int,
    x_arg: str = "x",
) -> None:
    checks.check_min_dim(op, x_arg, x, 2)
    checks.check_dtype(op, x_arg, x, checks.FLOAT_DTYPES)
    checks.check_dim(op, "positions", positions, 1)
    checks.check(
        op,
        "positions",
        positions.shape[0] == x.shape[0],
        lambda: (
            f"has {positions.shape[0]} entries; expected one per token of '{x_arg}' ({x.shape[0]})"
        ),
    )
    d = x.shape[-1]
    checks.check(
        op,
        "rope_dim",
        rope_dim > 0 and rope_dim % 2 == 0 and rope_dim <= d,
        lambda: f"got {rope_dim}; expected an even number in [2, {d}] (the head dim of '{x_arg}')",
    )
    checks.check_dim(op, "cos_sin_cache", cos_sin_cache, 2)
    checks.check_dtype(op, "cos_sin_cache", cos_sin_cache, checks.FLOAT_DTYPES)
    checks.check(
        op,
        "cos_sin_cache",
        cos_sin_cache.shape[1] == rope_dim,
        lambda: (
            f"has shape {tuple(cos_sin_cache.shape)}; expected [max_pos, rope_dim={rope_dim}] "
            "holding [cos | sin]"
        ),
    )
    checks.check_same_device(op, positions=positions, x=x, cos_sin_cache=cos_sin_cache)
    checks.check_index_range(op, "positions", positions, cos_sin_cache.shape[0])


def _rope_fake(positions: torch.Tensor, x: torch.Tensor, *_: Any) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


_define(
    "rope",
    "(Tensor positions, Tensor x, Tensor cos_sin_cache, int rope_dim, bool is_neox) -> Tensor",
    lambda pos, x, cs, rope_dim, is_neox: _check_rope("rope", pos, x, cs, rope_dim),
    _rope_fake,
    ref_rope.rope,
    device_arg=1,
)


# --- MLA KV cache -------------------------------------------------------------------------------
def _check_layout(op: str, layout: str) -> None:
    checks.check(
        op, "layout", layout in CACHE_LAYOUTS, lambda: f"got {layout!r}; expected {CACHE_LAYOUTS}"
    )


def _check_cache(op: str, kv_cache: torch.Tensor, layout: str) -> None:
    _check_layout(op, layout)
    checks.check_dim(op, "kv_cache", kv_cache, 3)
    if layout == "dsv4_fp8":
        checks.check_dtype(op, "kv_cache", kv_cache, (torch.uint8,))
        checks.check(
            op,
            "kv_cache",
            kv_cache.shape[2] == DSV4_SLOT_BYTES,
            lambda: (
                f"has shape {tuple(kv_cache.shape)}; layout 'dsv4_fp8' expects "
                f"[num_blocks, block_size, {DSV4_SLOT_BYTES}] uint8"
            ),
        )
    else:
        checks.check_dtype(op, "kv_cache", kv_cache, checks.FLOAT_DTYPES)
    nb, bs, row = kv_cache.shape
    checks.check(
        op,
        "kv_cache",
        kv_cache.stride(2) == 1
        and (bs == 1 or kv_cache.stride(1) == row)
        and (nb == 1 or kv_cache.stride(0) >= bs * row),
        lambda: (
            f"has strides {kv_cache.stride()}; each block must be contiguous (strides "
            f"(>= {bs * row}, {row}, 1))"
        ),
    )


def _written(kv: torch.Tensor, kv_dtype: torch.dtype | None) -> str:
    if kv_dtype is None:
        return f"has dtype {str(kv.dtype).removeprefix('torch.')}"
    return f"is written as {str(kv_dtype).removeprefix('torch.')} (out_dtype)"


def _check_cache_write(
    op: str,
    kv: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    layout: str,
    kv_dtype: torch.dtype | None = None,
    kv_arg: str = "kv",
) -> None:
    """``kv_dtype``: the dtype of what is written when it is not kv's own (an op that casts)."""
    _check_cache(op, kv_cache, layout)
    checks.check_dim(op, kv_arg, kv, 2)
    dtype = kv.dtype if kv_dtype is None else kv_dtype
    if layout == "dsv4_fp8":
        if dtype != torch.bfloat16:
            raise TypeError(
                f"fusion_ops.{op}: argument '{kv_arg}' {_written(kv, kv_dtype)}; layout "
                "'dsv4_fp8' expects bfloat16 rows"
            )
        checks.check(
            op,
            kv_arg,
            kv.shape[1] == DSV4_HEAD_DIM,
            lambda: (
                f"has shape {tuple(kv.shape)}; layout 'dsv4_fp8' expects [tokens, {DSV4_HEAD_DIM}]"
            ),
        )
    else:
        if dtype != kv_cache.dtype:
            raise TypeError(
                f"fusion_ops.{op}: argument '{kv_arg}' {_written(kv, kv_dtype)}; expected the "
                f"dtype of 'kv_cache' ({str(kv_cache.dtype).removeprefix('torch.')})"
            )
        checks.check(
            op,
            kv_arg,
            kv.shape[1] == kv_cache.shape[2],
            lambda: (
                f"has shape {tuple(kv.shape)}; expected [tokens, {kv_cache.shape[2]}] "
                "(cache head dim)"
            ),
        )
    checks.check_dim(op, "slot_mapping", slot_mapping, 1)
    checks.check(
        op,
        "slot_mapping",
        slot_mapping.shape[0] == kv.shape[0],
        lambda: (
            f"has {slot_mapping.shape[0]} entries; expected one per token of '{kv_arg}' "
            f"({kv.shape[0]})"
        ),
    )
    checks.check_same_device(op, **{kv_arg: kv}, kv_cache=kv_cache, slot_mapping=slot_mapping)
    checks.check_index_range(
        op,
        "slot_mapping",
        slot_mapping,
        kv_cache.shape[0] * kv_cache.shape[1],
        allow_negative=True,
    )


_define(
    "mla_cache_write",
    "(Tensor kv, Tensor(a!) kv_cache, Tensor slot_mapping, str layout) -> ()",
    lambda kv, cache, slots, layout: _check_cache_write(
        "mla_cache_write", kv, cache, slots, layout
    ),
    lambda *args: None,
    ref_cache.mla_cache_write,
)


def _check_dequant(op: str, kv_cache: torch.Tensor, block_ids: torch.Tensor, layout: str) -> None:
    _check_cache(op, kv_cache, layout)
    checks.check_dim(op, "block_ids", block_ids, 1)
    checks.check_same_device(op, kv_cache=kv_cache, block_ids=block_ids)
    checks.check_index_range(op, "block_ids", block_ids, kv_cache.shape[0])


def _dequant_shape(kv_cache: torch.Tensor, block_ids: torch.Tensor, layout: str) -> tuple:
    head_dim = DSV4_HEAD_DIM if layout == "dsv4_fp8" else kv_cache.shape[2]
    return (block_ids.shape[0] * kv_cache.shape[1], head_dim)


_define(
    "dequant_cache",
    "(Tensor kv_cache, Tensor block_ids, str layout) -> Tensor",
    lambda cache, ids, layout: _check_dequant("dequant_cache", cache, ids, layout),
    lambda cache, ids, layout: cache.new_empty(
        _dequant_shape(cache, ids, layout),
        dtype=torch.bfloat16 if layout == "dsv4_fp8" else cache.dtype,
    ),
    ref_cache.dequant_cache,
)


# --- fused: RoPE + cache write, dequant + FP8 cast ----------------------------------------------
def _check_rope_cache(
    positions: torch.Tensor,
    q: torch.Tensor,
    kv: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    rope_dim: int,
    is_neox: bool,
    layout: str,
    op: str = "rope_mla_cache_write",
) -> None:
    _check_rope(op, positions, q, cos_sin_cache, rope_dim, x_arg="q")
    _check_rope(op, positions, kv, cos_sin_cache, rope_dim, x_arg="kv")
    _check_cache_write(op, kv, kv_cache, slot_mapping, layout)


_define(
    "rope_mla_cache_write",
    "(Tensor positions, Tensor q, Tensor kv, Tensor cos_sin_cache, Tensor(a!) kv_cache, "
    "Tensor slot_mapping, int rope_dim, bool is_neox, str layout) -> (Tensor, Tensor)",
    _check_rope_cache,
    lambda positions, q, kv, *_: (_rope_fake(positions, q), _rope_fake(positions, kv)),
    ref_cache.rope_mla_cache_write,
    device_arg=1,
)


def _check_qnorm_rope_cache(
    positions: torch.Tensor,
    q: torch.Tensor,
    q_eps: float,
    kv: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    rope_dim: int,
    is_neox: bool,
    layout: str,
) -> None:
    op = "qnorm_rope_mla_cache_write"
    _check_weightless_norm(op, q, q_eps, x_arg="q")
    _check_rope_cache(
        positions, q, kv, cos_sin_cache, kv_cache, slot_mapping, rope_dim, is_neox, layout, op
    )


_define(
    "qnorm_rope_mla_cache_write",
    "(Tensor positions, Tensor q, float q_eps, Tensor kv, Tensor cos_sin_cache, "
    "Tensor(a!) kv_cache, Tensor slot_mapping, int rope_dim, bool is_neox, str layout) "
    "-> (Tensor, Tensor)",
    _check_qnorm_rope_cache,
    lambda positions, q, q_eps, kv, *_: (_rope_fake(positions, q), _rope_fake(positions, kv)),
    ref_cache.qnorm_rope_mla_cache_write,
    device_arg=1,
)


def _check_norm_rope_cache(
    positions: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    cos_sin_cache: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    rope_dim: int,
    is_neox: bool,
    layout: str,
    out_dtype: torch.dtype | None = None,
) -> None:
    op = "rms_norm_rope_mla_cache_write"
    _check_norm(op, x, weight, eps)
    if out_dtype is not None:
        checks.check(
            op,
            "out_dtype",
            out_dtype in checks.FLOAT_DTYPES,
            lambda: f"is {out_dtype}; expected one of {checks.FLOAT_DTYPES} or None (x's dtype)",
        )
    _check_rope(op, positions, x, cos_sin_cache, rope_dim)
    _check_cache_write(
        op, x, kv_cache, slot_mapping, layout, kv_dtype=out_dtype or x.dtype, kv_arg="x"
    )


def _norm_rope_cache_fake(positions, x, *args):  # type: ignore[no-untyped-def]
    out_dtype = args[-1]
    return torch.empty_like(x, dtype=out_dtype or x.dtype, memory_format=torch.contiguous_format)


_define(
    "rms_norm_rope_mla_cache_write",
    "(Tensor positions, Tensor x, Tensor weight, float eps, Tensor cos_sin_cache, "
    "Tensor(a!) kv_cache, Tensor slot_mapping, int rope_dim, bool is_neox, str layout, "
    "ScalarType? out_dtype=None) -> Tensor",
    _check_norm_rope_cache,
    _norm_rope_cache_fake,
    ref_cache.rms_norm_rope_mla_cache_write,
    device_arg=1,
)


def _check_dequant_fp8(
    kv_cache: torch.Tensor, block_ids: torch.Tensor, layout: str, fp8_dtype: torch.dtype
) -> None:
    _check_dequant("dequant_cache_fp8", kv_cache, block_ids, layout)
    checks.check_fp8_dtype("dequant_cache_fp8", "fp8_dtype", fp8_dtype)


_define(
    "dequant_cache_fp8",
    "(Tensor kv_cache, Tensor block_ids, str layout, ScalarType fp8_dtype) -> Tensor",
    _check_dequant_fp8,
    lambda cache, ids, layout, dt: cache.new_empty(_dequant_shape(cache, ids, layout), dtype=dt),
    ref_cache.dequant_cache_fp8,
)

ops = torch.ops.fusion_ops
