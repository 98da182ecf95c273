"""Two CPU processes (DDP over gloo, via accelerate launch) follow the single-process loss curve.

They are launched from configs/cpu-2proc.yaml with ACCELERATE_USE_CPU=1: accelerate 1.x's
``launch --cpu --num_processes 2`` starts a single process (tests/test_configs.py shows it), which
would make this comparison vacuous; the saved training state records the world size to prove it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from recursify.training.config import UptrainConfig
from recursify.training.metrics import read_metrics
from recursify.training.uptrain import uptrain

STEPS = 6


@pytest.mark.slow  # launches two accelerate processes
def test_two_processes_match_one_process(tiny_run, tmp_path) -> None:
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    if launcher is None:
        pytest.fail("accelerate's launcher is not installed next to this interpreter")
    options = ["--tokens", str(STEPS * 128), "--seq-len", "16", "--batch-tokens", "128", "--micro-batch", "2", "--lr", "3e-3"]
    options += ["--precision", "fp32", "--save-every", "0", "--eval-tokens", "0", "--quiet", "--warmup-steps", "0"]
    config = Path(__file__).resolve().parents[2] / "configs" / "cpu-2proc.yaml"
    command = [launcher, "launch", "--config_file", str(config), "-m", "recursify", "uptrain", str(tiny_run["student"])]
    command += ["--teacher", str(tiny_run["source"]), "--data", str(tiny_run["data"]), *options, "--out", str(tmp_path / "ddp")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    single = UptrainConfig(
        str(tiny_run["student"]), str(tmp_path / "single"), str(tiny_run["source"]), str(tiny_run["data"]), tokens=STEPS * 128,
        seq_len=16, batch_tokens=128, micro_batch=2, lr=3e-3, precision="fp32", save_every=0, eval_tokens=0, quiet=True, warmup_steps=0,
    )  # fmt: skip
    uptrain(single)
    curves = [[r["loss"] for r in read_metrics(tmp_path / run / "metrics.jsonl") if r["event"] == "train"] for run in ("ddp", "single")]
    [state] = (tmp_path / "ddp" / "training").glob("step-*/state.json")
    assert json.loads(state.read_text())["world_size"] == 2
    assert len(curves[0]) == len(curves[1]) == STEPS
    assert curves[0] == pytest.approx(curves[1], rel=1e-4)
    assert curves[1][-1] < curves[1][0]  # it trains, so equal curves are not two flat lines


@pytest.mark.slow  # one more 2-process launch
def test_two_streaming_processes_stop_together_when_one_share_runs_out(tiny_run, tmp_path) -> None:
    from recursify import load
    from recursify.data import stream_rows

    docs = [f"document {i} " + "word " * (i % 11) for i in range(40)]
    (tmp_path / "small.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tokenizer = load(tiny_run["student"]).tokenizer
    shares = [sum(1 for _ in stream_rows(str(tmp_path / "small.jsonl"), tokenizer, 16, "train", 0, rank=r, world_size=2)) for r in (0, 1)]
    assert shares[0] != shares[1]  # uneven shares: one process runs short first
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    assert launcher is not None
    config = Path(__file__).resolve().parents[2] / "configs" / "cpu-2proc.yaml"
    command = [launcher, "launch", "--config_file", str(config), "-m", "recursify", "uptrain", str(tiny_run["student"])]
    command += ["--teacher", str(tiny_run["source"]), "--data", str(tmp_path / "small.jsonl"), "--stream", "--tokens", "1M"]
    command += ["--seq-len", "16", "--batch-tokens", "64", "--micro-batch", "2", "--precision", "fp32", "--save-every", "0"]
    command += ["--eval-tokens", "0", "--quiet", "--out", str(tmp_path / "run")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    steps = min(shares) // 2  # 4 rows per step, 2 per process: the shorter share decides
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["event"] == "train"] == list(range(1, steps + 1))
    [state] = (tmp_path / "run" / "training").glob("step-*/state.json")
    assert json.loads(state.read_text())["step"] == steps and "ran out after" in result.stdout
