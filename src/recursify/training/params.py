"""Which parameters train (``--freeze``), their optimizer groups, activation checkpointing and compilation of the layers."""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from recursify.errors import ConfigError


def apply_freeze(model: nn.Module, patterns: list[str]) -> dict[str, int]:
    """Freeze parameters whose names match ``patterns`` (fnmatch; the last matching pattern wins).

    A pattern starting with ``!`` keeps matching parameters trainable, so "train only LoRA and
    norms" reads ``--freeze '*' --freeze '!*lora*' --freeze '!*norm*'``. Parameter names are those of
    ``model.named_parameters()`` (e.g. ``layers.0.q.weight``, ``layers.0.q.lora_A``).

    Returns:
        counts of trainable and frozen parameters.
    """
    used = dict.fromkeys(patterns, False)
    counts = {"trainable": 0, "frozen": 0}
    for name, param in model.named_parameters():
        frozen = False
        for pattern in patterns:
            if fnmatchcase(name, pattern.removeprefix("!")):
                frozen = not pattern.startswith("!")
                used[pattern] = True
        param.requires_grad_(not frozen)
        counts["frozen" if frozen else "trainable"] += param.numel()
    unused = [p for p, hit in used.items() if not hit]
    if unused:
        example = next(iter(dict(model.named_parameters())), "")
        raise ConfigError(f"--freeze pattern(s) {', '.join(map(repr, unused))} match no parameter (names look like {example!r})")
    return counts


def param_groups(modules: list[nn.Module], weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups of the trainable parameters: decay on matrices only, never on gains and biases.

    Per-depth gains and biases are stacked over visits ([visits, dim], e.g. ``attn_norm.weight``,
    ``q.bias_delta``), so dimensionality alone cannot tell them from matrices: names decide.
    """
    named = [(name, p) for module in modules for name, p in module.named_parameters() if p.requires_grad]
    if not named:
        raise ConfigError("every parameter is frozen; loosen --freeze so something trains")
    vector = [p.ndim < 2 or is_gain_or_bias(name) for name, p in named]
    decay = [p for (_, p), skip in zip(named, vector, strict=True) if not skip]
    no_decay = [p for (_, p), skip in zip(named, vector, strict=True) if skip]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def is_gain_or_bias(name: str) -> bool:
    """A norm gain or a bias (shared or per depth), by parameter name."""
    *modules, leaf = name.split(".")
    return "bias" in leaf or any("norm" in module for module in modules)


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each shared layer's activations in the backward pass instead of storing them.

    Trades ~30% more compute for memory linear in the number of depths rather than in the
    activations of every depth: one checkpoint per layer *visit*, since the wrapped forward runs
    once per depth. The core model has no hook for this, so each layer's bound ``forward`` is
    wrapped in place (whatever its signature); parameter names and the state dict are unchanged,
    and FSDP's per-layer hooks (which live in ``__call__``) still gather the weights around it.
    """
    for layer in _shared_layers(model):
        inner = layer.forward

        def checkpointed(*args: Any, _inner: Any = inner) -> torch.Tensor:
            return checkpoint(_inner, *args, use_reentrant=False)

        setattr(layer, "forward", checkpointed)  # noqa: B010 - an instance attribute shadows the method


def compile_layers(model: nn.Module) -> None:
    """``torch.compile`` each shared layer's forward in place (after checkpointing, if any, so it is compiled too).

    Only the layers: they are where the FLOPs are, and a layer's graph depends on the visit (an int),
    so each layer compiles once per depth it serves. As with checkpointing, the bound ``forward`` is
    replaced, so names, the state dict and FSDP's per-layer wrapping are unchanged.
    """
    for layer in _shared_layers(model):
        setattr(layer, "forward", torch.compile(layer.forward))  # noqa: B010 - an instance attribute shadows the method


def _shared_layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ConfigError("activation checkpointing and compilation need a RecursiveModel (a module with .layers)")
    return layers
