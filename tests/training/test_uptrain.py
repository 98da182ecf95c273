"""The uptrain loop on tiny models: KD heals, freezing freezes, guard rails, exact resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from recursify import load
from recursify.errors import ConfigError, TrainingError
from recursify.training.budget import budget_lr_factor
from recursify.training.checkpointing import latest_checkpoint
from recursify.training.config import LossConfig, UptrainConfig
from recursify.training.metrics import read_metrics
from recursify.training.params import apply_freeze, enable_gradient_checkpointing
from recursify.training.uptrain import UptrainRun, uptrain

SMALL = dict(seq_len=16, batch_tokens=64, micro_batch=2, precision="fp32", quiet=True, eval_tokens=0)


def _config(tiny_run, out: Path, **overrides) -> UptrainConfig:
    options = {**SMALL, **overrides}
    return UptrainConfig(str(tiny_run["student"]), str(out), str(tiny_run["source"]), str(tiny_run["data"]), **options)


@pytest.mark.slow  # 200 KD steps; the fast tier still runs KD in the exit, healing and resume tests
def test_kd_drives_student_teacher_kl_down(tiny_run, tmp_path) -> None:
    config = _config(tiny_run, tmp_path / "run", tokens=200 * 64, lr=5e-3, eval_tokens=2048, save_every=0)
    summary = uptrain(config)
    before, after = summary["eval_before"]["kl"], summary["eval_after"]["kl"]
    assert summary["steps"] == 200
    assert after < 0.3 * before, (before, after)
    model = load(tmp_path / "run")  # the output is a normal checkpoint
    assert torch.equal(
        model.embed.weight, load_file(str(tmp_path / "run" / "training" / "step-00000200" / "model.safetensors"))["embed.weight"]
    )


def test_cached_teacher_at_k_vocab_trains_like_the_online_teacher(tiny_run, tmp_path, monkeypatch) -> None:
    """Top-k targets computed once (k = vocab: full KD) give the online teacher's loss curve; the cache is read back."""
    monkeypatch.setenv("RECURSIFY_CACHE", str(tmp_path / "cache"))
    options = dict(tokens=6 * 64, lr=5e-3, save_every=0)
    uptrain(_config(tiny_run, tmp_path / "online", **options))
    summary = uptrain(_config(tiny_run, tmp_path / "cached", teacher_cache=97, **options))
    assert summary["teacher_cache"]["built"] and summary["teacher_cache"]["k"] == 97
    online = [r["loss"] for r in read_metrics(tmp_path / "online" / "metrics.jsonl") if r["event"] == "train"]
    cached = [r["loss"] for r in read_metrics(tmp_path / "cached" / "metrics.jsonl") if r["event"] == "train"]
    assert len(online) == 6 and cached == pytest.approx(online, rel=1e-4)
    again = uptrain(_config(tiny_run, tmp_path / "again", teacher_cache=97, **options))
    assert not again["teacher_cache"]["built"] and again["teacher_cache"]["path"] == summary["teacher_cache"]["path"]
    sparse = uptrain(_config(tiny_run, tmp_path / "top8", teacher_cache=8, **options))
    assert sparse["teacher_cache"]["built"] and sparse["teacher_cache"]["path"] != summary["teacher_cache"]["path"]
    with pytest.raises(ConfigError, match="--teacher-cache"):
        _config(tiny_run, tmp_path / "x", teacher_cache=8, loss=LossConfig(kd_weight=0.0))
    with pytest.raises(ConfigError, match="no fixed rows"):  # a stream has no rows to score once
        _config(tiny_run, tmp_path / "x", teacher_cache=8, stream=True)


def test_freeze_really_freezes(tiny_run, tmp_path) -> None:
    uptrain(_config(tiny_run, tmp_path / "run", tokens=4 * 64, lr=1e-2, freeze=["*", "!*lora*"]))
    before, after = load(tiny_run["student"]).state_dict(), load(tmp_path / "run").state_dict()
    for name in before:
        same = torch.equal(before[name], after[name])
        assert same != ("lora" in name), name


