"""The partition table: `tests/test_partitions.py` run a fixed number of times.

Each run is a whole pytest run of that module (a fresh set of network-namespace
hosts and a fresh mesh); the scenarios append their figures to a file
(``MESH_PARTITION_FIGURES``), and this sums them up as min/median/max per
figure. A run whose checkers fail fails the report: a partition table is only
worth printing if every run was safe. Needs root (network namespaces).

    python -m bench.partitions --runs 5 --output bench/partitions.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

MODULE = "tests/test_partitions.py"


def run_once(figures: Path) -> None:
    """One pytest run of the partition module; raises if any scenario failed."""
    env = {**os.environ, "MESH_PARTITION_FIGURES": str(figures)}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", MODULE],
        env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.stderr.write(result.stdout[-20_000:])
        raise SystemExit(f"{MODULE} failed (exit {result.returncode}): no table from an "
                         f"unsafe run")


def summarize(lines: list[dict[str, Any]], runs: int) -> dict[str, Any]:
    """``{scenario: {figure: {min, median, max}}}`` over every run's figures."""
    values: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for line in lines:
        scenario = line["scenario"]
        for name, value in line.items():
            if name != "scenario":
                values[scenario][name].append(float(value))
    return {
        "runs": runs,
        "scenarios": {
            scenario: {name: {"min": round(min(v), 3),
                              "median": round(statistics.median(v), 3),
                              "max": round(max(v), 3), "n": len(v)}
                       for name, v in sorted(figures.items())}
            for scenario, figures in sorted(values.items())},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs of the module (default 5)")
    parser.add_argument("--output", type=Path, default=Path("bench/partitions.json"),
                        help="where the summary goes (default bench/partitions.json)")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be >= 1")
    with tempfile.TemporaryDirectory() as tmp:
        figures = Path(tmp) / "figures.jsonl"
        for i in range(args.runs):
            started = time.monotonic()
            run_once(figures)
            print(f"[partitions {i + 1}/{args.runs}] passed in "
                  f"{time.monotonic() - started:.0f} s", flush=True)
        lines = [json.loads(line) for line in figures.read_text().splitlines() if line]
    summary = summarize(lines, args.runs)
    args.output.write_text(json.dumps(summary, indent=2) + "\n")
    for scenario, found in summary["scenarios"].items():
        shown = ", ".join(f"{name} {v['min']:g}/{v['median']:g}/{v['max']:g}"
                          for name, v in found.items())
        print(f"{scenario}: {shown}")


if __name__ == "__main__":
    main()
