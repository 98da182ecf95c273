"""configs/*.yaml: accelerate's own parser and launcher accept them and build the intended plugins (no GPU, no deepspeed)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from recursify import convert
from recursify.modeling.layers import SharedLayer
from recursify.training.config import UptrainConfig
from tiny import save_tiny_checkpoint

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
EXPECTED: dict[str, dict[str, Any]] = {
    "cpu": {"distributed_type": "NO", "num_processes": 1, "use_cpu": True, "mixed_precision": "no"},
    "cpu-2proc": {"distributed_type": "MULTI_GPU", "num_processes": 2, "use_cpu": True, "mixed_precision": "no"},
    "fsdp": {"distributed_type": "FSDP", "num_processes": 8, "use_cpu": False, "mixed_precision": "bf16"},
    "zero2": {"distributed_type": "DEEPSPEED", "num_processes": 8, "use_cpu": False, "mixed_precision": "bf16"},
    "zero3": {"distributed_type": "DEEPSPEED", "num_processes": 8, "use_cpu": False, "mixed_precision": "bf16"},
}


def _launch_args(name: str) -> tuple[Any, Any]:
    """What ``accelerate launch --config_file configs/NAME.yaml -m recursify uptrain`` resolves before starting processes."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / f"{name}.yaml"), "-m", "recursify", "uptrain"])
    args, defaults, _ = _validate_launch_command(args)
    return args, defaults


def test_the_recipe_has_exactly_these_configs() -> None:
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_parses_with_accelerates_config_classes(name: str) -> None:
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    config = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
    assert isinstance(config, ClusterConfig)
    fields = {"distributed_type": config.distributed_type.value, "num_processes": config.num_processes}
    fields |= {"use_cpu": config.use_cpu, "mixed_precision": config.mixed_precision}
    assert fields == EXPECTED[name]
    assert config.num_machines == 1
    # accelerate copies fsdp_config / deepspeed_config entries onto launch options by name and drops unknown ones
    # silently, so every key must be a real launch option.
    options = {action.dest for action in launch_command_parser()._actions}
    keys = [k if k.startswith("fsdp_") else f"fsdp_{k}" for k in config.fsdp_config] + list(config.deepspeed_config)
    assert not set(keys) - options


def test_fsdp_config_builds_an_fsdp2_plugin_that_wraps_each_shared_layer(tmp_path) -> None:
    from accelerate.utils import FullyShardedDataParallelPlugin, patch_environment
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from accelerate.utils.launch import prepare_multi_gpu_env

    args, _ = _launch_args("fsdp")
    assert args.use_fsdp and args.num_processes == 8 and args.mixed_precision == "bf16"
    env = {k: v for k, v in prepare_multi_gpu_env(args).items() if k.startswith(("ACCELERATE_", "FSDP_"))}
    with patch_environment(**env):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.transformer_cls_names_to_wrap == [SharedLayer.__name__]
    assert plugin.state_dict_type.name == "SHARDED_STATE_DICT" and not plugin.activation_checkpointing
    save_tiny_checkpoint(tmp_path, "llama")
    model = convert(str(tmp_path), loops=3, rank=4, init="average", progress=False)
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    assert policy is not None
    wrapped = [name for name, module in model.named_modules() if policy(module)]
    assert wrapped == [f"layers.{i}" for i in range(len(model.layers))]  # one unit per shared layer, embeddings in the root


@pytest.mark.parametrize(("name", "stage"), [("zero2", 2), ("zero3", 3)])
def test_deepspeed_configs_build_the_plugin_without_deepspeed(name: str, stage: int) -> None:
    from accelerate.utils import DeepSpeedPlugin, patch_environment
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    args, defaults = _launch_args(name)
    assert args.use_deepspeed and args.num_processes == 8
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
    _, env = prepare_deepspeed_cmd_env(args)
    with patch_environment(**{k: v for k, v in env.items() if k.startswith("ACCELERATE_")}):
        plugin = DeepSpeedPlugin()
    assert plugin.zero_stage == stage and plugin.deepspeed_config["zero_optimization"]["stage"] == stage
    assert plugin.offload_optimizer_device == plugin.offload_param_device == "none"
    assert plugin.gradient_clipping == UptrainConfig("s", "o", "t").clip  # the engine clips as uptrain --clip would
    assert plugin.zero3_save_16bit_model is (stage == 3)


PROBE = """
import json, sys
from accelerate import Accelerator
from recursify.data import read_documents
accelerator = Accelerator()
share = list(read_documents(sys.argv[1], "train", seed=3, rank=accelerator.process_index, world_size=accelerator.num_processes))
record = {"rank": accelerator.process_index, "world": accelerator.num_processes, "type": accelerator.distributed_type.value, "docs": share}
open(f"{sys.argv[2]}/rank{accelerator.process_index}.json", "w").write(json.dumps(record))
"""


@pytest.mark.slow
def test_two_cpu_processes_from_the_config_read_disjoint_shares(tmp_path) -> None:
    """configs/cpu-2proc.yaml really starts two gloo processes (and ``--cpu --num_processes 2`` does not)."""
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    assert launcher is not None, "accelerate's launcher is not installed next to this interpreter"
    docs = [f"document number {i} " + "word " * (i % 7) for i in range(200)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (tmp_path / "probe.py").write_text(PROBE)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    command = [launcher, "launch", "--config_file", str(CONFIGS / "cpu-2proc.yaml"), str(tmp_path / "probe.py")]
    result = subprocess.run([*command, str(tmp_path / "c.jsonl"), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [(r["rank"], r["world"], r["type"]) for r in records] == [(0, 2, "MULTI_CPU"), (1, 2, "MULTI_CPU")]
    from recursify.data import read_documents

    assert sorted(records[0]["docs"] + records[1]["docs"]) == sorted(read_documents(str(tmp_path / "c.jsonl"), "train", seed=3))
    assert not set(records[0]["docs"]) & set(records[1]["docs"])
    # The trap the config avoids: --cpu --num_processes 2 starts a single process of world size 1.
    for path in tmp_path.glob("rank*.json"):
        path.unlink()
    single = [launcher, "launch", "--cpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
    single += ["--dynamo_backend", "no", "--main_process_port", "0", str(tmp_path / "probe.py"), str(tmp_path / "c.jsonl"), str(tmp_path)]
    result = subprocess.run(single, env={**env, "ACCELERATE_USE_CPU": ""}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.glob("rank*.json")) == ["rank0.json"]
    assert json.loads((tmp_path / "rank0.json").read_text())["world"] == 1
