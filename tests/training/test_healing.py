"""Local healing on tiny models: exact at full rank, lowers the block-wise objective and KL, CLI, guard rails."""

from __future__ import annotations

import json

import pytest
import torch

from recursify import convert, load
from recursify.cli import main
from recursify.conversion.calibration import calibrate
from recursify.conversion.layer_drop import drop_layers
from recursify.errors import ConfigError
from recursify.training import HealConfig, heal
from recursify.training.healing import (
    block_objective,
    capture_states,
    depth_losses,
    local_optimizer,
    normalised_error,
    teacher_spans,
    vocabulary_losses,
)
from recursify.training.metrics import read_metrics
from tiny import tiny_model

FAST = dict(seq_len=16, micro_batch=4, eval_tokens=1024, precision="fp32", quiet=True)


def test_normalised_error_is_one_for_skipping_the_layer_and_zero_when_exact() -> None:
    inputs, target = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    assert float(normalised_error(inputs, target, inputs)) == pytest.approx(1.0)
    assert float(normalised_error(target, target, inputs)) == 0.0


def test_full_rank_per_depth_norms_reproduce_every_depth(tiny_run) -> None:
    teacher = convert(str(tiny_run["source"]), loops=1, progress=False)
    student = convert(str(tiny_run["source"]), loops=3, rank="full", init="average", norms="per-depth", progress=False)
    rows = torch.randint(4, 97, (3, 12), generator=torch.Generator().manual_seed(0))
    states = capture_states(teacher, rows, micro_batch=2, precision="fp32")
    assert states.shape == (teacher.num_depths + 1, 3, 12, teacher.arch.hidden_size)
    assert max(block_objective(student, states, micro_batch=2, precision="fp32")) < 1e-8
    low_rank = load(tiny_run["student"])
    assert min(block_objective(low_rank, states, micro_batch=2, precision="fp32")) > 1e-3


def test_local_healing_lowers_the_objective_and_the_kl(tiny_run, tmp_path) -> None:
    config = HealConfig(str(tiny_run["student"]), str(tmp_path / "healed"), str(tiny_run["data"]), minutes=0.05, lr=3e-3, **FAST)
    report = heal(config)
    assert report.local_steps > 10
    assert report.objective_after < 0.5 * report.objective_before, (report.objective_before, report.objective_after)
    assert report.eval_local["kl"] < 0.7 * report.eval_before["kl"], (report.eval_before, report.eval_local)
    assert report.kd is None and report.eval_after["kl"] == report.eval_local["kl"]
    assert 0.05 <= report.local_cpu_minutes < 0.2
    healed = load(tmp_path / "healed")
    assert healed.recursion == load(tiny_run["student"]).recursion
    records = [json.loads(line) for line in (tmp_path / "healed" / "heal.jsonl").read_text().splitlines()]
    assert [r["event"] for r in records].count("eval") == 2
    assert sum(r["event"] == "local" for r in records) == report.local_steps


def test_kd_phase_reuses_uptraining(tiny_run, tmp_path) -> None:
    config = HealConfig(
        str(tiny_run["student"]), str(tmp_path / "healed"), str(tiny_run["data"]), minutes=0.02, kd_minutes=0.02, kd_batch_tokens=64, **FAST
    )
    report = heal(config)
    assert report.kd is not None and 0 < report.kd["steps_run"] < report.kd["steps"]
    assert report.eval_after["kl"] == report.kd["eval_after"]["kl"]
    assert {"heal.jsonl", "heal_report.json", "metrics.jsonl", "model.safetensors"} <= {p.name for p in (tmp_path / "healed").iterdir()}
    load(tmp_path / "healed")