def test_apply_freeze_semantics_and_errors(tiny_run) -> None:
    model = load(tiny_run["student"])
    counts = apply_freeze(model, ["layers.*", "!*norm*"])
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in model.named_parameters() if n.startswith("layers.") and "norm" not in n}
    assert counts["frozen"] == sum(p.numel() for n, p in model.named_parameters() if n in frozen)
    with pytest.raises(ConfigError, match="match no parameter"):
        apply_freeze(model, ["*typo*"])


def test_gradient_checkpointing_gives_the_same_gradients(tiny_run) -> None:
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointed in (False, True):
        model = load(tiny_run["student"]).train()
        if checkpointed:
            enable_gradient_checkpointing(model)
        model(ids, output_exits=True).exit_logits[0].logsumexp(-1).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name])


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny_run, tmp_path) -> None:
    config = _config(tiny_run, tmp_path / "run", tokens=6 * 64, lr=1e30, clip=0.0, warmup_steps=0, save_every=1)
    with pytest.raises(TrainingError, match="non-finite") as info:
        uptrain(config)
    step = latest_checkpoint(tmp_path / "run").step
    assert f"step {step})" in str(info.value) and 1 <= step < 6
    assert all(r["step"] <= step + 1 for r in read_metrics(tmp_path / "run" / "metrics.jsonl"))
    load(tmp_path / "run")


def test_cpu_budget_starts_with_the_first_step(tiny_run, tmp_path) -> None:
    # setup must not spend the budget (0.06 CPU-s, less than loading the models takes): the first step runs at the
    # first warmup rate of the schedule over the budget; a budget counting even 6 CPU-us earlier would raise it
    config = _config(tiny_run, tmp_path / "run", tokens=100 * 64, cpu_minutes=0.001, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1)
    summary = uptrain(config)
    first = next(r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["event"] == "train")
    assert first["lr"] == pytest.approx(1e-3 * budget_lr_factor(0.0, 10 / 100, 0.1))
    assert summary["steps_run"] < 100 and summary["cpu_minutes"] >= 0.001


def test_exit_losses_and_ensemble_run(tiny_run, tmp_path) -> None:
    loss = LossConfig(exit_loss="aggressive:0.1", self_distill=True)
    uptrain(_config(tiny_run, tmp_path / "run", tokens=6 * 64, lr=1e-2, loss=loss, exit_ensemble=True, freeze=["*"]))
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["event"] == "train"]
    assert {f"{kind}/exit{b}" for kind in ("ce", "kd") for b in (1, 2, 3)} <= set(records[-1])
    weights = load_file(str(tmp_path / "run" / "exit_ensemble.safetensors"))["weights"]
    assert weights.shape == (2, 2) and not torch.equal(weights, torch.eye(2))  # trained with the backbone frozen
    assert weights[0, 1] == 0  # exit 1 cannot see exit 2
    before, after = load(tiny_run["student"]).state_dict(), load(tmp_path / "run").state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_resume_refuses_changed_options(tiny_run, tmp_path) -> None:
    uptrain(_config(tiny_run, tmp_path / "run", tokens=2 * 64))
    with pytest.raises(ConfigError, match="lr"):
        uptrain(_config(tiny_run, tmp_path / "run", tokens=2 * 64, lr=1e-3, resume=True))
    with pytest.raises(Exception, match="already exists"):
        uptrain(_config(tiny_run, tmp_path / "run", tokens=2 * 64))


def _cli_args(tiny_run, out: Path, *extra: str) -> list[str]:
    return [
        "uptrain", str(tiny_run["student"]), "--teacher", str(tiny_run["source"]), "--data", str(tiny_run["data"]),
        "--tokens", str(40 * 64), "--seq-len", "16", "--batch-tokens", "64", "--micro-batch", "2", "--lr", "1e-3",
        "--precision", "fp32", "--save-every", "3", "--eval-tokens", "0", "--quiet", "--out", str(out), *extra,
    ]  # fmt: skip


