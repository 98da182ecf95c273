"""Low-rank embeddings and heads in the model: exact paths, layouts, parameter counts, save/load, serving."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

import recursify
from recursify.conversion.calibration import calibrate
from recursify.errors import ConfigError
from recursify.modeling.embedding import FactorizedEmbedding
from recursify.modeling.model import RecursiveModel
from recursify.serve import Engine
from tiny import FAMILIES, tiny_model

VOCAB, HIDDEN = 97, 48


def _calibrated(family: str, seed: int = 0, **options: Any) -> RecursiveModel:
    """A conversion with frequency-weighted / activation-aware factors, calibrated on random token rows."""
    source = tiny_model(family, seed=seed)
    original = recursify.convert(source, loops=1, progress=False)
    rows = torch.randint(3, VOCAB, (8, 16), generator=torch.Generator().manual_seed(seed))
    calibration = calibrate(original, rows, progress=False)
    return recursify.convert(source, calib=calibration, progress=False, **options)


def test_factorized_embedding_looks_up_and_projects_its_product() -> None:
    module = FactorizedEmbedding(11, 6, 3)
    torch.nn.init.normal_(module.table)
    torch.nn.init.normal_(module.basis)
    ids = torch.tensor([[0, 5, 10], [3, 3, 1]])
    dense = module.table @ module.basis
    torch.testing.assert_close(module(ids), dense[ids])
    h = torch.randn(2, 3, 6)
    torch.testing.assert_close(module.project(h), h @ dense.T)
    assert module.rank == 3 and torch.equal(module.dense(), dense)


def test_exact_rows_replace_the_product_in_lookup_and_logits() -> None:
    module = FactorizedEmbedding(11, 6, 3, exact_rows=4)
    for tensor in (module.table, module.basis, module.exact_rows):
        torch.nn.init.normal_(tensor)
    module.exact_ids.copy_(torch.tensor([1, 4, 7, 10]))
    dense = module.table @ module.basis
    dense[module.exact_ids] = module.exact_rows.detach()
    ids = torch.tensor([[0, 1, 10], [4, 3, 7]])
    torch.testing.assert_close(module(ids), dense[ids])
    h = torch.randn(2, 3, 6)
    torch.testing.assert_close(module.project(h), h @ dense.T)
    torch.testing.assert_close(module.dense(), dense)
    module.project(h).sum().backward()  # every factor and row learns through the head
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_exact_rows_are_the_most_used_tokens_and_buy_more_than_rank() -> None:
    """On a skewed vocabulary, exact rows for the tokens calibration uses reproduce their rows and logits exactly, and beat a
    plain tied pair of the same parameter count (the rank the rows cost) by KL on fresh text of the same kind."""
    source = tiny_model("qwen2", seed=5)
    original = recursify.convert(source, loops=1, progress=False)
    frequent = torch.randint(3, 21, (12, 16), generator=torch.Generator().manual_seed(0))
    calibration = calibrate(original, frequent, progress=False)
    plain = recursify.convert(source, loops=1, calib=calibration, embed_rank=12, progress=False)  # tied pair: 12 * 145 = 1740
    exact = recursify.convert(source, loops=1, calib=calibration, embed_rank=6, embed_exact_rows=18, progress=False)
    assert exact.param_counts()["embedding"] == 6 * (VOCAB + HIDDEN) + 18 * HIDDEN <= plain.param_counts()["embedding"]
    assert set(exact.embed.exact_ids.tolist()) == set(frequent.unique().tolist())  # the 18 tokens calibration saw
    weight = source.get_input_embeddings().weight
    ids = torch.randint(3, 21, (4, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(exact.embed(ids), weight[ids])
        h = torch.randn(5, HIDDEN)
        torch.testing.assert_close(exact.lm_logits(h)[:, exact.embed.exact_ids], h @ weight[exact.embed.exact_ids].T)
        target = torch.log_softmax(original(ids).logits, -1)

        def kl(model: RecursiveModel) -> float:
            return float((target.exp() * (target - torch.log_softmax(model(ids).logits, -1))).sum(-1).mean())

        assert kl(exact) < 0.75 * kl(plain), (kl(exact), kl(plain))


def test_exact_rows_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="add --embed-rank"):
        recursify.convert(tiny_model("llama"), loops=1, embed_exact_rows=4, progress=False)
    with pytest.raises(ConfigError, match="--embed-init weighted"):
        recursify.convert(tiny_model("llama"), loops=1, embed_rank=8, embed_init="svd", embed_exact_rows=4, progress=False)
    with pytest.raises(ConfigError, match="exceeds the vocabulary"):
        _calibrated("llama", loops=1, embed_rank=8, embed_exact_rows=VOCAB + 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_embed_rank_full_reproduces_the_original_bit_for_bit(family: str) -> None:
    source = tiny_model(family, seed=1)
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for loops, rank in ((1, 0), (2, "full")):
            default = recursify.convert(source, loops=loops, rank=rank, progress=False)
            full = recursify.convert(source, loops=loops, rank=rank, embed_rank="full", head_rank="full", progress=False)
            assert torch.equal(full(ids).logits, default(ids).logits)
        hf = source.get_input_embeddings().weight
        assert torch.equal(full.embed.weight, hf)
        assert full.lm_head is not None and torch.equal(full.lm_head.weight, source.get_output_embeddings().weight)


@pytest.mark.parametrize("family", FAMILIES)
def test_factors_at_the_hidden_rank_match_transformers(family: str) -> None:
    """Factorised input and head at rank = hidden are the original matrices up to rounding: every family's extras
    (Gemma's embedding scale, soft-capping, tied or untied heads) run through the factorised path."""
    source = tiny_model(family, seed=2)
    model = _calibrated(family, seed=2, loops=1, embed_rank=HIDDEN, head_rank=HIDDEN)
    assert isinstance(model.embed, FactorizedEmbedding) and isinstance(model.lm_head, FactorizedEmbedding)
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(ids).logits - source(ids).logits).abs().max() < 1e-3


