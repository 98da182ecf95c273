"""``recursify eval`` / ``compare`` end to end on tiny checkpoints: JSON contract, tables, plots, user errors."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from recursify.cli import main
from recursify.data import load_tokens
from recursify.errors import ConfigError, RecursifyError
from recursify.evaluation.exits import LoopMetrics, OracleExits
from recursify.evaluation.multiple_choice import TaskResult
from recursify.evaluation.perplexity import PerplexityResult, sliding_windows
from recursify.evaluation.plots import exit_plot, pareto_plot
from recursify.evaluation.report import EvalReport, format_comparison, format_markdown
from tiny import save_tiny_checkpoint, tiny_tokenizer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
WORDS = ["the", "a", "cat", "dog", "sat", "ran", "on", "under", "mat", "tree", "big", "small", "red", "blue", "and", "then", "it", "was"]
PARAMS = {"embedding": 10, "non_embedding": 2_000_000, "lora": 100_000, "total": 2_100_010, "source_total": 4_000_010, "ratio": 0.525}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval")
    source = root / "source"
    save_tiny_checkpoint(source, "llama")
    rrt = root / "rrt"
    assert main(["convert", "--model", str(source), "--loops", "2", "--init", "average", "--rank", "4", "--out", str(rrt), "--quiet"]) == 0
    rng = random.Random(0)
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(rng.choices(WORDS, k=30))}) + "\n" for _ in range(300)))
    task = root / "toy" / "task.json"
    task.parent.mkdir()
    examples = [{"input": f"is {w} a word", "target_scores": {"yes": 1, "no": 0}} for w in WORDS[:6]]
    task.write_text(json.dumps({"examples": examples}))
    return {"source": source, "rrt": rrt, "data": data, "task": task, "root": root}


def test_eval_writes_the_json_contract(workspace: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    out = workspace["root"] / "out.json"
    args = ["eval", str(workspace["rrt"]), "--ppl", str(workspace["data"]), "--ctx", "32", "--stride", "16", "--per-loop"]
    args += ["--teacher", str(workspace["source"]), "--tasks", str(workspace["task"]), "--shots", "2", "--json", str(out), "--quiet"]
    assert main(args) == 0
    report = json.loads(out.read_text())
    assert list(report) == ["model", "ppl", "per_loop", "oracle_exit", "tasks", "params"]
    assert set(report["ppl"]) == {"value", "tokens", "ctx", "stride"} and report["ppl"]["ctx"] == 32 and report["ppl"]["stride"] == 16
    assert [entry["loop"] for entry in report["per_loop"]] == [1, 2]
    assert all(set(entry) == {"loop", "ppl", "agree_final", "kl_teacher", "agree_teacher"} for entry in report["per_loop"])
    assert report["per_loop"][-1]["ppl"] == pytest.approx(report["ppl"]["value"])
    assert sum(report["oracle_exit"]["histogram"]) == report["ppl"]["tokens"]
    assert report["tasks"] == {
        "toy": {
            "acc": pytest.approx(report["tasks"]["toy"]["acc"]),
            "acc_norm": pytest.approx(report["tasks"]["toy"]["acc_norm"]),
            "n": 6,
            "shots": 2,
        }
    }
    assert report["params"]["lora"] > 0
    table = capsys.readouterr().out
    assert "| loop | ppl | agree final | KL(teacher‖exit) | agree teacher |" in table and "oracle exits" in table


def test_eval_omits_what_was_not_computed(workspace: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", str(workspace["source"]), "--ppl", str(workspace["data"]), "--ctx", "64", "--json", "-", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert list(report) == ["model", "ppl", "params"]
    assert main(["eval", str(workspace["source"]), "--tasks", str(workspace["task"]), "--json", "-", "--quiet"]) == 0
    assert list(json.loads(capsys.readouterr().out)) == ["model", "tasks", "params"]


def test_ppl_defaults_to_the_heldout_split(workspace: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    heldout = load_tokens(str(workspace["data"]), tiny_tokenizer(), "heldout")
    train = load_tokens(str(workspace["data"]), tiny_tokenizer(), "train", max_tokens=300)
    assert 300 < heldout.numel() < 2000
    assert main(["eval", str(workspace["source"]), "--ppl", str(workspace["data"]), "--json", "-", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["ppl"]["tokens"] == heldout.numel() - 1
    args = ["eval", str(workspace["source"]), "--ppl", str(workspace["data"]), "--split", "train", "--max-tokens", "300"]
    assert main([*args, "--json", "-", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["ppl"]["tokens"] == train.numel() - 1 == 299


def test_split_all_scores_a_whole_file_in_its_own_order(workspace: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """Every token of the file once, in file order: len(text) - 1 scored tokens (a character tokenizer), equal to a direct computation."""
    import torch
    import transformers

    text = "the cat sat on the mat.\n\n\n  then it ran under a big tree,\n and it was red!\n\nA small blue dog sat. " * 3
    path = workspace["root"] / "test_file.txt"
    path.write_text(text)
    args = ["eval", str(workspace["source"]), "--ppl", str(path), "--split", "all", "--ctx", "16", "--json", "-", "--quiet"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)["ppl"]
    assert result["tokens"] == len(text) - 1
    ids = torch.tensor(tiny_tokenizer()(text, add_special_tokens=False)["input_ids"])
    assert ids.numel() == len(text)
    hf = transformers.AutoModelForCausalLM.from_pretrained(workspace["source"]).eval()
    nll = 0.0
    with torch.no_grad():  # transformers' model on the file's own token stream, HF's perplexity-guide masking
        for window in sliding_windows(ids.numel(), 16, 16):
            input_ids = ids[window.begin : window.end + 1][None]
            labels = input_ids.clone()
            labels[:, : -window.scored] = -100
            nll += float(hf(input_ids, labels=labels).loss) * window.scored
    assert result["value"] == pytest.approx(math.exp(nll / (len(text) - 1)), rel=1e-4)
    # a directory: its files in sorted order, separated by one EOS, nothing after the last
    folder = workspace["root"] / "test_dir"
    folder.mkdir()
    (folder / "b.txt").write_text("zz top")
    (folder / "a.txt").write_text(text)
    tokens = load_tokens(str(folder), tiny_tokenizer(), "all")
    assert tokens.tolist() == [
        *ids.tolist(),
        tiny_tokenizer().eos_token_id,
        *tiny_tokenizer()("zz top", add_special_tokens=False)["input_ids"],
    ]
    with pytest.raises(RecursifyError, match="local files"):
        load_tokens("teacher:100", tiny_tokenizer(), "all")


def test_compare_draws_both_plots(workspace: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    pareto, exits, out = (workspace["root"] / name for name in ("pareto.png", "exits.png", "compare.json"))
    args = ["compare", str(workspace["source"]), str(workspace["rrt"]), "--ppl", str(workspace["data"]), "--max-tokens", "400"]
    args += ["--ctx", "32", "--plot", str(pareto), "--exit-plot", str(exits), "--json", str(out), "--quiet"]
    assert main(args) == 0
    assert pareto.read_bytes().startswith(PNG_MAGIC) and exits.read_bytes().startswith(PNG_MAGIC)
    models = json.loads(out.read_text())["models"]
    assert [m["model"] for m in models] == [str(workspace["source"]), str(workspace["rrt"])]
    assert [len(m["per_loop"]) for m in models] == [1, 2]
    assert models[0]["ppl"]["tokens"] == 399
    table = capsys.readouterr().out
    assert table.startswith("| model | loops |") and str(workspace["rrt"]) in table


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "nothing to evaluate"),
        (["--tasks", "no/such/task.json"], "matches no file"),
        (["--ppl", "no/such/data.txt"], "not an existing file"),
        (["--ppl", "DATA", "--ctx", "8", "--stride", "9"], "stride"),
    ],
)
def test_eval_user_errors_are_one_line(
    workspace: dict[str, Path], extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    extra = [str(workspace["data"]) if arg == "DATA" else arg for arg in extra]
    assert main(["eval", str(workspace["source"]), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("recursify: error: ") and message in err and len(err.strip().splitlines()) == 1


def test_compare_exit_plot_needs_perplexity(workspace: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    args = ["compare", str(workspace["source"]), "--tasks", str(workspace["task"]), "--exit-plot", str(workspace["root"] / "x.png")]
    assert main(args) == 2
    assert "--exit-plot needs" in capsys.readouterr().err


def _report(model: str, loops: int, ppl: float | None, tasks: dict[str, TaskResult] | None = None) -> EvalReport:
    result = None
    if ppl is not None:
        per_loop = [LoopMetrics(loop=b + 1, ppl=ppl * (loops - b), agree_final=(b + 1) / loops) for b in range(loops)]
        result = PerplexityResult(ppl, 1.0, 100, 64, 64, per_loop, OracleExits([100 // loops] * loops, (loops + 1) / 2))
    return EvalReport(model, dict(PARAMS), loops, result, tasks or {})


def test_report_dict_and_markdown() -> None:
    report = _report("runs/rrt", 3, 12.5, {"toy": TaskResult(0.5, 0.75, 4, 1)})
    payload = report.to_dict()
    assert payload["per_loop"][0] == {"loop": 1, "ppl": 37.5, "agree_final": pytest.approx(1 / 3)}  # no teacher keys
    assert payload["oracle_exit"] == {"histogram": [33, 33, 33], "mean_loops": 2.0}
    assert payload["tasks"]["toy"] == {"acc": 0.5, "acc_norm": 0.75, "n": 4, "shots": 1}
    text = format_markdown(report)
    assert "perplexity: **12.500**" in text and "| toy | 0.500 | 0.750 | 4 | 1 |" in text
    assert "| runs/rrt | 3 | 2.10 | 0.525 | 12.500 | 2.000 | 0.500 / 0.750 |" in format_comparison([report])


def test_plots_write_pngs_and_reject_missing_metrics(tmp_path: Path) -> None:
    reports = [_report("orig", 1, 10.0, {"t": TaskResult(0.6, 0.6, 5, 0)}), _report("rrt", 2, 20.0, {"t": TaskResult(0.4, 0.5, 5, 0)})]
    for metric in ("ppl", "acc"):
        pareto_plot(reports, tmp_path / f"{metric}.png", metric)
        assert (tmp_path / f"{metric}.png").read_bytes().startswith(PNG_MAGIC)
    exit_plot(reports, tmp_path / "exits.png")
    assert (tmp_path / "exits.png").read_bytes().startswith(PNG_MAGIC)
    assert not list(tmp_path.glob(".*"))  # no temp files left behind
    with pytest.raises(ConfigError, match="no model has a ppl"):
        pareto_plot([_report("x", 1, None)], tmp_path / "none.png")
    with pytest.raises(ConfigError, match="per-loop"):
        exit_plot([_report("x", 1, None)], tmp_path / "none.png")
    with pytest.raises(ConfigError, match="unknown plot metric"):
        pareto_plot(reports, tmp_path / "bad.png", "bleu")
