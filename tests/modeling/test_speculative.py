"""Self-speculative decoding: greedy output equals plain greedy decoding token for token (many prompts, several
families, relaxed and exit-headed models, batches with left padding and EOS); sampled output follows the full
model's exact distribution (a chi-square test against the enumerated distribution, which also rejects a broken
acceptance rule); the per-row cache realignment; option parsing."""

from __future__ import annotations

import itertools
from functools import cache

import pytest
import torch

import recursify
from recursify.config import SamplingConfig, SpeculativeConfig, parse_speculative
from recursify.errors import ConfigError
from recursify.modeling import speculative
from recursify.modeling.generation import sampling_probs
from recursify.modeling.kv_cache import KVCache
from recursify.modeling.model import RecursiveModel
from recursify.modeling.speculative import SpeculativeStats
from tiny import tiny_model

# (family, loops, conversion options): sliding windows and soft-caps (gemma2), per-layer-type RoPE (gemma3),
# relaxed LoRA, LoRA-XS, bias residuals, models whose early exits have their own (random) exit heads, one of them with
# a prelude and a coda (drafts exit through the coda, which writes keys the verify pass rewrites).
MODELS = {
    "llama-l3-lora": ("llama", 3, {"rank": 4}),
    "gemma2-l2-lora": ("gemma2", 2, {"rank": 4}),
    "gemma3-l3": ("gemma3_text", 3, {}),
    "qwen2-l3-bias": ("qwen2", 3, {"relax": "bias"}),
    "mistral-l2-loraxs": ("mistral", 2, {"rank": 4, "relax": "lora-xs"}),
    "llama-l3-exit-heads": ("llama", 3, {"rank": 4, "exit_heads": 8}),
    "llama-l2-prelude-coda-exit-heads": ("llama", 2, {"rank": 4, "prelude": 1, "coda": 1, "exit_heads": 8}),
}


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny models gain nothing from intra-op threads on a shared CPU (see tests/training/conftest.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@cache
def _model(name: str) -> RecursiveModel:
    family, loops, options = MODELS[name]
    options = dict(options)
    heads = options.pop("exit_heads", 0)
    model = recursify.convert(tiny_model(family, seed=5), loops=loops, init="average", progress=False, **options)
    if heads:
        model.add_exit_heads(heads)
        with torch.no_grad():  # non-zero adapters: the drafts' head really differs from the shared one
            assert model.exit_heads is not None
            model.exit_heads.up.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    return model.eval()


def _batch(seed: int, rows: int, longest: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts of random lengths 1..longest and their attention mask."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, longest + 1, (rows,), generator=generator).tolist()
    width = max(lengths)
    ids, mask = torch.zeros(rows, width, dtype=torch.long), torch.zeros(rows, width, dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, width - length :] = torch.randint(3, 97, (length,), generator=generator)
        mask[row, width - length :] = 1
    return ids, mask


@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_equals_plain_greedy(name: str) -> None:
    model = _model(name)
    stats = SpeculativeStats()
    configs = [SpeculativeConfig(1, 3), SpeculativeConfig(model.loops - 1, 1 if model.loops > 2 else 5)]
    for seed, rows in itertools.product(range(5), (1, 3)):
        ids, mask = _batch(100 * seed + rows, rows)
        reference = model.generate(ids, attention_mask=mask, max_new_tokens=16, eos_token_ids=[])
        for config in configs:
            out = model.generate(ids, attention_mask=mask, max_new_tokens=16, eos_token_ids=[], speculative=config, speculative_stats=stats)
            assert torch.equal(out, reference), f"{name} seed {seed} rows {rows} {config.spec}"
    assert stats.rounds > 0 and stats.row_rounds >= stats.rounds
    assert 1.0 <= stats.tokens_per_pass <= 7.0


def test_greedy_runs_of_accepted_and_rejected_drafts_and_eos() -> None:
    """Rows accept different numbers of drafts per round (the realignment path) and stop at EOS at different steps."""
    model = _model("gemma2-l2-lora")  # its loop-1 exits agree with the last loop often enough to accept runs of drafts
    seen_runs: set[int] = set()
    original = speculative._accept

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        accepted, token = original(*args, **kwargs)
        seen_runs.update(accepted.tolist())
        return accepted, token

    speculative._accept = spy  # type: ignore[assignment]
    try:
        for seed in range(3):
            ids, mask = _batch(7 + seed, 4)
            free = model.generate(ids, attention_mask=mask, max_new_tokens=24, eos_token_ids=[])
            eos = [int(free[0, -10]), int(free[2, -3])]  # tokens the rows will meet at different steps
            reference = model.generate(ids, attention_mask=mask, max_new_tokens=24, eos_token_ids=eos, pad_token_id=0)
            out = model.generate(
                ids, attention_mask=mask, max_new_tokens=24, eos_token_ids=eos, pad_token_id=0, speculative=SpeculativeConfig(1, 4)
            )
            assert torch.equal(out, reference)
    finally:
        speculative._accept = original  # type: ignore[assignment]
    assert 0 in seen_runs and max(seen_runs) >= 2, f"accepted runs seen: {sorted(seen_runs)}"


def _exact_distribution(model: RecursiveModel, prompt: torch.Tensor, sampling: SamplingConfig, steps: int) -> dict[tuple[int, ...], float]:
    """P(first ``steps`` tokens) of the full model under ``sampling``, by enumerating its (top-k) support."""
    table: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(steps):
        grown: dict[tuple[int, ...], float] = {}
        prefixes = list(table)
        with torch.no_grad():
            ids = torch.tensor([list(prompt) + list(p) for p in prefixes])
            probs = sampling_probs(model(ids).logits[:, -1], sampling)
        for prefix, row in zip(prefixes, probs, strict=True):
            for token in row.nonzero()[:, 0].tolist():
                grown[(*prefix, token)] = table[prefix] * float(row[token])
        table = grown
    return table


def _chi_square_p(counts: dict[tuple[int, ...], int], expected: dict[tuple[int, ...], float], draws: int) -> float:
    """Pearson's chi-square p-value; cells expecting fewer than 5 draws are pooled into one; 0 for a sample outside the support."""
    if any(key not in expected for key in counts):
        return 0.0
    observed, means, rest_o, rest_e = [], [], 0.0, 0.0
    for key, p in expected.items():
        if p * draws >= 5:
            observed.append(counts.get(key, 0))
            means.append(p * draws)
        else:
            rest_o, rest_e = rest_o + counts.get(key, 0), rest_e + p * draws
    if rest_e > 0:
        observed.append(int(rest_o))
        means.append(rest_e)
    o, e = torch.tensor(observed, dtype=torch.float64), torch.tensor(means, dtype=torch.float64)
    statistic = float(((o - e) ** 2 / e).sum())
    dof = len(observed) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(statistic / 2, dtype=torch.float64)))


