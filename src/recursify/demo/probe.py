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
    """Time one forward, one forward + backward and a short sampling run (after a warm-up forward).

    Gradients are computed and dropped; the weights are not changed.
    """
    from recursify.data import sample_corpus

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(model.arch.vocab_size, (PROBE_ROWS, PROBE_SEQ), generator=generator)
    tokens = ids.numel()
    model.eval()
    with torch.no_grad():
        model(ids[:1, :16])
        began = time.perf_counter()
        model(ids)
        forward = tokens / (time.perf_counter() - began)
    model.train()
    began = time.perf_counter()
    model(ids).logits.float().logsumexp(-1).mean().backward()
    train = tokens / (time.perf_counter() - began)
    model.zero_grad(set_to_none=True)
    model.eval()
    sample_tokens = 1024
    began = time.perf_counter()
    sample_corpus(model, sample_tokens, seed, progress=False)
    sample = sample_tokens / (time.perf_counter() - began)
    return Speeds(forward=forward, train=train, sample=sample)
