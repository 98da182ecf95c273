"""FSDP2 on two CPU processes (gloo), launched by accelerate from configs/fsdp.yaml's FSDP settings.

accelerate 1.15 runs FSDP only where the launch's device type is a GPU; torch's FSDP2 itself runs on
CPU processes over gloo. ``fsdp_on_cpu.py`` makes accelerate take its FSDP path on the CPU (see its
docstring), so these tests run the real thing: accelerate's FSDP2 preparation with the shipped config's
policy (one unit per SharedLayer, embeddings in the root), torch's sharded collectives, and uptrain's
sharded checkpoints. What they show:

- the tied-gradient contract: a weight that the shared layer uses at depths 0 and 10, and the tied
  embedding / LM head, get the sum of both uses' gradients after an FSDP backward (an unsharded
  single-process reference computes each use's share apart);
- the 2-process FSDP loss curve equals the 1-process one (same global batches) within rel 1e-4, and
  its consolidated model.safetensors opens with ``recursify.load`` on one process;
- the shipped config's bf16 mixed precision trains within 3% of the fp32 curve and saves fp32 weights;
- sharded save -> SIGKILL -> resume continues bit-identically to an uninterrupted FSDP run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from recursify import convert, load
from recursify.training.checkpointing import latest_checkpoint
from recursify.training.config import UptrainConfig
from recursify.training.metrics import read_metrics
from recursify.training.uptrain import uptrain
from tiny import tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[2]
ENTRY = Path(__file__).with_name("fsdp_on_cpu.py")
STEPS, SAVE_EVERY = 30, 3
OPTIONS = dict(tokens=STEPS * 128, seq_len=16, batch_tokens=128, micro_batch=2, lr=3e-3, precision="fp32", warmup_steps=0)
OPTIONS |= dict(save_every=SAVE_EVERY, eval_tokens=256, quiet=True)


def _cpu_config(directory: Path, mixed_precision: str) -> Path:
    """configs/fsdp.yaml's FSDP settings on 2 CPU processes."""
    config = yaml.safe_load((ROOT / "configs" / "fsdp.yaml").read_text())
    config.update(num_processes=2, use_cpu=True, mixed_precision=mixed_precision, main_process_port=0)
    path = directory / f"fsdp-2cpu-{mixed_precision}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def fsdp_config(tmp_path_factory) -> Path:
    """In fp32, so that sharded and unsharded runs can be compared tightly (the bf16 config has its own test)."""
    return _cpu_config(tmp_path_factory.mktemp("fsdp"), "no")


def _launch(fsdp_config: Path, args: list[str], **popen: Any) -> subprocess.Popen[str]:
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    assert launcher is not None, "accelerate's launcher is not installed next to this interpreter"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    command = [launcher, "launch", "--config_file", str(fsdp_config), str(ENTRY), *args]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _run(fsdp_config: Path, args: list[str]) -> None:
    process = _launch(fsdp_config, args)
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-4000:]


def _uptrain_args(tiny_run: dict[str, Path], out: Path, *extra: str) -> list[str]:
    args = ["uptrain", str(tiny_run["student"]), "--teacher", str(tiny_run["source"]), "--data", str(tiny_run["data"])]
    for key, value in OPTIONS.items():
        flag = f"--{key.replace('_', '-')}"
        args += [flag] if value is True else [flag, str(value)]
    return [*args, "--out", str(out), *extra]


def _train_losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(out / "metrics.jsonl") if r["event"] == "train"]


@pytest.fixture(scope="module")
def fsdp_run(tiny_run, fsdp_config, tmp_path_factory) -> Path:
    """An uninterrupted 2-process FSDP uptraining run (checkpoints every 3 steps)."""
    out = tmp_path_factory.mktemp("fsdp_run") / "straight"
    _run(fsdp_config, _uptrain_args(tiny_run, out))
    return out