def test_cli_round_trip_and_one_line_errors(tiny_run, tmp_path, capsys) -> None:
    out = tmp_path / "cli"
    args = ["heal", str(tiny_run["student"]), "--calib", str(tiny_run["data"]), "--seq-len", "16", "--eval-tokens", "512"]
    assert main([*args, "--minutes", "0.01", "--precision", "fp32", "--quiet", "--out", str(out)]) == 0
    assert json.loads((out / "heal_report.json").read_text())["local_steps"] > 0
    load(out)
    capsys.readouterr()
    assert main([*args, "--minutes", "0", "--out", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("recursify: error: nothing to do") and err.count("\n") == 1
    assert main(["heal", str(tiny_run["data"]), "--calib", str(tiny_run["data"]), "--minutes", "1", "--out", str(tmp_path / "x")]) == 2
    assert "not a recursify checkpoint" in capsys.readouterr().err
    assert main([*args, "--minutes", "1", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_config_refuses_bad_budgets(tiny_run) -> None:
    base = (str(tiny_run["student"]), "out", str(tiny_run["data"]))
    with pytest.raises(ConfigError, match="--minutes must be >= 0"):
        HealConfig(*base, minutes=-1)
    with pytest.raises(ConfigError, match="--kd-lr must be positive"):
        HealConfig(*base, kd_lr=0)
    with pytest.raises(ConfigError, match="pass one of them"):
        HealConfig(*base, resume=True, overwrite=True)
    with pytest.raises(ConfigError, match="--save-every must be >= 0"):
        HealConfig(*base, save_every=-1)


def test_kd_evaluations_log_the_training_cpu_time_only(tiny_run, tmp_path) -> None:
    config = HealConfig(
        str(tiny_run["student"]), str(tmp_path / "kd"), str(tiny_run["data"]), minutes=0, kd_minutes=0.02, kd_batch_tokens=64, **FAST
    )
    report = heal(config)
    assert report.kd is not None
    evals = [r for r in read_metrics(tmp_path / "kd" / "metrics.jsonl") if r["event"] == "eval"]
    assert evals[-1]["cpu_s"] <= report.kd["cpu_minutes"] * 60


def test_local_healing_fits_low_rank_embedding_and_head_to_their_targets(tiny_run, tmp_path) -> None:
    source, data = str(tiny_run["source"]), str(tiny_run["data"])
    student = tmp_path / "factorised"
    convert(source, loops=3, rank=4, init="average", embed_rank=6, calib=data, calib_tokens=2000, progress=False).save_pretrained(student)
    before = load(student)
    report = heal(HealConfig(str(student), str(tmp_path / "healed"), data, minutes=0.05, lr=3e-3, **FAST))
    assert {"embedding", "head"} <= report.eval_before.keys()
    # the frequency-weighted fit already minimises the embedding's target in expectation: healing keeps it there
    assert report.eval_local["embedding"] < 1.01 * report.eval_before["embedding"], (report.eval_before, report.eval_local)
    assert report.eval_local["head"] < 0.9 * report.eval_before["head"]  # the head's init is a quadratic proxy of this KL
    healed = load(tmp_path / "healed")
    assert not torch.equal(healed.embed.table, before.embed.table) and not torch.equal(healed.lm_head.basis, before.lm_head.basis)
    records = [json.loads(line) for line in (tmp_path / "healed" / "heal.jsonl").read_text().splitlines()]
    assert all({"embedding", "head"} <= r.keys() for r in records if r["event"] == "local")
    teacher = convert(source, loops=1, progress=False)
    rows = torch.randint(4, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    states = capture_states(teacher, rows, micro_batch=2, precision="fp32")
    assert vocabulary_losses(teacher, teacher, rows, states, "fp32") == {}  # dense matrices have no extra targets
    exact = convert(source, loops=1, embed_rank=48, head_rank=48, calib=data, calib_tokens=2000, progress=False)
    losses = vocabulary_losses(exact, teacher, rows, states, "fp32")
    assert losses["embedding"] < 1e-8 and abs(losses["head"]) < 1e-5  # full-rank factors hit both targets
    # exact rows keep their tokens; the head's train with its factors (the input side's meet their target exactly: no gradient)
    rows_student = tmp_path / "exact-rows"
    options = dict(loops=3, rank=4, init="average", embed_rank=6, embed_exact_rows=8, calib=data, calib_tokens=2000, progress=False)
    convert(source, **options).save_pretrained(rows_student)  # type: ignore[arg-type]
    heal(HealConfig(str(rows_student), str(tmp_path / "healed-rows"), data, minutes=0.05, lr=3e-3, **FAST))
    initial, healed_rows = load(rows_student), load(tmp_path / "healed-rows")
    assert initial.lm_head is not None and healed_rows.lm_head is not None  # the llama source is untied: each side has its rows
    assert torch.equal(healed_rows.embed.exact_ids, initial.embed.exact_ids)
    assert torch.equal(healed_rows.embed.exact_rows, initial.embed.exact_rows)
    assert not torch.equal(healed_rows.lm_head.exact_rows, initial.lm_head.exact_rows)


def test_dropped_layers_heal_against_their_span_of_the_original(tiny_run, tmp_path) -> None:
    """A kept layer is taught the original's stream from its own input to the next kept layer's input."""
    dropped = drop_layers(str(tiny_run["source"]), keep=3, by="first", progress=False)
    assert teacher_spans(dropped, 6) == [(0, 1), (1, 2), (2, 6)]
    dropped.recursion.kept_layers = [1, 2, 5]
    assert teacher_spans(dropped, 6) == [(0, 2), (2, 5), (5, 6)]  # the first kept layer also stands for dropped layer 0
    dropped.recursion.kept_layers = [0, 1, 2]
    assert teacher_spans(convert(str(tiny_run["source"]), loops=3, rank=2, progress=False), 6) == [(d, d + 1) for d in range(6)]
    dropped.save_pretrained(tmp_path / "dropped")
    config = HealConfig(str(tmp_path / "dropped"), str(tmp_path / "healed"), str(tiny_run["data"]), minutes=0.03, lr=3e-3, **FAST)
    report = heal(config)
    assert len(report.per_depth_before) == 3
    assert report.per_depth_before[:2] == pytest.approx([0.0, 0.0], abs=1e-8)  # kept layers 0 and 1 are exact over their one-layer spans
    assert report.objective_after < report.objective_before and report.eval_local["kl"] < report.eval_before["kl"]


def test_the_default_lr_improves_fitted_vocabulary_factors_from_the_first_step() -> None:
    """SmolLM2's tied rank-164 pair once lost its fit in the first full-lr step of local healing (head KL 0.7 -> 11.7
    nats): its table was stored at RMS 5e-4 ~ the default lr, and AdamW moves every entry by about lr. That storage
    scale falls like 1 / sqrt(calibration tokens x rank), so the tiny tied model calibrated on 16k tokens would store
    its rank-8 table at ~3e-3 (its embedding target then worsens at every step); its factors must improve on both
    vocabulary targets at the default lr, step after step, with no warmup (on SmolLM2 the second step already ran at
    0.95 of the peak)."""
    source = tiny_model("qwen2")
    teacher = convert(source, loops=1, progress=False)
    generator = torch.Generator().manual_seed(0)
    calibration = calibrate(teacher, torch.randint(3, 97, (256, 64), generator=generator), progress=False)
    student = convert(source, calib=calibration, loops=1, embed_rank=8, progress=False)
    ids = torch.randint(3, 97, (8, 32), generator=generator)
    states = capture_states(teacher, ids, micro_batch=8, precision="fp32")
    optimizer = local_optimizer(student, HealConfig.__dataclass_fields__["lr"].default)
    before = vocabulary_losses(student, teacher, ids, states, "fp32")
    trajectory = []
    for _ in range(5):
        trajectory.append(vocabulary_losses(student, teacher, ids, states, "fp32", backward=True))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    trajectory.append(vocabulary_losses(student, teacher, ids, states, "fp32"))
    for target in ("embedding", "head"):
        values = [losses[target] for losses in trajectory]
        assert max(values[1:]) < before[target] and values[-1] < values[1], (target, before[target], values)


def test_freeze_holds_matching_parameters_through_both_phases(tiny_run, tmp_path, capsys) -> None:
    """``--freeze '*' --freeze '!*lora*' --freeze '!*norm*'``: only LoRA factors and norm gains move, locally and in KD."""
    lora_and_norms = ["*", "!*lora*", "!*norm*"]
    config = HealConfig(
        str(tiny_run["student"]), str(tmp_path / "healed"), str(tiny_run["data"]), minutes=0.02, kd_minutes=0.02, kd_batch_tokens=64,
        lr=3e-3, freeze=lora_and_norms, **FAST,
    )  # fmt: skip
    report = heal(config)
    assert report.local_steps > 0 and report.kd is not None and report.kd["steps_run"] > 0
    before, after = dict(load(tiny_run["student"]).named_parameters()), dict(load(tmp_path / "healed").named_parameters())
    trains = {name for name in before if "lora" in name or "norm" in name}
    assert trains and trains != before.keys()
    for name, value in before.items():
        assert torch.equal(value, after[name]) != (name in trains), name
    args = ["heal", str(tiny_run["student"]), "--calib", str(tiny_run["data"]), "--seq-len", "16", "--minutes", "0.01", "--quiet"]
    assert main([*args, "--freeze", "*.nothing", "--out", str(tmp_path / "typo")]) == 2
    assert "match no parameter" in capsys.readouterr().err and not (tmp_path / "typo").exists()
    assert main([*args, "--freeze", "*", "--out", str(tmp_path / "all")]) == 2
    assert "nothing to train" in capsys.readouterr().err and not (tmp_path / "all").exists()


def _interrupt_after(monkeypatch, owner, name: str, calls: int) -> None:
    """Make ``owner.name`` raise KeyboardInterrupt on its ``calls``-th training call, as a Ctrl-C would."""
    original, seen = getattr(owner, name), [0]

    def wrapped(*args, **kwargs):
        if name == "depth_losses" and not kwargs.get("backward"):  # evaluation, not a training step
            return original(*args, **kwargs)
        seen[0] += 1
        if seen[0] == calls:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapped)


def test_an_interrupted_local_phase_resumes_from_its_last_checkpoint(tiny_run, tmp_path, monkeypatch) -> None:
    from dataclasses import replace

    from recursify.errors import CheckpointError
    from recursify.training import heal_state, healing

    out = tmp_path / "healed"
    config = HealConfig(str(tiny_run["student"]), str(out), str(tiny_run["data"]), minutes=0.05, lr=3e-3, save_every=2, **FAST)
    with monkeypatch.context() as patch:
        _interrupt_after(patch, healing, "depth_losses", 6)  # local steps 1-5 ran; 2 and 4 were saved
        with pytest.raises(KeyboardInterrupt):
            heal(config)
    work = heal_state.work_dir(out)
    state = json.loads((work / heal_state.STATE_FILE).read_text())
    assert state["phase"] == "local" and state["checkpoint"] == "local-00000004" and state["report"]["local_steps"] == 4
    assert [p.name for p in work.glob("local-*")] == ["local-00000004"] and heal_state.interrupted(out)
    before = [r for r in read_metrics(work / "metrics.jsonl") if r["step"] <= 4]
    with pytest.raises(CheckpointError, match="pass --resume to continue it or --overwrite"):
        heal(config)
    with pytest.raises(ConfigError, match="lr: saved 0.003, now 0.001"):
        heal(replace(config, resume=True, lr=1e-3))
    report = heal(replace(config, resume=True, quiet=True))
    assert report.local_steps > 5 and report.local_cpu_minutes >= 0.05
    assert report.eval_local["kl"] < report.eval_before["kl"]
    records = read_metrics(out / "heal.jsonl")
    steps = [r["step"] for r in records if r["event"] == "local"]
    assert steps == list(range(1, report.local_steps + 1))  # steps 5.. of the lost stretch ran once, after the checkpoint
    assert [r["step"] for r in records if r["event"] == "eval"] == [0, report.local_steps]
    assert records[: len(before)] == before  # continued, not restarted: steps 1-4 are the interrupted run's own
    assert not work.exists() and not heal_state.interrupted(out)
    load(out)
    with pytest.raises(CheckpointError, match="nothing to resume"):
        heal(replace(config, resume=True))


def test_a_resumed_local_step_equals_the_uninterrupted_one(tiny_run, tmp_path) -> None:
    """The checkpoint holds everything a step depends on: weights and AdamW's moments and step counts, bit for bit."""
    from recursify.training import heal_state

    teacher = convert(str(tiny_run["source"]), loops=1, progress=False)
    rows = torch.randint(4, 97, (4, 12), generator=torch.Generator().manual_seed(0))
    states = capture_states(teacher, rows, micro_batch=4, precision="fp32")

    def step(model, optimizer) -> None:
        depth_losses(model, states, "fp32", backward=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    student = load(tiny_run["student"])
    optimizer = local_optimizer(student, 1e-3)
    for _ in range(3):
        step(student, optimizer)
    work = tmp_path / "work"
    work.mkdir()
    state = heal_state.save_local(work, {"phase": "local"}, student, optimizer, 3)
    resumed = load(work / state["checkpoint"])
    resumed_optimizer = local_optimizer(resumed, 1e-3)
    heal_state.restore_optimizer(work, state, resumed_optimizer)
    step(student, optimizer)
    step(resumed, resumed_optimizer)
    for (name, value), (_, other) in zip(student.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(value, other), name


def test_an_interrupted_kd_phase_resumes_with_uptraining(tiny_run, tmp_path, monkeypatch) -> None:
    from dataclasses import replace

    from recursify.training import heal_state
    from recursify.training.uptrain import UptrainRun

    out = tmp_path / "healed"
    config = HealConfig(
        str(tiny_run["student"]), str(out), str(tiny_run["data"]), minutes=0.01, kd_minutes=0.05, kd_batch_tokens=64, save_every=2,
        **FAST,
    )  # fmt: skip
    with monkeypatch.context() as patch:
        _interrupt_after(patch, UptrainRun, "train_step", 4)
        with pytest.raises(KeyboardInterrupt):
            heal(config)
    state = json.loads((heal_state.work_dir(out) / heal_state.STATE_FILE).read_text())
    assert state["phase"] == "kd" and (heal_state.work_dir(out) / heal_state.STAGED_DIR).is_dir()
    local_steps = state["report"]["local_steps"]
    saved = [r for r in read_metrics(out / "metrics.jsonl") if r["step"] <= 2]
    assert saved and (out / "training").is_dir()
    report = heal(replace(config, resume=True))
    assert report.local_steps == local_steps  # the local phase was not run again
    assert report.kd is not None and report.kd["steps_run"] > 3
    records = read_metrics(out / "metrics.jsonl")
    assert records[: len(saved)] == saved  # continued from the step-2 checkpoint, not restarted
    kd_steps = [r["step"] for r in records if r["event"] == "train"]
    assert kd_steps == list(range(1, kd_steps[-1] + 1))  # step 3 was lost with the interruption and run again once
    assert not heal_state.work_dir(out).exists()
    load(out)
