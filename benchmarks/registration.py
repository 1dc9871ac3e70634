"""Time to build FusionPass() with every family, in fresh processes (cold: imports excluded).

python benchmarks/registration.py [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CHILD = """
import json, time, torch, fusion_ops, fusion_passes
t0 = time.perf_counter()
p = fusion_passes.FusionPass()
t1 = time.perf_counter()
p2 = fusion_passes.FusionPass()
t2 = time.perf_counter()
print(json.dumps({"first_s": t1 - t0, "second_s": t2 - t1, "patterns": p.pattern_count,
                  "torch": torch.__version__}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    rows = []
    for _ in range(args.runs):
        out = subprocess.run(
            [sys.executable, "-c", CHILD], capture_output=True, text=True, check=True
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    first = [r["first_s"] for r in rows]
    second = [r["second_s"] for r in rows]
    print(
        f"FusionPass() with all families: {rows[0]['patterns']} patterns, torch {rows[0]['torch']}"
    )
    print(f"  first in a process : median {statistics.median(first):.3f} s, max {max(first):.3f} s")
    print(
        f"  second in a process: median {statistics.median(second):.3f} s, max {max(second):.3f} s"
    )


if __name__ == "__main__":
    main()
