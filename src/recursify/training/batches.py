"""Where each uptraining step's rows come from: the packed token budget in memory, or a per-process stream.

Both sources hand a process its ``rows_per_process`` rows [rows, seq_len] for optimizer step ``step``:

- ``MemoryBatches``: the whole budget is read and packed once; global batch ``step`` is a seeded draw
  over the packed rows (``schedule.batch_rows``), a pure function of (step, seed), and process i takes
  its i-th slice of it. Every process count sees the same global batches, so a 2-process run follows
  the 1-process loss curve, and a resumed run reads exactly what it would have read.
- ``StreamBatches``: ``data.stream_rows`` reads this process's disjoint share of the documents and
  packs it as it goes (nothing held in memory, one pass); step ``s`` takes the share's next rows in
  stream order. A resume skips the rows the steps before it consumed (re-reading them: the price of
  holding nothing), so it continues exactly; the shares, and hence the batches, depend on the number of
  processes. A share that runs out ends the run (``uptrain`` stops every process together).
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator
from typing import Any

import torch

from recursify.data import pack
from recursify.errors import DataError
from recursify.training.schedule import batch_rows


class MemoryBatches:
    """The token budget packed into rows in memory; batch ``step`` is a seeded draw (see the module doc)."""

    streamed = False

    def __init__(self, tokens: torch.Tensor, seq_len: int, rows_per_step: int, rank: int, world_size: int, seed: int, spec: str):
        self.rows = pack(tokens, seq_len)  # [rows, seq_len]
        if self.rows.shape[0] == 0:
            raise DataError(f"--data {spec!r} yields {tokens.numel()} training tokens, fewer than one --seq-len row")
        self.rows_per_step, self.rank, self.world_size, self.seed = rows_per_step, rank, world_size, seed
        self.fingerprint: str | None = hashlib.sha256(tokens.numpy().tobytes()).hexdigest()

    def local(self, step: int) -> torch.Tensor | None:
        """This process's rows of global batch ``step`` (never runs short: the draw wraps into new epochs)."""
        return self.rows[self.local_index(step)]

    def local_index(self, step: int) -> torch.Tensor:
        """Indices into ``rows`` of this process's share of global batch ``step`` (row-aligned caches use them too)."""
        global_rows = batch_rows(step, self.rows_per_step, self.rows.shape[0], self.seed)
        share = self.rows_per_step // self.world_size
        return global_rows[self.rank * share : (self.rank + 1) * share]

    def describe(self, steps: int) -> dict[str, Any]:
        rows = int(self.rows.shape[0])
        return {"rows": rows, "epochs": steps * self.rows_per_step / rows}


class StreamBatches:
    """This process's share of the data, packed as it is read; batch ``step`` is the share's next rows."""

    streamed = True
    fingerprint: str | None = None  # the stream is never held; --data and --seed identify it (checked on resume)

    def __init__(self, rows: Iterator[torch.Tensor], rows_per_step: int, world_size: int, start_step: int):
        """``rows``: ``data.stream_rows`` of this process's share; ``start_step``: the step a resume continues from."""
        self.share = rows_per_step // world_size
        self.rows_per_step = rows_per_step
        self.rows = itertools.islice(rows, start_step * self.share, None)  # a resume skips what earlier steps consumed

    def local(self, step: int) -> torch.Tensor | None:
        """The share's next rows (called once per step, in order), or None when fewer than a step's worth are left."""
        rows = list(itertools.islice(self.rows, self.share))
        return torch.stack(rows) if len(rows) == self.share else None

    def describe(self, steps: int) -> dict[str, Any]:
        return {"rows": steps * self.rows_per_step, "epochs": None}
