"""The one-expression fast path of op validation never accepts what the full checks reject.

Every op call runs ``quick(*args)`` and the full validation (which raises with the message naming
the op, the argument and the expectation) only when ``quick`` says False. So ``quick`` must be
True only on inputs the full validation passes; hypothesis searches the norm/quant ops' argument
space (dims, sizes, dtypes, eps, residual shape/dtype, scheme parameters) for a counterexample.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fusion_ops.library import QUICK_CHECKS
from fusion_ops.schemes import SCHEMES

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.int32]
FP8_ARGS = [torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.bfloat16]


@st.composite
def tensor(draw, last: int, min_dims: int = 0) -> torch.Tensor:
    dims = draw(st.integers(min_dims, 3))
    lead = draw(st.lists(st.integers(0, 3), min_size=max(dims - 1, 0), max_size=max(dims - 1, 0)))
    shape = (*lead, last) if dims else ()
    return torch.zeros(shape, dtype=draw(st.sampled_from(DTYPES)))


@st.composite
def norm_args(draw, with_residual: bool) -> tuple:
    k = draw(st.sampled_from([0, 16, 32, 40, 64, 128, 256]))
    x = draw(tensor(k))
    w_len = draw(st.sampled_from([k, k + 32, 1]))
    w_dims = draw(st.sampled_from([1, 1, 1, 2]))
    w = torch.zeros((w_len,) if w_dims == 1 else (1, w_len), dtype=draw(st.sampled_from(DTYPES)))
    eps = draw(st.sampled_from([1e-6, 0.0, -1.0]))
    if not with_residual:
        return (x, w, eps)
    r_shape = draw(st.sampled_from([tuple(x.shape), (*x.shape[:-1], k + 32), (1,)]))
    r = torch.zeros(r_shape, dtype=draw(st.sampled_from([x.dtype, *DTYPES])))
    return (x, r, w, eps)


@st.composite
def scheme_params(draw, scheme: str) -> tuple:
    if scheme in ("mxfp4", "mxfp8"):
        return ()
    ue8m0 = draw(st.booleans())
    fp8 = draw(st.sampled_from(FP8_ARGS))
    if scheme == "fp8_per_token":
        return (ue8m0, fp8)
    return (draw(st.sampled_from([-128, 0, 16, 64, 128])), ue8m0, fp8)


def passes(validate, args: tuple) -> bool:  # type: ignore[no-untyped-def]
    try:
        validate(*args)
    except (ValueError, TypeError):
        return False
    return True


def test_every_norm_and_quant_op_has_a_quick_check() -> None:
    expected = {"rms_norm", "weightless_rms_norm", "fused_add_rms_norm", "q_kv_rms_norm"}
    for s in SCHEMES.values():
        expected |= {s.quant_op, s.rms_op, s.add_rms_op, s.q_kv_rms_op}
    assert set(QUICK_CHECKS) == expected


@settings(max_examples=400, deadline=None, derandomize=True)
@given(data=st.data())
def test_quick_is_true_only_where_validation_passes(data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(sorted(QUICK_CHECKS)))
    scheme = next(
        (
            s
            for s in SCHEMES.values()
            if name in (s.quant_op, s.rms_op, s.add_rms_op, s.q_kv_rms_op)
        ),
        None,
    )
    if name in ("rms_norm", "fused_add_rms_norm"):
        args = data.draw(norm_args(with_residual=name == "fused_add_rms_norm"))
    elif name == "weightless_rms_norm":
        x, _, eps = data.draw(norm_args(with_residual=False))
        args = (x, eps)
    elif name == "q_kv_rms_norm" or name == scheme.q_kv_rms_op:
        # two norms' arguments (their leading dims equal or not), then the q quant's
        args = (*data.draw(norm_args(False)), *data.draw(norm_args(False)))
        if scheme is not None:
            flags = data.draw(st.tuples(st.booleans(), st.booleans()))
            args = (*args, *data.draw(scheme_params(scheme.name)), *flags)
    elif name == scheme.quant_op:
        x = data.draw(tensor(data.draw(st.sampled_from([0, 16, 32, 40, 64, 128, 256]))))
        args = (x, *data.draw(scheme_params(scheme.name)))
    else:
        add = name == scheme.add_rms_op
        base = data.draw(norm_args(with_residual=add))
        flags = data.draw(st.tuples(*[st.booleans()] * (3 if add else 2)))  # NormNumerics
        args = (*base, *data.draw(scheme_params(scheme.name)), *flags)
    validate, quick = QUICK_CHECKS[name]
    if quick(*args):
        assert passes(validate, args), (name, [getattr(a, "shape", a) for a in args])


def valid_args(name: str) -> tuple:
    x, w, r = torch.zeros(2, 256), torch.ones(256), torch.zeros(2, 256)
    params = {"mxfp4": (), "mxfp8": (), "fp8_per_token": (False, torch.float8_e4m3fn)}
    params["fp8_group"] = (128, True, torch.float8_e4m3fnuz)
    if name == "rms_norm":
        return (x, w, 1e-6)
    if name == "weightless_rms_norm":
        return (x, 1e-6)
    if name == "fused_add_rms_norm":
        return (x, r, w, 1e-6)
    kv, w_kv = torch.zeros(2, 128), torch.ones(128)
    if name == "q_kv_rms_norm":
        return (x, w, 1e-6, kv, w_kv, 1e-5)
    for s in SCHEMES.values():
        if name == s.q_kv_rms_op:
            return (x, w, 1e-6, kv, w_kv, 1e-5, *params[s.name], True, False)
        if name == s.quant_op:
            return (x, *params[s.name])
        if name == s.rms_op:
            return (x, w, 1e-6, *params[s.name], False, True)
        if name == s.add_rms_op:
            return (x, r, w, 1e-6, *params[s.name], True, False, True)
    raise KeyError(name)


def test_quick_takes_the_fast_path_on_valid_input() -> None:
    """The fast path is real: on valid input quick says True (and validation agrees)."""
    for name, (validate, quick) in QUICK_CHECKS.items():
        args = valid_args(name)
        assert quick(*args), name
        validate(*args)
