"""The serving engine: a request queue and a step loop over the scheduler and the model runner.

``Engine.generate`` yields every request's output as soon as it finishes; ``Engine.stream`` yields
each new token as it is sampled; ``add_request`` / ``step`` / ``cancel`` drive it by hand (the
benchmark does, to replay arrival times). The same engine serves vanilla models (loops=1) and
recursive ones; the batching policy, exit policy and KV mode are flags (docs/method.md sections 6-7).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from recursify.config import SamplingConfig, SpeculativeConfig, parse_speculative
from recursify.errors import ConfigError
from recursify.evaluation.loglikelihood import model_max_length
from recursify.modeling.model import RecursiveModel
from recursify.modeling.speculative import SpeculativeStats, check_draft_loops, speculative_rounds
from recursify.serving.config import EngineConfig
from recursify.serving.exit_policy import parse_exit_policy
from recursify.serving.kv_cache import BlockAllocator, KVPool
from recursify.serving.request import Request
from recursify.serving.runner import ModelRunner, block_size_of
from recursify.serving.scheduler import Scheduler, StepEvents
from recursify.text import precision_context


@dataclass
class RequestOutput:
    """A request's state as seen by the caller (a snapshot; times are ``time.perf_counter`` seconds).

    Attributes:
        new_token_ids: tokens emitted in the step that produced this snapshot.
        loops_run: per generated token, the loops it ran (B without early exits).
        oracle_loops: with exit=oracle, per token, the loops an oracle exit would have run.
        preemptions: how often the request lost its KV blocks to older requests and was recomputed.
    """

    request_id: str
    prompt_ids: list[int]
    token_ids: list[int]
    new_token_ids: list[int]
    text: str | None
    finished: bool
    finish_reason: str | None
    arrival_time: float
    first_token_time: float | None
    finish_time: float | None
    token_times: list[float] = field(default_factory=list)
    loops_run: list[int] = field(default_factory=list)
    oracle_loops: list[int] = field(default_factory=list)
    preemptions: int = 0


@dataclass
class EngineStats:
    """Where the time went, summed over steps: scheduling + bookkeeping vs running the model."""

    steps: int = 0
    items: int = 0
    head_rows: int = 0  # rows the LM head ran on
    head_steps: int = 0  # steps in which it ran
    row_loops: int = 0  # token rows run through one loop (prefill and decode; propagate fills excluded)
    schedule_s: float = 0.0
    execute_s: float = 0.0
    update_s: float = 0.0
    preemptions: int = 0


@dataclass
class _Session:
    """The request a speculative engine is decoding, and its round generator (modeling/speculative.py)."""

    request: Request
    rounds: Iterator[list[list[int]]]
    done: list[bool]

    @classmethod
    def start(cls, model: RecursiveModel, request: Request, config: SpeculativeConfig | None, stats: SpeculativeStats) -> _Session:
        assert config is not None
        sampling = request.sampling
        generator = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
        prompt = torch.tensor([request.prompt_ids], device=model.device)
        done = [False]
        rounds = speculative_rounds(
            model, prompt, torch.ones_like(prompt), request.max_new_tokens, sampling, generator, config, stats, done
        )
        return cls(request, rounds, done)

    def advance(self) -> list[int]:
        """The next round's tokens (the first call: the prefill's token)."""
        with torch.no_grad():
            return next(self.rounds)[0]


class Engine:
    """Continuous batching server for a RecursiveModel (see EngineConfig for the options)."""

    def __init__(self, model: RecursiveModel, config: EngineConfig | None = None, **options: Any):
        self.config = config or EngineConfig(**options)
        self.model = model.eval()
        self.tokenizer = model.tokenizer
        block_size_of(model)  # fail early on models whose depths are not one looped block
        self.policy = parse_exit_policy(self.config.exit, model.loops, model.addons)
        num_blocks = self.config.max_kv_tokens // self.config.block_size
        self.allocator = BlockAllocator(num_blocks, self.config.block_size)
        self.pool = KVPool(num_blocks, self.config.block_size, model.num_depths, model.arch.num_kv_heads, model.arch.head_dim)
        self.scheduler = Scheduler(
            model.loops,
            self.config.batching,
            self.config.max_batch,
            self.allocator,
            kv_mode=self.config.kv_mode,
            max_prefill_chunk=self.config.max_prefill_chunk,
            oracle=self.policy.kind == "oracle",
        )
        self.runner = ModelRunner(model, self.pool, self.policy, self.config.kv_mode)
        self.max_model_len = self.config.max_model_len or model_max_length(model)
        self.speculative = parse_speculative(self.config.speculative) if self.config.speculative else None
        if self.speculative is not None:
            check_draft_loops(self.speculative, model.loops)
        self.speculative_stats = SpeculativeStats()
        self._session: _Session | None = None
        self.stats = EngineStats()
        self._ids = itertools.count()
        self._stops: dict[str, list[str]] = {}
        precision_context(self.config.precision)  # validate now rather than at the first step

    @classmethod
    def from_pretrained(cls, path: str, **options: Any) -> Engine:
        """Serve a recursify checkpoint directory, or any model source as the original (loops=1)."""
        from recursify.loading import load

        return cls(load(path), EngineConfig(**options))

    # --- requests ---------------------------------------------------------------------------

    def add_request(
        self,
        prompt: str | Sequence[int],
        max_new_tokens: int = 32,
        sampling: SamplingConfig | None = None,
        stop: Sequence[str] = (),
        stop_token_ids: Sequence[int] | None = None,
        request_id: str | None = None,
        arrival_time: float | None = None,
    ) -> str:
        """Queue a prompt (text, or token ids); returns its request id.

        Args:
            max_new_tokens: capped so that prompt + output fit ``max_model_len`` (see ``new_tokens_allowed``).
            stop: strings that end the request; the text is cut before the first one.
            stop_token_ids: tokens that end it (emitted); the model's EOS ids when None, [] for none.
        """
        prompt_ids = self.encode(prompt)
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        max_new_tokens = min(max_new_tokens, self.new_tokens_allowed(len(prompt_ids)))
        if stop and self.tokenizer is None:
            raise ConfigError("stop strings need a model with a tokenizer; pass stop_token_ids instead")
        eos = self._eos_ids() if stop_token_ids is None else set(stop_token_ids)
        request = Request(
            request_id=request_id if request_id is not None else f"req-{next(self._ids)}",
            prompt_ids=prompt_ids,
            max_new_tokens=max_new_tokens,
            sampling=sampling or SamplingConfig(),
            stop_token_ids=frozenset(eos),
            arrival_time=time.perf_counter() if arrival_time is None else arrival_time,
        )
        self.scheduler.add(request)
        if stop:
            self._stops[request.request_id] = list(stop)
        return request.request_id

    def new_tokens_allowed(self, prompt_tokens: int) -> int:
        """The most tokens a prompt of this length may generate: prompt + output fit the context and the KV pool.

        A request must fit the KV pool alone (prompt + output - 1 positions), so that the oldest running
        request can always progress once newer ones are preempted. Raises ConfigError for prompts that
        leave no room for one new token.
        """
        capacity = self.allocator.capacity_tokens
        limit = min(self.max_model_len, capacity + 1)
        if prompt_tokens >= limit:
            context, pool = f"the context is {self.max_model_len} tokens", f"the KV pool holds {capacity} positions"
            which = context if limit == self.max_model_len else pool
            raise ConfigError(
                f"the prompt has {prompt_tokens} tokens but at most {limit - 1} fit ({which}, and one new token needs room); shorten it"
            )
        return limit - prompt_tokens

    def cancel(self, request_id: str) -> RequestOutput | None:
        """Stop a request now; returns its final output, or None if it is unknown or already finished."""
        request = self.scheduler.finish(request_id, "cancelled")
        if request is None:
            return None
        request.finish_time = time.perf_counter()
        output = self._output(request, [])
        self._stops.pop(request_id, None)
        return output

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # --- stepping ---------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one step (one loop of the shared block over the batch); outputs of requests that emitted or finished.

        With ``speculative``, a step is one draft-and-verify round of the one running request.
        """
        if self.speculative is not None:
            return self._speculative_step()
        t0 = time.perf_counter()
        plan = self.scheduler.schedule()
        for request_id in plan.admitted:
            request = self.scheduler.requests[request_id]
            if not request.preemptions:  # a resumed request keeps its sampler where it stopped
                self.runner.register(request_id, request.sampling)
        t1 = time.perf_counter()
        rows, steps, row_loops = self.runner.head_rows, self.runner.head_steps, self.runner.row_loops
        with precision_context(self.config.precision, self.model.device):
            results = self.runner.execute(plan)
        t2 = time.perf_counter()
        self.stats.head_rows += self.runner.head_rows - rows
        self.stats.head_steps += self.runner.head_steps - steps
        self.stats.row_loops += self.runner.row_loops - row_loops
        events = self.scheduler.update_from_output(plan, results)
        outputs = self._outputs(events, t2)
        t3 = time.perf_counter()
        self.stats.steps += 1
        self.stats.items += len(plan.items)
        self.stats.schedule_s += t1 - t0
        self.stats.execute_s += t2 - t1
        self.stats.update_s += t3 - t2
        self.stats.preemptions = self.scheduler.preemptions
        return outputs

    def _speculative_step(self) -> list[RequestOutput]:
        """One round of self-speculative decoding (modeling/speculative.py) for the running request; admits the next one."""
        t0 = time.perf_counter()
        if self._session is not None and self._session.request.finished:  # cancelled or stopped meanwhile
            self._session = None
        if self._session is None:
            self.scheduler.schedule()  # admission only (max_batch 1); the KV pool stays unused
            if not self.scheduler.running:
                return []
            self._session = _Session.start(self.model, self.scheduler.running[0], self.speculative, self.speculative_stats)
        session = self._session
        t1 = time.perf_counter()
        with precision_context(self.config.precision, self.model.device):
            new = session.advance()
        t2 = time.perf_counter()
        request = session.request
        emitted: list[int] = []
        reason = None
        for token in new:
            request.output_ids.append(token)
            request.loops_run.append(self.model.loops)
            request.token_times.append(t2)
            emitted.append(token)
            if token in request.stop_token_ids:
                reason = "stop"
            elif len(request.output_ids) >= request.max_new_tokens:
                reason = "length"
            elif self._hit_stop_string(request):
                reason = "stop"
            if reason is not None:
                break
        if request.first_token_time is None and emitted:
            request.first_token_time = t2
        if reason is not None:
            session.done[0] = True
            self.scheduler.finish(request.request_id, reason)
            request.finish_time = t2
            self._stops.pop(request.request_id, None)
            self._session = None
        self.stats.steps += 1
        self.stats.items += 1
        self.stats.schedule_s += t1 - t0
        self.stats.execute_s += t2 - t1
        self.stats.update_s += time.perf_counter() - t2
        return [self._output(request, emitted)] if emitted else []

    def _outputs(self, events: StepEvents, now: float) -> list[RequestOutput]:
        finished = {request.request_id for request in events.finished}
        outputs = []
        for request in events.emitted:
            request.token_times.append(now)
            if request.first_token_time is None:
                request.first_token_time = now
            if request.request_id not in finished and self._hit_stop_string(request):
                self.scheduler.finish(request.request_id, "stop")
                finished.add(request.request_id)
            if request.request_id in finished:
                request.finish_time = now
            outputs.append(self._output(request, request.output_ids[-1:]))
        for request_id in finished:
            self._stops.pop(request_id, None)
        return outputs

    def _hit_stop_string(self, request: Request) -> bool:
        stops = self._stops.get(request.request_id)
        return bool(stops) and any(stop in self._decode(request.output_ids) for stop in stops)  # type: ignore[union-attr]

    def _output(self, request: Request, new_tokens: list[int]) -> RequestOutput:
        text = None
        if self.tokenizer is not None:
            text = self._decode([t for t in request.output_ids if t not in request.stop_token_ids])
            for stop in self._stops.get(request.request_id, []):
                text = text.split(stop)[0]
        return RequestOutput(
            request_id=request.request_id,
            prompt_ids=list(request.prompt_ids),
            token_ids=list(request.output_ids),
            new_token_ids=list(new_tokens),
            text=text,
            finished=request.finished,
            finish_reason=request.finish_reason,
            arrival_time=request.arrival_time,
            first_token_time=request.first_token_time,
            finish_time=request.finish_time,
            token_times=list(request.token_times),
            loops_run=list(request.loops_run),
            oracle_loops=list(request.oracle_loops),
            preemptions=request.preemptions,
        )

    # --- convenience --------------------------------------------------------------------------

    def stream(self, prompts: Sequence[str | Sequence[int]], **request_options: Any) -> Iterator[RequestOutput]:
        """Submit prompts and yield a snapshot each time one of them emits a token (``new_token_ids``)."""
        for prompt in prompts:
            self.add_request(prompt, **request_options)
        while self.has_unfinished():
            yield from self.step()

    def generate(self, prompts: Sequence[str | Sequence[int]], **request_options: Any) -> Iterator[RequestOutput]:
        """Submit prompts and yield each request's final output as soon as it finishes (completion order).

        ``request_options`` are those of ``add_request`` (max_new_tokens, sampling, stop, stop_token_ids).
        """
        for output in self.stream(prompts, **request_options):
            if output.finished:
                yield output

    def kv_usage(self) -> dict[str, int]:
        """KV memory accounting: blocks and positions in use (covered by live requests' tables), and the pool's size."""
        return {
            "used_blocks": self.allocator.used_blocks,
            "num_blocks": self.allocator.num_blocks,
            "reserved_tokens": self.allocator.reserved_tokens,
            "capacity_tokens": self.allocator.capacity_tokens,
            "pool_bytes": self.pool.nbytes(),
            "live_requests": len(self.allocator.owners()),
        }

    # --- text ---------------------------------------------------------------------------------

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        """Prompt text (tokenized, special tokens as the tokenizer adds them) or ids -> checked token ids."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ConfigError("this model has no tokenizer; pass prompts as lists of token ids")
            ids = list(self.tokenizer(prompt)["input_ids"])
        else:
            ids = [int(token) for token in prompt]
        if not ids:
            raise ConfigError("a prompt encodes to zero tokens; give non-empty prompts")
        if max(ids) >= self.model.arch.vocab_size or min(ids) < 0:
            raise ConfigError(f"prompt token ids must lie in [0, {self.model.arch.vocab_size})")
        return ids

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def _eos_ids(self) -> set[int]:
        eos = set(self.model.arch.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(int(self.tokenizer.eos_token_id))
        return eos
