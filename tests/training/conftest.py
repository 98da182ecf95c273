"""Shared fixtures of the training tests: a tiny source model, its converted student, random text."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from recursify import convert
from tiny import save_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> dict[str, Path]:
    """Paths of a tiny llama source (the teacher), a loops=3 rank-4 student and a jsonl corpus."""
    root = tmp_path_factory.mktemp("tiny_run")
    save_tiny_checkpoint(root / "source", "llama", seed=0)
    convert(str(root / "source"), loops=3, rank=4, init="average", progress=False).save_pretrained(str(root / "student"))
    rng = random.Random(0)
    alphabet = "abcdefghijklmnopqrstuvwxyz      .,"
    lines = [json.dumps({"text": "".join(rng.choice(alphabet) for _ in range(rng.randint(40, 120)))}) for _ in range(400)]
    (root / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    return {"source": root / "source", "student": root / "student", "data": root / "corpus.jsonl", "root": root}


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared, oversubscribed CPU OpenMP
    barriers make them up to 10x slower; the setting is restored for the rest of the suite."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
