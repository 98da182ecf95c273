"""Each step's rows: in memory (a seeded draw shared by every process count) or streamed (each process its share, in order)."""

from __future__ import annotations

import json

import pytest
import torch

from recursify.data import load_tokens, stream_rows
from recursify.errors import DataError
from recursify.training.batches import MemoryBatches, StreamBatches
from recursify.training.schedule import batch_rows
from tiny import tiny_tokenizer


@pytest.fixture
def corpus(tmp_path) -> str:
    docs = [f"document {i} " + "abc def " * (i % 9 + 1) for i in range(60)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return str(tmp_path / "c.jsonl")


def test_memory_batches_split_the_same_global_batch_over_any_process_count(corpus) -> None:
    tokens = load_tokens(corpus, tiny_tokenizer(), "train", seed=0)
    single = MemoryBatches(tokens, 8, rows_per_step=4, rank=0, world_size=1, seed=5, spec=corpus)
    pair = [MemoryBatches(tokens, 8, rows_per_step=4, rank=r, world_size=2, seed=5, spec=corpus) for r in (0, 1)]
    for step in (0, 1, 17, 300):  # past the first epoch too: the draw wraps into a new permutation
        whole = single.local(step)
        assert whole is not None and torch.equal(whole, single.rows[batch_rows(step, 4, single.rows.shape[0], 5)])
        halves = [batches.local(step) for batches in pair]
        assert torch.equal(torch.cat(halves), whole)
    assert single.fingerprint == pair[1].fingerprint and single.describe(10)["epochs"] == 40 / single.rows.shape[0]
    with pytest.raises(DataError, match="fewer than one --seq-len row"):
        MemoryBatches(tokens[:5], 8, 4, 0, 1, 0, corpus)


def test_streamed_batches_take_each_share_in_order_resume_exactly_and_run_out(corpus) -> None:
    tokenizer = tiny_tokenizer()
    shares = [list(stream_rows(corpus, tokenizer, 8, "train", 3, rank=r, world_size=2)) for r in (0, 1)]
    steps = min(len(rows) for rows in shares) // 2  # 2 rows per process per step (4 per global step)
    for rank in (0, 1):
        batches = StreamBatches(stream_rows(corpus, tokenizer, 8, "train", 3, rank=rank, world_size=2), 4, 2, start_step=0)
        taken = [batches.local(step) for step in range(steps)]
        assert all(torch.equal(rows, torch.stack(shares[rank][2 * s : 2 * s + 2])) for s, rows in enumerate(taken))
        resumed = StreamBatches(stream_rows(corpus, tokenizer, 8, "train", 3, rank=rank, world_size=2), 4, 2, start_step=steps - 2)
        assert torch.equal(resumed.local(steps - 2), taken[-2]) and torch.equal(resumed.local(steps - 1), taken[-1])
    short = min((0, 1), key=lambda r: len(shares[r]))
    batches = StreamBatches(stream_rows(corpus, tokenizer, 8, "train", 3, rank=short, world_size=2), 4, 2, start_step=steps)
    assert batches.local(steps) is None  # fewer than 2 rows left in the shorter share
    assert batches.fingerprint is None and batches.describe(3) == {"rows": 12, "epochs": None}
