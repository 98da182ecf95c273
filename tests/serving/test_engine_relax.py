"""Every relaxation variant serves like plain generation: depth-wise batching mixes depths in one pass."""

from __future__ import annotations

import pytest
import torch

import recursify
from recursify.serve import Engine
from tiny import tiny_model

NEW = 6


@pytest.mark.parametrize(("family", "relax", "rank"), [("llama", "lora-xs", 4), ("gemma2", "prefix:3", 0), ("qwen2", "bias", 0)])
def test_depthwise_engine_equals_generate(family: str, relax: str, rank: int) -> None:
    model = recursify.convert(tiny_model(family, seed=3), loops=3, init="average", rank=rank, relax=relax, progress=False)
    torch.manual_seed(0)
    with torch.no_grad():  # move the relaxation off its init so every depth really differs
        for name, param in model.named_parameters():
            if name.rsplit(".", 1)[-1] in ("lora_R", "prefix_keys", "prefix_values", "bias_delta"):
                param.add_(torch.randn_like(param) * 0.3)
    prompts = [torch.randint(3, 97, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 1, 9, 3)]
    engine = Engine(model, batching="depthwise", max_batch=3, max_prefill_chunk=4, exit="none", max_kv_tokens=512)
    served = {out.request_id: out.token_ids for out in engine.generate(prompts, max_new_tokens=NEW, stop_token_ids=[])}
    for i, prompt in enumerate(prompts):
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=NEW, eos_token_ids=[])[0, len(prompt) :].tolist()
        assert served[f"req-{i}"] == expected, (relax, i)
