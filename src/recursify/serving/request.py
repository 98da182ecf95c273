"""One generation request and its bookkeeping: integers and lists only, no tensors.

Positions: the prompt occupies positions 0..P-1 and the i-th generated token position P+i. A
request always has exactly one *chunk in flight*: positions ``computed .. computed+chunk_len-1``
(a prefill chunk, or the last generated token), currently at ``loop``. A preempted request forgets
all of this and later recomputes ``prompt + outputs so far`` as one prefill (its tokens are kept).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from recursify.config import SamplingConfig


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    """A prompt to continue, with its limits and progress.

    Attributes:
        request_id: unique name.
        prompt_ids: token ids of the prompt (at least one).
        max_new_tokens: generation stops after this many tokens.
        sampling: decoding rule; each request samples with its own seeded generator.
        stop_token_ids: tokens that end the request (emitted, then finished with reason "stop").
        arrival_time: when it was submitted (engine clock, seconds).
        finish_reason: once finished, "length", "stop" or "cancelled".
        computed: positions whose chunk has left the loop stack (all loops, or an early exit).
        loop: the loop the chunk in flight runs next.
        chunk_len: length of the chunk in flight (0 when none has started).
        filled: per loop, positions ``< filled[loop]`` have keys/values at that loop's depths.
        idle: in lock-step batching (static/sequence), the chunk left early and waits for the
            round to end before the next one starts.
        loops_run: per generated token, how many loops it ran before it was emitted.
        oracle_loops: with the oracle policy, per generated token, the loops an oracle would run.
        argmax_per_loop: oracle bookkeeping for the token in flight.
        blocks: the request's KV blocks: they cover ``computed + chunk_len`` positions (grown as it runs).
        preemptions: how often its KV blocks were taken back to let older requests run.
    """

    request_id: str
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    stop_token_ids: frozenset[int] = frozenset()
    arrival_time: float = 0.0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    output_ids: list[int] = field(default_factory=list)
    computed: int = 0
    loop: int = 0
    chunk_len: int = 0
    filled: list[int] = field(default_factory=list)
    idle: bool = False
    loops_run: list[int] = field(default_factory=list)
    oracle_loops: list[int] = field(default_factory=list)
    argmax_per_loop: list[int] = field(default_factory=list)
    blocks: tuple[int, ...] = ()
    preemptions: int = 0
    first_token_time: float | None = None
    finish_time: float | None = None
    token_times: list[float] = field(default_factory=list)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def kv_tokens_needed(self) -> int:
        """The most positions it can ever hold keys/values for: the prompt and every generated token but the last."""
        return len(self.prompt_ids) + self.max_new_tokens - 1

    @property
    def kv_tokens_in_use(self) -> int:
        """Positions whose keys/values exist or are being computed: everything computed plus the chunk in flight."""
        return self.computed + self.chunk_len

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def next_chunk_len(self, max_chunk: int) -> int:
        """Length of the next chunk to start: the rest of the prompt (up to ``max_chunk``) or one token."""
        return min(max_chunk, len(self.all_ids) - self.computed)

    def preempt(self) -> None:
        """Forget all computed state (keys/values, the chunk in flight at any loop); outputs stay, to be recomputed."""
        self.status, self.blocks, self.preemptions = RequestStatus.WAITING, (), self.preemptions + 1
        self.computed, self.loop, self.chunk_len, self.idle = 0, 0, 0, False
        self.filled = [0] * len(self.filled)
        self.argmax_per_loop = []

    def chunk_emits(self) -> bool:
        """Whether the chunk in flight ends at the last known token, so its last position yields a new token."""
        return self.computed + self.chunk_len == len(self.all_ids)
