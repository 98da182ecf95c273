"""Configuration dataclasses: what the decoder is, and how it is made recursive.

Kept free of torch so the CLI can validate options before importing anything heavy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from recursify.errors import ConfigError

STRATEGIES: tuple[str, ...] = ("cycle", "sequence", "cycle-rev", "middle-cycle")
SHARED_INITS: tuple[str, ...] = ("stepwise", "average", "lower", "random")
LORA_INITS: tuple[str, ...] = ("svd", "asvd", "zero")
SHARED_FITS: tuple[str, ...] = ("init", "lsq")
NORM_MODES: tuple[str, ...] = ("per-depth", "tied", "fold")
LINEARS: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
RELAX_KINDS: tuple[str, ...] = ("lora", "lora-xs", "prefix:N", "bias")
EMBED_INITS: tuple[str, ...] = ("weighted", "svd")
CALIB_TOKENS = 16384  # calibration tokens streamed through the original by data-aware conversion
# --plan auto --target-total: vocabulary sizes tried, as shares of the dense embedding + head parameters
VOCAB_SHARES = (1.0, 0.5, 0.35)
PRECISIONS: tuple[str, ...] = ("fp32", "bf16")  # what a forward computes in; "auto" picks one from the hardware where offered


def normalise_plan(strategy: str, prelude: int, coda: int) -> tuple[str, int, int]:
    """(strategy, prelude, coda) with the paper's ``middle-cycle`` spelled out as cycle + prelude 1 + coda 1.

    Middle-Cycle keeps the first and the last layer unique and cycles the middle ones: one sharing
    plan among all (prelude N, coda M), so the schedule has a single mechanism for it.

    Raises:
        ConfigError: ``middle-cycle`` together with an explicit prelude or coda.
    """
    if strategy != "middle-cycle":
        return strategy, prelude, coda
    if prelude or coda:
        raise ConfigError("--strategy middle-cycle already means --prelude 1 --coda 1; use --strategy cycle with --prelude/--coda instead")
    return "cycle", 1, 1


def parse_relax(spec: str) -> tuple[str, int]:
    """("lora" | "lora-xs" | "prefix" | "bias", prefix tokens) from a ``--relax`` spec such as "prefix:64".

    Raises:
        ConfigError: an unknown kind, or a prefix length that is not a positive integer.
    """
    kind, _, count = spec.partition(":")
    if kind == "prefix":
        if not count.isdigit() or int(count) < 1:
            raise ConfigError(f"--relax prefix:N needs a positive number of prefix tokens N, got {spec!r}")
        return kind, int(count)
    if count or kind not in RELAX_KINDS:
        raise ConfigError(f"unknown relaxation {spec!r}; choose one of: {', '.join(RELAX_KINDS)}")
    return kind, 0


@dataclass
class ArchConfig:
    """The decoder architecture, independent of any recursion: one entry per family feature.

    Attributes:
        family: transformers ``model_type`` the weights came from (llama, qwen2, qwen3, gemma, ...).
        num_layers: depth L of the original model; every depth keeps its own attention pattern.
        norm_offset: 1.0 for Gemma's ``x * (1 + w)`` RMSNorm, 0.0 for ``x * w``.
        sandwich_norms: Gemma2/3 normalise the attention and MLP outputs before the residual add.
        qk_norm: Qwen3/Gemma3 apply an RMSNorm over each head of q and k before RoPE.
        embed_scale: multiply embeddings by this (Gemma: sqrt(hidden)); 1.0 elsewhere.
        attn_scale: softmax scale of q.k (head_dim**-0.5, or query_pre_attn_scalar**-0.5).
        layer_types: per original depth, full or sliding-window attention.
        rope_scaling: per layer type, the cos/sin multiplier of non-default RoPE types.
    """

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    hidden_act: Literal["silu", "gelu_tanh"]
    attention_bias: bool = False
    qk_norm: bool = False
    norm_offset: float = 0.0
    sandwich_norms: bool = False
    embed_scale: float = 1.0
    attn_scale: float = 0.0
    attn_softcap: float | None = None
    final_softcap: float | None = None
    layer_types: list[str] = field(default_factory=list)
    sliding_window: int | None = None
    rope_scaling: dict[str, float] = field(default_factory=dict)
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if not self.layer_types:
            self.layer_types = ["full_attention"] * self.num_layers
        if len(self.layer_types) != self.num_layers:
            raise ConfigError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
        if self.attn_scale == 0.0:
            self.attn_scale = self.head_dim**-0.5
        if "sliding_attention" in self.layer_types and not self.sliding_window:
            raise ConfigError("sliding_attention layers need a sliding_window size")

    @property
    def rope_kinds(self) -> list[str]:
        """Distinct layer types, in order of first appearance; each has its own RoPE frequencies."""
        return list(dict.fromkeys(self.layer_types))


@dataclass
class RecursionConfig:
    """How the original L layers are tied into K shared layers looped B times, and relaxed.

    Attributes:
        loops: B, the number of times the block of shared layers runs (1 = the original model).
        strategy: which shared layer serves each depth (docs/method.md section 1).
        init: how shared weights are initialised from the original layers.
        ranks: LoRA rank per linear kind (q, k, v, o, gate, up, down); 0 = no LoRA (pure recursive).
        lora_init: "svd" (truncated SVD of each depth's residual), "asvd" (activation-aware SVD on
            calibration data) or "zero" (standard LoRA init).
        norms: "per-depth" keeps each depth's norm gains (exact at full rank, the default),
            "tied" ties them like the weights (the paper), "fold" absorbs pre-norm gains into the
            linears they feed before tying and keeps unfoldable norms per depth.
        rank_spec: the rank as the user gave it ("full" or an int), kept for reports.
        shared_init: "init" keeps the ``init`` rule's shared weights; "lsq" refits them as the
            activation-weighted least-squares centroid, alternated with asvd for ``lsq_rounds``.
        layer_ranks: per "layer.linear" rank overriding ``ranks`` (set by a LoRA parameter budget).
        calib: the calibration data spec used by asvd / lsq / the budget ("" = none).
        calib_tokens: calibration tokens actually used.
        lora_params: the LoRA parameter budget that chose ``layer_ranks`` (0 = none).
        prelude, coda: the first ``prelude`` and the last ``coda`` original layers stay unique (run
            once, before and after the looped block; no LoRA: they are the original layers); only
            the layers between them are tied and looped (``modeling/schedule.py``).
        kept_layers: after layer dropping (``conversion/layer_drop.py``), the original layer each
            depth was taken from, in order; empty = every original layer (no dropping).
        relax: how depths are relaxed from the tied weights: "lora" (per-depth LoRA, trainable
            A and B), "lora-xs" (fixed A and B from the SVD, a trainable r x r matrix per depth),
            "prefix:N" (N learned key/value prefix tokens per depth, no LoRA) or "bias" (a
            bias vector per depth on every linear, no LoRA); see ``conversion/relax_init.py`` and
            ``modeling/prefix.py``.
        embed_rank: rank of the input embedding's low-rank factors ("full" = the original dense
            matrix, exact); see ``modeling/embedding.py``.
        head_rank: the output head's own rank (untied from the input side; "full" = its own dense
            matrix); None = the head follows the input side (a tied source stays tied).
        embed_init: how factors are fitted: "weighted" (input rows weighted by calibration token
            frequency, head by the logits' error on calibration hidden states; needs calibration
            data) or "svd" (plain truncated SVD); see ``conversion/embedding_init.py``.
        embed_params: the parameter budget for input embedding + head that chose the ranks (0 = none).
        embed_exact_rows: rows of the most-used tokens every factorised side keeps exact (dense),
            counted in ``embed_params``; see ``modeling/embedding.py``.
        exit_head_rank: rank of the per-loop exit heads in front of the shared LM head at every
            non-final loop end (0 = none: every exit reads the shared final norm and head); see
            ``modeling/exit_heads.py``. Added by ``uptrain --exit-heads R``, not by conversion.
    """

    loops: int = 1
    strategy: str = "cycle"
    init: str = "stepwise"
    ranks: dict[str, int] = field(default_factory=dict)
    lora_init: str = "svd"
    norms: str = "per-depth"
    rank_spec: int | str = 0
    seed: int = 0
    shared_init: str = "init"
    lsq_rounds: int = 2
    layer_ranks: dict[str, int] = field(default_factory=dict)
    calib: str = ""
    calib_tokens: int = 0
    lora_params: int = 0
    relax: str = "lora"
    embed_rank: int | str = "full"
    head_rank: int | str | None = None
    embed_init: str = "weighted"
    embed_params: int = 0
    embed_exact_rows: int = 0
    exit_head_rank: int = 0
    prelude: int = 0
    coda: int = 0
    kept_layers: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        parse_relax(self.relax)
        self.embed_rank = parse_embed_rank(self.embed_rank, "--embed-rank")
        if self.head_rank is not None:
            self.head_rank = parse_embed_rank(self.head_rank, "--head-rank")
        _check_choice("embed_init", self.embed_init, EMBED_INITS)
        if not isinstance(self.embed_params, int) or self.embed_params < 0:
            raise ConfigError(f"embed_params must be a non-negative integer, got {self.embed_params!r}")
        if not isinstance(self.embed_exact_rows, int) or self.embed_exact_rows < 0:
            raise ConfigError(f"--embed-exact-rows must be a non-negative integer, got {self.embed_exact_rows!r}")
        if self.embed_exact_rows and not (self.embed_factorized or self.embed_params):
            raise ConfigError(
                "--embed-exact-rows keeps rows of a low-rank embedding or head exact: add --embed-rank R, --head-rank R or --embed-params N"
            )
        if not isinstance(self.exit_head_rank, int) or self.exit_head_rank < 0:
            raise ConfigError(f"exit_head_rank must be a non-negative integer, got {self.exit_head_rank!r}")
        if self.exit_head_rank and self.loops < 2:
            raise ConfigError("exit heads need early exits: a model with loops >= 2")
        _check_choice("strategy", self.strategy, STRATEGIES)
        self.strategy, self.prelude, self.coda = normalise_plan(self.strategy, self.prelude, self.coda)
        if not isinstance(self.prelude, int) or not isinstance(self.coda, int) or self.prelude < 0 or self.coda < 0:
            raise ConfigError(f"prelude and coda must be non-negative integers, got {self.prelude!r} and {self.coda!r}")
        if self.kept_layers and (self.loops != 1 or sorted(set(self.kept_layers)) != self.kept_layers or self.kept_layers[0] < 0):
            raise ConfigError(f"kept_layers must be increasing original layer indices of a loops=1 model, got {self.kept_layers}")
        _check_choice("init", self.init, SHARED_INITS)
        _check_choice("lora_init", self.lora_init, LORA_INITS)
        _check_choice("norms", self.norms, NORM_MODES)
        _check_choice("shared_init", self.shared_init, SHARED_FITS)
        if not isinstance(self.loops, int) or self.loops < 1:
            raise ConfigError(f"loops must be a positive integer, got {self.loops!r}")
        for name, rank in self.ranks.items():
            if name not in LINEARS or rank < 0:
                raise ConfigError(f"invalid LoRA rank entry {name}={rank}")

    @property
    def relaxed(self) -> bool:
        """True when depths differ by more than their norms: a per-depth LoRA, prefix or bias."""
        has_lora = any(r > 0 for r in self.ranks.values()) or any(r > 0 for r in self.layer_ranks.values())
        return has_lora or self.relax_kind in ("prefix", "bias")

    @property
    def relax_kind(self) -> str:
        """The relaxation kind: "lora", "lora-xs", "prefix" or "bias"."""
        return parse_relax(self.relax)[0]

    @property
    def prefix_tokens(self) -> int:
        """Learned key/value prefix tokens per depth (0 unless ``relax`` is "prefix:N")."""
        return parse_relax(self.relax)[1]

    @property
    def embed_factorized(self) -> bool:
        """True when the input embedding or the head is stored as low-rank factors."""
        return self.embed_rank != "full" or self.head_rank not in (None, "full")

    def rank_of(self, layer: int, linear: str) -> int:
        """LoRA rank of one linear of one shared layer."""
        return self.layer_ranks.get(f"{layer}.{linear}", self.ranks.get(linear, 0))


def parse_embed_rank(value: int | str, option: str) -> int | str:
    """ "full" or a positive int (also from its decimal string): the rank of an embedding or head.

    Raises:
        ConfigError: anything else (0 would leave no embedding at all).
    """
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if value == "full" or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        return value
    raise ConfigError(f"{option} must be a positive integer or 'full', got {value!r}")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"unknown {name} {value!r}; choose one of: {', '.join(choices)}")


@dataclass
class SamplingConfig:
    """Decoding rule. temperature 0 means greedy; top_k 0 and top_p 1.0 disable those filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass(frozen=True)
class SpeculativeConfig:
    """Self-speculative decoding (modeling/speculative.py): draft with the first loops, verify with the rest.

    Attributes:
        draft_loops: b, the loops that draft (the exit head at loop b proposes each draft token);
            1 <= b < the model's loops.
        draft_tokens: d, draft tokens proposed per verify pass.
    """

    draft_loops: int = 1
    draft_tokens: int = 4

    def __post_init__(self) -> None:
        for name in ("draft_loops", "draft_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"speculative {name.replace('_', ' ')} must be a positive integer, got {value!r}")

    @property
    def spec(self) -> str:
        return f"{self.draft_loops}x{self.draft_tokens}"


def parse_speculative(spec: str) -> SpeculativeConfig:
    """``"BxD"`` (e.g. ``1x4``: draft with 1 loop, 4 tokens per verify pass) -> SpeculativeConfig."""
    loops, sep, tokens = spec.partition("x")
    if not sep or not loops.isdigit() or not tokens.isdigit() or int(loops) < 1 or int(tokens) < 1:
        raise ConfigError(f"--speculative takes BxD (draft loops x draft tokens, both positive), e.g. 1x4; got {spec!r}")
    return SpeculativeConfig(int(loops), int(tokens))
