"""RecursiveModel: embeddings -> prelude -> K shared layers looped B times -> exits at every loop end.

With loops=1 every depth has its own layer and this *is* the original model: the same class is
teacher, baseline and student everywhere in recursify.

Every way out of the stack goes through ``exit_logits``: the coda (the last original layers kept
unique, run once on a state leaving the loops) and then ``head`` (final norm + LM head). The last
loop's exit is the model's output; earlier loops' exits are the early exits.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from recursify import checkpoint
from recursify.config import LINEARS, ArchConfig, RecursionConfig
from recursify.errors import CheckpointError, ConfigError, RecursifyError
from recursify.modeling.attention import AttentionCore, RopeTables, build_masks
from recursify.modeling.embedding import FactorizedEmbedding, build_embedding, embedding_layout
from recursify.modeling.exit_addons import ExitAddons, attach_exit_addons
from recursify.modeling.exit_heads import ExitHeads
from recursify.modeling.kv_cache import AttentionContext, KVCache
from recursify.modeling.layers import FOLDABLE_NORMS, SharedLayer, norm_names
from recursify.modeling.lora import DepthRMSNorm
from recursify.modeling.schedule import DepthSlot, build_schedule, depths_of_layer, loop_end_depths, num_unique_layers


@dataclass
class ModelOutput:
    """Forward result.

    Attributes:
        logits: [batch, seq, vocab] after the last depth.
        exit_logits: with ``output_exits``, one [batch, seq, vocab] tensor per loop end (the last
            equals ``logits``).
        hidden_states: with ``output_hidden_states``, the residual stream after the embedding and
            after every depth (L + 1 tensors, no final norm).
    """

    logits: torch.Tensor
    exit_logits: list[torch.Tensor] | None = None
    hidden_states: list[torch.Tensor] | None = None


@dataclass
class SourceInfo:
    """Where the weights came from: kept in config.json so a checkpoint explains itself."""

    spec: str = ""
    hf_config: dict[str, Any] = field(default_factory=dict)
    total_params: int = 0


def norm_is_tied(recursion: RecursionConfig, name: str) -> bool:
    """Whether a norm keeps one gain for all depths of a shared layer (see RecursionConfig.norms)."""
    return recursion.norms == "tied" or (recursion.norms == "fold" and name in FOLDABLE_NORMS)


def lora_rank(recursion: RecursionConfig, schedule: list[DepthSlot], layer: int, linear: str) -> int:
    """LoRA rank of one linear of one shared layer: 0 for prelude and coda layers (they are the original layers, run once)."""
    if any(slot.layer == layer and slot.part != "loop" for slot in schedule):
        return 0
    return recursion.rank_of(layer, linear)


def norm_slot_counts(arch: ArchConfig, recursion: RecursionConfig, visits: int) -> dict[str, int]:
    """How many gain vectors each norm of a shared layer keeps."""
    return {name: 1 if norm_is_tied(recursion, name) else visits for name in norm_names(arch)}


class RecursiveModel(nn.Module):
    """A (relaxed) recursive decoder. Build it through ``recursify.convert`` or ``recursify.load``."""

    def __init__(self, arch: ArchConfig, recursion: RecursionConfig, source: SourceInfo | None = None):
        super().__init__()
        self.arch, self.recursion = arch, recursion
        self.source = source or SourceInfo()
        self.tokenizer: Any = None
        self.report: dict[str, Any] = {}  # conversion diagnostics (e.g. reconstruction errors), saved in config.json
        plan = (arch.num_layers, recursion.loops, recursion.strategy, recursion.prelude, recursion.coda)
        self.schedule: list[DepthSlot] = build_schedule(*plan)
        self.exit_depths = loop_end_depths(self.schedule)
        self.body = [slot for slot in self.schedule if slot.part != "coda"]  # embedding -> last loop's end
        self.prelude = [slot for slot in self.schedule if slot.part == "prelude"]  # run once, with a token's first loop
        self.coda = [slot for slot in self.schedule if slot.part == "coda"]  # run once on every exit, before the head
        looped = {slot.layer for slot in self.schedule if slot.part == "loop"}
        layers = []
        for layer in range(num_unique_layers(*plan)):
            visits = len(depths_of_layer(self.schedule, layer))
            slots = norm_slot_counts(arch, recursion, visits)
            ranks = {name: lora_rank(recursion, self.schedule, layer, name) for name in LINEARS}
            relaxed = layer in looped and recursion.relaxed and recursion.loops > 1  # prelude/coda: the original layers
            prefix = recursion.prefix_tokens if layer in looped else 0
            layers.append(SharedLayer(arch, visits, ranks, slots, relaxed, recursion.relax_kind, prefix))
        self.embedding_layout = embedding_layout(arch, recursion)
        self.embed, self.lm_head = build_embedding(arch, self.embedding_layout)
        self.layers = nn.ModuleList(layers)
        self.final_norm = DepthRMSNorm(arch.hidden_size, 1, arch.rms_norm_eps, arch.norm_offset)
        self.exit_heads = self._new_exit_heads(recursion.exit_head_rank) if recursion.exit_head_rank else None
        self.addons = ExitAddons()  # gates, ensemble, calibration read from beside a checkpoint (recursify.load); not weights
        for kind in arch.rope_kinds:
            self.register_buffer(rope_buffer_name(kind), torch.zeros(arch.head_dim // 2))

    @property
    def num_depths(self) -> int:
        return self.arch.num_layers

    @property
    def loops(self) -> int:
        return self.recursion.loops

    @property
    def device(self) -> torch.device:
        return self.final_norm.weight.device

    def shared_layer(self, index: int) -> SharedLayer:
        layer = self.layers[index]
        assert isinstance(layer, SharedLayer)
        return layer

    def rope_tables(self, position_ids: torch.Tensor, dtype: torch.dtype) -> RopeTables:
        """(cos, sin) [batch, seq, head_dim] per layer type for integer positions [batch, seq] (pick one with ``attention.rope_at``)."""
        tables = {}
        for kind in self.arch.rope_kinds:
            inv_freq = getattr(self, rope_buffer_name(kind)).float()
            freqs = position_ids[..., None].float() * inv_freq  # (batch, seq, head_dim / 2)
            emb = torch.cat((freqs, freqs), dim=-1)
            scale = self.arch.rope_scaling.get(kind, 1.0)
            tables[kind] = ((emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype))
        return tables

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        if self.arch.embed_scale != 1.0:
            h = h * torch.tensor(self.arch.embed_scale, dtype=h.dtype)
        return h

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head (+ Gemma2 soft-cap) of last-loop states already through the coda (``exit_logits``: any loop)."""
        return self.lm_logits(self.final_norm(h))

    def lm_logits(self, z: torch.Tensor) -> torch.Tensor:
        """The LM head (+ soft-cap) on a normalised hidden state z [..., hidden] -> [..., vocab].

        The head is the input embedding (tied), its own dense matrix or low-rank factors
        (``modeling/embedding.py``); factors project through their rank, which is what makes a
        factorised head cheaper at every exit.
        """
        head = self.embed if self.lm_head is None else self.lm_head
        if isinstance(head, FactorizedEmbedding):
            logits = head.project(z)
        else:
            assert isinstance(head, (nn.Embedding, nn.Linear))
            logits = nn.functional.linear(z, head.weight)
        if self.arch.final_softcap is not None:
            logits = torch.tanh(logits / self.arch.final_softcap) * self.arch.final_softcap
        return logits

    def run_depths(self, slots: list[DepthSlot], h: torch.Tensor, attention: AttentionCore | None) -> torch.Tensor:
        """Run ``slots`` (e.g. ``self.prelude`` or ``self.coda``) in order on states [batch, rows, hidden]."""
        for slot in slots:
            assert attention is not None, "depths need an attention core"
            h = self.shared_layer(slot.layer)(h, slot.visit, slot.depth, attention)
        return h

    def exit_logits(
        self, h: torch.Tensor, loop: int | list[int], attention: AttentionCore | None = None, keep: slice | torch.Tensor = slice(None)
    ) -> torch.Tensor:
        """Next-token logits of states leaving the stack at the end of (0-based) ``loop``: the one "exit -> logits" map.

        The coda first (when the model has one: the last original layers kept unique; it attends over
        the sequence, so h must be [batch, rows, hidden] with the ``attention`` core, it runs on every
        row and writes its keys), then, on the ``keep`` rows (a slice or LongTensor of row indices of
        a 3-D h), the loop's exit map (``exit_input``) and the LM head. ``loop`` is one loop for all
        states or one per kept state (a serving batch mixing loops). The model's final output, every
        early exit, the serving engine and self-speculative drafts call this. Rows at different loops
        share one LM-head matmul (the head's weights are read once).
        """
        if self.coda:
            if h.dim() != 3 or attention is None:
                raise ConfigError("a model with a coda exits through it: pass states [batch, rows, hidden] and their attention core")
            h = self.run_depths(self.coda, h, attention)
        if h.dim() == 3:
            h = h[:, keep]
        return self.lm_logits(self.exit_input(h, loop))

    def exit_input(self, h: torch.Tensor, loop: int | list[int]) -> torch.Tensor:
        """The LM head's input for exit states h [..., hidden]: the final norm, or a non-final loop's exit head.

        With one loop per state (a list as long as h has states), each group of states at one loop
        goes through its own exit head.
        """
        if isinstance(loop, int):
            if self.exit_heads is None or loop >= self.loops - 1:
                return self.final_norm(h)
            return self.exit_heads(h, loop)
        if len(loop) != h.shape[:-1].numel():
            raise ConfigError(f"exit_logits got {len(loop)} loops for {h.shape[:-1].numel()} states")
        if self.exit_heads is None:
            return self.final_norm(h)
        if len(set(loop)) == 1:
            return self.exit_input(h, loop[0])
        flat = h.reshape(-1, h.shape[-1])
        z = torch.empty_like(flat)
        for value in sorted(set(loop)):  # one exit head per loop present (at most B)
            rows = torch.tensor([i for i, b in enumerate(loop) if b == value], device=h.device)
            z[rows] = self.exit_input(flat[rows], value).to(z.dtype)
        return z.reshape(h.shape)

    def add_exit_heads(self, rank: int) -> None:
        """Give every non-final loop an exit head of ``rank`` (initially equal to the shared head); recorded in the config."""
        if self.exit_heads is not None:
            raise ConfigError(f"this model already has exit heads (rank {self.recursion.exit_head_rank})")
        self.exit_heads = self._new_exit_heads(rank).to(self.device)
        self.recursion = dataclasses.replace(self.recursion, exit_head_rank=rank)

    def _new_exit_heads(self, rank: int) -> ExitHeads:
        if self.loops < 2:
            raise ConfigError("exit heads need early exits: a model with loops >= 2")
        heads = ExitHeads(self.arch.hidden_size, self.loops, rank, self.arch.rms_norm_eps, self.arch.norm_offset)
        heads.init_from(self.final_norm)
        return heads

    def run_loops(self, h: torch.Tensor, ctx: AttentionContext, first: int, stop: int) -> torch.Tensor:
        """Run loops ``first .. stop - 1`` on h [batch, seq, hidden] (the prelude too when ``first`` is 0), no coda.

        ``forward`` is the embeddings through ``run_loops(h, ctx, 0, loops)`` plus exits;
        self-speculative decoding runs the first loops to draft and the rest to verify
        (modeling/speculative.py).
        """
        for slot in self.body:
            if first <= slot.loop < stop and (slot.part == "loop" or first == 0):
                h = self.shared_layer(slot.layer)(h, slot.visit, slot.depth, ctx)
        return h

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        output_exits: bool = False,
        output_hidden_states: bool = False,
        logits_to_keep: int = 0,
    ) -> ModelOutput:
        """Run the unrolled stack.

        Args:
            input_ids: [batch, seq] new tokens (the whole sequence, or the next ones with a cache).
            attention_mask: [batch, past + seq], 0 at padding; all ones when omitted.
            position_ids: [batch, seq]; by default counted over non-padding tokens.
            cache: a KVCache holding ``past`` tokens; the new keys/values are appended.
            output_exits: also return logits at the end of every loop.
            output_hidden_states: also return the residual stream after every depth.
            logits_to_keep: compute logits for the last N positions only (0 = all).
        """
        batch, seq = input_ids.shape
        past = cache.length if cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(batch, past + seq, dtype=torch.long, device=input_ids.device)
        if attention_mask.shape != (batch, past + seq):
            raise ConfigError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(batch, past + seq)}")
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
        h = self.embed_tokens(input_ids)
        ctx = self.attention_context(attention_mask, position_ids, cache, h.dtype)
        keep = slice(-logits_to_keep, None) if logits_to_keep > 0 else slice(None)
        hidden = [h] if output_hidden_states else None
        exits: list[torch.Tensor] | None = [] if output_exits else None
        for slot in self.body:
            h = self.shared_layer(slot.layer)(h, slot.visit, slot.depth, ctx)
            if hidden is not None:
                hidden.append(h)
            if exits is not None and slot.depth in self.exit_depths[:-1]:
                exits.append(
                    self.exit_logits(h, slot.loop, ctx, keep)
                )  # an early exit writes the coda's keys; the final exit rewrites them
        for slot in self.coda:  # the final exit's coda, recorded depth by depth
            h = self.shared_layer(slot.layer)(h, slot.visit, slot.depth, ctx)
            if hidden is not None:
                hidden.append(h)
        if cache is not None:
            cache.advance(seq)
        logits = self.head(h[:, keep])
        if exits is not None:
            exits.append(logits)
        return ModelOutput(logits=logits, exit_logits=exits, hidden_states=hidden)

    def attention_context(
        self, attention_mask: torch.Tensor, position_ids: torch.Tensor, cache: KVCache | None, dtype: torch.dtype
    ) -> AttentionContext:
        """RoPE tables and masks of ``seq`` new tokens (position_ids [batch, seq]) after the cache's ``past`` ones.

        attention_mask: [batch, past + seq], 0 at padding. The new tokens' keys are the last
        ``seq`` cache positions, so the queries stand at positions past..past+seq-1 of the key row.
        """
        num_keys, seq = attention_mask.shape[1], position_ids.shape[1]
        queries = torch.arange(num_keys - seq, num_keys, device=attention_mask.device)[None]  # (1, seq)
        masks = build_masks(queries, num_keys, self.arch.layer_types, self.arch.sliding_window, key_padding=attention_mask)
        return AttentionContext(rope=self.rope_tables(position_ids, dtype), masks=masks, cache=cache)

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty KV cache with one slot per depth."""
        return KVCache(self.num_depths, batch_size, self.arch.num_kv_heads, self.arch.head_dim, max_len)

    def param_counts(self) -> dict[str, int | float]:
        """Parameters by group, the total and its ratio to the source model, and stored frozen tensors.

        "lora" counts every trainable per-depth relaxation parameter (LoRA A/B, LoRA-XS cores,
        bias residuals, prefixes); "frozen" counts the fixed LoRA-XS factors, which are stored in
        the checkpoint and used in every forward but are buffers, never trained, and not part of
        "total" (nor of the ratio).
        """
        counts = {"embedding": 0, "non_embedding": 0, "lora": 0}
        for name, param in self.named_parameters():
            counts[parameter_group(name)] += param.numel()
        total = sum(counts.values())
        source_total = self.source.total_params or total
        frozen = sum(buffer.numel() for name, buffer in self.named_buffers() if name.endswith((".lora_A", ".lora_B")))
        return {**counts, "total": total, "source_total": source_total, "ratio": total / source_total, "frozen": frozen}

    def embedding_counts(self) -> dict[str, Any]:
        """The "embedding" group split into input embedding and head, with their ranks (None = dense).

        A head that reuses the input side's tensors (tied) owns no parameters: ``tied`` says so.
        """
        layout = self.embedding_layout
        input_params = sum(p.numel() for p in self.embed.parameters())
        head_params = sum(p.numel() for p in self.lm_head.parameters()) if self.lm_head is not None else 0
        head_rank = layout.input_rank if layout.head == "input" else layout.head_rank
        tied = layout.head == "input"
        return {"input": input_params, "head": head_params, "tied": tied, "input_rank": layout.input_rank, "head_rank": head_rank}

    def generate(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Generate continuations; see ``recursify.modeling.generation.generate`` for the options."""
        from recursify.modeling.generation import generate

        return generate(self, input_ids, **kwargs)

    def stream(self, input_ids: torch.Tensor, **kwargs: Any) -> Iterator[torch.Tensor]:
        """Yield the next token of every row, step by step; see ``generation.stream``."""
        from recursify.modeling.generation import stream

        return stream(self, input_ids, **kwargs)

    def save_pretrained(self, directory: str | os.PathLike[str], overwrite: bool = False) -> None:
        """Write config.json + model.safetensors (+ tokenizer files) atomically; ``from_pretrained`` reads them back."""
        config = {
            "architecture": dataclasses.asdict(self.arch),
            "recursion": dataclasses.asdict(self.recursion),
            "source": dataclasses.asdict(self.source),
            "params": self.param_counts(),
            "report": self.report,
        }
        checkpoint.write_checkpoint(directory, config, self.state_dict(), self.tokenizer, overwrite=overwrite)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str], device: str | torch.device = "cpu") -> RecursiveModel:
        """A checkpoint directory written by ``save_pretrained`` (weights via safetensors only), in eval mode.

        Exit gates, an exit ensemble and an exit calibration saved beside the weights are attached
        as ``model.addons`` (modeling/exit_addons.py).

        ``recursify.load`` opens any source; this opens recursify checkpoints only, with errors that
        say what is wrong with one.
        """
        path = Path(directory)
        config = checkpoint.read_config(path)
        config_file = path / checkpoint.CONFIG_FILE
        try:
            arch = ArchConfig(**config["architecture"])
            recursion = RecursionConfig(**config["recursion"])
            source = SourceInfo(**config.get("source", {}))
            model = cls(arch, recursion, source)  # validates loops against the layers, too
        except (KeyError, TypeError) as err:
            raise CheckpointError(f"{config_file} is incomplete or malformed ({err}); re-create the checkpoint") from err
        except RecursifyError as err:
            raise CheckpointError(f"{config_file} holds an invalid configuration: {err}") from err
        state = checkpoint.read_weights(path, device)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            first_line = str(err).splitlines()[0]
            raise CheckpointError(
                f"{path / checkpoint.WEIGHTS_FILE} does not match its config.json ({first_line}); re-create the checkpoint"
            ) from err
        model.report = config.get("report", {})
        model.tokenizer = checkpoint.load_tokenizer(path)
        model = model.to(device).eval()
        attach_exit_addons(model, path)  # gates, exit ensemble, calibration saved beside the weights
        return model


def rope_buffer_name(layer_type: str) -> str:
    return f"inv_freq_{layer_type}"


def parameter_group(name: str) -> str:
    """Which accounting group a parameter belongs to (docs/method.md section 8)."""
    if name.startswith(("embed.", "lm_head.")):
        return "embedding"
    if name.rsplit(".", 1)[-1] in ("lora_A", "lora_B", "lora_R", "bias_delta", "prefix_keys", "prefix_values"):
        return "lora"
    return "non_embedding"
