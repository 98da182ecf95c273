"""Layer dropping: the smaller model a user would make instead of a recursive one, kept as a baseline.

Keep K of the original L layers, unchanged, and drop the rest:

- ``by="influence"``: drop the layers whose removal changes the calibration hidden states least,
  by block influence as ShortGPT measures it: BI_l = 1 - mean over tokens of cos(x_l, x_{l+1}), the
  cosine between the residual stream entering and leaving layer l. A layer that barely turns the
  stream is nearly an identity; the K layers of highest influence are kept, in their order.
- ``by="first"``: keep the first K layers (the paper's "shrunk" baseline: a pretrained model cut short).

The result is an ordinary loops=1 model with K depths; ``RecursionConfig.kept_layers`` records which
original layer each depth is, so local healing pairs it with the right span of the original
(``training/healing.py``) and the checkpoint explains itself.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
from tqdm.auto import tqdm

from recursify.config import CALIB_TOKENS, RecursionConfig
from recursify.errors import ConfigError
from recursify.modeling.model import RecursiveModel

DROP_RULES = ("influence", "first")


def block_influence(model: RecursiveModel, rows: torch.Tensor, micro_batch: int = 4, progress: bool = False) -> list[float]:
    """BI of every depth of a loops=1 model on token rows [n, seq]: 1 - mean cosine between its input and output states."""
    if model.loops != 1:
        raise ConfigError("block influence is measured on the original model (loops=1)")
    sums = torch.zeros(model.num_depths, dtype=torch.float64)
    count = 0
    with torch.no_grad():
        for chunk in tqdm(rows.split(micro_batch), desc="block influence", unit="batch", disable=not progress):
            hidden = model(chunk, output_hidden_states=True, logits_to_keep=1).hidden_states
            assert hidden is not None
            states = torch.stack([h.float() for h in hidden])  # (L + 1, batch, seq, hidden)
            cosines = torch.nn.functional.cosine_similarity(states[:-1], states[1:], dim=-1)  # (L, batch, seq)
            sums += cosines.double().sum(dim=(1, 2))
            count += chunk.numel()
    return (1.0 - sums / count).tolist()


def layers_to_keep(influence: list[float], keep: int) -> list[int]:
    """The ``keep`` depths of highest influence, in their original order (ties: the earlier layer)."""
    if not 1 <= keep <= len(influence):
        raise ConfigError(f"--keep-layers must be between 1 and the model's {len(influence)} layers, got {keep}")
    ranked = sorted(range(len(influence)), key=lambda depth: (-influence[depth], depth))
    return sorted(ranked[:keep])


def drop_layers(
    source: str | os.PathLike[str] | Any,
    keep: int,
    by: str = "influence",
    calib: str | None = None,
    calib_tokens: int = CALIB_TOKENS,
    seed: int = 0,
    progress: bool = True,
) -> RecursiveModel:
    """A loops=1 model of ``keep`` original layers chosen by ``by`` ("influence" needs ``calib`` data).

    Args:
        source: any ``--model`` source (or a loaded transformers model).
        keep: K, the layers kept.
        by: "influence" (block influence on ``calib``) or "first".
        calib: a ``--data`` spec whose train split measures block influence.
        calib_tokens: tokens of ``calib`` to measure on.
        seed: data order.
    """
    from recursify.conversion.convert import CALIB_SEQ_LEN, build_model, open_source, original_param_count, recursive_state_dict
    from recursify.conversion.weight_map import arch_from_hf, split_state_dict
    from recursify.data import load_tokens, pack
    from recursify.modeling.model import SourceInfo

    if by not in DROP_RULES:
        raise ConfigError(f"unknown --drop-by {by!r}; choose one of: {', '.join(DROP_RULES)}")
    if by == "influence" and not calib:
        raise ConfigError("--drop-by influence measures block influence on calibration data: pass --calib (e.g. a .txt file)")
    loaded = open_source(source)
    arch = arch_from_hf(loaded.hf_config)
    original = split_state_dict(loaded.hf_config, loaded.state_dict)
    info = SourceInfo(spec=loaded.spec, hf_config=loaded.hf_config.to_dict(), total_params=original_param_count(original))
    report: dict[str, Any] = {"drop_by": by}
    if by == "influence":
        plain = RecursionConfig(loops=1)
        reference = build_model(arch, plain, info, recursive_state_dict(original, arch, plain))
        if loaded.tokenizer is None:
            raise ConfigError("block influence needs the source model's tokenizer to read --calib; use a checkpoint that ships one")
        assert calib is not None
        reference.tokenizer = loaded.tokenizer
        tokens = load_tokens(calib, loaded.tokenizer, "train", calib_tokens, seed, teacher=reference)  # teacher:N samples from it
        influence = block_influence(reference, pack(tokens, min(CALIB_SEQ_LEN, tokens.numel())), progress=progress)
        kept = layers_to_keep(influence, keep)
        report.update(block_influence=influence, calib=calib, calib_tokens=int(tokens.numel()))
    else:
        layers_to_keep([0.0] * arch.num_layers, keep)  # validates keep
        kept = list(range(keep))
    report["dropped"] = [depth for depth in range(arch.num_layers) if depth not in kept]
    small = dataclasses.replace(arch, num_layers=keep, layer_types=[arch.layer_types[d] for d in kept])
    recursion = RecursionConfig(loops=1, kept_layers=kept, calib=calib or "")
    subset = dataclasses.replace(
        original,
        layers=[original.layers[d] for d in kept],
        rope_inv_freq={kind: freq for kind, freq in original.rope_inv_freq.items() if kind in small.rope_kinds},
    )
    state = recursive_state_dict(subset, small, recursion)
    if not isinstance(source, (str, os.PathLike)):
        state = {name: tensor.clone() for name, tensor in state.items()}  # the caller keeps its source
    model = build_model(small, recursion, info, state)
    model.report = report
    model.tokenizer = loaded.tokenizer
    return model
