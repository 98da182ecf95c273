"""Plan an uptraining run on GPUs before renting them: parameters, memory per GPU, batch, speed, wall time.

Everything is computed from the architecture alone (no weights are read): a built-in table of
published configs (``BUILTIN_ARCHITECTURES``), a local Hugging Face config dir / ``config.json``, or a
hub id whose ``config.json`` is reachable. The accounting, per GPU:

- parameters: the converted student (shared layers, per-depth LoRA + norms, embeddings) counted on a
  meta-device ``RecursiveModel`` (the class training builds, so every family's quirks are included),
  and the teacher, the original model (loops 1);
- model states (mixed precision, ZeRO accounting): per trainable parameter 2 B bf16 weights, 2 B bf16
  gradients and 12 B AdamW state (fp32 master copy + two fp32 moments). ``ddp`` replicates all three;
  ``zero2`` shards gradients and AdamW state over the GPUs; ``zero3`` and ``fsdp`` (full shard) shard
  all three and gather bf16 weights per wrapping unit while it computes (counted: the embedding /
  LM-head unit plus two ``SharedLayer`` units, the running one and the prefetched one);
- teacher: bf16 weights, replicated on every GPU (it only runs forward passes and lives outside the
  sharded training module, as ``training/uptrain.py`` prepares it);
- activations, bytes per token per layer visit (bf16 autocast, the layout of ``modeling/layers.py``):
  ``26h + 4q + 4kv + 8f + 2s + 4n`` where h = hidden size, q = heads x head_dim, kv = KV heads x
  head_dim, f = MLP width, s = --seq-len, n = attention heads. Each RMSNorm keeps its fp32 input and
  fp32 normalised output (8h, twice); autocast keeps a bf16 copy of the normalised input per linear
  (6h for q/k/v, 4h for gate/up); attention keeps q, k, v and its output in bf16 (4q + 4kv), the
  log-sum-exp (4n) and the explicit attention mask as a bf16 bias (2s); the MLP keeps gate, up,
  silu(gate) and their product (8f). Sandwich norms add 16h, q/k norms 8q + 8kv, LoRA 10h + 2R
  (a bf16 copy of the input of each of the five linears reading the residual, and the rank-r
  projections; R = the sum of the seven linears' ranks, 7r at a uniform rank r). The formula is
  checked against the bytes autograd actually saves in ``tests/test_planning.py``. Soft-capped
  attention (Gemma2) cannot use SDPA and keeps the s x s scores: + 8ns + 4(q - kv) - 4n - s (tanh
  output and bf16 probabilities 2 B each, fp32 probabilities 4 B, keys and values repeated per
  head, a bool mask instead of the bf16 bias, no log-sum-exp).
  Per token, outside the layers: ``10h`` (final norm and head input) + ``20V`` for the KD loss over
  the vocabulary V (bf16 logits of student and teacher, fp32 log-probabilities of both, the
  teacher's probabilities and the log-ratio alive at the loss's peak) + ``8 d k`` RoPE tables (d =
  head_dim, k = layer types). Without checkpointing all L visits are kept; with activation
  checkpointing per layer visit only each visit's fp32 input (4h) is kept and one visit is
  recomputed at a time: ``L*4h + A_visit + outside``;
- the largest micro-batch of --seq-len sequences that fits in ``100 - RESERVE_PERCENT`` % of the GPU memory
  after the model states (the reserve covers the CUDA context, NCCL buffers and fragmentation);
- FLOPs per token, PaLM's model-FLOPs convention (no causal halving, recomputation not counted):
  ``6 N_s + 12 L s q`` for the student (N_s = weights a token is multiplied by: every depth's visit
  of its shared layer with its LoRA, plus the LM head) and ``2 N_t + 4 L s q`` for the online
  teacher's forward; tokens/s = MFU x GPUs x peak FLOP/s / FLOPs per token.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from recursify.config import LINEARS, ArchConfig, RecursionConfig
from recursify.errors import ConfigError, SourceError

SHARDINGS = ("ddp", "zero2", "zero3", "fsdp")
RESERVE_PERCENT = 10  # of GPU memory: CUDA context, NCCL buffers, allocator fragmentation
PAPER_BATCH_TOKENS = 1024 * 2048  # the paper's ~2M-token batches: 1024 sequences of 2048
PAPER_TOKEN_BUDGETS = (15 * 10**9, 60 * 10**9)
WEIGHT_BYTES, GRAD_BYTES, ADAM_BYTES, TEACHER_BYTES = 2, 2, 12, 2
# Dense bf16 tensor-core peak FLOP/s per device, by a word of its CUDA name (see ``peak_flops``).
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12}

# Published config.json values of the Hugging Face checkpoints (google/gemma-2b, Qwen/Qwen2.5-1.5B,
# HuggingFaceTB/SmolLM2-135M), copied for planning without network access; only the fields that set
# parameter counts, activations and FLOPs matter here.
BUILTIN_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "gemma-2b": {
        "model_type": "gemma",
        "vocab_size": 256000,
        "hidden_size": 2048,
        "intermediate_size": 16384,
        "num_hidden_layers": 18,
        "num_attention_heads": 8,
        "num_key_value_heads": 1,
        "head_dim": 256,
        "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": True,
        "bos_token_id": 2,
        "eos_token_id": 1,
        "pad_token_id": 0,
    },
    "qwen2.5-1.5b": {
        "model_type": "qwen2",
        "vocab_size": 151936,
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "max_position_embeddings": 131072,
        "tie_word_embeddings": True,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
    },
    "smollm2-135m": {
        "model_type": "llama",
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": True,
        "bos_token_id": 0,
        "eos_token_id": 0,
    },
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?$", re.IGNORECASE)


def parse_bytes(text: str) -> int:
    """``"80G"``, ``"80GiB"``, ``"141GB"`` -> bytes; every suffix is binary (G = 2**30), as GPU memory is quoted."""
    match = _SIZE.match(text.strip())
    if not match or float(match.group(1)) <= 0:
        raise ConfigError(f"expected a memory size like 80G or 141GiB, got {text!r}")
    return int(float(match.group(1)) * 1024 ** "_kmgt".index(match.group(2).lower() or "_"))


@dataclass(frozen=True)
class ParamCounts:
    """Parameters of one model by role, plus the weights each token is multiplied by.

    Attributes:
        embedding: token embedding (and an untied LM head).
        shared: tied weights of the shared layers, tied norms and the final norm.
        per_depth: what each depth owns: LoRA factors, bias residuals, per-depth norm gains.
        matmul_per_token: weights in the matmuls one token goes through: every depth's visit of its
            shared layer (with that depth's LoRA) and the LM head (the FLOPs count).
        largest_layer: parameters of the largest shared layer (a sharding unit).
    """

    embedding: int
    shared: int
    per_depth: int
    matmul_per_token: int
    largest_layer: int

    @property
    def total(self) -> int:
        return self.embedding + self.shared + self.per_depth


def count_params(arch: ArchConfig, recursion: RecursionConfig) -> ParamCounts:
    """Counts of the model ``convert`` would build, from a meta-device model (no memory, no weights)."""
    import torch

    from recursify.modeling.layers import linear_shapes
    from recursify.modeling.model import RecursiveModel, lora_rank, parameter_group

    with torch.device("meta"):
        model = RecursiveModel(arch, recursion)
    groups = {"embedding": 0, "shared": 0, "per_depth": 0}
    for name, param in model.named_parameters():
        group = parameter_group(name)
        if group == "non_embedding":  # a norm keeping one gain per visit belongs to its depths
            group = "per_depth" if name.endswith("norm.weight") and param.shape[0] > 1 else "shared"
        groups["per_depth" if group == "lora" else group] += param.numel()
    shapes = linear_shapes(arch)
    matmul = arch.vocab_size * arch.hidden_size
    for slot in model.schedule:
        for linear in LINEARS:
            fan_in, fan_out = shapes[linear]
            matmul += fan_in * fan_out + lora_rank(recursion, model.schedule, slot.layer, linear) * (fan_in + fan_out)
    largest = max(sum(p.numel() for p in layer.parameters()) for layer in model.layers)
    return ParamCounts(groups["embedding"], groups["shared"], groups["per_depth"], matmul, largest)


def activation_bytes_per_visit(arch: ArchConfig, seq_len: int, lora_ranks: int) -> int:
    """Bytes kept for the backward pass per token per layer visit (see the module doc for each term).

    ``lora_ranks``: the sum of the LoRA ranks of a layer's seven linears (0 = no LoRA).
    """
    h, f, heads = arch.hidden_size, arch.intermediate_size, arch.num_heads
    q, kv = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    total = 26 * h + 4 * q + 4 * kv + 8 * f + 2 * seq_len + 4 * heads
    if arch.sandwich_norms:
        total += 16 * h
    if arch.qk_norm:
        total += 8 * q + 8 * kv
    if arch.attn_softcap is not None:  # Gemma2's explicit attention: s x s scores kept, keys/values repeated per head
        total += 8 * heads * seq_len + 4 * (q - kv) - 4 * heads - seq_len
    if lora_ranks > 0:
        total += 10 * h + 2 * lora_ranks
    return total


def outside_bytes_per_token(arch: ArchConfig) -> int:
    """Bytes per token outside the layers: final norm + head input, the KD loss over the vocabulary, RoPE tables."""
    return 10 * arch.hidden_size + 20 * arch.vocab_size + 8 * arch.head_dim * len(arch.rope_kinds)


@dataclass
class TrainPlanConfig:
    """What ``recursify plan-train`` is asked (validated before anything is resolved)."""

    model: str
    loops: int
    rank: int | str = 0
    gpus: int = 8
    gpu_mem: int = 80 * 2**30
    seq_len: int = 2048
    mfu: float = 0.4
    sharding: str = "fsdp"
    gpu_flops: float = 989e12
    batch_tokens: int = PAPER_BATCH_TOKENS
    strategy: str = "cycle"

    def __post_init__(self) -> None:
        if self.sharding not in SHARDINGS:
            raise ConfigError(f"unknown sharding {self.sharding!r}; choose one of: {', '.join(SHARDINGS)}")
        for name in ("loops", "gpus", "gpu_mem", "seq_len", "batch_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if not 0 < self.mfu <= 1:
            raise ConfigError(f"--mfu must be in (0, 1], got {self.mfu}")
        if not self.gpu_flops > 0:
            raise ConfigError(f"--gpu-flops must be positive, got {self.gpu_flops}")


@dataclass
class BatchFit:
    """The largest micro-batch that fits and the accumulation that reaches the target batch."""

    activation_bytes_per_token: int
    micro_batch: int  # sequences per GPU per forward; 0 = not even one fits
    accumulation: int
    global_sequences: int

    @property
    def fits(self) -> bool:
        return self.micro_batch > 0


@dataclass
class TrainPlan:
    """Every number ``plan-train`` prints; ``memory`` holds bytes per GPU by row."""

    config: TrainPlanConfig
    architecture: str
    unique_layers: int
    depths: int
    student: ParamCounts
    teacher: ParamCounts
    memory: dict[str, int]
    usable_bytes: int
    activation_bytes_per_visit: int
    no_checkpointing: BatchFit
    checkpointing: BatchFit
    flops_per_token: float
    tokens_per_s: float
    hours: dict[int, float] = field(default_factory=dict)

    @property
    def static_bytes(self) -> int:
        return sum(self.memory.values())

    def to_dict(self) -> dict[str, Any]:
        payload = asdict(self)
        for name in ("student", "teacher"):
            payload[name]["total"] = getattr(self, name).total
        payload["static_bytes"] = self.static_bytes
        payload["hours"] = {str(tokens): hours for tokens, hours in self.hours.items()}
        return payload


def resolve_architecture(source: str) -> tuple[ArchConfig, str]:
    """(architecture, where it came from) for a built-in name, a local HF config dir or config.json, or a hub id.

    Only a config is read; for a hub id that is transformers' download of its config.json.
    """
    from transformers import AutoConfig

    from recursify.conversion.weight_map import arch_from_hf

    key = source.lower()
    path = Path(source).expanduser()
    if key not in BUILTIN_ARCHITECTURES and not path.exists() and not _HUB_ID.match(source):
        known = ", ".join(BUILTIN_ARCHITECTURES)
        raise SourceError(f"{source!r} is not a built-in architecture ({known}), a config.json or directory, or a hub id owner/name")
    if key in BUILTIN_ARCHITECTURES:
        values = dict(BUILTIN_ARCHITECTURES[key])
        return arch_from_hf(AutoConfig.for_model(values.pop("model_type"), **values)), f"{key} (built-in table of published config values)"
    if path.is_file():
        try:
            values = json.loads(path.read_text())
            hf_config = AutoConfig.for_model(values.pop("model_type"), **values)
        except (OSError, ValueError, KeyError, AttributeError) as err:
            raise SourceError(f"{path} is not a Hugging Face config.json with a model_type ({err})") from err
        return arch_from_hf(hf_config), f"config {path}"
    try:
        hf_config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        known = ", ".join(BUILTIN_ARCHITECTURES)
        raise SourceError(
            f"cannot read an architecture config from {source!r} ({str(err).splitlines()[0]}); pass a local config.json, "
            f"a model directory holding one, or a built-in name: {known}"
        ) from err
    return arch_from_hf(hf_config), f"config of {source}"


def plan_training(config: TrainPlanConfig) -> TrainPlan:
    """The plan for uptraining ``config.model`` as a loops-B (rank-R) student with online KD."""
    from recursify.conversion.lora_init import resolve_ranks
    from recursify.modeling.layers import linear_shapes
    from recursify.modeling.schedule import check_loops, num_unique_layers

    arch, origin = resolve_architecture(config.model)
    check_loops(arch.num_layers, config.loops, config.strategy)
    ranks = resolve_ranks(config.rank, linear_shapes(arch))
    recursion = RecursionConfig(loops=config.loops, strategy=config.strategy, ranks=ranks)
    student = count_params(arch, recursion)
    teacher = count_params(arch, RecursionConfig(loops=1))
    gpus, trainable = config.gpus, student.total
    sharded_grads = config.sharding != "ddp"
    sharded_weights = config.sharding in ("zero3", "fsdp")
    memory = {
        "weights (bf16)": _share(WEIGHT_BYTES * trainable, gpus, sharded_weights),
        "gradients (bf16)": _share(GRAD_BYTES * trainable, gpus, sharded_grads),
        "AdamW (fp32 master + 2 moments)": _share(ADAM_BYTES * trainable, gpus, sharded_grads),
        "teacher weights (bf16, replicated)": TEACHER_BYTES * teacher.total,
    }
    if sharded_weights:
        memory["gathered units (bf16)"] = WEIGHT_BYTES * (student.embedding + 2 * student.largest_layer)
    usable = config.gpu_mem * (100 - RESERVE_PERCENT) // 100
    per_visit = activation_bytes_per_visit(arch, config.seq_len, sum(ranks.values()))
    outside = outside_bytes_per_token(arch)
    free = usable - sum(memory.values())
    full = _fit(arch.num_layers * per_visit + outside, free, config)
    checkpointed = _fit(arch.num_layers * 4 * arch.hidden_size + per_visit + outside, free, config)
    flops = model_flops_per_token(arch, student, config.seq_len, training=True)
    flops += model_flops_per_token(arch, teacher, config.seq_len, training=False)
    tokens_per_s = config.mfu * gpus * config.gpu_flops / flops
    return TrainPlan(
        config=config,
        architecture=origin,
        unique_layers=num_unique_layers(arch.num_layers, config.loops, config.strategy),
        depths=arch.num_layers,
        student=student,
        teacher=teacher,
        memory=memory,
        usable_bytes=usable,
        activation_bytes_per_visit=per_visit,
        no_checkpointing=full,
        checkpointing=checkpointed,
        flops_per_token=float(flops),
        tokens_per_s=tokens_per_s,
        hours={tokens: tokens / tokens_per_s / 3600 for tokens in PAPER_TOKEN_BUDGETS},
    )


def model_flops_per_token(arch: ArchConfig, counts: ParamCounts, seq_len: int, training: bool) -> int:
    """Model FLOPs per token (PaLM's convention): ``6N + 12Lsq`` for a training step, ``2N + 4Lsq`` for a forward.

    N = ``counts.matmul_per_token``, L = depths, s = sequence length, q = heads x head_dim. Shared by
    ``plan-train`` (its tokens/s) and ``uptrain`` (the MFU it logs), so both count the same work.
    """
    attention = arch.num_layers * seq_len * arch.num_heads * arch.head_dim
    return (6 * counts.matmul_per_token + 12 * attention) if training else (2 * counts.matmul_per_token + 4 * attention)


def peak_flops(device_name: str, precision: str) -> float | None:
    """Dense bf16 peak FLOP/s of one accelerator from its name (``torch.cuda.get_device_name``); None when unknown.

    Values from the vendors' data sheets (tensor cores, no sparsity). fp32 gets None: its peak depends
    on whether TF32 tensor cores are enabled, and CPUs are not in the table either (cores, clocks and
    vector units vary), so for those ``uptrain --peak-flops`` declares the peak.
    """
    if precision != "bf16":
        return None
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if re.search(rf"\b{key}\b", device_name)), None)


def _share(nbytes: int, gpus: int, sharded: bool) -> int:
    return math.ceil(nbytes / gpus) if sharded else nbytes


def _fit(bytes_per_token: int, free: int, config: TrainPlanConfig) -> BatchFit:
    micro = max(0, free // (bytes_per_token * config.seq_len))
    target = math.ceil(config.batch_tokens / config.seq_len)
    accumulation = math.ceil(target / (config.gpus * micro)) if micro else 0
    return BatchFit(bytes_per_token, micro, accumulation, config.gpus * micro * accumulation)


def format_plan(plan: TrainPlan) -> str:
    """The table ``recursify plan-train`` prints."""
    c, s, t = plan.config, plan.student, plan.teacher
    gib = 2**30
    lines = [
        f"model       {plan.architecture}",
        f"student     loops {c.loops}: {plan.unique_layers} shared layers unrolled over {plan.depths} depths, LoRA rank {c.rank}; "
        "teacher: the original (loops 1), online KD",
        f"cluster     {c.gpus} GPUs x {c.gpu_mem / gib:.0f} GiB ({100 - RESERVE_PERCENT}% usable), {c.sharding}, "
        f"seq-len {c.seq_len}, peak {c.gpu_flops / 1e12:.0f} TFLOP/s per GPU at MFU {c.mfu}",
        "",
        f"{'parameters':<34}{'student':>16}{'teacher':>16}",
    ]
    for label, name in (("shared layers", "shared"), ("per-depth (LoRA, norms)", "per_depth"), ("embedding", "embedding")):
        lines.append(f"{label:<34}{getattr(s, name):>16,}{getattr(t, name):>16,}")
    lines.append(f"{'total':<34}{s.total:>16,}{t.total:>16,}")
    lines.append(f"{'weights per token (FLOPs count)':<34}{s.matmul_per_token:>16,}{t.matmul_per_token:>16,}")
    lines += ["", f"{'memory per GPU':<42}{'GiB':>10}"]
    lines += [f"{label:<42}{nbytes / gib:>10.2f}" for label, nbytes in plan.memory.items()]
    lines.append(f"{'model states + teacher':<42}{plan.static_bytes / gib:>10.2f}")
    lines.append(f"{'left for activations':<42}{(plan.usable_bytes - plan.static_bytes) / gib:>10.2f}")
    lines += ["", f"activations: {plan.activation_bytes_per_visit:,} bytes per token per layer visit", ""]
    lines.append(f"{'':<30}{'bytes/token':>14}{'micro-batch':>13}{'grad accum':>12}{'global batch (tokens)':>24}")
    for label, fit in (("no activation checkpointing", plan.no_checkpointing), ("activation checkpointing", plan.checkpointing)):
        if fit.fits:
            batch = f"{fit.global_sequences} x {c.seq_len} = {fit.global_sequences * c.seq_len:,}"
            lines.append(f"{label:<30}{fit.activation_bytes_per_token:>14,}{fit.micro_batch:>13}{fit.accumulation:>12}{batch:>24}")
        else:
            lines.append(f"{label:<30}{fit.activation_bytes_per_token:>14,}{'does not fit':>13}")
    lines += [
        "",
        f"FLOPs per token {plan.flops_per_token:.3e} (student training 6N + 12Lsq, teacher forward 2N + 4Lsq)",
        f"expected {plan.tokens_per_s:,.0f} tokens/s at MFU {c.mfu}",
    ]
    lines += [f"{tokens / 1e9:.0f}B tokens: {hours:,.1f} h ({hours / 24:.1f} days)" for tokens, hours in plan.hours.items()]
    if not plan.checkpointing.fits:
        lines.append("nothing fits: shard more (zero3 / fsdp), use more GPUs, or shorten --seq-len")
    return "\n".join(lines)
