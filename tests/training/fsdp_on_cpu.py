"""``python fsdp_on_cpu.py ARGS`` = ``recursify ARGS`` under accelerate's FSDP2 on CPU processes (tests only).

accelerate 1.15 turns an FSDP config into FSDP only when the launch's device type is a GPU (or another
accelerator): with ``ACCELERATE_USE_CPU=1`` it starts plain DDP over gloo instead, although torch's
FSDP2 (``fully_shard``) itself runs on CPU processes over gloo. This entry point makes accelerate's
shared state claim the GPU kind after it has set up the gloo process group and the CPU device, so the
real path runs: accelerate's ``fsdp2_prepare_model`` with the config's wrapping policy, torch's FSDP2
collectives, and uptrain's sharded checkpoints. Nothing else is changed; launch it with
``ACCELERATE_USE_CPU=1 accelerate launch --config_file <an FSDP config with use_cpu: true> fsdp_on_cpu.py``.
"""

from __future__ import annotations

import runpy
import sys

from accelerate import PartialState
from accelerate.utils import DistributedType

state = PartialState(cpu=True)  # gloo process group, CPU device
if state.distributed_type != DistributedType.MULTI_CPU:
    raise SystemExit(f"expected accelerate to start CPU processes (MULTI_CPU), got {state.distributed_type}")
state.distributed_type = DistributedType.MULTI_GPU  # the only change: accelerate now honours ACCELERATE_USE_FSDP
if sys.argv[1].endswith(".py"):  # a probe script: python fsdp_on_cpu.py probe.py ARGS
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
else:
    from recursify.cli import main

    sys.exit(main(sys.argv[1:]))
