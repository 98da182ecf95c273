"""Orchestration: source model -> tied shared layers + per-depth LoRA/norms -> RecursiveModel."""

from __future__ import annotations

import os
from typing import Any

import torch
from tqdm.auto import tqdm

from recursify.config import LINEARS, ArchConfig, RecursionConfig
from recursify.conversion.lora_init import resolve_ranks, svd_lora, zero_lora
from recursify.conversion.tying import init_sources, tie
from recursify.conversion.weight_map import OriginalWeights, arch_from_hf, split_state_dict
from recursify.modeling.layers import FOLDABLE_NORMS, linear_shapes, norm_names
from recursify.modeling.model import RecursiveModel, SourceInfo, norm_is_tied, rope_buffer_name
from recursify.modeling.schedule import build_schedule, check_loops, depths_of_layer

RANDOM_INIT_STD = 0.02


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
) -> RecursiveModel:
    """Turn a pretrained decoder into a (relaxed) recursive model.

    Args:
        source: a Hugging Face checkpoint directory, a ``.gguf`` file, a hub id, a registry alias
            such as ``smollm2-135m``, or an already loaded transformers model.
        loops: B; the model keeps K = L / B unique layers (``loops=1`` is the original model).
        init: shared-layer init: stepwise, average, lower or random.
        rank: LoRA rank per depth (0 = pure recursive, "full" = exact reproduction).
        strategy: cycle, sequence, cycle-rev or middle-cycle.
        norms: per-depth (default, exact at full rank), tied (the paper) or fold.
        lora_init: svd (residual SVD) or zero (standard LoRA init).
        seed: seeds random shared weights and standard-init LoRA factors.
        progress: show a progress bar.
    """
    from recursify.sources import LoadedSource, load_source

    def recursion_for(hf_config: Any) -> tuple[ArchConfig, RecursionConfig]:
        arch = arch_from_hf(hf_config)
        check_loops(arch.num_layers, loops, strategy)
        ranks = resolve_ranks(rank, linear_shapes(arch))
        return arch, RecursionConfig(
            loops=loops, strategy=strategy, init=init, ranks=ranks, lora_init=lora_init, norms=norms, rank_spec=rank, seed=seed
        )

    if hasattr(source, "state_dict") and hasattr(source, "config"):
        loaded = LoadedSource(
            spec=type(source).__name__, kind="object", hf_config=source.config, state_dict=source.state_dict(), tokenizer=None
        )
    elif isinstance(source, LoadedSource):
        loaded = source
    else:  # options are checked against the config before any weights are read
        loaded = load_source(source, check_config=recursion_for)
    arch, recursion = recursion_for(loaded.hf_config)
    original = split_state_dict(loaded.hf_config, loaded.state_dict)
    info = SourceInfo(spec=loaded.spec, hf_config=loaded.hf_config.to_dict(), total_params=original_param_count(original))
    with torch.device("meta"):  # no memory or init work for weights that are replaced at once
        model = RecursiveModel(arch, recursion, info)
    state = recursive_state_dict(original, arch, recursion, progress)
    if not isinstance(source, (str, os.PathLike)):
        # The caller keeps this source (e.g. as the KD teacher or for a second conversion); copied
        # or single-source tensors would otherwise share its storage, and training would change it.
        state = {name: tensor.clone() for name, tensor in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.tokenizer = loaded.tokenizer
    return model.eval()


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


def recursive_state_dict(
    original: OriginalWeights, arch: ArchConfig, recursion: RecursionConfig, progress: bool = False
) -> dict[str, torch.Tensor]:
    """The RecursiveModel state dict: shared weights by ``init``, LoRA/bias/norm per visit."""
    schedule = build_schedule(arch.num_layers, recursion.loops, recursion.strategy)
    sources = init_sources(schedule, recursion.init, recursion.strategy)
    layers = [fold_norms(layer, arch.norm_offset) for layer in original.layers] if recursion.norms == "fold" else original.layers
    generator = torch.Generator().manual_seed(recursion.seed)
    state: dict[str, torch.Tensor] = {"embed.weight": original.embed, "final_norm.weight": original.final_norm[None]}
    if original.lm_head is not None:
        state["lm_head.weight"] = original.lm_head
    for kind, inv_freq in original.rope_inv_freq.items():
        state[rope_buffer_name(kind)] = inv_freq
    with tqdm(total=len(sources) * len(LINEARS), desc="tying layers", unit="linear", disable=not progress) as bar:
        for index, source_depths in enumerate(sources):
            tying = _LayerTying(layers, source_depths, depths_of_layer(schedule, index), generator)
            for name, (fan_in, fan_out) in linear_shapes(arch).items():
                state.update(tying.linear(name, fan_in, fan_out, recursion, prefix=f"layers.{index}.{name}."))
                bar.update()
            for norm in norm_names(arch):
                state[f"layers.{index}.{norm}.weight"] = tying.norm(norm, norm_is_tied(recursion, norm), 1.0 - arch.norm_offset)
    return state


class _LayerTying:
    """Builds one shared layer's tensors from the original depths it serves."""

    def __init__(self, layers: list[dict[str, torch.Tensor]], source_depths: list[int], depths: list[int], generator: torch.Generator):
        self.layers, self.source_depths, self.depths, self.generator = layers, source_depths, depths, generator

    def shared(self, name: str, fill: float | None = None) -> torch.Tensor:
        """The tied value of ``name``: the init rule's mean, or random (``fill`` for norms/biases)."""
        if self.source_depths:
            return tie([self.layers[d][name] for d in self.source_depths])
        shape = self.layers[0][name].shape
        if fill is not None:
            return torch.full(shape, fill)
        return torch.randn(shape, generator=self.generator) * RANDOM_INIT_STD

    def linear(self, name: str, fan_in: int, fan_out: int, recursion: RecursionConfig, prefix: str) -> dict[str, torch.Tensor]:
        """Shared weight (+ bias), per-visit LoRA factors and bias residuals of one linear."""
        weight = self.shared(f"{name}.weight")
        out = {prefix + "weight": weight}
        rank = recursion.ranks.get(name, 0)
        if rank > 0:
            factors = [
                svd_lora(self.layers[d][f"{name}.weight"] - weight, rank, self.generator)
                if recursion.lora_init == "svd"
                else zero_lora(fan_in, fan_out, rank, self.generator)
                for d in self.depths
            ]
            out[prefix + "lora_A"] = torch.stack([a for a, _ in factors])
            out[prefix + "lora_B"] = torch.stack([b for _, b in factors])
        if f"{name}.bias" in self.layers[0]:
            bias = self.shared(f"{name}.bias", fill=0.0)
            out[prefix + "bias"] = bias
            if recursion.relaxed and recursion.loops > 1:
                out[prefix + "bias_delta"] = torch.stack([self.layers[d][f"{name}.bias"] - bias for d in self.depths])
        return out

    def norm(self, name: str, tied: bool, unit_gain: float) -> torch.Tensor:
        """Norm gains [slots, dim]: one tied slot, or every served depth's own gain."""
        if tied:
            return self.shared(name, fill=unit_gain)[None]
        return torch.stack([self.layers[d][name] for d in self.depths])
