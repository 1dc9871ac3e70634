"""Static sm_90 instruction counts of one norm_quant_kernel launch, on a machine without a GPU.

    python benchmarks/sass_counts.py --kdim 7168 --rows 8192 --scheme mxfp4 [--residual]
        [--dtype bf16] [--top 25] [--sass out.sass]

The launch policy's record for the rows is compiled as the compile check compiles it, with the
pointers, strides and width specialized as multiples of 16 (as Triton's launcher specializes
aligned arguments at run time), down to the cubin (Triton's ``ptxas``), and disassembled with
Triton's ``nvdisasm``. The kernels are straight-line per program, so the static count per
thread, divided by its elements, is what a change adds or removes per element: the measure to
take before a GPU run when a kernel is bound by issuing instructions (MXFP4 at many rows was).
Not a timing: RESULTS.md holds timings only.
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget

from fusion_ops import launch_policy as policy
from fusion_ops.reference.norm import NormNumerics
from fusion_ops.triton_backend import compile_check
from fusion_ops.triton_backend import kernels as k
from fusion_ops.triton_backend.calls import NormFlags, norm_quant_meta, scheme_constants

SM_90 = GPUTarget("cuda", 90, 32)
PDL = policy.DeviceFacts(hip=False, pdl=True, prefetch_weight=True, sm_count=132)
FN = torch.float8_e4m3fn
# scheme → (op parameters, Triton type of the codes, of the scales)
SCHEMES = {
    "none": ((), None, None),
    "mxfp4": ((), "u8", "u8"),
    "mxfp8": ((), "fp8e4nv", "u8"),
    "fp8_group": ((128, False, FN), "fp8e4nv", "fp32"),
    "fp8_per_token": ((False, FN), "fp8e4nv", "fp32"),
}
_OPCODE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")


def opcode_counts(sass: str) -> collections.Counter[str]:
    """Instructions of a disassembly by opcode (modifiers dropped: ``IMAD.MOV.U32`` → IMAD)."""
    return collections.Counter(m.group(1) for m in map(_OPCODE.search, sass.splitlines()) if m)


def disassemble(cubin: bytes) -> str:
    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run(
            [str(nvdisasm), "-c", f.name], capture_output=True, text=True, check=True
        ).stdout


def norm_quant_sass(
    kdim: int, rows: int, scheme: str, residual: bool, dtype: str
) -> tuple[policy.NormLaunch, str]:
    """(the policy's record, the sm_90 disassembly of its launch) for the fused op over these
    rows: norm (+ residual) → quant, the normed output not written (as the fused ops launch)."""
    params, q_ty, s_ty = SCHEMES[scheme]
    quant = None if scheme == "none" else scheme
    launch = policy.norm_launch(kdim, rows, PDL, scheme=quant, params=params, residual=residual)
    flags = NormFlags(residual=residual, write_y=quant is None, numerics=NormNumerics())
    meta = norm_quant_meta(launch, flags, scheme_constants(quant, params, launch.block_k))
    types = compile_check.norm_quant_types(dtype, q_ty or dtype, s_ty or dtype)
    case = compile_check.make_case("sass_counts", k.norm_quant_kernel, types, meta)
    divisible = tuple(n for n in types if n.endswith("_ptr") or n in ("x_stride", "r_stride", "K"))
    cubin = compile_check.compile_stages(case, SM_90, "cubin", divisible=divisible)
    return launch, disassemble(cubin)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kdim", type=int, default=7168)
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--scheme", default="mxfp4", choices=sorted(SCHEMES))
    parser.add_argument("--residual", action="store_true")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--top", type=int, default=25, help="opcodes to list")
    parser.add_argument("--sass", default=None, help="also write the disassembly here")
    args = parser.parse_args()
    launch, sass = norm_quant_sass(args.kdim, args.rows, args.scheme, args.residual, args.dtype)
    counts = opcode_counts(sass)
    threads = launch.num_warps * 32
    part = launch.block_k // launch.split  # the columns a program writes
    total = sum(counts.values())
    print(launch)
    print(
        f"{total} instructions per thread; {part / threads:g} written elements per thread "
        f"({total * threads / part:.1f} per element"
        + ("; each program also loads the whole row for its sums" if launch.split > 1 else "")
        + ")"
    )
    print(", ".join(f"{op} {n}" for op, n in counts.most_common(args.top)))
    if args.sass:
        Path(args.sass).write_text(sass)


if __name__ == "__main__":
    main()
