"""``recursify bench-serve`` and ``recursify simulate`` end to end on a tiny checkpoint, plus ``recursify.serve``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import recursify
from recursify.cli import main
from recursify.serve import Engine
from tiny import save_tiny_checkpoint

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "tall",
    "ships",
    "sail",
    "past",
    "quiet",
    "harbours",
    "at",
    "dawn",
]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, Path]:
    root = tmp_path_factory.mktemp("serve")
    source = root / "source"
    save_tiny_checkpoint(source, "llama", seed=2)
    run, relaxed = root / "rrt", root / "rrt-r4"
    recursify.convert(str(source), loops=3, init="average", rank=0, progress=False).save_pretrained(str(run))
    recursify.convert(str(source), loops=3, init="average", rank=4, progress=False).save_pretrained(str(relaxed))
    data = root / "text.jsonl"
    lines = [json.dumps({"text": " ".join(WORDS[(i + j) % len(WORDS)] for j in range(40 + i % 7))}) for i in range(120)]
    data.write_text("\n".join(lines) + "\n")
    return source, run, data, relaxed


def test_bench_serve_reports_every_row_with_ratios_and_simulation(checkpoints: tuple[Path, Path, Path, Path], tmp_path: Path) -> None:
    source, run, data, relaxed = checkpoints
    calibrated = tmp_path / "calibrated"
    shutil.copytree(run, calibrated)
    argv = ["train-exits", str(calibrated), "--data", str(data), "--tokens", "600", "--calib-tokens", "300", "--window", "32"]
    assert main(argv + ["--steps", "20", "--quiet"]) == 0
    out = tmp_path / "bench.json"
    argv = ["bench-serve", str(calibrated), "--baseline", str(source), "--relaxed", str(relaxed), "--requests", "2"]
    argv += ["--relaxed-exit", "confidence:1.0", "--prompt-tokens", "3,6", "--new-tokens", "2,3", "--speculative", "1x2"]
    argv += ["--transformers", "--transformers-early-exit", "2", "--single-requests", "2"]
    argv += ["--exit", "confidence:0.1", "--max-batch", "2", "--data", str(data), "--max-tokens", "300", "--json", str(out)]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert report["workload"]["requests"] == 2
    rows = {row["name"]: row for row in report["rows"]}
    engine_rows = {"1 vanilla static", "2 vanilla sequence", "3 recursive sequence", "4 recursive depthwise", "5 recursive depthwise+exit"}
    engine_rows |= {"5k recursive depthwise+exit share", "5q recursive sequence+exit", "6n relaxed depthwise", "6 relaxed depthwise+exit"}
    engine_rows |= {"5g recursive depthwise+gate", "5s recursive depthwise+saturation"}
    generate_rows = {"7g recursive greedy b1", "7 recursive speculative 1x2 b1", "7g recursive greedy b4", "7 recursive speculative 1x2 b4"}
    generate_rows |= {"7v vanilla greedy b1", "8 transformers static b2", "8g transformers greedy b1", "8e transformers early-exit@2 b1"}
    assert set(rows) == engine_rows | generate_rows
    for row in rows.values():
        assert row["tokens_per_s"] > 0
        assert row["roofline"]["compute_fraction"] > 0 and row["roofline"]["memory_fraction"] > 0
    for name in engine_rows:
        assert rows[name]["ttft_p50_ms"] > 0
    assert rows["2 vanilla sequence"]["positional_agreement"] == 1.0 and rows["2 vanilla sequence"]["mean_loops"] == 1.0
    assert rows["4 recursive depthwise"]["positional_agreement"] == 1.0 and rows["4 recursive depthwise"]["mean_loops"] == 3.0
    assert rows["4 recursive depthwise"]["agreement"] == 1.0  # token level: every token is the model's own greedy one
    assert rows["1 vanilla static"]["tokens"] == rows["5 recursive depthwise+exit"]["tokens"]
    gate = rows["5g recursive depthwise+gate"]
    assert gate["target_agreement"] == 0.95 and gate["exit"] == "agreement:0.95:gate"
    for name in ("7 recursive speculative 1x2 b1", "7 recursive speculative 1x2 b4", "8e transformers early-exit@2 b1"):
        assert rows[name]["identical_output"] is True, name
    assert rows["7 recursive speculative 1x2 b4"]["tokens"] == rows["5 recursive depthwise+exit"]["tokens"]  # every request
    assert rows["7 recursive speculative 1x2 b1"]["counts"]["speculative_rounds"] > 0
    assert report["ratios"]["vs_static"]["1 vanilla static"] == 1.0
    peers = ("speculative_b1_vs_greedy", "speculative_b4_vs_greedy", "engine_static_vs_transformers", "transformers_early_exit_vs_greedy")
    for key in peers:
        assert report["ratios"][key] > 0, key
    assert rows["6n relaxed depthwise"]["positional_agreement"] is None and rows["6 relaxed depthwise+exit"]["positional_agreement"] == 1.0
    assert rows["6 relaxed depthwise+exit"]["exit"] == "confidence:1.0" and rows["6 relaxed depthwise+exit"]["mean_loops"] == 3.0
    row6_over_row5 = rows["6 relaxed depthwise+exit"]["tokens_per_s"] / rows["5 recursive depthwise+exit"]["tokens_per_s"]
    assert report["ratios"]["row6/row5"] == pytest.approx(row6_over_row5)
    overhead = report["overhead"]
    assert set(overhead) == {"recursive", "relaxed"} and 0.0 <= overhead["recursive"]["overhead_fraction"] < 1.0
    assert report["roofline"]["matmul_flops_per_s"] > 0 and report["roofline"]["memory_bytes_per_s"] > 0
    assert report["exits"]["policies"]["5g recursive depthwise+gate"]["target"] == 0.95
    simulated = report["simulated"]
    assert set(simulated["vs_static"]) >= {"static", "sequence", "depthwise", "depthwise+oracle", "depthwise+confidence"}
    assert 1.0 <= simulated["mean_oracle_loops"] <= 3.0


def test_simulate_prints_policies(checkpoints: tuple[Path, Path, Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    _, run, data, _ = checkpoints
    argv = ["simulate", str(run), "--data", str(data), "--max-tokens", "300", "--requests", "4", "--new-tokens", "3", "--max-batch", "2"]
    assert main(argv + ["--exit", "oracle"]) == 0
    printed = capsys.readouterr().out
    assert "depthwise+oracle" in printed and "mean loops per token" in printed


def test_bad_serving_arguments_exit_with_status_two(checkpoints: tuple[Path, Path, Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    source, run, _, _ = checkpoints
    assert main(["bench-serve", str(run), "--baseline", str(source), "--arrival", "uniform:3"]) == 2
    assert "poisson:RATE" in capsys.readouterr().err
    assert main(["bench-serve", str(run), "--baseline", str(run), "--requests", "1"]) == 2
    assert "loops=1" in capsys.readouterr().err


def test_engine_from_pretrained_streams_text(checkpoints: tuple[Path, Path, Path, Path]) -> None:
    _, run, _, _ = checkpoints
    engine = Engine.from_pretrained(str(run), batching="depthwise", max_batch=2, exit="confidence:0.9", max_kv_tokens=256)
    outputs = list(engine.generate(["hello there", "a dog"], max_new_tokens=3, stop_token_ids=[]))
    assert sorted(out.request_id for out in outputs) == ["req-0", "req-1"]
    assert all(out.finished and len(out.token_ids) == 3 and isinstance(out.text, str) for out in outputs)
