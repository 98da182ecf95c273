"""Data sources, the held-out split, tokenisation and packing."""

from __future__ import annotations

import json
import random

import pytest
import torch

import recursify.data as data
from recursify import convert
from recursify.data import is_heldout, load_tokens, pack, parse_count, read_documents
from recursify.errors import ConfigError, DataError
from tiny import save_tiny_checkpoint, tiny_tokenizer


def _random_docs(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "light", "north", "quiet", "seven"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + f" {i}." for i in range(count)]


def test_parse_count() -> None:
    assert [parse_count(t) for t in ("512", "16k", "2M", "1.5k", "1G")] == [512, 16_000, 2_000_000, 1500, 10**9]
    for bad in ("", "0", "-3", "1.5", "2x", "k"):
        with pytest.raises(ConfigError):
            parse_count(bad)


def test_jsonl_splits_are_disjoint_complete_and_seeded(tmp_path) -> None:
    docs = _random_docs(400)
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    train = list(read_documents(str(tmp_path / "a.jsonl"), "train", seed=1))
    heldout = list(read_documents(str(tmp_path / "a.jsonl"), "heldout", seed=1))
    assert sorted(train + heldout) == sorted(docs)
    assert not set(train) & set(heldout)
    assert 0.01 < len(heldout) / len(docs) < 0.12  # ~5%
    assert set(heldout) == {d for d in docs if is_heldout(d)}  # independent of seed and order
    assert train == list(read_documents(str(tmp_path / "a.jsonl"), "train", seed=1))
    assert train != list(read_documents(str(tmp_path / "a.jsonl"), "train", seed=2))
    assert set(heldout) == set(read_documents(str(tmp_path / "a.jsonl"), "heldout", seed=2))


def test_txt_parquet_and_directory(tmp_path) -> None:
    paragraphs = [f"paragraph {i} " + "x" * 700 for i in range(9)]
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "book.txt").write_text("\n\n  \n".join(paragraphs))
    txt_docs = list(read_documents(str(tmp_path / "d" / "book.txt"), "train")) + list(
        read_documents(str(tmp_path / "d" / "book.txt"), "heldout")
    )
    # Paragraphs group into documents of >= TXT_DOC_CHARS characters: 3 paragraphs of ~710 each.
    assert sorted(txt_docs) == sorted("\n\n".join(paragraphs[i : i + 3]) for i in range(0, 9, 3))
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.table({"text": ["parquet one", "parquet two", ""], "id": [1, 2, 3]}), tmp_path / "d" / "sub" / "t.parquet")
    (tmp_path / "d" / "sub" / "notes.md").write_text("ignored")
    everything = set(read_documents(str(tmp_path / "d"), "train")) | set(read_documents(str(tmp_path / "d"), "heldout"))
    assert everything == set(txt_docs) | {"parquet one", "parquet two"}


def test_load_tokens_joins_documents_with_eos_and_truncates(tmp_path) -> None:
    docs = _random_docs(50)
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tokenizer = tiny_tokenizer()
    tokens = load_tokens(str(path), tokenizer, "train", seed=3)
    expected: list[int] = []
    for doc in read_documents(str(path), "train", seed=3):
        expected += tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert tokens.dtype == torch.int64 and tokens.tolist() == expected
    assert load_tokens(str(path), tokenizer, "train", max_tokens=37, seed=3).tolist() == expected[:37]


def test_pack_drops_the_remainder() -> None:
    tokens = torch.arange(23)
    rows = pack(tokens, 5)
    assert rows.shape == (4, 5) and rows.flatten().tolist() == list(range(20))
    assert pack(tokens, 30).shape == (0, 30)
    with pytest.raises(ConfigError):
        pack(tokens, 0)


