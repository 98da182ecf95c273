"""Lossless self-speculative decoding: the first loops draft, the remaining loops verify.

The first b loops of a recursive model are a draft model that shares every weight and every cache
with the full model (LayerSkip's self-speculation, Elhoushi et al. 2024, made natural by recursion).
One round, for each row, starting from its pending token t_0 (sampled, not yet run):

1. **draft**: t_0, d_1, ..., d_D each run loops 0..b-1 as one-token steps, writing their keys/values
   for those depths; the exit head at loop b proposes d_{i+1} from t_i's loop-b state (D drafts; the
   last token's draft is never needed, so its head is skipped);
2. **verify**: the D + 1 tokens' loop-b hidden states run loops b..B-1 in one pass, writing the
   deeper keys/values and giving the full model's next-token distribution p_i after every t_i;
3. **accept**: the longest prefix of drafts the full model agrees with, plus one token from the
   verifier (the correction at the first disagreement, or a bonus token when all D agree).
   Greedy: d_{i+1} is kept while it equals argmax p_i. Sampling: the speculative-sampling rule
   (Leviathan et al. 2023, Chen et al. 2023): keep d with probability min(1, p(d) / q(d)), q being
   the draft's own distribution; at the first rejection draw from normalise(max(0, p - q)). Either
   way the output distribution is exactly the full model's (greedy: token for token).

Keys/values of rejected drafts are discarded by moving the cache's write position back. In a batch,
rows keep different numbers of tokens; each row is right-aligned to the longest (``KVCache.right_align``)
and the freed slots are masked as padding, so every row keeps one contiguous history.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from recursify.config import SamplingConfig, SpeculativeConfig
from recursify.errors import ConfigError
from recursify.modeling.generation import sample_next, sampling_probs

if TYPE_CHECKING:
    from recursify.modeling.model import RecursiveModel


@dataclass
class SpeculativeStats:
    """Counts over a generation (per row and round while the row still generates).

    Attributes:
        rounds: verify passes (each runs loops b..B-1 once over the batch).
        row_rounds: rounds summed over the rows still generating in them.
        drafted: draft tokens proposed to those rows.
        accepted: drafts the verifier kept.
        emitted: tokens those rows produced in rounds (accepted drafts + one verifier token each),
            before the cut at EOS / ``max_new_tokens``.
    """

    rounds: int = 0
    row_rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_pass(self) -> float:
        """Tokens a row gains per verify pass (1 + accepted drafts)."""
        return self.emitted / self.row_rounds if self.row_rounds else 0.0

    def to_dict(self) -> dict[str, float]:
        counts = {name: getattr(self, name) for name in ("rounds", "row_rounds", "drafted", "accepted", "emitted")}
        return {**counts, "acceptance_rate": self.acceptance_rate, "tokens_per_pass": self.tokens_per_pass}


def check_draft_loops(config: SpeculativeConfig, loops: int) -> None:
    """Raise unless ``config`` drafts with 1..loops-1 of the model's ``loops`` loops."""
    if loops < 2:
        raise ConfigError(f"speculative decoding drafts with a recursive model's first loops: it needs loops >= 2, this model has {loops}")
    if not 1 <= config.draft_loops < loops:
        raise ConfigError(f"--speculative BxD needs B in 1..{loops - 1} loops of this {loops}-loop model, got B={config.draft_loops}")


