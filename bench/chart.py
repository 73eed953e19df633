"""A picture of results.json: every Mesh/baseline ratio as a bar, with its goal
and, where one was measured, its floor (the same messages in raw gRPC).

Written next to the results (``results.png``) by ``python -m bench``, so a
reader sees at a glance where Mesh stands; ``python -m bench.chart`` redraws it
from a results file.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt  # after the backend is chosen

from bench.report import GOALS

MET, MISSED, NO_GOAL, GOAL, FLOOR = "#2e7d32", "#ef6c00", "#90a4ae", "#c62828", "black"


def draw(results: dict[str, Any], path: Path) -> None:
    """Bars of every comparison's ratio (log scale, parity at 1), goals and floors
    marked, and the memory-per-key ratio against Redis (lower is better) last."""
    # label, ratio, goal, floor, higher wins, round-by-round ratios
    rows: list[tuple[str, float, float | None, float | None, bool, list[float]]] = []
    # The goals the run recorded (a results file from before they were kept: today's).
    recorded = results.get("goals", {})
    goals = {key: g["min_ratio"] for key, g in recorded.items()} or GOALS
    for key, c in results["comparisons"].items():
        rows.append((textwrap.fill(f"{c['label']} vs {c['baseline_label']}", 72), c["ratio"],
                     goals.get(key), recorded.get(key, {}).get("floor_ratio"), True,
                     c.get("round_ratios", [])))
    growth = results.get("growth")
    if growth:
        rows.append((f"memory per cache key at {growth['keys']:,} keys vs Redis "
                     "(lower is better)", growth["ratio"], growth["goal_ratio"], None, False, []))

    height = 0.42 * len(rows) + 1.6
    figure, axes = plt.subplots(figsize=(12, height))
    positions = list(range(len(rows)))[::-1]
    for y, (_, ratio, goal, floor, higher, rounds) in zip(positions, rows, strict=True):
        if goal is None:
            color = NO_GOAL
        else:
            color = MET if (ratio >= goal if higher else ratio <= goal) else MISSED
        axes.barh(y, ratio, color=color, height=0.7)
        if rounds:  # how far the ratio moved from round to round
            axes.plot([min(rounds), max(rounds)], [y, y], color=FLOOR, linewidth=0.8)
        axes.text(max([ratio, *rounds]) * 1.03, y, f"{ratio:.2f}x", va="center", fontsize=7)
        if goal is not None:
            axes.plot([goal, goal], [y - 0.45, y + 0.45], color=GOAL, linewidth=2)
        if floor is not None:
            axes.plot([floor], [y], marker="D", markersize=4, color=FLOOR)
    axes.set_yticks(positions, [label for label, *_ in rows], fontsize=7)
    axes.set_xscale("log")
    ticks = [t for t in (0.1, 0.25, 0.5, 1, 2, 4, 8, 16) if t <= max(r for _, r, *_ in rows) * 2]
    axes.set_xticks(ticks, [f"{t:g}" for t in ticks])
    axes.set_xlim(right=max(r for _, r, *_ in rows) * 1.6)
    axes.axvline(1.0, color="black", linewidth=0.8)
    axes.set_xlabel("Mesh / baseline (log scale; 1 = parity; red tick = goal; black diamond = "
                    "floor: the same messages in raw gRPC, nothing of Mesh; thin line: the "
                    "ratio's range over the run's rounds)")
    axes.set_title(f"Mesh benchmark, {results['timestamp']} "
                   f"({results['cpu_count']} CPUs{', quick run' if results['quick'] else ''})",
                   fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.chart", description=__doc__.splitlines()[0])
    p.add_argument("results", type=Path, nargs="?",
                   default=Path(__file__).resolve().parent / "results.json")
    p.add_argument("--output", type=Path, help="default: the results' path, .png")
    args = p.parse_args(argv)
    output = args.output or args.results.with_suffix(".png")
    draw(json.loads(args.results.read_text()), output)
    print(f"chart written to {output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
