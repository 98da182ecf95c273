"""The depth-mixed batch path the runner uses: one call per linear, each row with its own loop's LoRA and norms."""

from __future__ import annotations

import torch

import recursify
from recursify.modeling.lora import DepthLinear
from tiny import tiny_model


def test_per_token_lora_gather_equals_per_depth_reference_matmuls() -> None:
    model = recursify.convert(tiny_model("qwen2", seed=5), loops=3, init="average", rank=4, progress=False)
    generator = torch.Generator().manual_seed(0)
    rows = 11
    x = torch.randn(1, rows, model.arch.hidden_size, generator=generator)
    loops = torch.randint(0, 3, (rows,), generator=generator)
    assert len(set(loops.tolist())) == 3
    layer = model.shared_layer(1)
    for name in ("q", "k", "v", "gate", "up"):
        linear = layer.linear(name)
        assert isinstance(linear, DepthLinear) and linear.lora_A is not None and linear.lora_B is not None
        gathered = linear(x, loops[None])  # (1, rows, out): the runner's packed call
        for row, loop in enumerate(loops.tolist()):
            weight = linear.weight + linear.lora_B[loop] @ linear.lora_A[loop]  # the depth's effective weight
            bias = linear.bias + linear.bias_delta[loop] if linear.bias is not None and linear.bias_delta is not None else linear.bias
            expected = torch.nn.functional.linear(x[0, row], weight, bias)
            assert (gathered[0, row] - expected).abs().max() < 1e-5, (name, row)
    norm = layer.norm("attn_norm")
    assert norm.per_visit
    for row, loop in enumerate(loops.tolist()):
        assert torch.allclose(norm(x, loops[None])[0, row], norm(x[:, row : row + 1], loop)[0, 0], atol=1e-6)