def _sample(model: RecursiveModel, prompt: torch.Tensor, sampling: SamplingConfig, draws: int, steps: int) -> dict[tuple[int, ...], int]:
    ids = prompt[None].expand(draws, -1).contiguous()
    out = model.generate(ids, max_new_tokens=steps, eos_token_ids=[], sampling=sampling, speculative=SpeculativeConfig(1, 3))
    counts: dict[tuple[int, ...], int] = {}
    for row in out[:, prompt.numel() :].tolist():
        counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    return counts


def test_sampling_follows_the_full_models_distribution() -> None:
    """Three tokens (the prefill's, then speculative ones: accepted drafts, corrections, bonus tokens) against the exact joint."""
    model = _model("qwen2-l3-bias")
    prompt = torch.tensor([5, 17, 42, 8])
    sampling = SamplingConfig(temperature=1.0, top_k=3, seed=11)
    steps, draws = 3, 6000
    expected = _exact_distribution(model, prompt, sampling, steps)
    assert sum(expected.values()) == pytest.approx(1.0, abs=1e-5)
    assert _chi_square_p(_sample(model, prompt, sampling, draws, steps), expected, draws) > 1e-3

    original = speculative._accept  # a broken rule (keep every draft) must fail the same test

    def keep_all(drafts, draft_probs, target_logits, sampling, generator):  # type: ignore[no-untyped-def]
        accepted = torch.full((drafts.shape[0],), drafts.shape[1], dtype=torch.long)
        return accepted, torch.multinomial(sampling_probs(target_logits[:, -1], sampling), 1, generator=generator)[:, 0]

    speculative._accept = keep_all  # type: ignore[assignment]
    try:
        broken = _sample(model, prompt, SamplingConfig(temperature=1.0, top_k=3, seed=11), draws, steps)
    finally:
        speculative._accept = original  # type: ignore[assignment]
    assert _chi_square_p(broken, expected, draws) < 1e-6


def test_right_align_moves_each_rows_history() -> None:
    cache_ = KVCache(num_depths=2, batch_size=3, num_kv_heads=1, head_dim=2, max_len=8)
    keys = torch.arange(3 * 6 * 2, dtype=torch.float32).view(1, 3, 1, 6, 2).expand(2, -1, -1, -1, -1)
    cache_.update(0, keys[0], keys[0])
    cache_.update(1, keys[1], keys[1])
    cache_.advance(6)
    cache_.right_align([4, 6, 5], 6)
    assert cache_.keys is not None and cache_.length == 6
    torch.testing.assert_close(cache_.keys[:, 0, :, 2:6], keys[:, 0, :, 0:4])
    torch.testing.assert_close(cache_.keys[:, 1, :, 0:6], keys[:, 1, :, 0:6])
    torch.testing.assert_close(cache_.values[:, 2, :, 1:6], keys[:, 2, :, 0:5])  # type: ignore[index]
    with pytest.raises(ConfigError):
        cache_.right_align([7, 6, 6], 6)


def test_parse_speculative_and_bad_configs() -> None:
    assert parse_speculative("1x4") == SpeculativeConfig(draft_loops=1, draft_tokens=4)
    assert parse_speculative("2x1").spec == "2x1"
    for bad in ("1", "x4", "0x4", "1x0", "1x", "ax4", "1x4x2", "-1x3", ""):
        with pytest.raises(ConfigError, match="BxD"):
            parse_speculative(bad)
    model = _model("gemma2-l2-lora")
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ConfigError, match="1..1 loops"):
        model.generate(ids, max_new_tokens=4, speculative=SpeculativeConfig(2, 4))
    with pytest.raises(ConfigError, match="KV cache"):
        model.generate(ids, max_new_tokens=4, speculative=SpeculativeConfig(1, 4), use_cache=False)
    assert torch.equal(model.generate(ids, max_new_tokens=0, speculative=SpeculativeConfig(1, 2)), ids)
