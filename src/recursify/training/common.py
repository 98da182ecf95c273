"""What uptraining and healing share: the teacher, the precision, the student-with-exits module, held-out evaluation.

Both recipes distil a converted model from its original, so they open and check the teacher the same
way, pick the same compute precision, and report the same held-out numbers (per-exit CE and
perplexity, KL(teacher || student)): a healing run's "eval" records and an uptraining run's are
directly comparable because both come from ``evaluate`` here.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from recursify.checkpoint import read_config
from recursify.data import load_tokens, pack
from recursify.errors import ConfigError, DataError
from recursify.loading import load
from recursify.modeling.model import RecursiveModel
from recursify.text import precision_context, require_tokenizer
from recursify.training.exit_ensemble import ExitEnsemble
from recursify.training.losses import kd_divergence, next_token_ce

# AdamW betas of both recipes: the usual LLM-training pair (beta2 = 0.95, as in GPT-3 and Llama pretraining).
BETAS = (0.9, 0.95)


class ExitModel(nn.Module):
    """The student plus its optional exit ensemble, as one module for DDP: input ids -> exit logits."""

    def __init__(self, student: RecursiveModel, ensemble: ExitEnsemble | None, exits: bool):
        super().__init__()
        self.student, self.ensemble, self.exits = student, ensemble, exits

    def forward(self, input_ids: torch.Tensor) -> list[torch.Tensor]:
        out = self.student(input_ids, output_exits=self.exits)
        logits = out.exit_logits if out.exit_logits is not None else [out.logits]
        return self.ensemble(logits) if self.ensemble is not None else logits


def open_teacher(spec: str) -> RecursiveModel:
    """A frozen teacher: a recursify checkpoint as saved, or any --model source as the original (loops=1).

    The one place a teacher spec becomes a model, so uptraining and healing accept the same specs.
    """
    teacher = load(spec)
    teacher.requires_grad_(False)
    return teacher.eval()


def default_teacher(student_dir: str) -> str | None:
    """The model a checkpoint was converted from (its own original is the natural teacher)."""
    return read_config(student_dir).get("source", {}).get("spec") or None


def check_tokenizers(student: RecursiveModel, teacher: RecursiveModel) -> None:
    """Refuse a teacher whose vocabulary differs from the student's: KD over ids would be meaningless."""
    if student.arch.vocab_size != teacher.arch.vocab_size:
        raise ConfigError(
            f"student and teacher vocabularies differ ({student.arch.vocab_size} vs {teacher.arch.vocab_size} ids); "
            "pick the teacher the student was converted from"
        )
    student_tok, teacher_tok = require_tokenizer(student), teacher.tokenizer
    if teacher_tok is not None and (student_tok.get_vocab() != teacher_tok.get_vocab() or student_tok.eos_token != teacher_tok.eos_token):
        raise ConfigError(
            "student and teacher tokenizers differ (vocabulary or EOS token); pick the teacher the student was converted from"
        )


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> bf16 where the hardware computes in bf16 natively, else fp32."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and _cpu_has_bf16() else "fp32"


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: stay exact
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def teacher_logits(teacher: RecursiveModel | None, input_ids: torch.Tensor) -> torch.Tensor | None:
    """The teacher's logits for ``input_ids`` [batch, seq] -> [batch, seq, vocab], without a graph; None without a teacher."""
    if teacher is None:
        return None
    with torch.no_grad():
        return teacher(input_ids).logits


def heldout_rows(
    spec: str, tokenizer: Any, eval_tokens: int, seq_len: int, seed: int, teacher: RecursiveModel | None
) -> torch.Tensor | None:
    """The held-out split of ``spec`` packed into rows of ``seq_len`` for evaluation; None when ``eval_tokens`` is 0."""
    if eval_tokens == 0:
        return None
    try:
        tokens = load_tokens(spec, tokenizer, "heldout", eval_tokens, seed, teacher)
    except DataError as err:
        raise DataError(f"{err}; or pass --eval-tokens 0 to skip held-out evaluation") from err
    return pack(tokens, min(seq_len, tokens.numel()))


@torch.no_grad()
def exit_metrics(
    model: ExitModel, teacher: RecursiveModel | None, rows: torch.Tensor, micro_batch: int, precision: str
) -> dict[str, float]:
    """Held-out CE and perplexity per exit, and KL(teacher || student) per exit when there is a teacher."""
    was_training, exits = model.training, model.exits
    model.eval()
    model.exits = True
    sums: dict[str, float] = {}
    device = next(model.parameters()).device
    for chunk in rows.split(micro_batch):
        chunk = chunk.to(device)
        with precision_context(precision, device):
            exit_logits = model(chunk)
            target_logits = teacher_logits(teacher, chunk)
        share = chunk.shape[0] / rows.shape[0]
        for b, logits in enumerate(exit_logits, start=1):
            sums[f"ce/exit{b}"] = sums.get(f"ce/exit{b}", 0.0) + float(next_token_ce(logits, chunk)) * share
            if target_logits is not None:
                sums[f"kl/exit{b}"] = sums.get(f"kl/exit{b}", 0.0) + float(kd_divergence(logits, target_logits)) * share
    model.train(was_training)
    model.exits = exits
    last = len([k for k in sums if k.startswith("ce/")])
    sums["ppl"] = math.exp(sums[f"ce/exit{last}"])
    if teacher is not None:
        sums["kl"] = sums[f"kl/exit{last}"]
    return sums
