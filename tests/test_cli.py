"""The command line: the happy path on a tiny checkpoint, and one clear line for every user error."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

import recursify
from recursify import load
from recursify.cli import build_parser, main
from tiny import save_tiny_checkpoint


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-llama")
    save_tiny_checkpoint(directory, "llama")
    return directory


@pytest.fixture(scope="module")
def converted(source_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "rrt"
    args = ["convert", "--model", str(source_dir), "--loops", "3", "--init", "average", "--rank", "4", "--out", str(out), "--quiet"]
    assert main(args) == 0
    return out


def run_error(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run a command that must fail as a user error: exit 2, one line, no traceback."""
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("recursify: error: ")
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    return err


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("convert", "info", "generate"):
        assert command in out


def test_convert_writes_a_loadable_checkpoint(converted: Path) -> None:
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in converted.iterdir()}
    model = load(converted)
    assert model.loops == 3 and len(model.layers) == 2
    assert model.recursion.ranks["q"] == 4 and model.tokenizer is not None


def test_info_json_contract(converted: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(converted), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert set(info["params"]) == {"embedding", "non_embedding", "lora", "total", "source_total", "ratio", "frozen"}
    for key in ("loops", "unique_layers", "strategy", "init", "rank", "source"):
        assert key in info
    assert (info["loops"], info["unique_layers"], info["strategy"], info["init"], info["rank"]) == (3, 2, "cycle", "average", 4)
    params = info["params"]
    assert params["total"] == params["embedding"] + params["non_embedding"] + params["lora"]
    assert params["ratio"] == pytest.approx(params["total"] / params["source_total"])


def test_info_table_for_humans(converted: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(converted)]) == 0
    out = capsys.readouterr().out
    assert "non-embedding" in out and "ratio" in out and "3 loops x 2 unique layers" in out
    assert "input dense" in out and "head dense" in out  # the tiny llama's untied head


def printed_generation(prompt: str, tokens: list[int], tokenizer: Any) -> str:
    """What ``recursify generate`` prints for greedy ``tokens``: the prompt, the text up to EOS (id 2), a newline."""
    tokens = tokens[: tokens.index(2)] if 2 in tokens else tokens
    return prompt + tokenizer.decode(tokens, skip_special_tokens=True) + "\n"


