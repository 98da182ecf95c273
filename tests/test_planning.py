"""plan-train: parameter counts, memory, batch, FLOPs and time, against hand derivations and the real model."""

from __future__ import annotations

import json

import pytest
import torch

from recursify import convert
from recursify.cli import main
from recursify.config import RecursionConfig
from recursify.errors import ConfigError, SourceError
from recursify.planning import (
    TrainPlanConfig,
    activation_bytes_per_visit,
    count_params,
    model_flops_per_token,
    parse_bytes,
    peak_flops,
    plan_training,
    resolve_architecture,
)
from tiny import FAMILIES, save_tiny_checkpoint

GIB = 2**30


def test_smollm2_loops3_on_eight_80g_gpus_matches_the_hand_derivation() -> None:
    """SmolLM2-135M (h 576, 9 heads x 64, 3 KV heads, MLP 1536, 30 layers, vocab 49152, tied), loops 3, rank 0, fsdp."""
    plan = plan_training(TrainPlanConfig("smollm2-135m", loops=3))
    # One layer's linears: q, o 576*576 = 331,776 each; k, v 576*192 = 110,592 each; gate/up/down 576*1536 = 884,736 each
    # -> 3,538,944; two norms of 576. Loops 3 keeps 10 shared layers, each serving 3 depths with its own norm gains.
    assert plan.student.shared == 10 * 3_538_944 + 576  # + the final norm
    assert plan.student.per_depth == 10 * 2 * 3 * 576 == 34_560
    assert plan.student.embedding == 49_152 * 576 == 28_311_552
    assert plan.student.total == 63_736_128
    assert plan.teacher.total == 30 * (3_538_944 + 2 * 576) + 576 + 28_311_552 == 134_515_008  # SmolLM2-135M's published size
    assert plan.student.matmul_per_token == plan.teacher.matmul_per_token == 30 * 3_538_944 + 28_311_552 == 134_479_872
    # fsdp on 8 GPUs: 2 + 2 + 12 bytes per trainable parameter, all sharded by 8; the teacher in bf16 on every GPU;
    # gathered bf16 units: the embedding and two shared layers (3,538,944 + 3 * 2 * 576 = 3,542,400 parameters each).
    assert plan.memory == {
        "weights (bf16)": 15_934_032,
        "gradients (bf16)": 15_934_032,
        "AdamW (fp32 master + 2 moments)": 95_604_192,
        "teacher weights (bf16, replicated)": 269_030_016,
        "gathered units (bf16)": 2 * (28_311_552 + 2 * 3_542_400),
    }
    # Per visit: 26*576 + 4*576 + 4*192 + 8*1536 + 2*2048 + 4*9 = 14,976 + 2,304 + 768 + 12,288 + 4,096 + 36.
    assert plan.activation_bytes_per_visit == 34_468
    # Outside the layers: 10*576 + 20*49,152 + 8*64 = 989,312; all 30 visits kept, or 30 fp32 inputs + one visit.
    assert plan.no_checkpointing.activation_bytes_per_token == 30 * 34_468 + 989_312 == 2_023_352
    assert plan.checkpointing.activation_bytes_per_token == 30 * 4 * 576 + 34_468 + 989_312 == 1_092_900
    # Free: 90% of 80 GiB = 77,309,411,328 minus 467,294,976 of model states = 76,842,116,352 bytes.
    # 76,842,116,352 / (2,023,352 * 2048) = 18.5 -> 18 sequences; 1024 sequences per step / (8 * 18) -> 8 accumulations.
    assert (plan.no_checkpointing.micro_batch, plan.no_checkpointing.accumulation, plan.no_checkpointing.global_sequences) == (18, 8, 1152)
    # 76,842,116,352 / (1,092,900 * 2048) = 34.3 -> 34; 1024 / 272 -> 4 accumulations.
    assert (plan.checkpointing.micro_batch, plan.checkpointing.accumulation, plan.checkpointing.global_sequences) == (34, 4, 1088)
    # FLOPs: 6 * 134,479,872 + 12 * (30 * 2048 * 576) + 2 * 134,479,872 + 4 * (30 * 2048 * 576) = 1,642,070,016.
    assert plan.flops_per_token == 1_642_070_016
    assert plan.tokens_per_s == pytest.approx(0.4 * 8 * 989e12 / 1_642_070_016)  # 1,927,323 tokens/s
    assert plan.hours[15 * 10**9] == pytest.approx(15e9 / 1_927_323.4 / 3600, rel=1e-6)  # 2.16 h


