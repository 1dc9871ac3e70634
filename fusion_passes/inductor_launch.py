"""Hand the fused norm+quant ops' Triton kernel to Inductor, so compiled code launches it itself.

A fused op left in the post-grad graph is called from Inductor's generated wrapper through the
dispatcher: the op's Python kernel, validation, backend selection and Triton's launcher run on
every call. With ``FusionPass(inductor_launch=True)`` each fused ``rms_norm_<scheme>_quant`` /
``add_rms_norm_<scheme>_quant`` node that the Triton backend would run is replaced by the
kernel itself, as ``triton_kernel_wrapper_functional`` (the node torch.compile makes of a
user-written ``kernel[grid](...)`` call) with its output buffers: Inductor then compiles and
launches it like one of its own kernels. Same kernel, same constexprs, same warps (a one-config
``triton.autotune`` wrapper, as Dynamo builds for ``num_warps=``), hence the same bytes as the
op — ``pytest -m gpu`` compares the two bit for bit.

Only where the rewrite cannot change results or the backend: NVIDIA (the Triton backend; ROCm's
AITER backend keeps its op), a static row width, a row count the op's warp rule gives one value
for (the op gives a lone row twice the warps, so a dynamic row count must be known ≥ 2 — as
Dynamo's 0/1 specialization guarantees for a backed size; an unbacked or size-oblivious count
that may be 1 keeps the op; at widths where the rule also changes with a larger row count —
4097–8192 columns without a residual — only a static count is lowered), a row-contiguous
``x``, a forced backend other than ``triton`` absent at compile time, no FNUZ FP8 output
(NVIDIA runs those on the reference backend). No PDL: Inductor's launcher has no ``launch_pdl``.
"""

from __future__ import annotations

import functools
import operator
from typing import Any

import torch
from torch._prims_common import is_contiguous_or_false
from torch.fx.experimental.symbolic_shapes import statically_known_true

import fusion_ops
from fusion_ops import SCHEMES
from fusion_ops.reference.norm import NormNumerics, split_fused_params
from patterns.base import op_args, val

_FUSED = {s.rms_op: (s, False) for s in SCHEMES.values()} | {
    s.add_rms_op: (s, True) for s in SCHEMES.values()
}


@functools.cache
def _kernel_with_warps(num_warps: int) -> Any:
    """norm_quant_kernel wrapped in a one-config autotuner carrying ``num_warps``."""
    import triton

    from fusion_ops.triton_backend import kernels

    return triton.autotune(configs=[triton.Config({}, num_warps=num_warps)], key=[])(
        kernels.norm_quant_kernel
    )


def _lowerable(node: torch.fx.Node) -> tuple[Any, bool, list[Any]] | None:
    """(scheme, has_residual, every schema argument in order) when ``node`` is a fused
    norm+quant call this module can lower."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return None
    if node.target.namespace != "fusion_ops" or node.target._opname not in _FUSED:
        return None
    scheme, has_res = _FUSED[node.target._opname]
    by_name = op_args(node)  # defaults filled in, kwargs included
    args = [by_name[a.name] for a in node.target._schema.arguments]
    x = val(args[0])
    if x is None or x.device.type != "cuda" or torch.version.hip is not None:
        return None
    if fusion_ops.backends.forced_backend() not in (None, "triton"):
        return None
    if not isinstance(x.shape[-1], int) or not _contiguous(x):
        return None
    if has_res and not _contiguous(val(args[1])):
        return None
    rows = _row_count(x)
    if not isinstance(rows, int):  # the warps (a row's rounding) must be known
        if not statically_known_true(rows >= 2):
            return None
        from fusion_ops.launch_policy import next_power_of_2, warps_depend_on_row_count

        if warps_depend_on_row_count(next_power_of_2(x.shape[-1]), has_res):
            return None
    if any(p is torch.float8_e4m3fnuz for p in args):
        return None
    return scheme, has_res, args


def _contiguous(t: torch.Tensor) -> bool:
    """Row-major contiguous for every value of its symbolic sizes (no guard is added)."""
    return bool(is_contiguous_or_false(t))


def _row_count(x: torch.Tensor) -> Any:
    """The row count of x [..., K] (an int or a SymInt)."""
    return functools.reduce(operator.mul, x.shape[:-1], 1)


def _size_node(graph: torch.fx.Graph, d: Any, x: torch.fx.Node) -> Any:
    """``d`` as a graph argument: an int, ``sym_size(x, i)``, or the product of x's leading dims
    (the row count) — the only symbolic sizes these ops' outputs have."""
    if isinstance(d, int):
        return d
    lead = val(x).shape[:-1]
    for i, size in enumerate(lead):
        if not isinstance(size, int) and statically_known_true(size == d):
            return _sym_size(graph, x, i)
    if not statically_known_true(_row_count(val(x)) == d):
        raise NotImplementedError(f"output size {d}: not one of x's leading dims or their product")
    node: Any = None
    for i, size in enumerate(lead):
        term = size if isinstance(size, int) else _sym_size(graph, x, i)
        node = term if node is None else _mul_node(graph, node, term)
    return node


def _sym_size(graph: torch.fx.Graph, x: torch.fx.Node, dim: int) -> torch.fx.Node:
    n = graph.call_function(torch.ops.aten.sym_size.int, (x, dim))
    n.meta["val"] = val(x).shape[dim]
    return n


def _mul_node(graph: torch.fx.Graph, a: Any, b: Any) -> torch.fx.Node:
    n = graph.call_function(operator.mul, (a, b))
    n.meta["val"] = val(a) * val(b)
    return n


