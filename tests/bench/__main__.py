"""`make bench`: run every benchmark module (tests/bench/bench_*.py) in turn.

Each prints its numbers; none passes or fails on a time. Pass module names
(`python -m tests.bench bench_verify`) to run a subset. bench_scale (ten million devices: tens
of GB and about half an hour) runs only when named.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ONLY_WHEN_NAMED = frozenset({"bench_scale"})


def main(argv: list[str]) -> int:
    here = Path(__file__).resolve().parent
    names = argv or sorted(p.stem for p in here.glob("bench_*.py") if p.stem not in ONLY_WHEN_NAMED)
    failed = 0
    for name in names:
        print(f"\n=== {name} ===", flush=True)
        done = subprocess.run([sys.executable, "-m", f"tests.bench.{name}"], check=False)
        failed += done.returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
