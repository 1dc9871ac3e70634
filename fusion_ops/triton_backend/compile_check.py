"""Compile every Triton kernel of this backend for AMD and NVIDIA GPUs on a machine without one.

    python -m fusion_ops.triton_backend.compile_check [--targets gfx942,gfx950,sm_90]

Each kernel is compiled, for every path its launches take (scheme, cache layout, input dtype,
residual/norm/normed-output flags, PDL), through Triton's own stages for the target down to the
GPU's assembly: AMDGCN for ``gfx942`` (MI300) and ``gfx950`` (MI355X), PTX for ``sm_90``
(H100/H200), and SASS (cubin) as well when ``ptxas`` is installed. Nothing is launched and no
driver is needed. The last stage (linking a ``.hsaco`` needs ROCm's ``ld.lld``; loading needs a
device) is left out.

What it proves: the kernels parse, type-check and lower on each target's code generator — the
FP8 types included: ``float8_e4m3fnuz`` compiles to gfx942's FNUZ type, ``float8_e4m3fn`` to
OCP E4M3 on gfx950 and sm_90 — and PDL code is guarded off on AMD. What it cannot prove: that the
AMD binaries compute the right numbers or run fast; only a run on an AMD GPU shows that.

Exit status 1 when any compile fails (each failure is printed with the first line of its error).
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from triton._C.libtriton import ir
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction

from .. import launch_policy as policy
from ..launch_policy import DeviceFacts
from ..reference.norm import NormNumerics
from . import kernels as k
from .calls import (
    Meta,
    NormFlags,
    all_reduce_meta,
    chain_meta,
    norm_quant_meta,
    q_kv_meta,
    scheme_constants,
    split_meta,
)
from .launch import PINNED_OPTIONS

TARGETS = {
    "gfx942": GPUTarget("hip", "gfx942", 64),
    "gfx950": GPUTarget("hip", "gfx950", 64),
    "sm_90": GPUTarget("cuda", 90, 32),
}
# the last stage before a binary per backend; "cubin" is added for CUDA when ptxas is installed
_ISA_STAGE = {"hip": "amdgcn", "cuda": "ptx"}
_FP8 = {"e4m3fn": "fp8e4nv", "e4m3fnuz": "fp8e4b8"}  # Triton's names of the torch FP8 types


@dataclass
class Case:
    """One compile: a kernel, the Triton types of its runtime arguments, its constexprs."""

    name: str
    kernel: JITFunction
    types: dict[str, str]
    constexprs: dict[str, Any]
    options: dict[str, Any] = field(default_factory=dict)
    hip_only_fnuz: bool = False  # an FP8 FNUZ output: only gfx942 has that type


# the launch records come from the launch policy, the constexprs from the calling conventions
# (.calls), as every launch builds them: the policy's NVIDIA choices (PDL, FMA 1/rms steps) are
# turned off per target by compile_to_isa where the policy turns them off on ROCm
_NVIDIA = DeviceFacts(hip=False, pdl=False, prefetch_weight=False, sm_count=132)
_NVIDIA_PDL = DeviceFacts(hip=False, pdl=True, prefetch_weight=True, sm_count=132)
_FP8_TORCH = {"e4m3fn": torch.float8_e4m3fn, "e4m3fnuz": torch.float8_e4m3fnuz}


def make_case(name: str, kernel: JITFunction, types: dict[str, str], meta: Meta, **kw: Any) -> Case:
    """A compile of ``kernel`` with the runtime argument types ``types`` and a launch's ``meta``
    (as the calling conventions in .calls build it: constexprs and launch options)."""
    constexprs, options = split_meta(kernel, meta)
    return Case(name, kernel, types, constexprs, options, **kw)


def _norm_quant_schemes() -> dict[str, tuple[str | None, tuple[Any, ...], str, str]]:
    """label → (scheme, op parameters, Triton type of the codes, of the scales)."""
    schemes: dict[str, tuple[str | None, tuple[Any, ...], str, str]] = {
        "none": (None, (), "bf16", "bf16"),
        "mxfp4": ("mxfp4", (), "u8", "u8"),
        "mxfp8": ("mxfp8", (), "fp8e4nv", "u8"),
    }
    for fp8, ue8m0 in itertools.product(("e4m3fn", "e4m3fnuz"), (False, True)):
        tag = f"{fp8}{'_ue8m0' if ue8m0 else ''}"
        schemes[f"fp8_group128_{tag}"] = (
            "fp8_group",
            (128, ue8m0, _FP8_TORCH[fp8]),
            _FP8[fp8],
            "fp32",
        )
        per_token = (ue8m0, _FP8_TORCH[fp8])
        schemes[f"fp8_per_token_{tag}"] = ("fp8_per_token", per_token, _FP8[fp8], "fp32")
    return schemes


def norm_quant_types(dtype: str, q_ty: str, s_ty: str) -> dict[str, str]:
    """norm_quant_kernel's runtime argument types: activations of ``dtype``, codes and scales of
    the Triton types ``q_ty`` and ``s_ty``."""
    return {
        **{p: f"*{dtype}" for p in ("x_ptr", "r_ptr", "w_ptr", "y_ptr", "res_ptr")},
        "q_ptr": f"*{q_ty}",
        "s_ptr": f"*{s_ty}",
        **{p: "i32" for p in ("x_stride", "r_stride", "K")},
        **{p: "fp32" for p in ("eps", "fp8_max", "min_scale")},
    }


# the launch-policy walk (every record a width's row counts get) in full for these schemes; the
# others (UE8M0, FNUZ) differ from them only in constexprs the walk does not change, and walk only
# rows that get one program per row and no pieces (the common record)
_ONE_PROGRAM_ROWS = policy.NORM_SPLIT_MAX_ROWS + 1
# the records whose code differs by scheme (the row in pieces)
_WALKED = ("none", "mxfp4", "mxfp8", "fp8_group128_e4m3fn", "fp8_per_token_e4m3fn")


def _norm_quant_cases() -> Iterator[Case]:
    combos = itertools.product(
        _norm_quant_schemes().items(), ("bf16", "fp16", "fp32"), (False, True), (False, True),
        (False, True),
    )  # fmt: skip
    for (label, (scheme, params, q_ty, s_ty)), dtype, has_res, pdl, other in combos:
        if pdl and (has_res or other):  # PDL changes only the prologue: once per scheme, dtype
            continue
        # other rounding points (vLLM IR's): once per scheme for a 16-bit dtype
        if other and (dtype != "bf16" or "ue8m0" in label):
            continue
        types = norm_quant_types(dtype, q_ty, s_ty)
        flags = NormFlags(
            residual=has_res,
            write_y=scheme is None,
            numerics=NormNumerics(False, other, other and has_res),
        )
        consts = scheme_constants(scheme, params, 8192)
        fnuz = q_ty == _FP8["e4m3fnuz"]
        # a few dozen rows of 8192 columns (one program per row)
        base = policy.norm_launch(
            8192, _ONE_PROGRAM_ROWS, _NVIDIA_PDL if pdl else _NVIDIA, scheme=scheme, params=params,
            residual=has_res,
        )  # fmt: skip
        yield make_case(
            f"norm_quant_kernel[{label}, {dtype}, {'add+' if has_res else ''}rms"
            f"{', pdl' if pdl else ''}{', vllm_ir numerics' if other else ''}]",
            k.norm_quant_kernel,
            types,
            norm_quant_meta(base, flags, consts),
            hip_only_fnuz=fnuz,
        )
        if dtype != "bf16" or pdl or other:
            continue
        # every other record rows of 7168 columns get: decode sizes (a row split over programs;
        # one row: more warps), many rows (fewer warps; block-quant schemes without a residual:
        # the row in unpadded pieces)
        for rows, launch in policy.norm_launch_space(
            7168, _NVIDIA, scheme=scheme, params=params, residual=has_res
        ):
            pieces = "+".join(str(p) for p in launch.pieces if p)
            split = launch.split > 1
            if launch == base or (label not in _WALKED and not pieces and not split):
                continue
            many = f"{rows} row{'s' if rows > 1 else ''}: {launch.num_warps} warps"
            many += f", split {launch.split}" if split else ""
            yield make_case(
                f"norm_quant_kernel[{label}, {dtype}, {'add+' if has_res else ''}rms, "
                + (f"pieces {pieces}" if launch.num_warps == 4 and pieces else
                   f"{many}{', pieces ' + pieces if pieces else ''}")
                + "]",
                k.norm_quant_kernel,
                types,
                norm_quant_meta(launch, flags, consts),
                hip_only_fnuz=fnuz,
            )  # fmt: skip
    # the norm alone: weightless_rms_norm (no weight), and an eps below 2⁻⁴⁰ (the correctly
    # rounded division instructions, on every target)
    for dtype, width, weightless, eps, label in (
        ("bf16", 512, True, 1e-6, "weightless rms"),
        ("fp16", 512, True, 1e-6, "weightless rms"),
        ("bf16", 8192, False, 2.0**-41, "rms, tiny eps"),
    ):
        launch = policy.norm_launch(
            width, _ONE_PROGRAM_ROWS, _NVIDIA, has_weight=not weightless, eps=eps
        )
        yield make_case(
            f"norm_quant_kernel[none, {dtype}, {label}]",
            k.norm_quant_kernel,
            norm_quant_types(dtype, dtype, dtype),
            norm_quant_meta(
                launch, NormFlags(weightless=weightless), scheme_constants(None, (), 1)
            ),
        )


def _all_reduce_cases() -> Iterator[Case]:
    """The one-shot all-reduce kernel: every scheme (FP8 as e4m3fn and, for gfx942, e4m3fnuz),
    with and without the norm-only output, bf16 (what tensor-parallel layers reduce), rows
    whole and split over 8 programs (decode sizes), at 2, 4 and 8 ranks (WORLD unrolls the
    sends and the rank-order sum)."""
    schemes = {
        label: _norm_quant_schemes()[label]
        for label in ("none", "mxfp4", "mxfp8", "fp8_group128_e4m3fn", "fp8_group128_e4m3fnuz")
    }
    for (label, (scheme, params, q_ty, s_ty)), rows, world in itertools.product(
        schemes.items(), (200, 16), (2, 4, 8)
    ):
        consts = scheme_constants(scheme, params, 8192)
        launch = policy.all_reduce_launch(8192, rows, _NVIDIA, group=consts["GROUP"], eps=1e-6)
        meta = all_reduce_meta(launch, world, 16, True, scheme is None, NormNumerics(), consts)
        yield make_case(
            f"all_reduce_norm_quant_kernel[{label}, bf16, world {world}, split {launch.split}]",
            k.all_reduce_norm_quant_kernel,
            {
                "x_ptr": "*bf16",
                "buf_ptrs": "*i64",
                "state_ptr": "*i32",
                "red_ptr": "*bf16",
                "r_ptr": "*bf16",
                "w_ptr": "*bf16",
                "y_ptr": "*bf16",
                "res_ptr": "*bf16",
                "q_ptr": f"*{q_ty}",
                "s_ptr": f"*{s_ty}",
                "x_stride": "i32",
                "r_stride": "i32",
                "M": "i32",
                "K": "i32",
                "eps": "fp32",
                "fp8_max": "fp32",
                "min_scale": "fp32",
                "rank": "i32",
                "slot_elems": "i64",
            },
            meta,
            hip_only_fnuz=q_ty == _FP8["e4m3fnuz"],
        )


def _rope_cache_cases() -> Iterator[Case]:
    for dtype, neox in itertools.product(("bf16", "fp16", "fp32"), (False, True)):
        yield Case(
            f"rope_kernel[{dtype}, {'neox' if neox else 'gptj'}]",
            k.rope_kernel,
            {
                "pos_ptr": "*i64",
                "x_ptr": f"*{dtype}",
                "out_ptr": f"*{dtype}",
                "cs_ptr": "*fp32",
                "x_stride_t": "i32",
                "x_stride_h": "i32",
                "HEADS": "i32",
            },
            {"D": 512, "ROPE": 64, "IS_NEOX": neox, "BLOCK_D": 512},
            {"enable_fp_fusion": False},
        )
    for layout, neox in itertools.product(("dsv4_fp8", "bf16"), (False, True)):
        dsv4 = layout == "dsv4_fp8"
        cache_ty = "*u8" if dsv4 else "*bf16"
        if not neox:  # no rope: once per layout
            yield Case(
                f"cache_write_kernel[{layout}]",
                k.cache_write_kernel,
                {
                    "kv_ptr": "*bf16",
                    "kv_stride": "i32",
                    "cache_ptr": cache_ty,
                    "slot_ptr": "*i64",
                    "block_stride": "i32",
                    "num_slots": "i32",
                },
                {"BS": 64, "D": 512, "DSV4": dsv4, "BLOCK_D": 512},
                {"num_warps": 4},
            )
        yield Case(
            f"rope_cache_kernel[{layout}, {'neox' if neox else 'gptj'}]",
            k.rope_cache_kernel,
            {
                "pos_ptr": "*i64",
                "q_ptr": "*bf16",
                "kv_ptr": "*bf16",
                "q_out_ptr": "*bf16",
                "kv_out_ptr": "*bf16",
                "cs_ptr": "*fp32",
                "cache_ptr": cache_ty,
                "slot_ptr": "*i64",
                "q_stride_t": "i32",
                "q_stride_h": "i32",
                "kv_stride": "i32",
                "block_stride": "i32",
                "num_slots": "i32",
                "HEADS": "i32",
            },
            {"BS": 64, "D": 512, "ROPE": 64, "IS_NEOX": neox, "DSV4": dsv4, "BLOCK_D": 512},
            {"enable_fp_fusion": False},
        )


def _q_kv_cases() -> Iterator[Case]:
    """The two-norm kernel: q plain or quantized (every scheme), bf16, PDL once; quantized q of
    1536 columns also as pieces (1024 + 512, one row per program); q's row split over programs
    (decode sizes, PDL) plain, as MXFP4 and with a per-token scale."""
    schemes = _norm_quant_schemes()
    quantized = ("mxfp4", "mxfp8", "fp8_group128_e4m3fn", "fp8_group128_e4m3fnuz")
    variants = (  # (scheme label, pdl, q in pieces, q split)
        *((label, False, False, False) for label in ("none", *quantized)),
        *((label, False, True, False) for label in quantized),  # pieces only with a quant
        ("none", True, False, False),  # PDL once (plain q)
        *((label, True, False, True) for label in ("none", "mxfp4", "fp8_per_token_e4m3fn")),
    )
    for label, pdl, pieces, split in variants:
        scheme, params, q_ty, s_ty = schemes[label]
        tags = ", pdl" if pdl else ", pieces" if pieces else ""
        tags += ", q split" if split else ""
        # many rows (two per program, or q in pieces), or a few rows with PDL
        launch = policy.q_kv_launch(
            1536 if pieces else 2048, 512, 2 if pdl else policy.MANY_ROWS,
            _NVIDIA_PDL if pdl else _NVIDIA, scheme=scheme, params=params,
        )  # fmt: skip
        if split:
            launch = replace(launch, q_split=max(2, launch.q_split))
        yield make_case(
            f"q_kv_norm_quant_kernel[{label}, bf16{tags}]",
            k.q_kv_norm_quant_kernel,
            {
                "q_ptr": "*bf16",
                "qw_ptr": "*bf16",
                "y_ptr": "*bf16",
                "codes_ptr": f"*{q_ty}",
                "scales_ptr": f"*{s_ty}",
                "kv_ptr": "*bf16",
                "kvw_ptr": "*bf16",
                "kv_out_ptr": "*bf16",
                "M": "i32",
                "q_stride": "i32",
                "kv_stride": "i32",
                "K_Q": "i32",
                "K_KV": "i32",
                "q_eps": "fp32",
                "kv_eps": "fp32",
                "fp8_max": "fp32",
                "min_scale": "fp32",
            },
            q_kv_meta(launch, scheme is None, False, scheme_constants(scheme, params, 2048)),
            hip_only_fnuz=q_ty == _FP8["e4m3fnuz"],
        )


def _chain_case(
    name: str, kernel: JITFunction, types: dict[str, str], geometry: dict[str, Any]
) -> Case:
    """A norm + rope + cache-write kernel over a few rows of 512 (HIP is set per target by
    compile_to_isa)."""
    launch = policy.chain_launch(geometry["D"], 2, _NVIDIA, 1e-6)
    return make_case(name, kernel, types, (*geometry.items(), *chain_meta(launch, hip=False)))


def _norm_rope_cache_cases() -> Iterator[Case]:
    """The kv-only chain kernel: fp32 or bf16 input, both layouts, both rope styles."""
    for (layout, x_ty), neox in itertools.product(
        (("dsv4_fp8", "fp32"), ("dsv4_fp8", "bf16"), ("bf16", "fp32")), (False, True)
    ):
        dsv4 = layout == "dsv4_fp8"
        yield _chain_case(
            f"norm_rope_cache_kernel[{layout}, {x_ty} -> bf16, {'neox' if neox else 'gptj'}]",
            k.norm_rope_cache_kernel,
            {
                "pos_ptr": "*i64",
                "x_ptr": f"*{x_ty}",
                "w_ptr": f"*{x_ty}",
                "kv_out_ptr": "*bf16",
                "cs_ptr": "*fp32",
                "cache_ptr": "*u8" if dsv4 else "*bf16",
                "slot_ptr": "*i64",
                "x_stride": "i32",
                "eps": "fp32",
                "block_stride": "i32",
                "num_slots": "i32",
            },
            {
                "BS": 64,
                "D": 512,
                "ROPE": 64,
                "IS_NEOX": neox,
                "DSV4": dsv4,
                "BLOCK_D": 512,
            },
        )


def _qnorm_rope_cache_cases() -> Iterator[Case]:
    """Per-head q norm + both ropes + the kv write: both layouts, both rope styles."""
    for layout, neox in itertools.product(("dsv4_fp8", "bf16"), (False, True)):
        dsv4 = layout == "dsv4_fp8"
        yield _chain_case(
            f"qnorm_rope_cache_kernel[{layout}, bf16, {'neox' if neox else 'gptj'}]",
            k.qnorm_rope_cache_kernel,
            {
                "pos_ptr": "*i64",
                **{p: "*bf16" for p in ("q_ptr", "kv_ptr", "q_out_ptr", "kv_out_ptr")},
                "cs_ptr": "*fp32",
                "cache_ptr": "*u8" if dsv4 else "*bf16",
                "slot_ptr": "*i64",
                **{p: "i32" for p in ("q_stride_t", "q_stride_h", "kv_stride")},
                "q_eps": "fp32",
                **{p: "i32" for p in ("block_stride", "num_slots", "HEADS")},
            },
            {
                "BS": 64,
                "D": 512,
                "ROPE": 64,
                "IS_NEOX": neox,
                "DSV4": dsv4,
                "BLOCK_D": 512,
            },
        )


def _dequant_cases() -> Iterator[Case]:
    dequant = policy.dequant_launch(64)
    for out in ("bf16", "e4m3fn", "e4m3fnuz"):
        to_fp8 = out != "bf16"
        out_ty = _FP8[out] if to_fp8 else "bf16"
        yield Case(
            f"dequant_dsv4_kernel[-> {out}]",
            k.dequant_dsv4_kernel,
            {
                "cache_ptr": "*u8",
                "ids_ptr": "*i32",
                "out_ptr": f"*{out_ty}",
                "block_stride": "i32",
                "num_blocks": "i32",
                "fp8_max": "fp32",
            },
            {"BS": 64, "TOK": dequant.tokens, "TO_FP8": to_fp8},
            {"num_warps": dequant.num_warps},
            hip_only_fnuz=out == "e4m3fnuz",
        )
        yield Case(
            f"gather_rows_kernel[bf16 -> {out}]",
            k.gather_rows_kernel,
            {
                "cache_ptr": "*bf16",
                "ids_ptr": "*i32",
                "out_ptr": f"*{out_ty}",
                "block_stride": "i32",
                "num_blocks": "i32",
                "fp8_max": "fp32",
            },
            {"ROW": 64 * 512, "BLOCK": 4096, "TO_FP8": to_fp8},
            {"num_warps": 4},
            hip_only_fnuz=out == "e4m3fnuz",
        )


def cases() -> list[Case]:
    """Every kernel of :mod:`.kernels`, once per path its launches take."""
    return [
        *_norm_quant_cases(),
        *_all_reduce_cases(),
        *_q_kv_cases(),
        *_rope_cache_cases(),
        *_norm_rope_cache_cases(),
        *_qnorm_rope_cache_cases(),
        *_dequant_cases(),
    ]


def compile_to_isa(case: Case, target: GPUTarget, with_cubin: bool) -> dict[str, int]:
    """Run Triton's stages for ``target`` down to the assembly; returns bytes per stage."""
    last = "cubin" if with_cubin and target.backend == "cuda" else _ISA_STAGE[target.backend]
    sizes: dict[str, int] = {}
    compile_stages(case, target, last, sizes)
    return sizes


