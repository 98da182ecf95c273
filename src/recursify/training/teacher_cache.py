"""Teacher logits cached once per dataset: the original's top-k log-probabilities on every training row.

Online KD runs the teacher in every training step (about a fifth of a KD step on a CPU for SmolLM2).
The teacher is frozen and the training rows are fixed, so its outputs can be computed once, kept
sparse (top-k log-probabilities and the log of the leftover mass, ``losses.SparseTargets``) and
reused by every run on the same rows: several conversions distilled from one teacher on one data set
(the demo trains six) pay for the teacher once. KD on the cached top-k compares the distributions
over the k tokens plus "any other token" (``losses.kd_divergence``); at k = vocab it is full KD.

Files live under ``cache_root()/data/teacher-logits/``, keyed by the teacher's fingerprint, the rows'
digest, k, the temperature and the precision; they hold indices (int32), log-probabilities and the
leftover mass (float32) as safetensors, 8k + 4 bytes per token.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import torch

from recursify.modeling.model import RecursiveModel
from recursify.text import precision_context
from recursify.training.losses import SparseTargets, top_k_targets

CACHE_DIR = "teacher-logits"


def cache_path(teacher: RecursiveModel, rows: torch.Tensor, k: int, temperature: float, precision: str) -> Path:
    """Where the targets of ``teacher`` on ``rows`` [n, seq] are cached."""
    from recursify.data import model_fingerprint
    from recursify.sources import cache_root

    digest = hashlib.sha256(str(tuple(rows.shape)).encode() + rows.cpu().numpy().tobytes()).hexdigest()[:16]
    name = f"{model_fingerprint(teacher)}-{digest}-k{k}-t{temperature:g}-{precision}.safetensors"
    return cache_root() / "data" / CACHE_DIR / name


@torch.no_grad()
def compute_targets(
    teacher: RecursiveModel,
    rows: torch.Tensor,
    k: int,
    temperature: float = 1.0,
    micro_batch: int = 4,
    precision: str = "fp32",
    progress: bool = False,
) -> SparseTargets:
    """The teacher's top-k targets on every row [n, seq] -> SparseTargets [n, seq, k] (on the CPU)."""
    from tqdm.auto import tqdm

    parts = []
    for chunk in tqdm(rows.split(micro_batch), desc="teacher top-k", unit="batch", leave=False, disable=not progress):
        with precision_context(precision, teacher.device):
            logits = teacher(chunk.to(teacher.device)).logits
        targets = top_k_targets(logits, k, temperature)
        parts.append(SparseTargets(targets.indices.int().cpu(), targets.log_probs.cpu(), targets.rest.cpu()))
    return SparseTargets(torch.cat([p.indices for p in parts]), torch.cat([p.log_probs for p in parts]), torch.cat([p.rest for p in parts]))


def save_targets(path: Path, targets: SparseTargets) -> None:
    """Write targets as safetensors, atomically."""
    from safetensors.torch import save

    from recursify.files import write_bytes

    tensors = {"indices": targets.indices.int().contiguous(), "log_probs": targets.log_probs.float().contiguous()}
    write_bytes(path, save({**tensors, "rest": targets.rest.float().contiguous()}))


def load_targets(path: Path) -> SparseTargets:
    """Read targets written by ``save_targets`` (safetensors: no pickle)."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    return SparseTargets(tensors["indices"], tensors["log_probs"], tensors["rest"])


def teacher_targets(
    teacher: RecursiveModel,
    rows: torch.Tensor,
    k: int,
    temperature: float = 1.0,
    micro_batch: int = 4,
    precision: str = "fp32",
    progress: bool = False,
) -> tuple[SparseTargets, dict[str, Any]]:
    """The cached targets of ``teacher`` on ``rows``, computed and stored on first use.

    Returns the targets and what it cost: {"k", "path", "built" (computed now, not read), "cpu_minutes"
    (process CPU time of computing or reading them)}.
    """
    path = cache_path(teacher, rows, k, temperature, precision)
    began = time.process_time()
    built = not path.is_file()
    if built:
        targets = compute_targets(teacher, rows, k, temperature, micro_batch, precision, progress)
        save_targets(path, targets)
    else:
        targets = load_targets(path)
    info = {"k": k, "path": str(path), "built": built, "cpu_minutes": (time.process_time() - began) / 60}
    return targets, info
