"""The benchmark runs end to end (``python -m bench --quick``) and reports every number.

Only the shape of results.json is checked: tests never assert speed.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

WORKLOADS = {
    "echo.get.seq", "mesh.get.seq", "echo.get.c64", "mesh.get.c64",
    "mesh.mget100.seq", "mesh.mget100.c16",
    "redis.get.seq", "redis.pipeline100.seq", "redis.pipeline100.c16",
}
COMPARISONS = {"get.seq", "get.c64", "mget100.seq", "mget100.c16", "get.seq.redis"}


@pytest.mark.timeout(150)
def test_quick_bench_writes_every_workload_and_ratio(tmp_path: Path) -> None:
    output = tmp_path / "results.json"
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--output", str(output)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, f"stdout:\n{run.stdout}\nstderr:\n{run.stderr}"
    assert "| workload | Mesh | baseline | ratio |" in run.stdout

    results = json.loads(output.read_text())
    for key in ("python", "grpcio", "cpu_count", "timestamp"):
        assert results[key], key

    assert set(results["workloads"]) == WORKLOADS
    for name, workload in results["workloads"].items():
        assert workload["ops"] > 0, name
        assert workload["ops_per_s"] > 0, name
        assert workload["keys_per_s"] > 0, name

    assert set(results["comparisons"]) == COMPARISONS
    for key, c in results["comparisons"].items():
        assert c["mesh"] in WORKLOADS and c["baseline"] in WORKLOADS, key
        assert c["mesh_rate"] > 0 and c["baseline_rate"] > 0, key
        assert isinstance(c["ratio"], float) and math.isfinite(c["ratio"]), key
        assert c["ratio"] == pytest.approx(c["mesh_rate"] / c["baseline_rate"], rel=0.01), key
