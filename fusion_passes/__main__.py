"""python -m fusion_passes report [options]   (see fusion_passes.report)"""

import sys

from .report import main

USAGE = "usage: python -m fusion_passes report [--help]"

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] != "report":
        print(USAGE, file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[2:]))
