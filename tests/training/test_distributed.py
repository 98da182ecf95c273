"""Two CPU processes (DDP over gloo, via accelerate launch) follow the single-process loss curve."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

import pytest

from recursify.training.config import UptrainConfig
from recursify.training.metrics import read_metrics
from recursify.training.uptrain import uptrain

STEPS = 6


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow  # launches two accelerate processes
def test_two_processes_match_one_process(tiny_run, tmp_path) -> None:
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    if launcher is None:
        pytest.fail("accelerate's launcher is not installed next to this interpreter")
    options = ["--tokens", str(STEPS * 128), "--seq-len", "16", "--batch-tokens", "128", "--micro-batch", "2", "--lr", "3e-3"]
    options += ["--precision", "fp32", "--save-every", "0", "--eval-tokens", "0", "--quiet", "--warmup-steps", "0"]
    command = [launcher, "launch", "--cpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
    command += ["--dynamo_backend", "no", "--main_process_port", str(_free_port()), "-m", "recursify", "uptrain", str(tiny_run["student"])]
    command += ["--teacher", str(tiny_run["source"]), "--data", str(tiny_run["data"]), *options, "--out", str(tmp_path / "ddp")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    single = UptrainConfig(
        str(tiny_run["student"]), str(tmp_path / "single"), str(tiny_run["source"]), str(tiny_run["data"]), tokens=STEPS * 128,
        seq_len=16, batch_tokens=128, micro_batch=2, lr=3e-3, precision="fp32", save_every=0, eval_tokens=0, quiet=True, warmup_steps=0,
    )  # fmt: skip
    uptrain(single)
    curves = [[r["loss"] for r in read_metrics(tmp_path / run / "metrics.jsonl") if r["event"] == "train"] for run in ("ddp", "single")]
    assert len(curves[0]) == len(curves[1]) == STEPS
    assert curves[0] == pytest.approx(curves[1], rel=1e-4)
    assert curves[1][-1] < curves[1][0]  # it trains, so equal curves are not two flat lines
