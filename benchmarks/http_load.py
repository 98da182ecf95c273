"""HTTP serving under load: N concurrent streaming clients against ``recursify serve``, beside the in-process engine.

One fixed-seed workload (token-id prompts, output lengths, and which clients disconnect after how
many tokens) runs through two arms, alternating for --rounds rounds (each arm keeps its fastest):

- engine: the same Engine in this process, all requests added at once, a disconnecting client's
  request cancelled once it has emitted as many tokens as that client reads;
- http: ``python -m recursify serve`` as a subprocess on a free 127.0.0.1 port, with --clients
  concurrent streaming clients (httpx, server-sent events) that send at once; the disconnecting ones
  close their connection after their share of tokens.

Reports requests/s, tokens/s, TTFT and inter-token latency p50/p99 per arm, the HTTP / engine
tokens/s ratio (best of each arm, and the median of each round's back-to-back ratio), the CPU time
each arm used for the same tokens (server process + clients vs the engine process: on a shared
machine wall-clock ratios swing with other jobs, CPU time much less), and checks:
every request completed or was cancelled (none lost or hung), no server errors, the server's own
counters agree with the clients', its KV blocks and batch are back to zero, and completed greedy
texts equal the engine's. Loopback only; bounded by --clients and --time-limit.
Writes benchmarks/results/http_load.json.

    recursify convert --model smollm2-135m --loops 3 --init stepwise --rank 0 --out /tmp/hs/r0
    OMP_NUM_THREADS=1 python benchmarks/http_load.py /tmp/hs/r0 --clients 64 --disconnect 0.2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from recursify import load
from recursify.files import write_json
from recursify.serving.benchmark import Workload, make_workload, percentile
from recursify.serving.config import EngineConfig
from recursify.serving.engine import Engine
from recursify.text import require_tokenizer

RESULTS = Path(__file__).parent / "results" / "http_load.json"
SRC = str(Path(__file__).resolve().parents[1] / "src")


@dataclass
class Outcome:
    """One client's request: when its tokens arrived, its text, and how it ended."""

    status: str = "lost"  # completed | cancelled | lost | error
    tokens: int = 0
    token_times: list[float] = field(default_factory=list)  # seconds since the round started, one per token
    text: str = ""
    detail: str = ""


@dataclass
class ArmResult:
    arm: str
    wall_s: float
    requests_per_s: float
    tokens_per_s: float
    tokens: int
    completed: int
    cancelled: int
    lost: int
    errors: int
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    cpu_s: float  # CPU time the arm used: the engine process, or the server process plus the clients
    tokens_per_cpu_s: float


