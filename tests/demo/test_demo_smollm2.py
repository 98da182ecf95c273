"""CI smoke run of the main job: ``recursify demo --quick`` on the embedded SmolLM2-135M."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest

from helpers import numbers
from recursify.cli import main
from recursify.demo.plan import GRID
from recursify.demo.report import HEADLINE_KEYS, PLOTS

pytestmark = pytest.mark.slow


def test_quick_demo_on_the_embedded_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    began = time.perf_counter()
    assert main(["demo", "--quick", "--out", str(tmp_path / "demo")]) == 0
    minutes = (time.perf_counter() - began) / 60
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert report["options"]["model"] == "smollm2-135m" and report["options"]["quick"]
    assert len(report["headline"]) == len(GRID) + 2  # the original, the grid and the exit-trained model
    assert all(set(HEADLINE_KEYS) <= set(row) for row in report["headline"])
    assert report["models"]["original"]["eval"]["per_loop"][0]["kl_teacher"] == pytest.approx(0.0, abs=1e-4)
    assert all(math.isfinite(n) for n in numbers(report))
    assert all((tmp_path / "demo" / path).is_file() for path in PLOTS.values())
    with capsys.disabled():  # measured, not asserted: the goal is < 3 minutes on 2 cores
        print(f"\ndemo --quick on smollm2-135m took {minutes:.1f} min")
