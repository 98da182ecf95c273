"""Orchestration: source model -> tied shared layers + per-depth LoRA/norms -> RecursiveModel."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
from tqdm.auto import tqdm

from recursify.config import CALIB_TOKENS, LINEARS, ArchConfig, RecursionConfig, parse_relax
from recursify.conversion.calibration import Calibration, calibrate, damped, weighted_error
from recursify.conversion.embedding_init import SCORE_TOKENS, budget_candidates, check_embedding_options, vocabulary_state
from recursify.conversion.lora_init import asvd_lora, resolve_ranks, squared_singular_values, svd_lora, zero_lora
from recursify.conversion.rank_budget import allocate_ranks, parse_budget
from recursify.conversion.relax_init import bias_init, check_relax_options, xs_factors
from recursify.conversion.shared_fit import lsq_shared
from recursify.conversion.tying import init_sources, tie
from recursify.conversion.weight_map import OriginalWeights, arch_from_hf, split_state_dict
from recursify.errors import ConfigError
from recursify.modeling.embedding import embedding_layout
from recursify.modeling.layers import FOLDABLE_NORMS, linear_shapes, norm_names
from recursify.modeling.model import RecursiveModel, SourceInfo, lora_rank, norm_is_tied, rope_buffer_name
from recursify.modeling.schedule import DepthSlot, build_schedule, check_loops, depths_of_layer

RANDOM_INIT_STD = 0.02
CALIB_SEQ_LEN = 256


def convert(
    source: str | os.PathLike[str] | Any,
    loops: int = 1,
    init: str = "stepwise",
    rank: int | str = 0,
    strategy: str = "cycle",
    norms: str = "per-depth",
    lora_init: str = "svd",
    seed: int = 0,
    progress: bool = True,
    shared_init: str = "init",
    calib: str | Calibration | None = None,
    calib_tokens: int = CALIB_TOKENS,
    lora_params: int | str | None = None,
    lsq_rounds: int = 2,
    relax: str = "lora",
    embed_rank: int | str = "full",
    head_rank: int | str | None = None,
    embed_init: str = "weighted",
    embed_params: int | str | None = None,
    embed_exact_rows: int = 0,
    prelude: int = 0,
    coda: int = 0,
) -> RecursiveModel:
    """Turn a pretrained decoder into a (relaxed) recursive model.

    Args:
        source: a Hugging Face checkpoint directory, a ``.gguf`` file, a hub id, a registry alias
            such as ``smollm2-135m``, or an already loaded transformers model.
        loops: B; the model keeps K = L / B unique layers (``loops=1`` is the original model).
        init: shared-layer init: stepwise, average, lower or random.
        rank: LoRA rank per depth (0 = pure recursive, "full" = exact reproduction).
        strategy: cycle, sequence, cycle-rev, or middle-cycle (= cycle with prelude 1 and coda 1).
        norms: per-depth (default, exact at full rank), tied (the paper) or fold.
        lora_init: svd (residual SVD), asvd (activation-aware SVD; needs ``calib``) or zero.
        seed: seeds random shared weights and standard-init LoRA factors.
        progress: show progress bars.
        shared_init: "init" (the ``init`` rule) or "lsq" (activation-weighted least squares,
            alternated with asvd for ``lsq_rounds``; needs ``calib``).
        calib: calibration data (any ``--data`` spec, e.g. ``teacher:16k`` or a .txt file), or
            statistics already computed by ``calibration_for`` (to reuse them across conversions).
        calib_tokens: how many calibration tokens to stream through the original model.
        lora_params: a LoRA parameter budget (e.g. "8M") that replaces ``rank``: ranks per shared
            layer and linear are chosen to retain the most (whitened) residual energy.
        lsq_rounds: alternation rounds of ``shared_init="lsq"``.
        relax: "lora" (default), "lora-xs" (frozen (a)svd factors, trainable r x r cores; needs
            ``rank``), "prefix:N" (learned key/value prefixes) or "bias" (per-depth biases, with
            ``calib`` initialised to the least-squares bias); see ``conversion/relax_init.py``.
        embed_rank: rank of the input embedding's low-rank factors ("full" = the original matrix).
        head_rank: the output head's own rank (untied; "full" = its own dense copy); None = the
            head follows the input side (a tied source stays tied).
        embed_init: "weighted" (frequency-weighted input, activation-aware head; needs ``calib``)
            or "svd" (plain truncated SVD); see ``conversion/embedding_init.py``.
        embed_params: a parameter budget (e.g. "12M") for input embedding + head that replaces
            ``embed_rank`` / ``head_rank``: candidate layouts are scored on calibration tokens.
        embed_exact_rows: keep the rows of this many most-used tokens exact on every factorised side
            (dense rows replacing the product's; counted in ``embed_params``; needs ``calib``).
        prelude, coda: keep the first ``prelude`` and the last ``coda`` original layers unique (run
            once before and after the looped block) and loop only the layers between them.
    """
    data_aware = lora_init == "asvd" or shared_init == "lsq"
    if data_aware and not calib:
        raise ConfigError("--lora-init asvd and --shared-init lsq need calibration data: pass --calib (e.g. teacher:16k or a .txt file)")
    check_relax_options(parse_relax(relax)[0], rank, lora_params)
    budget = parse_budget(lora_params) if lora_params is not None else None
    vocab_budget = parse_budget(embed_params, "--embed-params") if embed_params is not None else 0

    def recursion_for_options(ranks: dict[str, int] | None = None) -> RecursionConfig:
        return RecursionConfig(
            loops=loops,
            strategy=strategy,
            init=init,
            ranks=ranks or {},
            lora_init=lora_init,
            norms=norms,
            rank_spec=rank if budget is None else f"budget {budget}",
            seed=seed,
            shared_init=shared_init,
            lsq_rounds=lsq_rounds,
            calib=calib if isinstance(calib, str) else ("precomputed" if calib else ""),
            lora_params=budget or 0,
            relax=relax,
            embed_rank=embed_rank,
            head_rank=head_rank,
            embed_init=embed_init,
            embed_params=vocab_budget,
            embed_exact_rows=embed_exact_rows,
            prelude=prelude,
            coda=coda,
        )

    def recursion_for(hf_config: Any) -> tuple[ArchConfig, RecursionConfig]:
        arch = arch_from_hf(hf_config)
        recursion = recursion_for_options(resolve_ranks(rank, linear_shapes(arch)))
        check_loops(arch.num_layers, recursion.loops, recursion.strategy, recursion.prelude, recursion.coda)
        embedding_layout(arch, recursion)  # ranks above min(vocab, hidden) fail before the weights load
        if vocab_budget:
            budget_candidates(arch, vocab_budget, recursion.embed_exact_rows)
        return arch, recursion

    check_embedding_options(recursion_for_options(), bool(calib))
    loaded = open_source(source, check_config=recursion_for)  # options are checked against the config before any weights are read
    arch, recursion = recursion_for(loaded.hf_config)
    original = split_state_dict(loaded.hf_config, loaded.state_dict)
    info = SourceInfo(spec=loaded.spec, hf_config=loaded.hf_config.to_dict(), total_params=original_param_count(original))
    calibration = calib if isinstance(calib, Calibration) else None
    if isinstance(calib, str) and calib:
        calibration = calibration_for(original, arch, norms, info, loaded.tokenizer, calib, calib_tokens, seed, progress)
    if calibration is not None:
        recursion.calib_tokens = calibration.tokens
    if budget is not None:
        recursion.ranks = dict.fromkeys(LINEARS, 0)
        recursion.layer_ranks = budget_ranks(original, arch, recursion, budget, calibration)
    report: dict[str, Any] = {}
    if vocab_budget:
        recursion.embed_rank, recursion.head_rank = budget_embedding(original, arch, recursion, info, calibration, report)
    state = recursive_state_dict(original, arch, recursion, progress, calibration, report)
    if not isinstance(source, (str, os.PathLike)):
        # The caller keeps this source (e.g. as the KD teacher or for a second conversion); copied
        # or single-source tensors would otherwise share its storage, and training would change it.
        state = {name: tensor.clone() for name, tensor in state.items()}
    model = build_model(arch, recursion, info, state)
    model.report = report
    model.tokenizer = loaded.tokenizer
    return model


def open_source(source: str | os.PathLike[str] | Any, check_config: Any = None) -> Any:
    """A ``LoadedSource`` from a ``--model`` spec, a ``LoadedSource`` already loaded, or a transformers model object.

    ``check_config`` (spec sources) is called with the transformers config before the weights load.
    """
    from recursify.sources import LoadedSource, load_source

    if isinstance(source, LoadedSource):
        return source
    if hasattr(source, "state_dict") and hasattr(source, "config"):
        return LoadedSource(
            spec=type(source).__name__, kind="object", hf_config=source.config, state_dict=source.state_dict(), tokenizer=None
        )
    return load_source(source, check_config=check_config)


def build_model(arch: ArchConfig, recursion: RecursionConfig, info: SourceInfo, state: dict[str, torch.Tensor]) -> RecursiveModel:
    """A model whose parameters are the given tensors (no init work, no copies)."""
    with torch.device("meta"):
        model = RecursiveModel(arch, recursion, info)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def calibration_for(
    original: OriginalWeights,
    arch: ArchConfig,
    norms: str,
    info: SourceInfo,
    tokenizer: Any,
    spec: str,
    max_tokens: int,
    seed: int,
    progress: bool,
) -> Calibration:
    """Stream ``spec``'s training split through the original model (in the chosen norm form)."""
    from recursify.data import load_tokens, pack

    if tokenizer is None:
        raise ConfigError(
            "calibration needs the source model's tokenizer, and this source has none; convert from a checkpoint that ships one"
        )
    plain = RecursionConfig(loops=1, norms=norms)
    reference = build_model(arch, plain, info, recursive_state_dict(original, arch, plain))
    reference.tokenizer = tokenizer
    tokens = load_tokens(spec, tokenizer, split="train", max_tokens=max_tokens, seed=seed, teacher=reference)
    seq_len = min(CALIB_SEQ_LEN, len(tokens))
    if seq_len < 2:
        raise ConfigError(f"--calib {spec} gave {len(tokens)} tokens; calibration needs at least a few hundred")
    return calibrate(reference, pack(tokens, seq_len), progress=progress)


def budget_ranks(
    original: OriginalWeights, arch: ArchConfig, recursion: RecursionConfig, budget: int, calibration: Calibration | None
) -> dict[str, int]:
    """Ranks per "layer.linear" that retain the most residual energy within ``budget`` LoRA parameters.

    The energy is the residual's to the ``init`` rule's shared weight, whitened by the calibration
    inputs when there are any (what asvd can retain), plain otherwise (what svd can retain).
    """
    schedule = schedule_of(arch, recursion)
    layers = _layers_in_norm_form(original, arch, recursion)
    gains: dict[str, torch.Tensor] = {}
    costs: dict[str, int] = {}
    for index, source_depths in enumerate(init_sources(schedule, recursion.init)):
        if any(slot.layer == index and slot.part != "loop" for slot in schedule):
            continue  # prelude / coda layers are the original layers: nothing to relax
        depths = depths_of_layer(schedule, index)
        for name, (fan_in, fan_out) in linear_shapes(arch).items():
            weights = [layers[d][f"{name}.weight"] for d in depths]
            shared = tie([layers[d][f"{name}.weight"] for d in source_depths]) if source_depths else torch.zeros_like(weights[0])
            energy = torch.zeros(min(fan_in, fan_out), dtype=torch.float64)
            for depth, weight in zip(depths, weights, strict=True):
                residual = weight.double() - shared.double()
                if calibration is not None:
                    residual = residual @ calibration.whitening(depth, name)[0]
                energy += squared_singular_values(residual)
            gains[f"{index}.{name}"] = energy
            costs[f"{index}.{name}"] = len(depths) * (fan_in + fan_out)
    return allocate_ranks(gains, costs, budget)


def budget_embedding(
    original: OriginalWeights,
    arch: ArchConfig,
    recursion: RecursionConfig,
    info: SourceInfo,
    calibration: Calibration | None,
    report: dict[str, Any],
) -> tuple[int | str, int | str | None]:
    """(embed_rank, head_rank) within ``recursion.embed_params``: the candidate whose original model scores the lowest KL.

    Each candidate (``embedding_init.budget_candidates``) replaces only the original's input
    embedding and head, so the score isolates what the vocabulary factors cost; it is measured on
    the last ``SCORE_TOKENS`` calibration tokens (at most half the rows; KL(original || candidate)
    per token) and every score is kept in ``report["embedding_budget"]``. The candidates' fits do
    not count the scored rows' tokens: counted, every scored token would have a heavy (or, with
    ``--embed-exact-rows``, an exact) input row, and the score would favour layouts that starve the
    input side and fail on new text (measured on SmolLM2: an untied 59/178 split with 2,048 exact
    rows scored best in sample and had 3x the held-out KL of the tied pair).
    """
    if calibration is None or calibration.rows is None:
        raise ConfigError("--embed-params scores its candidates on calibration data: pass --calib (e.g. teacher:16k or a .txt file)")
    count = max(1, min(SCORE_TOKENS // calibration.rows.shape[1], calibration.rows.shape[0] // 2))
    rows = calibration.rows[-count:]
    fitted = calibration
    if calibration.token_counts is not None and calibration.rows.shape[0] > count:
        scored = torch.bincount(rows.flatten(), minlength=arch.vocab_size).double()
        fitted = dataclasses.replace(calibration, token_counts=calibration.token_counts - scored)
    vocabulary_calibration = fitted if recursion.embed_init == "weighted" else None
    plain = RecursionConfig(loops=1, norms=recursion.norms)
    base = recursive_state_dict(original, arch, plain)
    with torch.no_grad():  # the reference's log-probabilities once; then one candidate model alive at a time
        reference = build_model(arch, plain, info, base)
        targets = [torch.log_softmax(reference(row).logits.float(), dim=-1) for row in rows.split(1)]
        del reference
        layers = {k: v for k, v in base.items() if not k.startswith(("embed.", "lm_head."))}
        scores: list[dict[str, Any]] = []
        for embed_rank, head_rank in budget_candidates(arch, recursion.embed_params, recursion.embed_exact_rows):
            candidate = dataclasses.replace(
                plain,
                embed_rank=embed_rank,
                head_rank=head_rank,
                embed_init=recursion.embed_init,
                embed_exact_rows=recursion.embed_exact_rows,
            )
            vocabulary = vocabulary_state(original.embed, original.lm_head, embedding_layout(arch, candidate), vocabulary_calibration)
            model = build_model(arch, candidate, info, layers | vocabulary)
            counts = model.embedding_counts()
            kl = 0.0
            for row, target in zip(rows.split(1), targets, strict=True):  # a row at a time: vocabularies can be 262k
                log_probs = torch.log_softmax(model(row).logits.float(), dim=-1)
                kl += float((target.exp() * (target - log_probs)).sum()) / rows.numel()
            scores.append({"embed_rank": embed_rank, "head_rank": head_rank, "params": counts["input"] + counts["head"], "kl": kl})
            del model, vocabulary
    best = min(scores, key=lambda score: float(score["kl"]))
    report["embedding_budget"] = scores
    return best["embed_rank"], best["head_rank"]


def schedule_of(arch: ArchConfig, recursion: RecursionConfig) -> list[DepthSlot]:
    """The depth schedule a model with this architecture and recursion runs (what ``RecursiveModel`` builds)."""
    return build_schedule(arch.num_layers, recursion.loops, recursion.strategy, recursion.prelude, recursion.coda)


def original_param_count(original: OriginalWeights) -> int:
    """Parameters of the untied source model (embedding, head, layers, final norm)."""
    tensors = [original.embed, original.final_norm] + ([original.lm_head] if original.lm_head is not None else [])
    return sum(t.numel() for t in tensors) + sum(t.numel() for layer in original.layers for t in layer.values())


def fold_norms(layer: dict[str, torch.Tensor], norm_offset: float) -> dict[str, torch.Tensor]:
    """Absorb pre-norm gains into the linears they feed: W diag(g) x == W (g * x), exactly.

    The folded norm keeps a unit gain (stored as ``1 - offset`` for Gemma's ``1 + w`` form).
    """
    folded = dict(layer)
    for norm, linears in FOLDABLE_NORMS.items():
        gain = norm_offset + layer[norm]
        for linear in linears:
            folded[f"{linear}.weight"] = layer[f"{linear}.weight"] * gain[None, :]
        folded[norm] = torch.full_like(layer[norm], 1.0 - norm_offset)
    return folded


def _layers_in_norm_form(original: OriginalWeights, arch: ArchConfig, recursion: RecursionConfig) -> list[dict[str, torch.Tensor]]:
    if recursion.norms == "fold":
        return [fold_norms(layer, arch.norm_offset) for layer in original.layers]
    return original.layers


def recursive_state_dict(
    original: OriginalWeights,
    arch: ArchConfig,
    recursion: RecursionConfig,
    progress: bool = False,
    calibration: Calibration | None = None,
    report: dict[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """The RecursiveModel state dict: shared weights by ``init``, LoRA/bias/norm per visit.

    With ``calibration``, ``report`` receives the relative reconstruction error on calibration
    inputs of every linear at every depth: tr(E C E^T) / tr(W C W^T), E = W_d - (W' + B_d A_d).
    """
    schedule = schedule_of(arch, recursion)
    sources = init_sources(schedule, recursion.init)
    layers = _layers_in_norm_form(original, arch, recursion)
    generator = torch.Generator().manual_seed(recursion.seed)
    vocabulary_calibration = calibration if recursion.embed_init == "weighted" else None
    layout = embedding_layout(arch, recursion)
    state = vocabulary_state(original.embed, original.lm_head, layout, vocabulary_calibration, report)
    state["final_norm.weight"] = original.final_norm[None]
    for kind, inv_freq in original.rope_inv_freq.items():
        state[rope_buffer_name(kind)] = inv_freq
    errors: dict[str, list[float]] = {name: [0.0] * arch.num_layers for name in LINEARS}
    with tqdm(total=len(sources) * len(LINEARS), desc="tying layers", unit="linear", disable=not progress) as bar:
        for index, source_depths in enumerate(sources):
            looped = all(slot.part == "loop" for slot in schedule if slot.layer == index)
            tying = _LayerTying(layers, source_depths, depths_of_layer(schedule, index), generator, recursion, calibration, looped)
            for name, (fan_in, fan_out) in linear_shapes(arch).items():
                rank = lora_rank(recursion, schedule, index, name)
                state.update(tying.linear(name, fan_in, fan_out, rank, f"layers.{index}.{name}.", errors[name]))
                bar.update()
            for norm in norm_names(arch):
                state[f"layers.{index}.{norm}.weight"] = tying.norm(norm, norm_is_tied(recursion, norm), 1.0 - arch.norm_offset)
            if recursion.prefix_tokens and tying.looped:  # zero keys and values: see modeling/prefix.py
                shape = (len(tying.depths), arch.num_kv_heads, recursion.prefix_tokens, arch.head_dim)
                state[f"layers.{index}.prefix.prefix_keys"] = torch.zeros(shape)
                state[f"layers.{index}.prefix.prefix_values"] = torch.zeros(shape)
    if report is not None and calibration is not None:
        report["relative_error"] = errors
        report["calib_tokens"] = calibration.tokens
    return state


class _LayerTying:
    """Builds one shared layer's tensors from the original depths it serves."""

    def __init__(
        self,
        layers: list[dict[str, torch.Tensor]],
        source_depths: list[int],
        depths: list[int],
        generator: torch.Generator,
        recursion: RecursionConfig,
        calibration: Calibration | None,
        looped: bool,
    ):
        self.layers, self.source_depths, self.depths, self.generator = layers, source_depths, depths, generator
        self.recursion, self.calibration, self.looped = recursion, calibration, looped

    def shared(self, name: str, fill: float | None = None) -> torch.Tensor:
        """The tied value of ``name``: the init rule's mean, or random (``fill`` for norms/biases)."""
        if self.source_depths:
            return tie([self.layers[d][name] for d in self.source_depths])
        shape = self.layers[0][name].shape
        if fill is not None:
            return torch.full(shape, fill)
        return torch.randn(shape, generator=self.generator) * RANDOM_INIT_STD

    def factors(self, name: str, weights: list[torch.Tensor], shared: torch.Tensor, rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-visit LoRA (A, B) for the residuals W_d - W' by the configured init."""
        fan_out, fan_in = shared.shape
        if self.recursion.lora_init == "zero":
            return [zero_lora(fan_in, fan_out, rank, self.generator) for _ in weights]
        if self.recursion.lora_init == "asvd":
            assert self.calibration is not None
            return [
                asvd_lora(w - shared, rank, self.calibration.whitening(d, name), self.generator)
                for d, w in zip(self.depths, weights, strict=True)
            ]
        return [svd_lora(w - shared, rank, self.generator) for w in weights]

    def linear(self, name: str, fan_in: int, fan_out: int, rank: int, prefix: str, errors: list[float]) -> dict[str, torch.Tensor]:
        """Shared weight (+ bias), per-visit LoRA factors and bias residuals of one linear."""
        weights = [self.layers[d][f"{name}.weight"] for d in self.depths]
        shared = self.shared(f"{name}.weight")
        factors = self.factors(name, weights, shared, rank) if rank > 0 else []
        if self.recursion.shared_init == "lsq" and self.looped:
            assert self.calibration is not None
            grams = [damped(self.calibration.gram(d, name)) for d in self.depths]
            for _ in range(self.recursion.lsq_rounds if rank > 0 else 1):
                targets = [w - b @ a for w, (a, b) in zip(weights, factors, strict=True)] if factors else weights
                shared = lsq_shared(targets, grams)
                factors = self.factors(name, weights, shared, rank) if rank > 0 else []
        out = {prefix + "weight": shared}
        if factors and self.recursion.relax_kind == "lora-xs":
            fixed = [xs_factors(a, b, self.generator) for a, b in factors]
            out.update({prefix + key: torch.stack([f[i] for f in fixed]) for i, key in enumerate(("lora_A", "lora_B", "lora_R"))})
        elif factors:
            out[prefix + "lora_A"] = torch.stack([a for a, _ in factors])
            out[prefix + "lora_B"] = torch.stack([b for _, b in factors])
        if self.calibration is not None:
            for visit, (depth, weight) in enumerate(zip(self.depths, weights, strict=True)):
                effective = shared + (factors[visit][1] @ factors[visit][0] if factors else 0.0)
                gram = self.calibration.gram(depth, name)
                errors[depth] = weighted_error(weight - effective, gram) / max(weighted_error(weight, gram), 1e-30)
        biased = f"{name}.bias" in self.layers[0]
        bias = self.shared(f"{name}.bias", fill=0.0) if biased else None
        if bias is not None:
            out[prefix + "bias"] = bias
        if self.looped and self.recursion.relaxed and self.recursion.loops > 1 and (biased or self.recursion.relax_kind == "bias"):
            out[prefix + "bias_delta"] = torch.stack(
                [self.bias_residual(name, d, w, shared, bias) for d, w in zip(self.depths, weights, strict=True)]
            )
        return out

    def bias_residual(self, name: str, depth: int, weight: torch.Tensor, shared: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Depth ``depth``'s bias residual: b_d - b' (biased families), plus (W_d - W') E[x] for ``--relax bias``."""
        residual = self.layers[depth][f"{name}.bias"] - bias if bias is not None else torch.zeros(weight.shape[0])
        if self.recursion.relax_kind != "bias":
            return residual
        means = self.calibration.mean(depth, name) if self.calibration is not None and self.calibration.means else None
        return residual + bias_init(weight, shared, means)

    def norm(self, name: str, tied: bool, unit_gain: float) -> torch.Tensor:
        """Norm gains [slots, dim]: one tied slot, or every served depth's own gain."""
        if tied:
            return self.shared(name, fill=unit_gain)[None]
        return torch.stack([self.layers[d][name] for d in self.depths])