def summarize(arm: str, outcomes: list[Outcome], wall: float, cpu: float) -> ArmResult:
    """TTFT from the round's start (all requests are sent at once); inter-token gaps within each request."""
    ttft = [1000 * out.token_times[0] for out in outcomes if out.token_times]
    itl = [1000 * (b - a) for out in outcomes for a, b in zip(out.token_times, out.token_times[1:], strict=False)]
    tokens = sum(out.tokens for out in outcomes)
    count = {status: sum(out.status == status for out in outcomes) for status in ("completed", "cancelled", "lost", "error")}
    return ArmResult(
        arm=arm,
        wall_s=wall,
        requests_per_s=(count["completed"] + count["cancelled"]) / wall,
        tokens_per_s=tokens / wall,
        tokens=tokens,
        completed=count["completed"],
        cancelled=count["cancelled"],
        lost=count["lost"],
        errors=count["error"],
        ttft_p50_ms=percentile(ttft, 0.5),
        ttft_p99_ms=percentile(ttft, 0.99),
        itl_p50_ms=percentile(itl, 0.5),
        itl_p99_ms=percentile(itl, 0.99),
        cpu_s=cpu,
        tokens_per_cpu_s=tokens / max(cpu, 1e-9),
    )


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def disconnect_plan(workload: Workload, share: float, seed: int) -> list[int | None]:
    """Per request: after how many tokens its client disconnects (None: reads to the end)."""
    rng = random.Random(seed + 7)
    plan: list[int | None] = [None] * len(workload.prompts)
    for i in rng.sample(range(len(plan)), round(share * len(plan))):
        plan[i] = rng.randint(1, max(1, workload.max_new_tokens[i] // 2))
    return plan


# --- the in-process engine ------------------------------------------------------------------------


def run_engine(engine: Engine, workload: Workload, cuts: list[int | None], time_limit: float) -> tuple[list[Outcome], float]:
    outcomes = [Outcome() for _ in workload.prompts]
    start = time.perf_counter()
    for i, prompt in enumerate(workload.prompts):
        engine.add_request(prompt, workload.max_new_tokens[i], request_id=str(i), arrival_time=start)
    while engine.has_unfinished() and time.perf_counter() - start < time_limit:
        for out in engine.step():
            i, cut = int(out.request_id), cuts[int(out.request_id)]
            outcomes[i].token_times = [t - start for t in out.token_times]
            outcomes[i].tokens, outcomes[i].text = len(out.token_ids), out.text or ""
            if out.finished:
                outcomes[i].status = "completed"
            elif cut is not None and len(out.token_ids) >= cut:
                engine.cancel(out.request_id)
                outcomes[i].status = "cancelled"
    wall = time.perf_counter() - start
    for request_id in list(engine.scheduler.requests):  # past the time limit: hung
        engine.cancel(request_id)
    return outcomes, wall


# --- HTTP ---------------------------------------------------------------------------------------------


async def one_client(http: httpx.AsyncClient, url: str, body: dict[str, Any], cut: int | None, start: float) -> Outcome:
    out = Outcome()
    pieces: list[str] = []
    try:
        async with http.stream("POST", url + "/v1/completions", json=body) as response:
            if response.status_code != 200:
                out.status, out.detail = "error", f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return out
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    out.status = "completed" if out.status == "finished" else "lost"
                    break
                event = json.loads(line[6:])
                if "error" in event:
                    out.status, out.detail = "error", str(event["error"])
                    break
                choice = event["choices"][0]
                arrived = len(event["recursify"]["loops_per_token"])
                out.token_times += [time.perf_counter() - start] * arrived
                out.tokens += arrived
                pieces.append(choice["text"])
                if choice["finish_reason"] is not None:
                    out.status = "finished"  # completed once [DONE] follows
                elif cut is not None and out.tokens >= cut:
                    out.status = "cancelled"
                    break  # leaving the block closes the connection: the server cancels the request
    except Exception as err:  # a transport error is a lost request
        out.status, out.detail = "lost", repr(err)
    if out.status == "finished":
        out.status, out.detail = "lost", "no [DONE] after the last chunk"
    out.text = "".join(pieces)
    return out


async def run_http(url: str, model: str, workload: Workload, cuts: list[int | None], time_limit: float) -> tuple[list[Outcome], float]:
    limits = httpx.Limits(max_connections=len(workload.prompts) + 8, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(time_limit)) as http:
        start = time.perf_counter()
        bodies = [
            {"model": model, "prompt": prompt, "max_tokens": new, "temperature": 0, "stream": True}
            for prompt, new in zip(workload.prompts, workload.max_new_tokens, strict=True)
        ]
        tasks = [asyncio.create_task(one_client(http, url, body, cut, start)) for body, cut in zip(bodies, cuts, strict=True)]
        done, pending = await asyncio.wait(tasks, timeout=time_limit)
        wall = time.perf_counter() - start
        for task in pending:  # hung past the time limit
            task.cancel()
        outcomes = [task.result() if task in done else Outcome(status="lost", detail="hung") for task in tasks]
    return outcomes, wall


def scrape(url: str) -> dict[str, float]:
    """The server's Prometheus samples, keyed like ``recursify_requests_total{status=cancelled}``."""
    samples = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[sample.name + (f"{{{labels}}}" if labels else "")] = float(sample.value)
    return samples


def server_check(url: str, before: dict[str, float], outcomes: list[Outcome]) -> dict[str, Any]:
    """After a round: the server is idle with no KV held, and its request counters add up to the clients'."""
    deadline = time.monotonic() + 30
    while True:
        after = scrape(url)
        idle = after["recursify_running_requests"] == 0 and after["recursify_waiting_requests"] == 0
        if (idle and after["recursify_kv_blocks_used"] == 0) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    finished = {
        status: after.get(f"recursify_requests_total{{status={status}}}", 0) - before.get(f"recursify_requests_total{{status={status}}}", 0)
        for status in ("stop", "length", "cancelled", "rejected", "invalid", "unavailable", "error")
    }
    return {
        "steps": after["recursify_step_seconds_count"] - before.get("recursify_step_seconds_count", 0),
        "kv_blocks_used": after["recursify_kv_blocks_used"],
        "running": after["recursify_running_requests"],
        "waiting": after["recursify_waiting_requests"],
        "server_finished": finished,
        "server_total_matches_clients": finished["stop"] + finished["length"] + finished["cancelled"] == len(outcomes),
        "server_errors": finished["error"] + finished["unavailable"] + finished["rejected"] + finished["invalid"],
    }


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen[str], str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = [sys.executable, "-m", "recursify", "serve", args.model, "--port", str(port), "--served-model-name", "bench"]
    argv += ["--batching", args.batching, "--max-batch", str(args.max_batch), "--exit", args.exit, "--max-waiting", str(args.clients)]
    argv += ["--log-level", "warning"]
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    server = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        if server.poll() is not None:
            raise SystemExit(f"the server exited: {server.communicate()[0]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return server, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            server.kill()
            raise SystemExit("the server did not come up within 300 s")
        time.sleep(0.3)


def print_table(rows: list[ArmResult]) -> None:
    header = f"{'arm':<8}{'req/s':>8}{'tok/s':>8}{'tokens':>8}{'done':>6}{'cut':>5}{'lost':>6}{'err':>5}"
    header += f"{'TTFT p50/p99 ms':>18}{'ITL p50/p99 ms':>17}{'CPU s':>7}{'tok/CPU-s':>10}"
    print(header + "\n" + "-" * len(header))
    for row in rows:
        print(
            f"{row.arm:<8}{row.requests_per_s:>8.2f}{row.tokens_per_s:>8.1f}{row.tokens:>8}{row.completed:>6}{row.cancelled:>5}{row.lost:>6}"
            f"{row.errors:>5}{f'{row.ttft_p50_ms:.0f}/{row.ttft_p99_ms:.0f}':>18}{f'{row.itl_p50_ms:.0f}/{row.itl_p99_ms:.0f}':>17}"
            f"{row.cpu_s:>7.1f}{row.tokens_per_cpu_s:>10.1f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="checkpoint directory or any model source")
    parser.add_argument("--clients", type=int, default=64, help="concurrent streaming clients, one request each")
    parser.add_argument("--disconnect", type=float, default=0.2, help="share of clients that close their stream early")
    parser.add_argument("--prompt-tokens", default="8,48")
    parser.add_argument("--new-tokens", default="16,32")
    parser.add_argument("--batching", default="depthwise")
    parser.add_argument("--max-batch", type=int, default=EngineConfig.max_batch)
    parser.add_argument("--exit", default="none")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; each arm keeps its fastest")
    parser.add_argument("--time-limit", type=float, default=600.0, help="seconds a round may take before requests count as hung")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=str(RESULTS))
    args = parser.parse_args()
    if not 1 <= args.clients <= 512 or not 0.0 <= args.disconnect <= 1.0:
        raise SystemExit("--clients must be in 1..512 and --disconnect in [0, 1]")

    model = load(args.model)
    low, high = (int(v) for v in args.prompt_tokens.split(","))
    new_low, new_high = (int(v) for v in args.new_tokens.split(","))
    workload = make_workload(require_tokenizer(model), args.clients, "all", args.seed, (low, high), (new_low, new_high))
    cuts = disconnect_plan(workload, args.disconnect, args.seed)
    config = EngineConfig(batching=args.batching, max_batch=args.max_batch, exit=args.exit)
    load_start = os.getloadavg()
    server, url = start_server(args)
    rounds: list[dict[str, Any]] = []
    try:
        for index in range(args.rounds):
            engine = Engine(model, config)
            cpu = time.process_time()
            engine_outcomes, engine_wall = run_engine(engine, workload, cuts, args.time_limit)
            engine_cpu = time.process_time() - cpu
            before = scrape(url)
            cpu, server_cpu = time.process_time(), process_cpu_s(server.pid)
            http_outcomes, http_wall = asyncio.run(run_http(url, "bench", workload, cuts, args.time_limit))
            http_cpu = time.process_time() - cpu + process_cpu_s(server.pid) - server_cpu
            check = server_check(url, before, http_outcomes)
            same_text = [
                e.text == h.text for e, h in zip(engine_outcomes, http_outcomes, strict=True) if e.status == h.status == "completed"
            ]
            rows = [summarize("engine", engine_outcomes, engine_wall, engine_cpu), summarize("http", http_outcomes, http_wall, http_cpu)]
            problems = [out.detail for out in http_outcomes if out.status in ("lost", "error")][:5]
            rounds.append({
                "round": index, "engine": asdict(rows[0]), "http": asdict(rows[1]), "server": check,
                "engine_kv_blocks_used": engine.allocator.used_blocks, "engine_steps": engine.stats.steps,
                "completed_text_equal": f"{sum(same_text)}/{len(same_text)}",
                "problems": problems, "load_avg": os.getloadavg(),
            })  # fmt: skip
            print(f"\n== round {index + 1}/{args.rounds} ==")
            print_table(rows)
            print(f"server after the round: {check}; engine steps {engine.stats.steps}; "
                  f"completed texts equal to the engine's: {sum(same_text)}/{len(same_text)}")  # fmt: skip
            if problems:
                print("problems:", problems)
    finally:
        server.terminate()
        exit_status = server.wait(timeout=60)

    best = {arm: max((r[arm] for r in rounds), key=lambda row: row["tokens_per_s"]) for arm in ("engine", "http")}
    ratio = best["http"]["tokens_per_s"] / best["engine"]["tokens_per_s"]
    paired = sorted(r["http"]["tokens_per_s"] / r["engine"]["tokens_per_s"] for r in rounds)  # each round's arms ran back to back
    per_token = {arm: sum(r[arm]["cpu_s"] for r in rounds) / sum(r[arm]["tokens"] for r in rounds) for arm in ("engine", "http")}
    cpu_ratio = per_token["http"] / per_token["engine"]
    checks = {
        "lost": sum(r["http"]["lost"] + r["engine"]["lost"] for r in rounds),
        "errors": sum(r["http"]["errors"] for r in rounds) + sum(r["server"]["server_errors"] for r in rounds),
        "kv_back_to_zero": all(r["server"]["kv_blocks_used"] == 0 and r["engine_kv_blocks_used"] == 0 for r in rounds),
        "server_counts_match": all(r["server"]["server_total_matches_clients"] for r in rounds),
        "server_exit_status": exit_status,
    }
    print("\n== best of each arm ==")
    print_table([ArmResult(**best["engine"]), ArmResult(**best["http"])])
    print(f"HTTP / engine tokens/s: {ratio:.3f} best of each arm, {statistics.median(paired):.3f} median of the rounds' ratios "
          f"({', '.join(f'{value:.2f}' for value in paired)}); goal >= 0.9")  # fmt: skip
    print(f"CPU time per token, HTTP (server + clients) / engine: {cpu_ratio:.3f} (the HTTP layer's cost, robust to other load)")
    print(f"checks: {checks}")
    report = {
        "command": "python " + " ".join(sys.argv),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "load_avg_start": load_start,
        "workload": {**workload.description, "disconnecting": sum(cut is not None for cut in cuts)},
        "engine_config": asdict(config),
        "rounds": rounds,
        "best": best,
        "http_over_engine_tokens_per_s": ratio,
        "round_ratios": paired,
        "median_round_ratio": statistics.median(paired),
        "http_over_engine_cpu_per_token": cpu_ratio,
        "checks": checks,
    }
    write_json(args.json, report)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
