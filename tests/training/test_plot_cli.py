"""The uptrain/plot subcommands: help, one-line errors, a PNG from a run's metrics."""

from __future__ import annotations

import json

import pytest

from recursify.cli import build_parser, main


def test_help_lists_training_commands(capsys) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["uptrain", "--help"])
    text = capsys.readouterr().out
    for option in ("--teacher", "--data", "--kd", "--exit-loss", "--self-distill", "--exit-ensemble", "--freeze", "--resume"):
        assert option in text


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--exit-loss", "sometimes"], "exit loss"),
        (["--self-distill"], "--self-distill"),
        (["--resume"], "no training checkpoint"),
        (["--no-teacher"], "--kd-weight"),
    ],
)
def test_uptrain_user_errors_exit_2(tiny_run, tmp_path, capsys, extra, message) -> None:
    args = ["uptrain", str(tiny_run["student"]), "--teacher", str(tiny_run["source"]), "--out", str(tmp_path / "o"), *extra]
    if "--no-teacher" in extra:
        args += ["--kd-weight", "0.5", "--data", str(tiny_run["data"])]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("recursify: error:") and message in err and err.count("\n") == 1


def test_plot_draws_png(tmp_path) -> None:
    records = [
        {"event": "train", "step": s, "tokens": 64 * s, "loss": 3.0 / s, "ce/exit1": 4.0 / s, "ce/exit2": 3.5 / s} for s in range(1, 6)
    ]
    records.append({"event": "eval", "step": 5, "tokens": 320, "ce/exit2": 0.9, "kl/exit2": 0.3})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"torn')
    assert main(["plot", str(tmp_path)]) == 0
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plot", str(tmp_path / "nothing")]) == 2
