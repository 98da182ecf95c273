"""Measure how fast this machine runs the source model, so the demo's budget fits ``--minutes``."""

from __future__ import annotations

import time

import torch

from recursify.demo.plan import Shape, Speeds
from recursify.modeling.model import RecursiveModel

PROBE_ROWS, PROBE_SEQ = 4, 128  # the demo's uptraining micro-batch shape


def model_shape(model: RecursiveModel) -> Shape:
    arch = model.arch
    return Shape(arch.hidden_size, arch.intermediate_size, arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim)


def measure_speeds(model: RecursiveModel, seed: int = 0) -> Speeds:
    """Time one forward, a short sampling run and one KD training step (after a warm-up forward).

    The training step is the real thing, not a proxy: the model as its own teacher (no-grad forward),
    a student forward, forward KL over the whole vocabulary, backward and an AdamW update. It changes
    ``model``'s weights, so pass a copy you will not use again (the demo's probe model is dropped).
    """
    from recursify.data import sample_corpus
    from recursify.training.losses import kd_divergence

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(model.arch.vocab_size, (PROBE_ROWS, PROBE_SEQ), generator=generator)
    tokens = ids.numel()
    model.eval()
    with torch.no_grad():
        model(ids[:1, :16])
        began = time.perf_counter()
        model(ids)
        forward = tokens / (time.perf_counter() - began)
    sample_tokens = 1024
    began = time.perf_counter()
    sample_corpus(model, sample_tokens, seed, progress=False)
    sample = sample_tokens / (time.perf_counter() - began)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    model.train()
    began = time.perf_counter()
    with torch.no_grad():
        teacher_logits = model(ids).logits
    kd_divergence(model(ids).logits, teacher_logits).backward()
    optimizer.step()
    train = tokens / (time.perf_counter() - began)
    model.zero_grad(set_to_none=True)
    model.eval()
    return Speeds(forward=forward, train=train, sample=sample)
