"""train-exits on a tiny model (gates learn, files land beside the weights, recursify.load attaches them, agreement
specs resolve), ROC AUC against brute force, and exit heads trained with the model frozen (the last loop unchanged)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from recursify import load
from recursify.cli import main
from recursify.errors import ConfigError
from recursify.modeling.exit_addons import CALIBRATION_FILE
from recursify.modeling.exit_gates import GATES_FILE
from recursify.serving.exit_policy import parse_exit_policy
from recursify.training.config import LossConfig, TrainExitsConfig, UptrainConfig
from recursify.training.exit_training import roc_auc, train_exits
from recursify.training.uptrain import uptrain


@pytest.fixture
def student(tiny_run, tmp_path):
    path = tmp_path / "student"
    shutil.copytree(tiny_run["student"], path)
    return path


def test_gates_learn_and_load_with_the_checkpoint(tiny_run, student) -> None:
    config = TrainExitsConfig(str(student), data=str(tiny_run["data"]), tokens=2048, calib_tokens=1024, window=64, steps=150, quiet=True)
    report = train_exits(config)
    first, last = report["gates"]["loss"]
    assert last < first
    assert (student / GATES_FILE).is_file() and (student / CALIBRATION_FILE).is_file()
    model = load(student)
    assert model.addons.gates is not None and model.addons.calibration is not None
    assert set(model.addons.calibration["signals"]) == {"confidence", "saturation", "gate"}
    for quality in report["gates"]["heldout"]:
        assert 0.0 <= quality["agree_rate"] <= 1.0 and quality["bce"] > 0
    policy = parse_exit_policy("agreement:0.9", model.loops, model.addons)
    assert policy.kind == "gate" and policy.expected is not None and policy.expected["agreement"] >= 0.9
    assert parse_exit_policy("agreement:0.9:saturation", model.loops, model.addons).kind == "saturation"
    json.loads((student / CALIBRATION_FILE).read_text())  # plain JSON

    train_exits(TrainExitsConfig(str(student), data=str(tiny_run["data"]), calib_tokens=512, window=64, gate_width=None, quiet=True))
    assert not (student / GATES_FILE).exists()  # a calibration without gates never sits beside stale ones
    assert load(student).addons.gates is None


def test_roc_auc_against_pairs() -> None:
    scores = torch.tensor([0.1, 0.4, 0.35, 0.8, 0.4, 0.9])
    labels = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0, 0.0])
    pairs = [(p, n) for p in scores[labels == 1].tolist() for n in scores[labels == 0].tolist()]
    expected = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)
    assert roc_auc(scores, labels) == pytest.approx(expected)


def test_train_exits_cli_refuses_a_one_loop_model(tiny_run, capsys) -> None:
    assert main(["train-exits", str(tiny_run["source"]), "--data", str(tiny_run["data"])]) == 2
    assert capsys.readouterr().err.startswith("recursify: error:")
    with pytest.raises(ConfigError):
        TrainExitsConfig("x", gate_width=-1)


def test_exit_heads_with_the_model_frozen_leave_the_last_loop_unchanged(tiny_run, tmp_path) -> None:
    loss = LossConfig(exit_loss="aggressive:1", early_exit_target="final")
    config = UptrainConfig(
        str(tiny_run["student"]), str(tmp_path / "run"), str(tiny_run["source"]), str(tiny_run["data"]), tokens=12 * 64,
        seq_len=16, batch_tokens=64, micro_batch=2, lr=1e-2, precision="fp32", quiet=True, eval_tokens=512, save_every=0,
        loss=loss, exit_heads=4, freeze_model=True,
    )  # fmt: skip
    summary = uptrain(config)
    before, after = load(tiny_run["student"]), load(tmp_path / "run")
    assert after.recursion.exit_head_rank == 4 and before.exit_heads is None
    for name, tensor in before.state_dict().items():
        assert torch.equal(tensor, after.state_dict()[name]), name
    ids = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        old, new = before(ids, output_exits=True).exit_logits, after(ids, output_exits=True).exit_logits
    assert old is not None and new is not None
    assert torch.equal(old[-1], new[-1]) and not torch.allclose(old[0], new[0])
    assert summary["eval_after"]["kl/exit3"] == pytest.approx(summary["eval_before"]["kl/exit3"])
    assert summary["eval_after"]["kl/exit1"] != summary["eval_before"]["kl/exit1"]
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    distilled = [m["sd/exit1"] for m in metrics if m.get("event") == "train"]
    assert distilled[-1] < distilled[0]
    with pytest.raises(ConfigError, match="--exit-loss"):
        UptrainConfig("s", "o", "t", freeze_model=True)