@torch.no_grad()
def speculative_stream(
    model: RecursiveModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    sampling: SamplingConfig,
    eos: torch.Tensor,
    pad: int,
    generator: torch.Generator | None,
    config: SpeculativeConfig,
    stats: SpeculativeStats | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row ([batch]) like ``generation.stream``, drafting and verifying underneath.

    Rows advance at their own pace inside; tokens are yielded position by position once every
    row has its next one, so callers see exactly the stream plain decoding yields.
    """
    check_draft_loops(config, model.loops)
    stats = stats if stats is not None else SpeculativeStats()
    batch = input_ids.shape[0]
    if max_new_tokens == 0:
        return
    pending: list[deque[int]] = [deque() for _ in range(batch)]
    produced = [0] * batch  # tokens handed to ``pending`` per row (EOS included)
    done = [False] * batch  # EOS emitted or max_new_tokens reached
    for row_tokens in speculative_rounds(model, input_ids, attention_mask, max_new_tokens, sampling, generator, config, stats, done):
        for row, tokens in enumerate(row_tokens):
            for token in tokens:
                if done[row]:
                    break
                pending[row].append(token)
                produced[row] += 1
                done[row] = produced[row] >= max_new_tokens or bool((eos == token).any())
        while all(pending[row] or done[row] for row in range(batch)) and any(pending):
            yield torch.tensor([pending[row].popleft() if pending[row] else pad for row in range(batch)], device=input_ids.device)
        if all(done):
            break


def speculative_rounds(
    model: RecursiveModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    sampling: SamplingConfig,
    generator: torch.Generator | None,
    config: SpeculativeConfig,
    stats: SpeculativeStats,
    done: list[bool],
) -> Iterator[list[list[int]]]:
    """The prefill's first token, then per round each row's new tokens (accepted drafts + the verifier's token).

    Rounds go on until the caller marks every row ``done`` (EOS or enough tokens; rows keep drafting
    until then). The serving engine drives one round per step (serving/engine.py).
    """
    batch, prompt = input_ids.shape
    b, draft, loops = config.draft_loops, config.draft_tokens, model.loops
    cache = model.new_cache(batch, prompt + (max_new_tokens + 1) * (draft + 1))  # right-aligning may leave gaps per round
    logits = model(input_ids, attention_mask=attention_mask, cache=cache, logits_to_keep=1).logits[:, -1]
    token = sample_next(logits, sampling, generator)  # (batch,)
    yield [[int(t)] for t in token]
    mask = attention_mask.clone()
    count = mask.sum(dim=1)  # (batch,) real tokens with keys/values: the next token's position
    while not all(done):
        start = cache.length
        states, drafts, draft_probs = [], [], []
        current = token
        for i in range(draft + 1):  # draft: one-token steps through loops 0..b-1
            mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype, device=mask.device)], dim=1)
            h = model.embed_tokens(current[:, None])
            ctx = model.attention_context(mask, (count + i)[:, None], cache, h.dtype)
            h = model.run_loops(h, ctx, 0, b)
            states.append(h)
            if i < draft:  # the exit runs before advancing: a coda writes its keys here (the verify pass rewrites them)
                draft_logits = model.exit_logits(h, b - 1, ctx)[:, -1]
                probs = sampling_probs(draft_logits, sampling)  # q: what the draft token is drawn from
                current = draft_logits.argmax(-1) if sampling.temperature == 0.0 else torch.multinomial(probs, 1, generator=generator)[:, 0]
                drafts.append(current)
                draft_probs.append(probs)
            cache.advance(1)
        cache.rewind(start)  # verify: the deeper loops of all D + 1 tokens in one pass, from their loop-b states
        positions = count[:, None] + torch.arange(draft + 1, device=count.device)
        h = torch.cat(states, dim=1)
        ctx = model.attention_context(mask, positions, cache, h.dtype)
        h = model.run_loops(h, ctx, b, loops)
        target = model.exit_logits(h, loops - 1, ctx)  # (batch, D + 1, vocab): the full model after t_0 .. t_D
        cache.advance(draft + 1)
        proposed = torch.stack(drafts, dim=1)  # (batch, D)
        accepted, token = _accept(proposed, torch.stack(draft_probs, dim=1), target, sampling, generator)
        kept = accepted + 1  # t_0 and the accepted drafts have valid keys/values at every depth
        longest = int(kept.max())
        mask = _realign_mask(mask[:, : start + longest], start, kept, longest)
        cache.right_align([start + int(k) for k in kept], start + longest)
        count = count + kept
        active = [row for row in range(batch) if not done[row]]
        stats.rounds += 1
        stats.row_rounds += len(active)
        stats.drafted += draft * len(active)
        stats.accepted += int(accepted[active].sum())
        stats.emitted += int(kept[active].sum())
        yield [proposed[row, : int(accepted[row])].tolist() + [int(token[row])] for row in range(batch)]


def _accept(
    drafts: torch.Tensor,
    draft_probs: torch.Tensor,
    target_logits: torch.Tensor,
    sampling: SamplingConfig,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Accepted drafts per row [batch] and the verifier's token [batch] (correction or bonus).

    drafts [batch, D]; draft_probs q [batch, D, vocab]; target_logits [batch, D + 1, vocab].
    """
    batch, steps = drafts.shape
    if sampling.temperature == 0.0:
        best = target_logits.argmax(-1)  # (batch, D + 1)
        accepted = (drafts == best[:, :steps]).long().cumprod(dim=1).sum(dim=1)
        return accepted, best.gather(1, accepted[:, None])[:, 0]
    p = sampling_probs(target_logits, sampling)  # (batch, D + 1, vocab)
    p_draft = p[:, :steps].gather(-1, drafts[..., None])[..., 0]
    q_draft = draft_probs.gather(-1, drafts[..., None])[..., 0]  # > 0: each draft was drawn from q
    u = torch.rand(batch, steps, generator=generator, device=drafts.device)
    accepted = (u * q_draft < p_draft).long().cumprod(dim=1).sum(dim=1)  # u < p/q without dividing
    at = accepted[:, None, None].expand(-1, 1, p.shape[-1])
    p_at = p.gather(1, at)[:, 0]  # (batch, vocab): p after the last accepted token
    q_padded = torch.cat([draft_probs, torch.zeros_like(draft_probs[:, :1])], dim=1)  # a bonus token (all accepted) draws from p
    residual = (p_at - q_padded.gather(1, at)[:, 0]).clamp_min(0)
    mass = residual.sum(-1, keepdim=True)
    residual = torch.where(mass > 0, residual / mass.clamp_min(1e-30), p_at)  # p == q exactly never rejects; rounding may
    return accepted, torch.multinomial(residual, 1, generator=generator)[:, 0]


def _realign_mask(mask: torch.Tensor, start: int, kept: torch.Tensor, longest: int) -> torch.Tensor:
    """The attention mask after a round: row r's ``kept[r]`` new slots end at ``start + longest``, freed slots padding.

    mask: [batch, >= start + longest]; as ``KVCache.right_align`` moves the keys.
    """
    length = start + longest
    source = torch.arange(length, device=mask.device)[None] - (longest - kept)[:, None]  # (batch, length)
    return torch.where(source >= 0, mask.gather(1, source.clamp(min=0)), torch.zeros_like(mask[:, :length]))