def test_generate_matches_the_python_api(converted: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", str(converted), "--prompt", "Hello", "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    model = load(converted)
    ids = model.tokenizer("Hello", return_tensors="pt")["input_ids"]
    tokens = model.generate(ids, max_new_tokens=6)[0, ids.shape[1] :].tolist()
    assert out == printed_generation("Hello", tokens, model.tokenizer)


def test_generate_from_a_source_runs_the_original(source_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A source directory is generated from as the original model: transformers' own greedy tokens are the reference."""
    reference = transformers.AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(source_dir)
    ids = tokenizer("ab", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        tokens = reference.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)[0, ids.shape[1] :].tolist()
    assert main(["generate", str(source_dir), "--prompt", "ab", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out == printed_generation("ab", tokens, tokenizer)
    # bf16 autocast: the same tokens as the Python API under the same autocast
    assert main(["generate", str(source_dir), "--prompt", "ab", "--max-new-tokens", "8", "--precision", "bf16"]) == 0
    original = recursify.convert(str(source_dir), loops=1, progress=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_tokens = original.generate(ids, max_new_tokens=8)[0, ids.shape[1] :].tolist()
    assert capsys.readouterr().out == printed_generation("ab", bf16_tokens, tokenizer)


def test_unknown_alias(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = run_error(["convert", "--model", "no-such-model", "--out", str(tmp_path / "x")], capsys)
    assert "smollm2-135m" in err  # the message lists the known aliases


def test_loops_that_do_not_divide(source_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = run_error(["convert", "--model", str(source_dir), "--loops", "4", "--out", str(tmp_path / "x"), "--quiet"], capsys)
    assert "valid loops: 1, 2, 3, 6" in err
    assert not (tmp_path / "x").exists()


def test_rank_above_every_linear(source_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = run_error(["convert", "--model", str(source_dir), "--rank", "999", "--out", str(tmp_path / "x"), "--quiet"], capsys)
    assert "rank 999 exceeds" in err


def test_existing_output_needs_overwrite(source_dir: Path, converted: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = (converted / "model.safetensors").read_bytes()
    err = run_error(["convert", "--model", str(source_dir), "--out", str(converted), "--quiet"], capsys)
    assert "--overwrite" in err
    assert (converted / "model.safetensors").read_bytes() == before


def test_unsupported_model_type(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    err = run_error(["convert", "--model", str(tmp_path / "gpt2"), "--out", str(tmp_path / "x"), "--quiet"], capsys)
    assert "unsupported model type 'gpt2'" in err and "llama" in err


def test_info_on_missing_and_corrupt_checkpoints(converted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_error(["info", str(tmp_path / "missing")], capsys)
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "model.safetensors"):
        (broken / name).write_bytes((converted / name).read_bytes())
    with (broken / "model.safetensors").open("r+b") as handle:
        handle.truncate(1000)
    assert "corrupt" in run_error(["info", str(broken)], capsys)


def test_bad_sampling_options(converted: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_error(["generate", str(converted), "--prompt", "a", "--top-p", "0"], capsys)
    run_error(["generate", str(converted), "--prompt", "a", "--temperature", "-1"], capsys)


def test_bad_argument_values_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    for args in (
        ["convert", "--rank", "lots", "--out", "x"],
        ["convert", "--loops", "0", "--out", "x"],
        ["convert", "--init", "magic", "--out", "x"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        assert exit_info.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


def test_python_module_entry_point(converted: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m recursify`` is the same CLI: its output equals an in-process ``main`` call's."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "recursify", "info", str(converted), "--json"], capture_output=True, text=True, check=True
    )
    assert main(["info", str(converted), "--json"]) == 0
    assert json.loads(result.stdout) == json.loads(capsys.readouterr().out)
    assert json.loads(result.stdout)["loops"] == 3


def test_info_on_a_source_model_describes_the_original(source_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(source_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["loops"] == 1 and info["unique_layers"] == 6
    assert info["params"]["ratio"] == 1.0 and info["params"]["lora"] == 0


def test_relax_variants_on_the_command_line(source_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "xs"
    assert (
        main(["convert", "--model", str(source_dir), "--loops", "3", "--relax", "lora-xs", "--rank", "4", "--out", str(out), "--quiet"])
        == 0
    )
    assert main(["info", str(out)]) == 0
    table = capsys.readouterr().out
    assert "lora-xs" in table and "frozen (fixed)" in table
    assert "positive --rank" in run_error(
        ["convert", "--model", str(source_dir), "--relax", "lora-xs", "--out", str(tmp_path / "x")], capsys
    )
    assert "no LoRA" in run_error(
        ["convert", "--model", str(source_dir), "--relax", "bias", "--rank", "4", "--out", str(tmp_path / "x")], capsys
    )
    for spec in ("prefix:0", "prefix:abc", "lora-sx"):
        with pytest.raises(SystemExit) as exit_info:
            main(["convert", "--relax", spec, "--out", "x"])
        assert exit_info.value.code == 2
    assert "positive number of prefix tokens" in capsys.readouterr().err


def test_low_rank_embedding_on_the_command_line(source_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = tmp_path / "calib.txt"
    text.write_text("\n\n".join(f"paragraph {i}: the quick brown fox jumps over the lazy dog, again and again." for i in range(60)))
    out = tmp_path / "emb"
    common = ["convert", "--model", str(source_dir), "--loops", "3", "--quiet"]
    assert main([*common, "--embed-rank", "8", "--head-rank", "12", "--calib", str(text), "--calib-tokens", "1000", "--out", str(out)]) == 0
    assert main(["info", str(out)]) == 0
    table = capsys.readouterr().out
    assert "input rank 8" in table and "head rank 12" in table and "relative weighted error input" in table
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["embedding"] == {"input": 8 * (97 + 48), "head": 12 * (97 + 48), "tied": False, "input_rank": 8, "head_rank": 12}
    assert info["params"]["embedding"] == 20 * (97 + 48)
    assert "--calib" in run_error([*common, "--embed-rank", "8", "--out", str(tmp_path / "x")], capsys)
    assert "exceeds min(vocab, hidden) = 48" in run_error(
        [*common, "--embed-rank", "49", "--embed-init", "svd", "--out", str(tmp_path / "x")], capsys
    )
    assert "drop --embed-rank" in run_error(
        [*common, "--embed-rank", "8", "--embed-params", "2k", "--calib", str(text), "--out", str(tmp_path / "x")], capsys
    )
    assert "below the smallest" in run_error([*common, "--embed-params", "100", "--calib", str(text), "--out", str(tmp_path / "x")], capsys)
    exact = tmp_path / "exact"
    options = ["--embed-params", "3k", "--embed-exact-rows", "10", "--calib", str(text), "--calib-tokens", "1000"]
    assert main([*common, *options, "--out", str(exact)]) == 0
    assert main(["info", str(exact)]) == 0
    assert "+ 10 rows" in capsys.readouterr().out
    assert "add --embed-rank" in run_error([*common, "--embed-exact-rows", "10", "--out", str(tmp_path / "x")], capsys)
    assert "--embed-init weighted" in run_error(
        [*common, "--embed-rank", "8", "--embed-init", "svd", "--embed-exact-rows", "10", "--out", str(tmp_path / "x")], capsys
    )
    assert "exceeds the vocabulary (97 tokens)" in run_error(
        [*common, "--embed-rank", "8", "--embed-exact-rows", "98", "--calib", str(text), "--out", str(tmp_path / "x")], capsys
    )
    assert not (tmp_path / "x").exists()
    for rank in ("0", "-3", "big"):
        with pytest.raises(SystemExit) as exit_info:
            main(["convert", "--embed-rank", rank, "--out", "x"])
        assert exit_info.value.code == 2
    assert "positive integer or 'full'" in capsys.readouterr().err


def test_cli_import_and_help_do_not_load_torch() -> None:
    """``recursify --help`` and argument checking answer without paying for torch: each command imports the library it calls."""
    import subprocess
    import sys

    code = "import sys, recursify.cli as cli; assert 'torch' not in sys.modules, 'import'; "
    code += "cli.build_parser(); assert 'torch' not in sys.modules, 'parser'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_help_states_each_default_from_the_config(capsys: pytest.CaptureFixture[str]) -> None:
    from recursify.config import RecursionConfig

    with pytest.raises(SystemExit):
        build_parser().parse_args(["convert", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert f"shared-layer init (default: {RecursionConfig.init})" in out
    assert f"(default: {RecursionConfig.lsq_rounds})" in out
    assert "--out OUT output directory" in out  # required: no default to state
    assert "seed for random init (default: 0)" in out  # a falsy default is still a default


def test_library_never_imports_the_cli() -> None:
    """The CLI is a layer over the library: only cli.py and __main__.py may import it."""
    import recursify

    package = Path(recursify.__file__).parent
    importers = [
        str(path.relative_to(package))
        for path in package.rglob("*.py")
        if path.name not in ("cli.py", "__main__.py")
        and ("recursify.cli" in path.read_text() or "from recursify import cli" in path.read_text())
    ]
    assert importers == []


def test_generate_speculative_and_exit_options(converted: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", str(converted), "--prompt", "ab", "--max-new-tokens", "6"]) == 0
    plain = capsys.readouterr().out
    assert main(["generate", str(converted), "--prompt", "ab", "--max-new-tokens", "6", "--speculative", "2x3"]) == 0
    captured = capsys.readouterr()
    assert captured.out == plain  # lossless: the same greedy text
    assert "tokens per verify pass" in captured.err
    assert main(["generate", str(converted), "--prompt", "ab", "--max-new-tokens", "6", "--exit", "fixed:3"]) == 0
    assert capsys.readouterr().out == plain  # the engine path, every token through all loops
    for bad in ("1", "0x2", "2x", "ax1"):
        with pytest.raises(SystemExit) as exit_info:
            main(["generate", str(converted), "--prompt", "a", "--speculative", bad])
        assert exit_info.value.code == 2
        assert "BxD" in capsys.readouterr().err
    assert "1..2 loops" in run_error(["generate", str(converted), "--prompt", "a", "--speculative", "3x2"], capsys)
    assert "pick one" in run_error(["generate", str(converted), "--prompt", "a", "--speculative", "1x2", "--exit", "fixed:1"], capsys)
    assert "train-exits" in run_error(["generate", str(converted), "--prompt", "a", "--exit", "gate:0.9"], capsys)