def _empty_node(
    graph: torch.fx.Graph, v: torch.Tensor, fake_mode: Any, x: torch.fx.Node
) -> torch.fx.Node:
    """An ``aten.empty`` node shaped like the fake value ``v`` (with its own fake value);
    symbolic sizes are read from x's leading dims."""
    e = graph.call_function(
        torch.ops.aten.empty.memory_format,
        ([_size_node(graph, d, x) for d in v.shape],),
        {"dtype": v.dtype, "device": v.device, "pin_memory": False},
    )
    with fake_mode:
        e.meta["val"] = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    return e


def lower_fused_norm_quant(graph: torch.fx.Graph) -> int:
    """Replace every lowerable fused norm+quant node (see the module docstring); returns how
    many were replaced."""
    from torch._higher_order_ops.triton_kernel_wrap import (
        kernel_side_table,
        triton_kernel_wrapper_functional,
    )

    from fusion_ops import launch_policy as policy
    from fusion_ops.triton_backend.calls import (
        NORM_QUANT_ARGS,
        NormFlags,
        norm_quant_args,
        norm_quant_meta,
        scheme_constants,
        split_meta,
    )
    from fusion_ops.triton_backend.kernels import norm_quant_kernel

    lowered = 0
    for node in list(graph.nodes):
        found = _lowerable(node)
        if found is None:
            continue
        scheme, has_res, args = found
        n_lead = 4 if has_res else 3  # x, [residual,] weight, eps
        x, r, w = (args[0], args[1], args[2]) if has_res else (args[0], None, args[1])
        eps = args[n_lead - 1]
        params, numerics = split_fused_params(tuple(args[n_lead:]), add=has_res)
        return_normed = bool(numerics.return_normed)
        xv = val(x)
        kdim = xv.shape[-1]
        m = _row_count(xv)
        if isinstance(m, int) and (m == 0 or kdim == 0):
            continue
        # a symbolic row count is known >= 2 here, at a width where every count >= 2 gets the
        # same warps (_lowerable); taken as 2, it gets no pieces (speed only, same bytes). No
        # PDL: Inductor's launcher has no launch_pdl (without PDL the load order does not matter)
        launch = policy.norm_launch(
            kdim, m if isinstance(m, int) else 2, policy.NO_PDL, scheme=scheme.name,
            params=params, residual=has_res, eps=float(eps),
        )  # fmt: skip
        fake_mode = xv.fake_mode
        with fake_mode:
            q_val, s_val = scheme.fake(xv, params)
            res_val = torch.empty_like(xv) if has_res else None
            y_val = torch.empty_like(xv) if return_normed else None

        with graph.inserting_before(node):
            outs = {
                "q_ptr": _empty_node(graph, q_val, fake_mode, x),
                "s_ptr": _empty_node(graph, s_val, fake_mode, x),
            }
            if has_res:
                outs["res_ptr"] = _empty_node(graph, res_val, fake_mode, x)
            if return_normed:
                outs["y_ptr"] = _empty_node(graph, y_val, fake_mode, x)
            consts = scheme_constants(scheme.name, params, launch.block_k)
            flags = NormFlags(
                has_res, write_y=return_normed, numerics=NormNumerics(*map(bool, numerics))
            )
            y_out = outs.get("y_ptr", outs["q_ptr"])  # written only when WRITE_Y
            res = outs.get("res_ptr", outs["q_ptr"])  # written only when HAS_RES
            arguments = dict(
                zip(
                    NORM_QUANT_ARGS,
                    norm_quant_args(
                        x,
                        r,
                        w,
                        y_out,
                        res,
                        outs["q_ptr"],
                        outs["s_ptr"],
                        kdim,
                        kdim,
                        kdim,
                        float(eps),
                        consts,
                    ),  # fmt: skip
                    strict=True,
                )
            )
            tensors = {n: a for n, a in arguments.items() if isinstance(a, torch.fx.Node)}
            constexprs, options = split_meta(
                norm_quant_kernel, norm_quant_meta(launch, flags, consts)
            )
            constants = {
                **{n: a for n, a in arguments.items() if n not in tensors},
                **constexprs,  # wrap_triton needs every argument, defaulted ones too
            }
            kernel = _kernel_with_warps(options["num_warps"])
            # (NO_PDL names no programs: no launch here splits a row, launch.grid is (m,))
            grid_rows = m if isinstance(m, int) else _size_node(graph, m, x)
            hop = graph.call_function(
                triton_kernel_wrapper_functional,
                (),
                {
                    "kernel_idx": kernel_side_table.add_kernel(kernel),
                    "constant_args_idx": kernel_side_table.add_constant_args(constants),
                    "grid": [(grid_rows, 1, 1)],
                    "tma_descriptor_metadata": {},
                    "kwargs": tensors,
                    "tensors_to_clone": list(outs),
                },
            )
            hop.meta["val"] = {name: val(o) for name, o in outs.items()}
            results = {}
            for name, out in outs.items():
                g = graph.call_function(operator.getitem, (hop, name))
                g.meta["val"] = val(out)
                results[name] = g
            # the op's outputs: (q, scales[, residual_out], normed_or_empty)
            order = ["q_ptr", "s_ptr", *(["res_ptr"] if has_res else []), "y_ptr"]
            for user in list(node.users):
                if user.target is not operator.getitem:
                    raise RuntimeError(f"{node.name}: unexpected user {user.format_node()}")
                name = order[user.args[1]]
                if name in results:
                    user.replace_all_uses_with(results[name])
                elif user.users:  # the empty normed placeholder, used: keep an empty tensor
                    user.replace_all_uses_with(_empty_node(graph, val(user), fake_mode, x))
                graph.erase_node(user)
        graph.erase_node(node)
        lowered += 1
    return lowered
