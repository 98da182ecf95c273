"""Looped, relaxed models: KV cache, padding, early exits, per-row LoRA visits, sampling, EOS, streaming.

References: the same model without the cache, prompts run one by one, naive per-depth matmuls and
closed-form sampling distributions.
"""

from __future__ import annotations

from functools import cache

import pytest
import torch

import recursify
from recursify.config import SamplingConfig
from recursify.errors import ConfigError
from recursify.modeling.generation import sample_next
from recursify.modeling.kv_cache import AttentionContext
from recursify.modeling.lora import lora_delta
from recursify.modeling.model import RecursiveModel
from tiny import tiny_model

PAD = 0
NEW_TOKENS = 10
# (family, loops): Gemma2 has sliding windows (4), soft-caps and sandwich norms; Qwen2 per-depth bias residuals
LOOPED = [("gemma2", 2), ("qwen2", 3), ("gemma3_text", 3), ("llama", 2)]


@cache
def _model(family: str, loops: int) -> RecursiveModel:
    """A relaxed recursive model whose LoRAs are non-zero at every visit (average init, SVD rank 4)."""
    return recursify.convert(tiny_model(family, seed=3), loops=loops, init="average", rank=4, progress=False)


def _tokens(seed: int, batch: int, seq: int) -> torch.Tensor:
    return torch.randint(3, 97, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _left_padded(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = 1
    return ids, mask


def _greedy(model: RecursiveModel, ids: torch.Tensor, mask: torch.Tensor | None = None, **kwargs: object) -> torch.Tensor:
    options: dict[str, object] = {"max_new_tokens": NEW_TOKENS, "eos_token_ids": [], "pad_token_id": PAD, **kwargs}
    return model.generate(ids, attention_mask=mask, **options)


# --- KV cache and padding ----------------------------------------------------------------------


@pytest.mark.parametrize(("family", "loops"), LOOPED)
def test_cached_generation_equals_uncached(family: str, loops: int) -> None:
    model = _model(family, loops)
    ids, mask = _left_padded([_tokens(31, 1, 7)[0], _tokens(32, 1, 3)[0]])
    with_cache = _greedy(model, ids, mask, use_cache=True)
    without = _greedy(model, ids, mask, use_cache=False)
    assert with_cache.shape == (2, 7 + NEW_TOKENS)
    assert torch.equal(with_cache, without)


@pytest.mark.parametrize(("family", "loops"), LOOPED[:2])
def test_chunked_prefill_with_cache_equals_one_full_forward(family: str, loops: int) -> None:
    model = _model(family, loops)
    ids = _tokens(33, 2, 11)
    kv = model.new_cache(2, 11)
    with torch.no_grad():
        full = model(ids).logits
        chunks = [
            model(ids[:, a:b], attention_mask=torch.ones(2, b, dtype=torch.long), cache=kv).logits for a, b in [(0, 6), (6, 9), (9, 11)]
        ]
    assert kv.length == 11
    assert (torch.cat(chunks, dim=1) - full).abs().max() < 1e-5


@pytest.mark.parametrize(("family", "loops"), LOOPED)
def test_left_padded_batch_equals_prompts_run_one_by_one(family: str, loops: int) -> None:
    model = _model(family, loops)
    prompts = [_tokens(34, 1, n)[0] for n in (9, 2, 5)]
    ids, mask = _left_padded(prompts)
    batched = _greedy(model, ids, mask)
    with torch.no_grad():
        batched_logits = model(ids, attention_mask=mask).logits
    for row, prompt in enumerate(prompts):
        alone = _greedy(model, prompt[None])
        assert torch.equal(batched[row, ids.shape[1] :], alone[0, len(prompt) :]), f"row {row}"
        with torch.no_grad():
            alone_logits = model(prompt[None]).logits[0]
        assert (batched_logits[row, -len(prompt) :] - alone_logits).abs().max() < 1e-5


def test_cache_too_short_raises_config_error() -> None:
    model = _model("llama", 2)
    ids = _tokens(35, 1, 6)
    with pytest.raises(ConfigError, match="KV cache full"):
        model(ids, cache=model.new_cache(1, 5))
    kv = model.new_cache(1, 8)
    with torch.no_grad():
        model(ids, cache=kv)
    with pytest.raises(ConfigError, match="max_len=8"):
        model(ids[:, :3], attention_mask=torch.ones(1, 9, dtype=torch.long), cache=kv)


def test_cache_keeps_one_slot_per_depth() -> None:
    model = _model("qwen2", 3)  # 2 shared layers, 6 depths
    kv = model.new_cache(1, 4)
    with torch.no_grad():
        model(_tokens(36, 1, 4), cache=kv)
    assert kv.keys is not None and kv.keys.shape == (6, 1, 2, 4, 16)
    # depths 0, 2, 4 run the same shared layer on different hidden states: their keys must differ
    assert not torch.allclose(kv.keys[0], kv.keys[2]) and not torch.allclose(kv.keys[2], kv.keys[4])


# --- early exits -------------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "loops"), LOOPED)
def test_exit_logits_one_per_loop_and_last_is_the_output(family: str, loops: int) -> None:
    model = _model(family, loops)
    ids = _tokens(37, 2, 6)
    with torch.no_grad():
        out = model(ids, output_exits=True, output_hidden_states=True)
        plain = model(ids).logits
    assert out.exit_logits is not None and out.hidden_states is not None
    assert len(out.exit_logits) == loops
    assert torch.equal(out.exit_logits[-1], out.logits)
    assert torch.equal(out.logits, plain)
    block = 6 // loops
    for loop, exit_logits in enumerate(out.exit_logits):
        # exit b reads the residual stream after depth (b + 1) * K - 1, i.e. hidden_states[(b + 1) * K]
        assert torch.equal(exit_logits, model.head(out.hidden_states[(loop + 1) * block]))
    assert not torch.allclose(out.exit_logits[0], out.exit_logits[-1])


def test_logits_to_keep_matches_the_tail_of_all_exits() -> None:
    model = _model("gemma2", 2)
    ids = _tokens(38, 2, 7)
    with torch.no_grad():
        full = model(ids, output_exits=True)
        tail = model(ids, output_exits=True, logits_to_keep=2)
    assert tail.exit_logits is not None and full.exit_logits is not None
    for a, b in zip(tail.exit_logits, full.exit_logits, strict=True):
        assert torch.equal(a, b[:, -2:])


# --- per-row LoRA visits -----------------------------------------------------------------------


def test_lora_delta_gathers_each_rows_visit() -> None:
    gen = torch.Generator().manual_seed(5)
    lora_a, lora_b = torch.randn(3, 4, 10, generator=gen), torch.randn(3, 7, 4, generator=gen)
    x = torch.randn(5, 6, 10, generator=gen)
    visit = torch.tensor([2, 0, 1, 2, 0])
    got = lora_delta(x, lora_a, lora_b, visit)
    assert got.shape == (5, 6, 7)
    for row in range(5):
        v = int(visit[row])
        reference = x[row] @ (lora_b[v] @ lora_a[v]).T  # (seq, out) = x (B_v A_v)^T
        torch.testing.assert_close(got[row], reference, atol=1e-5, rtol=1e-5)
    for v in range(3):
        torch.testing.assert_close(lora_delta(x, lora_a, lora_b, v), x @ (lora_b[v] @ lora_a[v]).T, atol=1e-5, rtol=1e-5)


def _context(model: RecursiveModel, ids: torch.Tensor) -> AttentionContext:
    positions = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
    return model.attention_context(torch.ones_like(ids), positions, None, torch.float32)


def _forward_with_tensor_visits(model: RecursiveModel, ids: torch.Tensor, per_token: bool) -> torch.Tensor:
    """The model's stack with every depth's visit passed as a LongTensor ([batch] or [batch, seq]) instead of an int."""
    h, ctx = model.embed_tokens(ids), _context(model, ids)
    shape = ids.shape if per_token else ids.shape[:1]
    for slot in model.schedule:
        h = model.shared_layer(slot.layer)(h, torch.full(shape, slot.visit), slot.depth, ctx)
    return model.head(h)


@pytest.mark.parametrize("per_token", [False, True], ids=["per-row", "per-token"])
@pytest.mark.parametrize(("family", "loops"), LOOPED)
def test_tensor_visits_equal_the_int_path(family: str, loops: int, per_token: bool) -> None:
    model = _model(family, loops)
    ids = _tokens(39, 3, 6)
    with torch.no_grad():
        assert (_forward_with_tensor_visits(model, ids, per_token) - model(ids).logits).abs().max() < 1e-5


@pytest.mark.parametrize("family", ["qwen2", "gemma3_text"])  # bias residuals; per-visit sandwich + q/k norms
def test_mixed_visits_in_one_batch_equal_each_row_at_its_own_visit(family: str) -> None:
    model = recursify.convert(tiny_model(family, seed=3), loops=3, init="average", rank=4, norms="per-depth", progress=False)
    layer, depth = model.shared_layer(0), 0
    ids = _tokens(40, 3, 6)
    h = torch.randn(3, 6, 48, generator=torch.Generator().manual_seed(6))
    ctx = _context(model, ids)
    visit = torch.tensor([2, 0, 1])
    with torch.no_grad():
        mixed = layer(h, visit, depth, ctx)
        for row in range(3):
            alone = layer(h[row : row + 1], int(visit[row]), depth, _context(model, ids[row : row + 1]))
            assert (mixed[row] - alone[0]).abs().max() < 1e-5, f"row {row}"
        assert not torch.allclose(layer(h, 0, depth, ctx), layer(h, 2, depth, ctx))  # visits really differ


# --- sampling ----------------------------------------------------------------------------------


def test_seeded_sampling_is_reproducible() -> None:
    model = _model("llama", 2)
    ids = _tokens(41, 2, 4)
    hot = SamplingConfig(temperature=1.5, seed=123)
    first = _greedy(model, ids, sampling=hot)
    assert torch.equal(first, _greedy(model, ids, sampling=hot))
    assert not torch.equal(first, _greedy(model, ids, sampling=SamplingConfig(temperature=1.5, seed=124)))
    assert not torch.equal(first, _greedy(model, ids))


@pytest.mark.parametrize(
    "sampling", [SamplingConfig(temperature=1.0, top_k=1, seed=1), SamplingConfig(temperature=1.0, top_p=1e-6, seed=1)]
)
def test_top_k_one_and_tiny_top_p_equal_greedy(sampling: SamplingConfig) -> None:
    model = _model("gemma2", 2)
    ids = _tokens(42, 2, 5)
    assert torch.equal(_greedy(model, ids, sampling=sampling), _greedy(model, ids))


def _draws(logits: torch.Tensor, config: SamplingConfig, n: int = 4000) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    return sample_next(logits.expand(n, -1), config, gen)


def test_top_p_keeps_the_smallest_prefix_reaching_p_and_renormalises() -> None:
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    # mass before token 1 is 0.5 < 0.7 (kept); before token 2 it is 0.8 >= 0.7 (dropped)
    counts = torch.bincount(_draws(logits, SamplingConfig(temperature=1.0, top_p=0.7)), minlength=4).float() / 4000
    assert counts[2] == counts[3] == 0
    torch.testing.assert_close(counts[:2], torch.tensor([0.5 / 0.8, 0.3 / 0.8]), atol=0.03, rtol=0)


def test_top_k_and_temperature_follow_the_softmax() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    counts = torch.bincount(_draws(logits, SamplingConfig(temperature=2.0, top_k=3)), minlength=5).float() / 4000
    expected = torch.softmax(logits[0, :3] / 2.0, dim=-1)
    assert counts[3] == counts[4] == 0
    torch.testing.assert_close(counts[:3], expected, atol=0.03, rtol=0)


@pytest.mark.parametrize("bad", [{"temperature": -0.1}, {"top_k": -1}, {"top_p": 0.0}, {"top_p": 1.5}])
def test_invalid_sampling_config_raises(bad: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        SamplingConfig(**bad)  # type: ignore[arg-type]


# --- EOS, streaming ----------------------------------------------------------------------------


def _pad_after_eos(free: torch.Tensor, eos: list[int]) -> tuple[torch.Tensor, list[int]]:
    """Reference: each row's EOS-free continuation, padded after its first EOS; cut once every row is done."""
    expected, ends = free.clone(), []
    for row in range(free.shape[0]):
        hits = torch.isin(free[row], torch.tensor(eos)).nonzero()
        end = int(hits[0]) + 1 if len(hits) else free.shape[1]
        expected[row, end:] = PAD
        ends.append(end)
    return expected[:, : max(ends)], ends


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
def test_eos_stops_rows_and_pads_afterwards(use_cache: bool) -> None:
    model = _model("qwen2", 3)
    ids, mask = _left_padded([_tokens(43, 1, 6)[0], _tokens(44, 1, 4)[0], _tokens(45, 1, 5)[0]])
    width = ids.shape[1]
    free = _greedy(model, ids, mask)[:, width:]
    eos = int(free[0, 1])  # row 0 finishes after its second token
    assert eos != PAD
    got = _greedy(model, ids, mask, eos_token_ids=[eos], use_cache=use_cache)
    expected, ends = _pad_after_eos(free, [eos])
    assert ends[0] == 2 and max(ends) == NEW_TOKENS  # row 0 is padded while another row keeps going
    assert torch.equal(got[:, :width], ids)
    assert torch.equal(got[:, width:], expected)


def test_generation_stops_early_when_every_row_hit_eos() -> None:
    model = _model("llama", 2)
    ids = _tokens(46, 2, 5)
    free = _greedy(model, ids)[:, 5:]
    eos = [int(free[0, 1]), int(free[1, 3])]
    got = _greedy(model, ids, eos_token_ids=eos)
    expected, ends = _pad_after_eos(free, eos)
    assert max(ends) < NEW_TOKENS
    assert torch.equal(got[:, 5:], expected)


def test_default_eos_and_pad_come_from_the_source_config() -> None:
    model = _model("llama", 2)
    assert model.arch.eos_token_ids == [2] and model.arch.pad_token_id == 0
    ids = _tokens(52, 4, 5)  # rows 1 and 2 of this batch emit token 2 within 12 steps
    free = _greedy(model, ids, max_new_tokens=12)[:, 5:]
    expected, ends = _pad_after_eos(free, [2])
    assert min(ends) < 12
    assert torch.equal(model.generate(ids, max_new_tokens=12)[:, 5:], expected)


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
def test_stream_yields_the_tokens_generate_returns(use_cache: bool) -> None:
    model = _model("gemma3_text", 3)
    ids, mask = _left_padded([_tokens(48, 1, 6)[0], _tokens(49, 1, 3)[0]])
    steps = list(model.stream(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, eos_token_ids=[], use_cache=use_cache))
    assert len(steps) == NEW_TOKENS and all(step.shape == (2,) for step in steps)
    generated = _greedy(model, ids, mask, use_cache=use_cache)
    assert torch.equal(torch.stack(steps, dim=1), generated[:, ids.shape[1] :])


def test_stream_is_lazy_and_zero_new_tokens_returns_the_prompt() -> None:
    model = _model("llama", 2)
    ids = _tokens(50, 1, 4)
    first = next(iter(model.stream(ids, max_new_tokens=1000, eos_token_ids=[])))
    assert torch.equal(first, _greedy(model, ids, max_new_tokens=1)[:, -1])
    assert torch.equal(model.generate(ids, max_new_tokens=0), ids)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        model.generate(ids, max_new_tokens=-1)
