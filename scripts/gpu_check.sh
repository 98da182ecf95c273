#!/usr/bin/env bash
# The GPU check, one command with an overall time limit; it writes a JSON summary ($OUT/gpu_check.json when
# $OUT is set, else ./gpu_check.json). On a CUDA machine: installs torch's CUDA build into .gpu-venv if the
# interpreter's torch sees no GPU, runs the device tests (RECURSIFY_TEST_DEVICE=cuda), uptrains SmolLM2 loops 3
# in bf16 with fused AdamW for ~2 minutes (tokens/s, MFU), then ~1 minute more with --compile, and runs bench-serve
# rows 1-5. Steps and variables: scripts/gpu_check.py.
#   scripts/gpu_check.sh             # the check (GPU_CHECK_TIME_LIMIT seconds, default 540)
#   scripts/gpu_check.sh --dry-run   # every step tiny on the CPU (tests/test_gpu_check.py runs this)
set -euo pipefail
cd "$(dirname "$0")/.."
limit=${GPU_CHECK_TIME_LIMIT:-540}
exec timeout --kill-after=15 "$((limit + 30))" "${PYTHON:-python3}" scripts/gpu_check.py --time-limit "$limit" "$@"