def compile_stages(
    case: Case,
    target: GPUTarget,
    last: str,
    sizes: dict[str, int] | None = None,
    divisible: tuple[str, ...] = (),
) -> Any:
    """``case`` compiled through Triton's stages for ``target`` up to stage ``last`` ("ptx",
    "cubin", "amdgcn", ...), returned as that stage makes it (text or bytes); ``sizes`` gets the
    bytes of every stage run. ``divisible``: runtime arguments to specialize as multiples of 16
    (``tt.divisibility``, what Triton's launcher gives aligned pointers and strides; the check
    itself compiles without it)."""
    backend = make_backend(target)
    signature = dict(case.types)
    constexprs = dict(case.constexprs)
    if "HIP" in case.kernel.arg_names:  # the kernel's vendor switch follows the target
        constexprs["HIP"] = target.backend == "hip"
    if constexprs.get("INV_BY_FMA"):  # PTX seeds: the launchers choose them on NVIDIA only
        constexprs["INV_BY_FMA"] = target.backend == "cuda"
    if target.backend != "cuda":  # PDL is NVIDIA's: the launchers never turn it on for ROCm
        for name in ("USE_PDL", "PREFETCH_W"):  # (Triton 3.9's AMD backend rejects gdc_wait)
            if name in constexprs:
                constexprs[name] = False
    signature.update({name: "constexpr" for name in constexprs})
    names = case.kernel.arg_names
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    src = ASTSource(fn=case.kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {**dict(PINNED_OPTIONS), **dict(case.options)}  # as the launcher compiles them
    if target.backend != "cuda":
        options.pop("launch_pdl", None)  # a CUDA launch option only (kernels guard USE_PDL)
    opts = backend.parse_options(options)
    stages: dict[str, Any] = {}
    backend.add_stages(stages, opts, src.language)
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    module = src.make_ir(
        target, opts, backend.get_codegen_implementation(opts), backend.get_module_map(), context
    )
    metadata: dict[str, Any] = {"hash": "compile-check", "target": target, **opts.__dict__}
    for ext, stage in stages.items():
        module = stage(module, metadata)
        if sizes is not None:
            sizes[ext] = len(module) if isinstance(module, (str, bytes)) else len(str(module))
        if ext == last:
            return module
    raise RuntimeError(f"no stage {last!r} for {target}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", default=",".join(TARGETS), help=f"from {sorted(TARGETS)}")
    args = p.parse_args(argv)
    targets = {name: TARGETS[name] for name in args.targets.split(",")}
    with_cubin = shutil.which("ptxas") is not None
    import triton

    print(
        f"triton {triton.__version__}; targets {', '.join(targets)}; "
        f"sm_90 down to {'SASS (ptxas found)' if with_cubin else 'PTX (no ptxas)'}"
    )
    failures = 0
    total = 0
    start = time.perf_counter()
    for case in cases():
        for tname, target in targets.items():
            if case.hip_only_fnuz and tname != "gfx942":
                continue  # FNUZ FP8 exists on gfx942 only (CUDA calls run the reference backend)
            total += 1
            try:
                sizes = compile_to_isa(case, target, with_cubin)
            except Exception as exc:  # noqa: BLE001 - report every failure, then fail
                failures += 1
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                print(f"FAIL {tname:7s} {case.name}: {type(exc).__name__}: {first[:200]}")
                continue
            last = list(sizes)[-1]
            print(f"ok   {tname:7s} {case.name} ({last} {sizes[last]} bytes)")
    print(
        f"{total - failures}/{total} compiles passed in {time.perf_counter() - start:.0f} s"
        + (f"; {failures} FAILED" if failures else "")
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