@pytest.mark.slow  # a 2-process launch (~30 s): kept out of the fast tier (make check < 2 min)
def test_fsdp_follows_the_single_process_loss_curve(tiny_run, fsdp_run, tmp_path) -> None:
    config = UptrainConfig(str(tiny_run["student"]), str(tmp_path / "single"), str(tiny_run["source"]), str(tiny_run["data"]), **OPTIONS)
    uptrain(config)
    fsdp, single = _train_losses(fsdp_run), _train_losses(tmp_path / "single")
    assert [s for s, _ in fsdp] == [s for s, _ in single] == list(range(1, STEPS + 1))
    assert [loss for _, loss in fsdp] == pytest.approx([loss for _, loss in single], rel=1e-4)
    assert single[-1][1] < 0.8 * single[0][1]  # it trains, so equal curves are not two flat lines
    evals = [[r["kl"] for r in read_metrics(run / "metrics.jsonl") if r["event"] == "eval"] for run in (fsdp_run, tmp_path / "single")]
    assert evals[0] == pytest.approx(evals[1], rel=1e-4)  # every process evaluated the sharded model together
    # The consolidated checkpoint is a normal recursify checkpoint on one process, and holds the same weights.
    sharded, reference = load(fsdp_run).state_dict(), load(tmp_path / "single").state_dict()
    assert sharded.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(sharded[name], reference[name], rtol=1e-3, atol=1e-5)
    # The optimizer state was saved sharded: one file per process, each holding half of a layer's AdamW moments.
    step_dir = latest_checkpoint(fsdp_run).directory
    assert json.loads((step_dir / "state.json").read_text())["world_size"] == 2
    shards = sorted((step_dir / "optimizer").glob("*.safetensors"))
    assert len(shards) == 2
    key, full_rows = "state.student.layers.0.q.weight.exp_avg", reference["layers.0.q.weight"].shape[0]
    rows = []
    for shard in shards:
        with safe_open(str(shard), "pt") as handle:
            rows.append(handle.get_slice(key).get_shape()[0])
    assert rows == [full_rows // 2, full_rows - full_rows // 2]


@pytest.mark.slow  # one more 2-process launch
def test_fsdp_with_the_shipped_bf16_mixed_precision_trains_close_to_fp32(tiny_run, fsdp_run, tmp_path) -> None:
    """configs/fsdp.yaml's own precision: FSDP2 keeps fp32 master weights, computes in bf16 (+ uptrain's bf16 autocast)."""
    out = tmp_path / "bf16"
    _run(_cpu_config(tmp_path, "bf16"), _uptrain_args(tiny_run, out, "--precision", "bf16"))
    bf16, fp32 = _train_losses(out), _train_losses(fsdp_run)
    assert [s for s, _ in bf16] == [s for s, _ in fp32]
    assert [loss for _, loss in bf16] == pytest.approx([loss for _, loss in fp32], rel=3e-2)
    assert [loss for _, loss in bf16] != [loss for _, loss in fp32]  # it did compute in bf16
    assert {tensor.dtype for tensor in load_file(str(out / "model.safetensors")).values()} == {torch.float32}


@pytest.mark.slow  # two 2-process launches (~1 min)
def test_fsdp_resume_after_sigkill_is_exact(tiny_run, fsdp_config, fsdp_run, tmp_path) -> None:
    killed = tmp_path / "killed"
    process = _launch(fsdp_config, _uptrain_args(tiny_run, killed))
    deadline = time.time() + 300
    while not (killed / "training" / "LATEST").is_file() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    # The launcher and both training processes at once, as a lost machine would (torchrun starts its workers in
    # sessions of their own, so killing the launcher's process group would leave them running).
    tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    assert len(tree) >= 3, "the run finished before it could be killed"
    for member in tree:
        member.send_signal(signal.SIGKILL)
    process.communicate()
    interrupted_at = latest_checkpoint(killed).step
    assert 0 < interrupted_at < STEPS
    _run(fsdp_config, _uptrain_args(tiny_run, killed, "--resume"))
    assert _train_losses(killed) == _train_losses(fsdp_run)  # bit-identical: same process count, deterministic gloo sums
    resumed, straight = load_file(str(killed / "model.safetensors")), load_file(str(fsdp_run / "model.safetensors"))
    assert resumed.keys() == straight.keys() and all(torch.equal(resumed[k], straight[k]) for k in straight)


PROBE = """
import sys
import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from recursify import load

accelerator = Accelerator()
model = load(sys.argv[1]).train()
model, _ = accelerator.prepare(model, torch.optim.AdamW(model.parameters()))  # FSDP2 needs the optimizer along
ids = load_file(sys.argv[2])["ids"]  # [4, seq]: this process takes its 2 rows, as uptrain does
share = ids.shape[0] // accelerator.num_processes
mine = ids[accelerator.process_index * share : (accelerator.process_index + 1) * share]
logits = model(mine).logits
loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), mine[:, 1:].flatten())
accelerator.backward(loss)
kind = type(model.layers[0].q.weight).__name__
grads = {name: p.grad.full_tensor() for name, p in model.named_parameters() if p.grad is not None}
if accelerator.is_main_process:
    save_file(grads, sys.argv[3], {"distributed_type": accelerator.distributed_type.value, "param_type": kind})
"""


@pytest.mark.slow  # a 2-process launch (~20 s)
def test_tied_weights_get_every_use_gradient_under_fsdp(fsdp_config, tmp_path) -> None:
    """Shared layer 0 runs at depths 0 and 10 (20 layers, loops 2); the embedding is also the LM head (Qwen2 ties them)."""
    source = tiny_model("qwen2", seed=1, num_hidden_layers=20)
    source.save_pretrained(tmp_path / "source")
    tiny_tokenizer().save_pretrained(tmp_path / "source")
    student = convert(str(tmp_path / "source"), loops=2, rank=4, init="average", progress=False)
    assert [slot.depth for slot in student.schedule if slot.layer == 0] == [0, 10]
    assert student.lm_head is None  # tied embeddings
    student.save_pretrained(str(tmp_path / "student"))
    ids = torch.randint(3, 97, (4, 12), generator=torch.Generator().manual_seed(0))
    save_file({"ids": ids}, str(tmp_path / "ids.safetensors"))
    (tmp_path / "probe.py").write_text(PROBE)
    _run(
        fsdp_config,
        [str(tmp_path / "probe.py"), str(tmp_path / "student"), str(tmp_path / "ids.safetensors"), str(tmp_path / "grads.safetensors")],
    )
    with safe_open(str(tmp_path / "grads.safetensors"), "pt") as handle:
        assert handle.metadata() == {"distributed_type": "FSDP", "param_type": "DTensor"}  # really sharded
    sharded = load_file(str(tmp_path / "grads.safetensors"))

    # Unsharded reference on one process over all 4 rows, with each use of the two tied tensors given its own leaf.
    model = load(tmp_path / "student").train()
    layer, embedding = model.layers[0], model.embed.weight
    depth10_weight = layer.q.weight.detach().clone().requires_grad_(True)
    head_weight = embedding.detach().clone().requires_grad_(True)
    calls = []

    def second_visit_uses_its_own_leaf(module: Any, args: Any) -> None:
        calls.append(1)
        module.q._parameters["weight"] = depth10_weight if len(calls) == 2 else layer_weight

    layer_weight = layer.q.weight
    layer.register_forward_pre_hook(second_visit_uses_its_own_leaf)
    model.head = lambda h: torch.nn.functional.linear(model.final_norm(h), head_weight)  # the LM head's use of the embedding
    logits = model(ids).logits
    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    assert len(calls) == 2
    depth0, depth10 = layer_weight.grad, depth10_weight.grad
    lookup, head = embedding.grad, head_weight.grad
    assert depth0 is not None and depth10 is not None and lookup is not None and head is not None
    assert depth10.norm() > 0.1 * depth0.norm() and lookup.norm() > 0.01 * head.norm()  # both uses matter
    torch.testing.assert_close(sharded["layers.0.q.weight"], depth0 + depth10, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(sharded["embed.weight"], lookup + head, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(sharded["layers.0.q.weight"], depth0, rtol=1e-2, atol=1e-4)