def test_resume_after_sigkill_is_exact(tiny_run, tmp_path) -> None:
    from recursify.cli import main

    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same threads as this process (see conftest)
    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "recursify", *_cli_args(tiny_run, killed)], env=env, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "training" / "LATEST").is_file() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    interrupted_at = latest_checkpoint(killed).step
    assert 0 < interrupted_at < 40
    assert main(_cli_args(tiny_run, killed, "--resume")) == 0
    assert main(_cli_args(tiny_run, tmp_path / "straight")) == 0
    resumed, straight = load(killed).state_dict(), load(tmp_path / "straight").state_dict()
    assert all(torch.equal(resumed[name], straight[name]) for name in straight)
    losses = [(r["step"], r["loss"]) for r in read_metrics(killed / "metrics.jsonl") if r["event"] == "train"]
    assert losses == [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "straight" / "metrics.jsonl") if r["event"] == "train"]
    state = json.loads((killed / "training" / "LATEST").read_text() and (latest_checkpoint(killed).directory / "state.json").read_text())
    assert state["step"] == 40 and state["tokens_seen"] == 40 * 64


def test_streamed_run_resumes_exactly_after_an_interruption(tiny_run, tmp_path, monkeypatch) -> None:
    def config(out: Path, **extra) -> UptrainConfig:
        return _config(tiny_run, out, tokens=6 * 64, lr=1e-3, save_every=2, stream=True, **extra)

    straight = uptrain(config(tmp_path / "straight"))
    assert straight["streamed"] and straight["epochs"] is None and straight["steps_run"] == 6
    original = UptrainRun.train_step

    def interrupted(self: UptrainRun) -> dict[str, float] | None:
        if self.step == 5:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(UptrainRun, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        uptrain(config(tmp_path / "killed"))
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path / "killed").step == 4
    uptrain(config(tmp_path / "killed", resume=True))  # skips the 16 rows steps 1-4 consumed, then reads on
    resumed, reference = load(tmp_path / "killed").state_dict(), load(tmp_path / "straight").state_dict()
    assert all(torch.equal(resumed[name], reference[name]) for name in reference)
    losses = [[(r["step"], r["loss"]) for r in read_metrics(run / "metrics.jsonl")] for run in (tmp_path / "killed", tmp_path / "straight")]
    assert losses[0] == losses[1]


def test_a_streamed_share_running_out_ends_the_run_with_a_checkpoint(tiny_run, tmp_path, capsys) -> None:
    from recursify.data import stream_rows

    docs = [f"a short document number {i}." for i in range(30)]
    (tmp_path / "small.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    rows = sum(1 for _ in stream_rows(str(tmp_path / "small.jsonl"), load(tiny_run["student"]).tokenizer, 16, "train", 0))
    config = _config(tiny_run, tmp_path / "run", tokens=10**6, lr=1e-3, save_every=0, stream=True)
    config.data = str(tmp_path / "small.jsonl")
    summary = uptrain(config)
    assert summary["data_exhausted"] and summary["steps_run"] == rows // 4 < summary["steps"]  # 4 rows of 16 per step
    assert latest_checkpoint(tmp_path / "run").step == rows // 4
    assert "ran out after" in capsys.readouterr().out


def test_tokens_per_second_and_mfu_are_logged_from_the_flops_per_token(tiny_run, tmp_path) -> None:
    summary = uptrain(_config(tiny_run, tmp_path / "run", tokens=3 * 64, peak_flops=1e9, save_every=0))
    # Tiny llama (h 48, 6 layers, 4 heads x 16, KV 2 x 16, MLP 80, vocab 97, untied head), loops 3, LoRA rank 4, seq 16.
    # Weights per depth: q 48*64 + k, v 48*32 + o 64*48 + gate, up, down 48*80 = 20,736; LoRA 4*(in+out) over the seven
    # linears = 3,072. Student N = 6 * 23,808 + head 97*48 = 147,504; teacher N = 6 * 20,736 + 4,656 = 129,072;
    # attention L*s*q = 6*16*64 = 6,144. Student 6N + 12Lsq = 958,752; teacher forward 2N + 4Lsq = 282,720.
    assert summary["flops_per_token"] == 958_752 + 282_720
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["event"] == "train"]
    assert len(records) == 3
    for record in records:
        assert record["mfu"] == pytest.approx(record["tokens_per_s"] * 1_241_472 / 1e9)
    assert summary["mfu"] == pytest.approx(summary["tokens_per_s"] * 1_241_472 / 1e9)
    plain = uptrain(_config(tiny_run, tmp_path / "plain", tokens=64, save_every=0))  # no known peak on a CPU: no MFU
    assert plain["peak_flops"] is None and plain["mfu"] is None
    assert "mfu" not in read_metrics(tmp_path / "plain" / "metrics.jsonl")[0]


