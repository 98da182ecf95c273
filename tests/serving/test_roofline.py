"""The roofline's cost model against hand counts, and the measured peaks are positive."""

from __future__ import annotations

import pytest

import recursify
from recursify.serving.roofline import ModelSizes, measure_roofline, token_cost
from tiny import tiny_model


def test_model_sizes_count_one_loop_and_the_head() -> None:
    # tiny llama: hidden 48, q 4x16, kv 2x16, ffn 80; 6 layers, loops 3 -> 2 shared layers per loop
    dense = 48 * 64 + 2 * 48 * 32 + 64 * 48 + 3 * 48 * 80
    norms = 2 * 48
    original = ModelSizes.of(recursify.convert(tiny_model("llama", seed=0), loops=1, progress=False))
    assert original.loop_params == 6 * (dense + norms) and original.depths_per_loop == 6
    assert original.head_params == 97 * 48 and original.kv_width == 2 * 2 * 16
    looped = ModelSizes.of(recursify.convert(tiny_model("llama", seed=0), loops=3, rank=4, init="average", progress=False))
    lora = 4 * (48 + 64) + 2 * 4 * (48 + 32) + 4 * (64 + 48) + 2 * 4 * (48 + 80) + 4 * (80 + 48)  # one visit's A and B
    assert looped.loop_params == 2 * (dense + norms + lora) and looped.depths_per_loop == 2


def test_token_cost_by_hand() -> None:
    sizes = ModelSizes(loop_params=100, head_params=50, kv_width=4, depths_per_loop=2)
    cost = token_cost(sizes, loop_passes=3, head_rows=1, loop_steps=0.5, head_steps=0.25, context=10)
    attention = 2 * 10 * 4 * 2  # q.k and p.v over 10 positions, 2 depths, kv width 4
    assert cost["flops"] == pytest.approx(2 * (100 * 3 + 50 * 1) + attention * 3)
    assert cost["bytes"] == pytest.approx(4 * (100 * 0.5 + 50 * 0.25) + 4 * 10 * 4 * 2 * 3)


def test_measured_peaks_are_positive() -> None:
    roof = measure_roofline(matmul_size=64, copy_mib=8, repeats=1)
    assert roof.matmul_flops_per_s > 0 and roof.memory_bytes_per_s > 0 and roof.copy_bytes == 8 * 2**20
