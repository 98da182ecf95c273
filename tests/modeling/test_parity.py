"""loops=1 is the original model: logits, hidden states and greedy decoding equal transformers'.

Every family's tiny config has all weights (norm gains included) randomised, and the sequences are
longer than the sliding windows (Gemma2/3: 4, Mistral: 5), so windows, soft-caps, sandwich and q/k
norms all have to be right for these to pass. They run on ``$RECURSIFY_TEST_DEVICE`` (the ``device`` fixture).
"""

from __future__ import annotations

from functools import cache
from typing import Any

import pytest
import torch
from transformers import GenerationConfig

import recursify
from recursify.modeling.model import RecursiveModel
from tiny import FAMILIES, tiny_model

ATOL = 1e-4
PROMPT_LEN = 10
NEW_TOKENS = 8
PAD = 0


@cache
def _pair(family: str, device: torch.device) -> tuple[Any, RecursiveModel]:
    """The transformers reference (EOS disabled, so both sides decode a fixed length) and its conversion, on ``device``."""
    hf = tiny_model(family, seed=1)
    hf.generation_config.eos_token_id = None
    ours = recursify.convert(hf, loops=1, progress=False)
    return hf.to(device), ours.to(device)


def _tokens(seed: int, batch: int, seq: int, device: torch.device, vocab: int = 97) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed)).to(device)


def _left_padded(seed: int, lengths: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts of the given lengths, left-padded to the longest: (input_ids, attention_mask)."""
    width = max(lengths)
    ids = _tokens(seed, len(lengths), width, device)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        mask[row, width - length :] = 1
    return ids.masked_fill(mask == 0, PAD), mask


def _hf_position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens, as transformers' generate computes them for left padding."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)


def _hf_greedy(hf: Any, ids: torch.Tensor, mask: torch.Tensor, eos: int | None) -> torch.Tensor:
    config = GenerationConfig(do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=eos, pad_token_id=PAD)
    with torch.no_grad():
        return hf.generate(ids, attention_mask=mask, generation_config=config, eos_token_id=eos)


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_hidden_states_match_transformers(family: str, device: torch.device) -> None:
    hf, ours = _pair(family, device)
    ids = _tokens(seed=11, batch=2, seq=12, device=device)
    with torch.no_grad():
        ref = hf(ids, output_hidden_states=True)
        out = ours(ids, output_hidden_states=True)
    assert out.logits.shape == ref.logits.shape == (2, 12, 97)
    assert (out.logits - ref.logits).abs().max() < ATOL
    # transformers' last hidden state has the final norm applied; ours is the raw residual stream
    assert len(out.hidden_states) == len(ref.hidden_states) == 7
    for depth, (ours_h, ref_h) in enumerate(zip(out.hidden_states[:-1], ref.hidden_states[:-1], strict=True)):
        assert (ours_h - ref_h).abs().max() < ATOL, f"hidden state {depth}"
    assert (ours.final_norm(out.hidden_states[-1]) - ref.hidden_states[-1]).abs().max() < ATOL


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_batch_matches_transformers_at_real_tokens(family: str, device: torch.device) -> None:
    hf, ours = _pair(family, device)
    ids, mask = _left_padded(seed=12, lengths=[12, 9, 5], device=device)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=_hf_position_ids(mask)).logits
        out = ours(ids, attention_mask=mask).logits
    real = mask.bool()
    assert torch.isfinite(out).all()
    assert (out[real] - ref[real]).abs().max() < ATOL


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_matches_transformers(family: str, use_cache: bool, device: torch.device) -> None:
    hf, ours = _pair(family, device)
    ids, mask = _left_padded(seed=13, lengths=[PROMPT_LEN, 6], device=device)
    expected = _hf_greedy(hf, ids, mask, eos=None)
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, eos_token_ids=[], pad_token_id=PAD, use_cache=use_cache)
    assert expected.shape == (2, PROMPT_LEN + NEW_TOKENS)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_generation_with_eos_pads_like_transformers(family: str, device: torch.device) -> None:
    hf, ours = _pair(family, device)
    ids, mask = _left_padded(seed=14, lengths=[PROMPT_LEN, 7], device=device)
    free = _hf_greedy(hf, ids, mask, eos=None)
    eos = int(free[0, PROMPT_LEN + 2])  # row 0 stops after its third new token
    assert eos != PAD
    expected = _hf_greedy(hf, ids, mask, eos=eos)
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, eos_token_ids=[eos], pad_token_id=PAD)
    assert torch.equal(got, expected)
    assert (got[0, PROMPT_LEN + 3 :] == PAD).all()
