"""The hot paths, this tree against a commit, side by side in one run.

`python -m tests.bench.compare --against <commit>` (`make bench AGAINST=<commit>`) checks the
commit out into a temporary worktree and runs the gateway benchmark (bench_gateway: what the
Envoy hop adds to GetCertificate) and the verify benchmark (bench_verify: VerifyApiKey and
Check against the echo ceiling of one Python process) for both trees, alternating them round by
round on the same machine at the same moment, then prints each figure and the ratio of this
tree to the commit. Ratios, not absolute times, are what compare across a shared machine.

Figures printed (the median over rounds):
- hop ratio: GetCertificate p50 through Envoy (native gRPC; and REST) / direct gRPC p50;
- verify and Check cache hits as a fraction of the echo ceiling (req/s and CPU per call).

It prints numbers and asserts nothing about time.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_GATEWAY_ROW = re.compile(
    r"^(direct gRPC to cert_service|gRPC through Envoy|REST through Envoy \(HTTP/1\.1\))"
    r"\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)",
    re.M,
)
_CEILING = re.compile(
    r"^(verify|Check) cache hit / echo ceiling: (\d+)% \(req/s\), (\d+)% \(CPU/call\)", re.M
)


@contextlib.contextmanager
def checkout(revision: str) -> Iterator[Path]:
    """`revision` in a temporary worktree, removed afterwards."""
    directory = Path(tempfile.mkdtemp(prefix="myl-bench-base-"))
    tree = directory / "tree"
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet", str(tree), revision],
        check=True,
    )
    try:
        yield tree
    finally:
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False
        )
        with contextlib.suppress(OSError):
            directory.rmdir()


def run_module(tree: Path, module: str, *args: str) -> str:
    """`python -m <module>` with `tree`'s code (its own packages first on the path)."""
    env = {**os.environ, "PYTHONPATH": f"{tree}{os.pathsep}{tree / 'protos'}"}
    done = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"{module} failed in {tree}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
        )
    return done.stdout


def gateway_figures(output: str) -> dict[str, float]:
    """The h2load table's figures: the first row of each path (bench_gateway prints a Python
    client's table after it, whose direct row has the same label and a slower client)."""
    p50: dict[str, float] = {}
    p99: dict[str, float] = {}
    for match in _GATEWAY_ROW.finditer(output):
        p50.setdefault(match.group(1), float(match.group(3)))
        p99.setdefault(match.group(1), float(match.group(5)))
    direct = p50["direct gRPC to cert_service"]
    return {
        "direct p50 ms": direct,
        "gRPC via Envoy p50 ms": p50["gRPC through Envoy"],
        "gRPC via Envoy p99 ms": p99["gRPC through Envoy"],
        "REST via Envoy p50 ms": p50["REST through Envoy (HTTP/1.1)"],
        "hop ratio gRPC (p50 / direct)": p50["gRPC through Envoy"] / direct,
        "hop ratio REST (p50 / direct)": p50["REST through Envoy (HTTP/1.1)"] / direct,
    }


def verify_figures(output: str) -> dict[str, float]:
    figures: dict[str, float] = {}
    for match in _CEILING.finditer(output):
        figures[f"{match.group(1)} hit / echo (req/s)"] = int(match.group(2)) / 100
        figures[f"{match.group(1)} hit / echo (CPU/call)"] = int(match.group(3)) / 100
    return figures


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", required=True, help="the commit to compare with")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--requests", type=int, default=3000, help="per gateway run")
    parser.add_argument("--no-verify", action="store_true", help="the gateway benchmark only")
    args = parser.parse_args(argv)
    trees = {"this tree": ROOT}
    samples: dict[str, dict[str, list[float]]] = {name: {} for name in ("this tree", "commit")}
    with checkout(args.against) as base:
        trees["commit"] = base
        for round_number in range(args.rounds):
            # Alternate which tree goes first, so neither always meets a warmer machine.
            order = list(trees.items())
            if round_number % 2:
                order.reverse()
            for name, tree in order:
                print(f"round {round_number + 1}: {name} ...", flush=True)
                figures = gateway_figures(
                    run_module(tree, "tests.bench.bench_gateway", "--requests", str(args.requests))
                )
                if not args.no_verify:
                    figures |= verify_figures(run_module(tree, "tests.bench.bench_verify"))
                for key, value in figures.items():
                    samples[name].setdefault(key, []).append(value)
    print(f"\nthis tree against {args.against}, median of {args.rounds} round(s) each")
    print(f"{'figure':<34}{'this tree':>12}{'commit':>12}{'ratio':>9}")
    for key in samples["this tree"]:
        ours = statistics.median(samples["this tree"][key])
        theirs = statistics.median(samples["commit"].get(key, [float("nan")]))
        ratio = ours / theirs if theirs else float("nan")
        print(f"{key:<34}{ours:>12.3f}{theirs:>12.3f}{ratio:>9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