def test_gemma_2b_loops2_rank128_zero2_hand_derivation() -> None:
    """Gemma 2B (h 2048, 8 heads x 256, 1 KV head, MLP 16384, 18 layers, vocab 256000), loops 2, rank 128, ZeRO-2 on 8 GPUs."""
    plan = plan_training(TrainPlanConfig("gemma-2b", loops=2, rank=128, sharding="zero2", gpu_mem=80 * GIB))
    # LoRA per depth: q, o 128*(2048+2048) = 524,288; k, v 128*(2048+256) = 294,912; gate/up/down 128*(2048+16384) = 2,359,296
    # -> 8,716,288 per depth, 18 depths; plus per-depth norms 9 layers * 2 norms * 2 visits * 2048.
    assert plan.student.per_depth == 18 * 8_716_288 + 73_728 == 156_966_912
    assert plan.student.shared == 9 * 110_100_480 + 2048  # linears: 2*4,194,304 + 2*524,288 + 3*33,554,432
    assert plan.teacher.total == 2_506_172_416  # Gemma 2B's published size
    trainable = 524_288_000 + 990_906_368 + 156_966_912
    assert plan.memory == {
        "weights (bf16)": 2 * trainable,  # ZeRO-2 keeps full weights
        "gradients (bf16)": 2 * trainable // 8,
        "AdamW (fp32 master + 2 moments)": 12 * trainable // 8,
        "teacher weights (bf16, replicated)": 2 * 2_506_172_416,
    }
    # Student FLOPs see every depth: 18 * 110,100,480 + 18 * 8,716,288 + the head 256,000 * 2048.
    assert plan.student.matmul_per_token == 18 * (110_100_480 + 8_716_288) + 524_288_000


def test_sharding_strategies_divide_what_they_shard() -> None:
    plans = {kind: plan_training(TrainPlanConfig("qwen2.5-1.5b", loops=2, gpus=4, sharding=kind)) for kind in ("ddp", "zero2", "zero3")}
    ddp, zero2, zero3 = (plans[k].memory for k in ("ddp", "zero2", "zero3"))
    trainable = plans["ddp"].student.total
    assert ddp["weights (bf16)"] == zero2["weights (bf16)"] == 2 * trainable
    assert ddp["AdamW (fp32 master + 2 moments)"] == 4 * zero2["AdamW (fp32 master + 2 moments)"] == 12 * trainable
    assert zero3["weights (bf16)"] == 2 * trainable // 4 and "gathered units (bf16)" in zero3 and "gathered units (bf16)" not in zero2
    assert plans["ddp"].static_bytes > plans["zero2"].static_bytes > plans["zero3"].static_bytes


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
def test_counts_equal_the_converted_model(family: str, tmp_path) -> None:
    """From the config.json alone, the counts equal those of the model ``convert`` builds from the weights."""
    save_tiny_checkpoint(tmp_path, family)
    arch, origin = resolve_architecture(str(tmp_path / "config.json"))
    assert origin.startswith("config ")
    model = convert(str(tmp_path), loops=3, rank=4, init="average", progress=False)
    counts = count_params(arch, model.recursion)
    params = model.param_counts()
    assert counts.embedding == params["embedding"]
    assert counts.shared + counts.per_depth == params["non_embedding"] + params["lora"]
    assert counts.per_depth >= params["lora"] > 0
    assert count_params(arch, convert(str(tmp_path), loops=1, progress=False).recursion).total == params["source_total"]