def test_fused_adamw_follows_the_unfused_loss_curve(tiny_run, tmp_path) -> None:
    runs = {fused: uptrain(_config(tiny_run, tmp_path / str(fused), tokens=6 * 64, lr=3e-3, fused_adamw=fused)) for fused in (False, True)}
    assert runs[True]["fused_adamw"] and not runs[False]["fused_adamw"]
    curves = [[r["loss"] for r in read_metrics(tmp_path / str(fused) / "metrics.jsonl")] for fused in (False, True)]
    assert curves[1] == pytest.approx(curves[0], rel=1e-5) and curves[0][-1] < curves[0][0]


@pytest.mark.slow  # inductor compiles every layer once per visit: ~2 CPU-minutes on a tiny model
def test_compiled_layers_follow_the_eager_loss_curve(tiny_run, tmp_path) -> None:
    for compiled in (False, True):
        uptrain(_config(tiny_run, tmp_path / str(compiled), tokens=6 * 64, lr=3e-3, compile=compiled, gradient_checkpointing=True))
    curves = [[r["loss"] for r in read_metrics(tmp_path / str(compiled) / "metrics.jsonl")] for compiled in (False, True)]
    assert curves[1] == pytest.approx(curves[0], rel=1e-5) and curves[0][-1] < curves[0][0]


def test_teacher_weights_follow_bf16_training_on_a_gpu_only(tiny_run, device) -> None:
    from recursify.training.common import open_teacher
    from recursify.training.uptrain import _place_teacher

    for precision in ("bf16", "fp32"):
        teacher = _place_teacher(open_teacher(str(tiny_run["source"])), device, precision)
        expected = torch.bfloat16 if device.type == "cuda" and precision == "bf16" else torch.float32
        assert {p.dtype for p in teacher.parameters()} == {expected} and teacher.device.type == device.type
        assert {b.dtype for b in teacher.buffers()} == {torch.float32}  # RoPE frequencies stay exact


def test_launches_that_would_not_train_as_asked_are_refused(monkeypatch) -> None:
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from recursify.training.uptrain import _check_launch

    def launch(kind: DistributedType, processes: int = 2, fsdp2: bool = True) -> SimpleNamespace:
        return SimpleNamespace(distributed_type=kind, num_processes=processes, is_fsdp2=fsdp2)

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    _check_launch(launch(DistributedType.MULTI_CPU))  # DDP over gloo: fine
    with pytest.raises(ConfigError, match="DeepSpeed"):
        _check_launch(launch(DistributedType.DEEPSPEED))
    with pytest.raises(ConfigError, match="no GPU was found"):  # torchrun started 2, accelerate saw a world of 1
        _check_launch(launch(DistributedType.NO, processes=1))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ConfigError, match="FSDP on GPUs only"):  # accelerate's silent fallback on CPUs
        _check_launch(launch(DistributedType.MULTI_CPU))
    with pytest.raises(ConfigError, match="fsdp_version: 2"):
        _check_launch(launch(DistributedType.FSDP, fsdp2=False))
    _check_launch(launch(DistributedType.FSDP))