def test_bad_specs_raise_actionable_errors(tmp_path) -> None:
    with pytest.raises(DataError, match="not an existing file"):
        read_documents(str(tmp_path / "missing.txt"))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DataError, match="unsupported extension"):
        read_documents(str(tmp_path / "x.csv"))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match="bad.jsonl:2"):
        read_documents(str(tmp_path / "bad.jsonl"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no"):
        read_documents(str(tmp_path / "empty"))
    with pytest.raises(DataError, match="--teacher"):
        read_documents("teacher:1k")
    with pytest.raises(DataError, match="teacher:2M"):
        read_documents("teacher:lots", teacher=object())  # type: ignore[arg-type]
    with pytest.raises(DataError, match="split"):
        read_documents(str(tmp_path / "bad.jsonl"), "validation")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    directory = tmp_path_factory.mktemp("teacher")
    save_tiny_checkpoint(directory, "qwen2")
    return convert(str(directory), loops=1, progress=False)


def test_teacher_corpus_is_cached_deterministic_and_split(teacher, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RECURSIFY_CACHE", str(tmp_path / "cache"))
    train = list(read_documents("teacher:64", "train", seed=5, teacher=teacher))
    heldout = list(read_documents("teacher:64", "heldout", seed=5, teacher=teacher))
    assert train and heldout and train != heldout  # separately seeded samples (tiny docs may coincide by chance)
    tokenizer = teacher.tokenizer
    assert sum(len(tokenizer(d, add_special_tokens=False)["input_ids"]) for d in train) >= 64 * 0.8
    assert any(d.startswith(tuple(data.SEED_PHRASES)) for d in train)
    cached = sorted((tmp_path / "cache" / "data").rglob("*.jsonl"))
    assert [p.name for p in cached] == ["heldout-n64-seed5.jsonl", "train-n64-seed5.jsonl"]

    def fail(*args, **kwargs):
        raise AssertionError("the cached corpus must not be regenerated")

    monkeypatch.setattr(data, "sample_corpus", fail)
    assert list(read_documents("teacher:64", "train", seed=5, teacher=teacher)) == train
    monkeypatch.undo()
    monkeypatch.setenv("RECURSIFY_CACHE", str(tmp_path / "other-cache"))
    assert list(read_documents("teacher:64", "train", seed=5, teacher=teacher)) == train  # regenerated identically
    assert list(read_documents("teacher:64", "train", seed=6, teacher=teacher)) != train


def _write_jsonl(path, docs: list[str]) -> str:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return str(path)


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_process_shares_are_disjoint_and_cover_the_split(tmp_path, world_size: int) -> None:
    docs = _random_docs(300, seed=4)
    spec = _write_jsonl(tmp_path / "c.jsonl", docs)
    for split in ("train", "heldout"):
        whole = list(read_documents(spec, split, seed=7))
        shares = [list(read_documents(spec, split, seed=7, rank=r, world_size=world_size)) for r in range(world_size)]
        assert sorted(d for share in shares for d in share) == sorted(whole)  # every document once: no overlap, no loss
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    heldout_shares = [set(read_documents(spec, "heldout", rank=r, world_size=world_size)) for r in range(world_size)]
    assert set().union(*heldout_shares) == {d for d in docs if is_heldout(d)}  # the held-out split ignores the process count
    for rank in range(world_size):
        assert not any(is_heldout(d) for d in read_documents(spec, "train", seed=7, rank=rank, world_size=world_size))


def test_bad_process_rank_is_refused_before_reading(tmp_path) -> None:
    spec = _write_jsonl(tmp_path / "c.jsonl", _random_docs(10))
    for rank, world_size in ((2, 2), (-1, 2), (0, 0)):
        with pytest.raises(ConfigError, match="rank"):
            read_documents(spec, rank=rank, world_size=world_size)
        with pytest.raises(ConfigError, match="rank"):
            data.stream_rows(spec, tiny_tokenizer(), 8, rank=rank, world_size=world_size)


def test_stream_rows_packs_like_pack_load_tokens(tmp_path) -> None:
    docs = _random_docs(200, seed=2)
    spec = _write_jsonl(tmp_path / "c.jsonl", docs)
    tokenizer = tiny_tokenizer()
    rows = torch.stack(list(data.stream_rows(spec, tokenizer, 13, "train", seed=3)))
    assert torch.equal(rows, pack(load_tokens(spec, tokenizer, "train", seed=3), 13))
    # Three processes: each packs its own documents; together they hold every document's tokens once.
    token_count = 0
    for rank in range(3):
        share = load_tokens(spec, tokenizer, "train", seed=3, rank=rank, world_size=3)
        share_rows = list(data.stream_rows(spec, tokenizer, 13, "train", seed=3, rank=rank, world_size=3))
        assert torch.equal(torch.stack(share_rows), pack(share, 13))
        token_count += share.numel()
    assert token_count == load_tokens(spec, tokenizer, "train", seed=3).numel()
    with pytest.raises(DataError, match="share of 400"):
        next(data.stream_rows(spec, tokenizer, 13, "heldout", rank=399, world_size=400))


def test_teacher_corpus_shares(teacher, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RECURSIFY_CACHE", str(tmp_path / "cache"))
    whole = list(read_documents("teacher:64", "train", seed=1, teacher=teacher))
    shares = [list(read_documents("teacher:64", "train", seed=1, teacher=teacher, rank=r, world_size=2)) for r in range(2)]
    assert sorted(shares[0] + shares[1]) == sorted(whole) and shares[0] and shares[1]


def test_streamed_parquet_dataset_is_split_across_processes(tmp_path, monkeypatch) -> None:
    """``hf:DIR`` streams a parquet dataset through ``datasets`` (the hub code path, offline), split by process."""
    datasets = pytest.importorskip("datasets")
    # datasets sleeps 5 s after each fully read shuffled parquet stream (a guard against an arrow crash at interpreter
    # shutdown); a training run reads its stream once, this test reads it 19 times.
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    docs = _random_docs(240, seed=9)
    files = {}
    for shard in range(4):  # 4 shards: 2 and 4 processes get whole files, 3 processes every 3rd document
        part = docs[shard * 60 : (shard + 1) * 60]
        pq.write_table(pa.table({"text": part}), tmp_path / f"part-{shard}.parquet")
        files.update(dict.fromkeys(part, shard))
    spec = f"hf:{tmp_path}"
    train = sorted(d for d in docs if not is_heldout(d))
    assert sorted(read_documents(spec, "train", seed=5)) == train
    for world_size in (2, 3, 4):
        shares = [list(read_documents(spec, "train", seed=5, rank=r, world_size=world_size)) for r in range(world_size)]
        assert sorted(d for share in shares for d in share) == train
        heldout = [d for r in range(world_size) for d in read_documents(spec, "heldout", seed=5, rank=r, world_size=world_size)]
        assert sorted(heldout) == sorted(d for d in docs if is_heldout(d))
        if world_size in (2, 4):  # split by shards: a process reads whole files, never another's
            assert all(len({files[d] for d in share}) == 4 // world_size for share in shares)