def _saved_bytes_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """Bytes autograd keeps for backward per token of a bf16-autocast forward (weights excluded: two batch sizes, differenced)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def saved(batch: int) -> int:
        storages: dict[int, int] = {}

        def keep(tensor: torch.Tensor) -> torch.Tensor:
            if tensor.untyped_storage().data_ptr() not in params:
                storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        ids = torch.randint(4, 97, (batch, seq_len), generator=torch.Generator().manual_seed(0))
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            model(ids)
        return sum(storages.values())

    return (saved(4) - saved(2)) / (2 * seq_len)


@pytest.mark.parametrize("family", FAMILIES)
def test_activation_formula_matches_what_autograd_saves(family: str, tmp_path) -> None:
    save_tiny_checkpoint(tmp_path, family)
    for loops, rank in ((1, 0), (3, 4)):
        model = convert(str(tmp_path), loops=loops, rank=rank, init="average", progress=False).train()
        arch, seq_len = model.arch, 32
        per_visit = activation_bytes_per_visit(arch, seq_len, sum(model.recursion.ranks.values()))
        # Outside the layers in a forward: final norm + head input (10h), RoPE tables (8 d per layer type), int64 ids.
        expected = arch.num_layers * per_visit + 10 * arch.hidden_size + 8 * arch.head_dim * len(arch.rope_kinds) + 8
        assert _saved_bytes_per_token(model, seq_len) == pytest.approx(expected, rel=0.02)


def test_nothing_fits_and_bad_options() -> None:
    plan = plan_training(TrainPlanConfig("gemma-2b", loops=2, gpus=1, gpu_mem=8 * GIB, sharding="ddp"))
    assert not plan.checkpointing.fits and plan.checkpointing.accumulation == 0
    with pytest.raises(ConfigError, match="valid loops: 1, 2, 4, 7, 14, 28"):
        plan_training(TrainPlanConfig("qwen2.5-1.5b", loops=3))
    with pytest.raises(ConfigError, match="sharding"):
        TrainPlanConfig("gemma-2b", loops=2, sharding="zero1")
    with pytest.raises(ConfigError, match="mfu"):
        TrainPlanConfig("gemma-2b", loops=2, mfu=1.5)
    with pytest.raises(SourceError, match="built-in"):
        resolve_architecture("no-such-model")
    assert parse_bytes("80G") == 80 * GIB and parse_bytes("141GiB") == 141 * GIB and parse_bytes("512M") == 512 * 2**20
    for bad in ("", "80X", "-1G", "0G"):
        with pytest.raises(ConfigError):
            parse_bytes(bad)


def test_cli_prints_the_table_and_json(tmp_path, capsys) -> None:
    out = tmp_path / "plan.json"
    assert main(["plan-train", "--model", "smollm2-135m", "--loops", "3", "--gpus", "8", "--gpu-mem", "80G", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "63,736,128" in printed and "1,927,323 tokens/s" in printed and "activation checkpointing" in printed
    payload = json.loads(out.read_text())
    assert payload["student"]["total"] == 63_736_128 and payload["checkpointing"]["micro_batch"] == 34
    assert main(["plan-train", "--model", "qwen2.5-1.5b", "--loops", "3"]) == 2
    assert "valid loops" in capsys.readouterr().err


def test_flops_per_token_and_known_peaks() -> None:
    arch, _ = resolve_architecture("smollm2-135m")
    counts = count_params(arch, RecursionConfig(loops=1))
    # 134,479,872 weights per token; L*s*q = 30 * 2048 * 576 = 35,389,440.
    assert model_flops_per_token(arch, counts, 2048, training=True) == 6 * 134_479_872 + 12 * 35_389_440
    assert model_flops_per_token(arch, counts, 2048, training=False) == 2 * 134_479_872 + 4 * 35_389_440
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989e12 and peak_flops("NVIDIA A100-SXM4-80GB", "bf16") == 312e12
    assert peak_flops("NVIDIA L4", "bf16") == 121e12 and peak_flops("NVIDIA L40S", "bf16") == 362e12  # L4 is not L40S
    assert peak_flops("NVIDIA H100 80GB HBM3", "fp32") is None and peak_flops("Some Future GPU", "bf16") is None
