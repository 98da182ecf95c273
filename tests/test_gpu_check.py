"""scripts/gpu_check.sh --dry-run: every step of the GPU check, tiny, on the CPU, so the script cannot rot unseen."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # fetches/converts the embedded SmolLM2 and uptrains it briefly (~1.5 min)
def test_dry_run_runs_every_step_and_writes_the_summary(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "GPU_CHECK_PEAK_FLOPS": "1e12", "OUT": str(tmp_path / "out")}
    command = ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--work", str(tmp_path / "work")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    summary = json.loads((tmp_path / "out" / "gpu_check.json").read_text())  # $OUT/gpu_check.json, as on the device machine
    assert result.returncode == 0, json.dumps(summary["steps"], indent=2)[-3000:]
    assert summary["ok"] and summary["dry_run"] and summary["device"] == "cpu"
    assert {name: step["status"] for name, step in summary["steps"].items()} == {
        "environment": "ok",
        "install": "skipped",
        "tests": "ok",
        "convert": "ok",
        "uptrain": "ok",
        "uptrain_compile": "skipped",
        "bench_serve": "ok",
    }
    assert summary["tests"]["passed"] > 0 and summary["tests"]["failed"] == [] and summary["tests"]["device"] == "cpu"
    uptrain = summary["uptrain"]
    assert uptrain["steps"] > 0 and uptrain["tokens_per_s_steady"] > 0 and uptrain["flops_per_token"] > 0
    assert uptrain["peak_flops"] == 1e12 and uptrain["fused_adamw"] is False  # --peak-flops from GPU_CHECK_PEAK_FLOPS; CPU: unfused
    assert uptrain["mfu"] == pytest.approx(uptrain["tokens_per_s_steady"] * uptrain["flops_per_token"] / 1e12)
    rows = {row["name"].split()[0]: row for row in summary["bench_serve"]["rows"]}
    assert {"1", "2", "3", "4", "5"} <= set(rows) and all(rows[r]["tokens_per_s"] > 0 for r in "12345")
