"""Which shared layer runs at each depth: the sharing strategies of docs/method.md section 1.

Pure functions over integers; the model, the conversion and the serving engine all read the same
schedule so they can never disagree about which weights, LoRA visit or KV slot a depth uses.
"""

from __future__ import annotations

from dataclasses import dataclass

from recursify.errors import ConfigError


@dataclass(frozen=True)
class DepthSlot:
    """One depth of the unrolled model.

    Attributes:
        depth: position in the unrolled stack, 0..L-1 (also the KV-cache slot).
        layer: index of the shared layer that runs here.
        visit: how many earlier depths ran the same shared layer (selects its per-depth LoRA/norms).
        loop: which pass over the block this depth belongs to, 0..B-1.
    """

    depth: int
    layer: int
    visit: int
    loop: int


def valid_loops(num_layers: int, strategy: str) -> list[int]:
    """Loop counts B that tie ``num_layers`` layers evenly under ``strategy``."""
    looped = num_layers - 2 if strategy == "middle-cycle" else num_layers
    return [b for b in range(1, looped + 1) if looped % b == 0]


def num_unique_layers(num_layers: int, loops: int, strategy: str) -> int:
    """K, the number of distinct (shared) layers kept."""
    check_loops(num_layers, loops, strategy)
    if strategy == "middle-cycle":
        return (num_layers - 2) // loops + 2
    return num_layers // loops


def check_loops(num_layers: int, loops: int, strategy: str) -> None:
    """Raise a ConfigError listing the valid values when ``loops`` does not tie the layers evenly."""
    options = valid_loops(num_layers, strategy)
    if loops not in options:
        what = f"{num_layers - 2} middle layers" if strategy == "middle-cycle" else f"{num_layers} layers"
        raise ConfigError(f"loops={loops} does not divide the model's {what} ({strategy}); valid loops: {', '.join(map(str, options))}")


def _layer_and_loop(depth: int, num_layers: int, loops: int, strategy: str) -> tuple[int, int]:
    if strategy == "middle-cycle":
        block = (num_layers - 2) // loops
        if depth == 0:
            return 0, 0
        if depth == num_layers - 1:
            return block + 1, loops - 1
        return 1 + (depth - 1) % block, (depth - 1) // block
    block = num_layers // loops
    loop = depth // block
    if strategy == "cycle":
        return depth % block, loop
    if strategy == "cycle-rev":
        return (depth % block if loop == 0 else block - 1 - depth % block), loop
    if strategy == "sequence":
        return depth // loops, loop
    raise ConfigError(f"unknown strategy {strategy!r}")


def build_schedule(num_layers: int, loops: int, strategy: str) -> list[DepthSlot]:
    """The unrolled stack: one DepthSlot per depth."""
    check_loops(num_layers, loops, strategy)
    visits: dict[int, int] = {}
    slots = []
    for depth in range(num_layers):
        layer, loop = _layer_and_loop(depth, num_layers, loops, strategy)
        slots.append(DepthSlot(depth=depth, layer=layer, visit=visits.get(layer, 0), loop=loop))
        visits[layer] = visits.get(layer, 0) + 1
    return slots


def depths_of_layer(schedule: list[DepthSlot], layer: int) -> list[int]:
    """The depths a shared layer serves, in visit order."""
    return [slot.depth for slot in schedule if slot.layer == layer]


def loop_end_depths(schedule: list[DepthSlot]) -> list[int]:
    """The last depth of every loop: where early exits read the hidden state."""
    ends: dict[int, int] = {}
    for slot in schedule:
        ends[slot.loop] = slot.depth
    return [ends[loop] for loop in sorted(ends)]