def test_layouts_and_parameter_counts() -> None:
    per_rank = VOCAB + HIDDEN
    tied = _calibrated("qwen2", loops=2, embed_rank=8)  # a tied source stays tied: one pair of factors
    assert isinstance(tied.embed, FactorizedEmbedding) and tied.lm_head is None
    assert tied.embedding_counts() == {"input": 8 * per_rank, "head": 0, "tied": True, "input_rank": 8, "head_rank": 8}
    assert tied.param_counts()["embedding"] == 8 * per_rank
    untied = _calibrated("qwen2", loops=2, embed_rank=8, head_rank=12)
    assert untied.embedding_counts()["head"] == 12 * per_rank and untied.param_counts()["embedding"] == 20 * per_rank
    llama = _calibrated("llama", loops=2, embed_rank=8)  # an untied source: the head gets its own factors at the same rank
    assert llama.embedding_counts() == {"input": 8 * per_rank, "head": 8 * per_rank, "tied": False, "input_rank": 8, "head_rank": 8}
    head_only = _calibrated("qwen2", loops=1, head_rank=6)  # input kept dense, head factorised and untied
    assert isinstance(head_only.embed, torch.nn.Embedding) and head_only.embedding_counts()["head"] == 6 * per_rank
    dense = recursify.convert(tiny_model("qwen2"), loops=1, progress=False)
    assert head_only.param_counts()["total"] == dense.param_counts()["total"] + 6 * per_rank
    assert tied.report["embedding_error"].keys() == {"tied"} and untied.report["embedding_error"].keys() == {"input", "head"}


def test_rank_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="exceeds min"):
        recursify.convert(tiny_model("llama"), loops=1, embed_rank=HIDDEN + 1, embed_init="svd", progress=False)
    with pytest.raises(ConfigError, match="--calib"):
        recursify.convert(tiny_model("llama"), loops=1, embed_rank=8, progress=False)
    with pytest.raises(ConfigError, match="positive integer"):
        recursify.convert(tiny_model("llama"), loops=1, embed_rank=0, progress=False)
    with pytest.raises(ConfigError, match="drop --embed-rank"):
        recursify.convert(tiny_model("llama"), loops=1, embed_rank=8, embed_params="5k", embed_init="svd", progress=False)


