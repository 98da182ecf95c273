"""The machine's roofline and what a served token costs: the bounds every benchmark row is measured against.

``measure_roofline`` times torch itself on this CPU (with the current thread count): the fp32
matmul rate of a large square product (the compute bound) and the bandwidth of a copy far larger
than the caches (the memory bound). ``token_cost`` turns a run's counts into what one generated
token cost: FLOPs of every loop a token row ran (prompt rows in prefill included) and of every
LM-head row, and the bytes streamed: one loop's weights per loop step and the head's per head
call (shared by the batch of that step), plus the keys and values every row reads.
A row's throughput divided by ``flops_per_s / flops`` and by ``bytes_per_s / bytes`` says how
close it runs to either bound; a row with fewer FLOPs per token has a proportionally higher ceiling.
Propagate fills (keys/values of exited tokens at deeper loops) and norms are not counted.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from recursify.modeling.model import RecursiveModel


@dataclass
class Roofline:
    """Peak rates measured on this machine."""

    threads: int
    matmul_flops_per_s: float  # fp32, n x n x n product
    memory_bytes_per_s: float  # read + write of a copy much larger than the last-level cache
    matmul_size: int
    copy_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _best_seconds(work: Any, repeats: int) -> float:
    work()  # warm up (allocation, thread pool)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - start)
    return best


@torch.no_grad()
def measure_roofline(matmul_size: int = 1536, copy_mib: int = 512, repeats: int = 5) -> Roofline:
    """The fp32 matmul FLOP/s and the copy bandwidth torch reaches here, best of ``repeats``."""
    a, b = torch.randn(matmul_size, matmul_size), torch.randn(matmul_size, matmul_size)
    out = torch.empty(matmul_size, matmul_size)
    matmul_s = _best_seconds(lambda: torch.mm(a, b, out=out), repeats)
    source = torch.ones(copy_mib * 2**20 // 4)
    target = torch.empty_like(source)
    copy_s = _best_seconds(lambda: target.copy_(source), repeats)
    return Roofline(
        threads=torch.get_num_threads(),
        matmul_flops_per_s=2 * matmul_size**3 / matmul_s,
        memory_bytes_per_s=2 * source.nbytes / copy_s,  # each byte is read once and written once
        matmul_size=matmul_size,
        copy_bytes=source.nbytes,
    )


PER_VISIT = ("lora_A", "lora_B", "lora_R", "bias_delta", "prefix_keys", "prefix_values")  # stacked over a layer's visits


@dataclass
class ModelSizes:
    """Parameter counts that decide a decode step's cost."""

    loop_params: int  # every shared layer's weights and one visit's per-depth factors: what one loop multiplies by
    head_params: int  # vocab x hidden
    kv_width: int  # 2 x kv_heads x head_dim: key + value floats per depth and position
    depths_per_loop: int

    @classmethod
    def of(cls, model: RecursiveModel) -> ModelSizes:
        """Sizes of ``model``: shared weights count fully, per-depth tensors (stacked over visits) once."""
        loop_params = 0
        tensors = list(model.named_parameters()) + [(n, b) for n, b in model.named_buffers() if n.endswith((".lora_A", ".lora_B"))]
        for name, tensor in tensors:
            if not name.startswith("layers."):
                continue
            per_visit = name.rsplit(".", 1)[-1] in PER_VISIT or "norm" in name
            loop_params += tensor[0].numel() if per_visit else tensor.numel()
        return cls(
            loop_params=loop_params,
            head_params=model.arch.vocab_size * model.arch.hidden_size,
            kv_width=2 * model.arch.num_kv_heads * model.arch.head_dim,
            depths_per_loop=model.num_depths // model.loops,
        )


def token_cost(
    sizes: ModelSizes, loop_passes: float, head_rows: float, loop_steps: float, head_steps: float, context: float
) -> dict[str, float]:
    """FLOPs and bytes per generated token, from per-token counts of a run.

    Args:
        loop_passes: token rows run through one loop (prompt tokens in prefill and generated
            tokens, each loop counted), per generated token.
        head_rows: rows the LM head ran on, per generated token.
        loop_steps: forward calls of one loop over the batch (each streams that loop's weights once).
        head_steps: LM-head calls (each streams the head once).
        context: mean positions a row attends over.
    """
    attention = 2 * context * sizes.kv_width * sizes.depths_per_loop  # q.k and p.v per row and loop (GQA: per kv width)
    flops = 2 * (sizes.loop_params * loop_passes + sizes.head_params * head_rows) + attention * loop_passes
    kv_bytes = 4 * context * sizes.kv_width * sizes.depths_per_loop * loop_passes  # every row reads its keys and values
    weight_bytes = 4 * (sizes.loop_params * loop_steps + sizes.head_params * head_steps)
    return {"flops": flops, "bytes": weight_bytes + kv_bytes}
