"""Prometheus metrics of one server (its own registry, so several servers can live in one process)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from recursify.serving.engine import Engine, RequestOutput

STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ServerMetrics:
    """Request outcomes, tokens and loops, and the engine's queue, batch, KV blocks and step time.

    ``recursify_requests_total`` counts requests by ``status``: the engine's finish reasons (stop,
    length, cancelled) and the HTTP refusals (rejected = 429, invalid = 400/404, unavailable = 503,
    error = 500). Mean loops per token = ``recursify_token_loops_total / recursify_generated_tokens_total``,
    also exported directly as a gauge.
    """

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("recursify_requests", "Requests by final status", ["status"], registry=r)
        self.tokens = Counter("recursify_generated_tokens", "Tokens generated", registry=r)
        self.loops = Counter("recursify_token_loops", "Loops run by generated tokens (sum over tokens)", registry=r)
        self.mean_loops = Gauge("recursify_mean_loops_per_token", "Mean loops per generated token so far", registry=r)
        self.preemptions = Gauge("recursify_preemptions", "Requests preempted so far (KV freed, recomputed later)", registry=r)
        self.waiting = Gauge("recursify_waiting_requests", "Requests accepted but not running", registry=r)
        self.running = Gauge("recursify_running_requests", "Requests in the running batch", registry=r)
        self.kv_used = Gauge("recursify_kv_blocks_used", "KV blocks held by running requests", registry=r)
        self.kv_total = Gauge("recursify_kv_blocks_total", "KV blocks in the pool", registry=r)
        self.step = Histogram("recursify_step_seconds", "One engine step (one loop over the batch)", buckets=STEP_BUCKETS, registry=r)
        self._tokens = self._loops = 0  # running sums for the mean (engine thread only)

    def observe_engine(self, engine: Engine, waiting: int, step_s: float | None) -> None:
        """After every engine iteration (engine thread)."""
        self.waiting.set(waiting)
        self.running.set(len(engine.scheduler.running))
        self.kv_used.set(engine.allocator.used_blocks)
        self.kv_total.set(engine.allocator.num_blocks)
        self.preemptions.set(engine.scheduler.preemptions)
        if step_s is not None:
            self.step.observe(step_s)

    def observe_finished(self, output: RequestOutput) -> None:
        """A request the engine finished (engine thread)."""
        self.requests.labels(status=output.finish_reason or "unknown").inc()
        self.tokens.inc(len(output.token_ids))
        self.loops.inc(sum(output.loops_run))
        self._tokens += len(output.token_ids)
        self._loops += sum(output.loops_run)
        if self._tokens:
            self.mean_loops.set(self._loops / self._tokens)

    def refused(self, status: int) -> None:
        """An HTTP request answered with an error status before (or instead of) reaching the engine."""
        label = {429: "rejected", 503: "unavailable", 500: "error"}.get(status, "invalid")
        self.requests.labels(status=label).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
