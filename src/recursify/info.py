"""What a model is, in one table: parameters by group, the recursion, where it came from.

The single place for the summary ``recursify info`` prints, ``convert`` shows after saving and the demo
reports; ``model_info`` is the machine-readable form, ``format_model_info`` the table.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from recursify.modeling.model import RecursiveModel


def model_info(model: RecursiveModel) -> dict[str, Any]:
    """The machine-readable summary (``recursify info --json``): parameters by group, the recursion and its source."""
    recursion = model.recursion
    return {
        "params": model.param_counts(),
        "loops": recursion.loops,
        "unique_layers": len(model.layers),
        "depths": model.num_depths,
        "strategy": recursion.strategy,
        "prelude": recursion.prelude,
        "coda": recursion.coda,
        "kept_layers": recursion.kept_layers,
        "init": recursion.init,
        "rank": recursion.rank_spec,
        "ranks": recursion.ranks,
        "lora_init": recursion.lora_init,
        "norms": recursion.norms,
        "family": model.arch.family,
        "source": model.source.spec,
        "shared_init": recursion.shared_init,
        "calib": recursion.calib,
        "calib_tokens": recursion.calib_tokens,
        "lora_params": recursion.lora_params,
        "layer_ranks": recursion.layer_ranks,
        "relax": recursion.relax,
        "embedding": model.embedding_counts(),
        "embed_init": recursion.embed_init,
        "embed_params": recursion.embed_params,
        "embed_exact_rows": recursion.embed_exact_rows,
        "report": model.report,
    }


def format_model_info(info: dict[str, Any]) -> str:
    """The human-readable parameter table of ``model_info`` (``recursify info``), with conversion diagnostics."""
    params = info["params"]
    split, exact = info["embedding"], info.get("embed_exact_rows", 0)
    rows = [
        ("embedding", params["embedding"]),
        (f"  input {_rank_text(split['input_rank'], exact)}", split["input"]),
        (f"  head {'tied to input' if split['tied'] else _rank_text(split['head_rank'], exact)}", split["head"]),
        ("non-embedding", params["non_embedding"]),
        ("LoRA", params["lora"]),
        ("total", params["total"]),
        ("source total", params["source_total"]),
    ]
    if params.get("frozen"):  # LoRA-XS factors: stored and used, never trained
        rows.insert(5, ("frozen (fixed)", params["frozen"]))
    capped = {name: r for name, r in info["ranks"].items() if isinstance(info["rank"], int) and r < info["rank"]}
    rank_note = f" (capped at full rank: {', '.join(f'{n}={r}' for n, r in capped.items())})" if capped else ""
    lines = [
        f"source      {info['source']} ({info['family']})",
        f"recursion   {_plan_line(info)}, strategy {info['strategy']}, init {info['init']}",
        f"relaxation  {info.get('relax', 'lora')}, rank {info['rank']}{rank_note}, {info['lora_init']} init, "
        f"norms {info['norms']}, shared {info['shared_init']}",
        "",
        f"{'parameters':<22}{'count':>14}{'millions':>10}",
    ]
    lines += [f"{name:<22}{count:>14,}{count / 1e6:>10.2f}" for name, count in rows]
    lines.append(f"{'ratio':<22}{params['ratio']:>14.3f}")
    fitted = info.get("report", {}).get("embedding_error")
    if fitted:
        shares = ", ".join(f"{side} {error:.4f}" for side, error in fitted.items())
        lines += ["", f"embedding factors ({info['embed_init']} fit): relative weighted error {shares}"]
    errors = info.get("report", {}).get("relative_error")
    if errors:
        lines += ["", f"relative reconstruction error on {info['calib_tokens']} calibration tokens ({info['calib']}), %:"]
        lines.append("depth " + "".join(f"{name:>8}" for name in errors))
        for depth in range(info["depths"]):
            lines.append(f"{depth:>5} " + "".join(f"{100 * errors[name][depth]:>8.2f}" for name in errors))
    return "\n".join(lines)


def _rank_text(rank: int | None, exact_rows: int = 0) -> str:
    if rank is None:
        return "dense"
    return f"rank {rank}" + (f" + {exact_rows} rows" if exact_rows else "")


def _plan_line(info: dict[str, Any]) -> str:
    """ "2 loops x 13 unique layers = 30 depths", with the prelude/coda or the kept layers when there are any."""
    prelude, coda = info.get("prelude", 0), info.get("coda", 0)
    if info.get("kept_layers"):
        return f"{info['depths']} layers kept of the original's (layer dropping): {info['kept_layers']}"
    if not prelude and not coda:
        return f"{info['loops']} loops x {info['unique_layers']} unique layers = {info['depths']} depths"
    block = info["unique_layers"] - prelude - coda
    return f"prelude {prelude} + {info['loops']} loops x {block} shared layers + coda {coda} = {info['depths']} depths"