def test_plain_svd_needs_no_calibration_and_weighting_beats_it_on_frequent_tokens() -> None:
    source = tiny_model("qwen2", seed=5)
    original = recursify.convert(source, loops=1, progress=False)
    frequent = torch.randint(3, 20, (12, 16), generator=torch.Generator().manual_seed(0))  # a skewed vocabulary
    calibration = calibrate(original, frequent, progress=False)
    plain = recursify.convert(source, loops=1, embed_rank=6, head_rank=6, embed_init="svd", progress=False)
    weighted = recursify.convert(source, loops=1, embed_rank=6, head_rank=6, calib=calibration, progress=False)
    ids = torch.randint(3, 20, (4, 16), generator=torch.Generator().manual_seed(1))

    def kl(model: RecursiveModel) -> float:
        with torch.no_grad():
            target = torch.log_softmax(original(ids).logits, -1)
            return float((target.exp() * (target - torch.log_softmax(model(ids).logits, -1))).sum(-1).mean())

    assert kl(weighted) < 0.75 * kl(plain)


def test_embedding_budget_picks_the_lowest_kl_candidate() -> None:
    model = _calibrated("qwen2", loops=1, embed_params=(VOCAB + HIDDEN) * 16)
    scores = model.report["embedding_budget"]
    assert len(scores) >= 3 and all(score["params"] <= (VOCAB + HIDDEN) * 16 for score in scores)
    best = min(scores, key=lambda score: score["kl"])
    assert (model.recursion.embed_rank, model.recursion.head_rank) == (best["embed_rank"], best["head_rank"])
    counts = model.embedding_counts()
    assert counts["input"] + counts["head"] == best["params"] and model.recursion.embed_params == (VOCAB + HIDDEN) * 16
    # every score is KL(original || candidate) per token on the last half of the calibration rows, with factors fitted on
    # token counts of the first half only (scored tokens unseen by the fit), recomputed here from explicit ranks
    source = tiny_model("qwen2", seed=0)
    original = recursify.convert(source, loops=1, progress=False)
    rows = torch.randint(3, VOCAB, (8, 16), generator=torch.Generator().manual_seed(0))
    calibration = calibrate(original, rows, progress=False)
    assert calibration.token_counts is not None
    fitted = dataclasses.replace(calibration, token_counts=torch.bincount(rows[:4].flatten(), minlength=VOCAB).double())
    with torch.no_grad():
        target = torch.log_softmax(original(rows[4:]).logits.double(), -1)
        for score in scores:
            ranks = {"embed_rank": score["embed_rank"], "head_rank": score["head_rank"]}
            candidate = recursify.convert(source, calib=fitted, loops=1, progress=False, **ranks)
            log_probs = torch.log_softmax(candidate(rows[4:]).logits.double(), -1)
            kl = float((target.exp() * (target - log_probs)).sum(-1).mean())
            assert score["kl"] == pytest.approx(kl, rel=1e-4, abs=1e-6), ranks


@pytest.mark.parametrize(("family", "exact_rows"), [("qwen2", 0), ("llama", 0), ("llama", 5)])
def test_save_load_round_trip(tmp_path: Path, family: str, exact_rows: int) -> None:
    model = _calibrated(family, loops=2, rank=4, init="average", embed_rank=8, head_rank=10, embed_exact_rows=exact_rows)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = recursify.load(tmp_path / "ckpt")
    assert loaded.recursion == model.recursion and loaded.recursion.embed_rank == 8 and loaded.recursion.head_rank == 10
    assert loaded.recursion.embed_exact_rows == exact_rows
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    ids = torch.randint(3, VOCAB, (1, 7))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize(("family", "exact_rows"), [("gemma2", 0), ("llama", 0), ("gemma2", 7)])
def test_engine_equals_generate_with_factorized_embedding_and_head(family: str, exact_rows: int) -> None:
    model = _calibrated(family, seed=3, loops=3, rank=4, init="average", embed_rank=12, embed_exact_rows=exact_rows)
    prompts = [torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 1, 9)]
    engine = Engine(model, batching="depthwise", max_batch=2, max_prefill_chunk=4, exit="none", max_kv_tokens=512)
    served = {out.request_id: out.token_ids for out in engine.generate(prompts, max_new_tokens=6, stop_token_ids=[])}
    for i, prompt in enumerate(prompts):
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=6, eos_token_ids=[])[0, len(prompt) :].tolist()
        assert served[f"req-{i}"] == expected, i
