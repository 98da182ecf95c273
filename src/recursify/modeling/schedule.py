"""Which shared layer runs at each depth: the sharing strategies of docs/method.md section 1, with a prelude and a coda.

Pure functions over integers; the model, the conversion and the serving engine all read the same
schedule so they can never disagree about which weights, LoRA visit or KV slot a depth uses.

A sharing plan is (loops B, strategy, prelude N, coda M): the first N and the last M original layers
stay unique and run once (the prelude before the looped block, the coda after it, as in Huginn and
retrofitted recurrence); the L - N - M middle layers are tied into K = (L - N - M) / B shared layers
looped B times by the strategy. The paper's Middle-Cycle is cycle with N = M = 1.
"""

from __future__ import annotations

from dataclasses import dataclass

from recursify.config import normalise_plan
from recursify.errors import ConfigError

PARTS = ("prelude", "loop", "coda")


@dataclass(frozen=True)
class DepthSlot:
    """One depth of the unrolled model.

    Attributes:
        depth: position in the unrolled stack, 0..L-1 (also the KV-cache slot).
        layer: index of the shared layer that runs here (prelude layers first, then the looped
            block's shared layers, then the coda's).
        visit: how many earlier depths ran the same shared layer (selects its per-depth LoRA/norms).
        loop: which pass over the block this depth belongs to, 0..B-1 (the prelude runs with loop 0,
            the coda with the last loop).
        part: "prelude", "loop" or "coda".
    """

    depth: int
    layer: int
    visit: int
    loop: int
    part: str = "loop"


def looped_layers(num_layers: int, prelude: int = 0, coda: int = 0) -> int:
    """How many original layers the looped block covers (L - N - M); raises when nothing is left to loop."""
    if prelude < 0 or coda < 0:
        raise ConfigError(f"prelude and coda must be >= 0, got {prelude} and {coda}")
    looped = num_layers - prelude - coda
    if looped < 1:
        raise ConfigError(f"--prelude {prelude} + --coda {coda} leave no layer of the model's {num_layers} to loop; lower them")
    return looped


def valid_loops(num_layers: int, strategy: str, prelude: int = 0, coda: int = 0) -> list[int]:
    """Loop counts B that tie the looped layers evenly."""
    strategy, prelude, coda = normalise_plan(strategy, prelude, coda)
    looped = looped_layers(num_layers, prelude, coda)
    return [b for b in range(1, looped + 1) if looped % b == 0]


def num_unique_layers(num_layers: int, loops: int, strategy: str, prelude: int = 0, coda: int = 0) -> int:
    """The number of distinct (shared) layers kept: N + K + M."""
    strategy, prelude, coda = normalise_plan(strategy, prelude, coda)
    check_loops(num_layers, loops, strategy, prelude, coda)
    return prelude + looped_layers(num_layers, prelude, coda) // loops + coda


def check_loops(num_layers: int, loops: int, strategy: str, prelude: int = 0, coda: int = 0) -> None:
    """Raise a ConfigError listing the valid values when ``loops`` does not tie the looped layers evenly."""
    strategy, prelude, coda = normalise_plan(strategy, prelude, coda)
    options = valid_loops(num_layers, strategy, prelude, coda)
    if loops not in options:
        looped = looped_layers(num_layers, prelude, coda)
        what = f"{looped} looped layers (after a prelude of {prelude} and a coda of {coda})" if prelude or coda else f"{num_layers} layers"
        raise ConfigError(f"loops={loops} does not divide the model's {what} ({strategy}); valid loops: {', '.join(map(str, options))}")


def _block_layer(index: int, block: int, loops: int, strategy: str) -> tuple[int, int]:
    """(shared layer within the block, loop) of the looped block's ``index``-th depth."""
    loop = index // block
    if strategy == "cycle":
        return index % block, loop
    if strategy == "cycle-rev":
        return (index % block if loop == 0 else block - 1 - index % block), loop
    if strategy == "sequence":
        return index // loops, loop
    raise ConfigError(f"unknown strategy {strategy!r}")


def build_schedule(num_layers: int, loops: int, strategy: str = "cycle", prelude: int = 0, coda: int = 0) -> list[DepthSlot]:
    """The unrolled stack: one DepthSlot per depth (prelude, then B loops of the block, then coda)."""
    strategy, prelude, coda = normalise_plan(strategy, prelude, coda)
    check_loops(num_layers, loops, strategy, prelude, coda)
    block = looped_layers(num_layers, prelude, coda) // loops
    slots = [DepthSlot(depth=d, layer=d, visit=0, loop=0, part="prelude") for d in range(prelude)]
    visits: dict[int, int] = {}
    for index in range(block * loops):
        local, loop = _block_layer(index, block, loops, strategy)
        layer = prelude + local
        slots.append(DepthSlot(depth=prelude + index, layer=layer, visit=visits.get(layer, 0), loop=loop))
        visits[layer] = visits.get(layer, 0) + 1
    first_coda = prelude + block * loops
    slots += [DepthSlot(depth=first_coda + j, layer=prelude + block + j, visit=0, loop=loops - 1, part="coda") for j in range(coda)]
    return slots


def depths_of_layer(schedule: list[DepthSlot], layer: int) -> list[int]:
    """The depths a shared layer serves, in visit order."""
    return [slot.depth for slot in schedule if slot.layer == layer]


def loop_end_depths(schedule: list[DepthSlot]) -> list[int]:
    """The last looped depth of every loop: where an exit reads the hidden state (then coda, then head)."""
    ends: dict[int, int] = {}
    for slot in schedule:
        if slot.part == "loop":
            ends[slot.loop] = slot.depth
    return [ends[loop] for loop in sorted(ends)]
