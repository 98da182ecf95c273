"""Conversion: schedules, shared-layer init, SVD LoRA init, exactness at full rank, parameter accounting.

References are independent of the conversion code: transformers' own models (run as-is or with
layers overwritten by hand), hand-written schedules, torch.linalg.svd and closed-form counts.
"""

from __future__ import annotations

import copy
from functools import cache
from typing import Any

import pytest
import torch

import recursify
from recursify.config import LINEARS, STRATEGIES
from recursify.conversion.lora_init import resolve_ranks, svd_lora
from recursify.conversion.tying import init_sources
from recursify.errors import ConfigError
from recursify.modeling.schedule import build_schedule, depths_of_layer, loop_end_depths, num_unique_layers
from tiny import FAMILIES, tiny_model

EXACT = 1e-3
SEQ = 10
INITS = ("stepwise", "average", "lower", "random")
HF_LINEARS = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}


@cache
def _reference(family: str) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """(transformers model, input ids, its logits): the original every conversion is compared with."""
    hf = tiny_model(family, seed=2)
    ids = torch.randint(3, 97, (2, SEQ), generator=torch.Generator().manual_seed(21))
    with torch.no_grad():
        logits = hf(ids).logits
    return hf, ids, logits


def _max_diff(model: Any, family: str) -> float:
    _, ids, ref = _reference(family)
    with torch.no_grad():
        return float((model(ids).logits - ref).abs().max())


# --- schedules ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_layers", "loops", "strategy", "layers", "visits", "loop_of_depth"),
    [
        (6, 1, "cycle", [0, 1, 2, 3, 4, 5], [0] * 6, [0] * 6),
        (6, 2, "cycle", [0, 1, 2, 0, 1, 2], [0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 1]),
        (6, 3, "cycle", [0, 1, 0, 1, 0, 1], [0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 2, 2]),
        (8, 4, "cycle", [0, 1] * 4, [0, 0, 1, 1, 2, 2, 3, 3], [0, 0, 1, 1, 2, 2, 3, 3]),
        (6, 6, "cycle", [0] * 6, [0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5]),
        (6, 2, "sequence", [0, 0, 1, 1, 2, 2], [0, 1, 0, 1, 0, 1], [0, 0, 0, 1, 1, 1]),
        (6, 3, "sequence", [0, 0, 0, 1, 1, 1], [0, 1, 2, 0, 1, 2], [0, 0, 1, 1, 2, 2]),
        (6, 2, "cycle-rev", [0, 1, 2, 2, 1, 0], [0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 1]),
        (6, 3, "cycle-rev", [0, 1, 1, 0, 1, 0], [0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 2, 2]),
        (6, 2, "middle-cycle", [0, 1, 2, 1, 2, 3], [0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 1, 1]),
        (6, 4, "middle-cycle", [0, 1, 1, 1, 1, 2], [0, 0, 1, 2, 3, 0], [0, 0, 1, 2, 3, 3]),
        (8, 3, "middle-cycle", [0, 1, 2, 1, 2, 1, 2, 3], [0, 0, 0, 1, 1, 2, 2, 0], [0, 0, 0, 1, 1, 2, 2, 2]),
    ],
)
def test_build_schedule_by_hand(
    num_layers: int, loops: int, strategy: str, layers: list[int], visits: list[int], loop_of_depth: list[int]
) -> None:
    schedule = build_schedule(num_layers, loops, strategy)
    assert [s.depth for s in schedule] == list(range(num_layers))
    assert [s.layer for s in schedule] == layers
    assert [s.visit for s in schedule] == visits
    assert [s.loop for s in schedule] == loop_of_depth
    assert num_unique_layers(num_layers, loops, strategy) == len(set(layers))
    # exits sit at the last looped depth of every loop; the final one is the last depth before the coda
    coda = 1 if strategy == "middle-cycle" else 0
    ends = loop_end_depths(schedule)
    assert len(ends) == loops and ends[-1] == num_layers - 1 - coda
    assert ends == [max(d for d, lp in enumerate(loop_of_depth[: num_layers - coda]) if lp == b) for b in range(loops)]


@pytest.mark.parametrize(
    ("num_layers", "loops", "strategy", "prelude", "coda", "layers", "visits", "parts"),
    [
        (6, 2, "cycle", 2, 0, [0, 1, 2, 3, 2, 3], [0, 0, 0, 0, 1, 1], "PPLLLL"),
        (6, 2, "cycle", 0, 2, [0, 1, 0, 1, 2, 3], [0, 0, 1, 1, 0, 0], "LLLLCC"),
        (8, 2, "cycle", 1, 3, [0, 1, 2, 1, 2, 3, 4, 5], [0, 0, 0, 1, 1, 0, 0, 0], "PLLLLCCC"),
        (7, 3, "sequence", 2, 2, [0, 1, 2, 2, 2, 3, 4], [0, 0, 0, 1, 2, 0, 0], "PPLLLCC"),
        (8, 2, "cycle-rev", 2, 2, [0, 1, 2, 3, 3, 2, 4, 5], [0, 0, 0, 0, 1, 1, 0, 0], "PPLLLLCC"),
        (6, 1, "cycle", 2, 1, [0, 1, 2, 3, 4, 5], [0] * 6, "PPLLLC"),
    ],
)
def test_prelude_and_coda_schedules_by_hand(
    num_layers: int, loops: int, strategy: str, prelude: int, coda: int, layers: list[int], visits: list[int], parts: str
) -> None:
    schedule = build_schedule(num_layers, loops, strategy, prelude, coda)
    assert [s.layer for s in schedule] == layers
    assert [s.visit for s in schedule] == visits
    assert "".join(s.part[0].upper() for s in schedule) == parts
    looped = [s for s in schedule if s.part == "loop"]
    assert [s.loop for s in looped] == [i * loops // len(looped) for i in range(len(looped))]
    assert all(s.loop == 0 for s in schedule if s.part == "prelude") and all(s.loop == loops - 1 for s in schedule if s.part == "coda")
    assert loop_end_depths(schedule) == [prelude + (b + 1) * len(looped) // loops - 1 for b in range(loops)]
    assert num_unique_layers(num_layers, loops, strategy, prelude, coda) == len(set(layers))


def test_middle_cycle_is_cycle_with_a_prelude_and_coda_of_one() -> None:
    assert build_schedule(8, 3, "middle-cycle") == build_schedule(8, 3, "cycle", 1, 1)
    with pytest.raises(ConfigError, match="already means --prelude 1 --coda 1"):
        build_schedule(8, 3, "middle-cycle", 2, 0)
    with pytest.raises(ConfigError, match="leave no layer"):
        build_schedule(6, 1, "cycle", 3, 3)
    with pytest.raises(ConfigError, match=r"4 looped layers \(after a prelude of 1 and a coda of 1\).*valid loops: 1, 2, 4$"):
        build_schedule(6, 3, "cycle", 1, 1)


@pytest.mark.parametrize(
    ("num_layers", "loops", "strategy", "valid"),
    [(6, 4, "cycle", "1, 2, 3, 6"), (6, 5, "sequence", "1, 2, 3, 6"), (6, 3, "middle-cycle", "1, 2, 4"), (6, 0, "cycle", "1, 2, 3, 6")],
)
def test_invalid_loops_raise_config_error_listing_valid_values(num_layers: int, loops: int, strategy: str, valid: str) -> None:
    with pytest.raises(ConfigError, match=f"valid loops: {valid}$"):
        build_schedule(num_layers, loops, strategy)


def test_convert_rejects_invalid_loops_before_any_work() -> None:
    hf, _, _ = _reference("llama")
    with pytest.raises(ConfigError, match="valid loops: 1, 2, 3, 6"):
        recursify.convert(hf, loops=4, progress=False)
    with pytest.raises(ConfigError, match="valid loops: 1, 2, 4"):
        recursify.convert(hf, loops=3, strategy="middle-cycle", progress=False)


# --- shared-layer init -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("loops", "strategy", "init", "expected"),
    [
        (2, "cycle", "stepwise", [[0], [2], [5]]),  # the paper's Fig. 2 (1, 3, 6 one-based)
        (3, "cycle", "stepwise", [[0], [5]]),
        (6, "cycle", "stepwise", [[0]]),
        (1, "cycle", "stepwise", [[0], [1], [2], [3], [4], [5]]),
        (2, "cycle", "lower", [[0], [1], [2]]),
        (2, "cycle", "average", [[0, 3], [1, 4], [2, 5]]),
        (3, "cycle", "average", [[0, 2, 4], [1, 3, 5]]),
        (2, "sequence", "average", [[0, 1], [2, 3], [4, 5]]),
        (2, "cycle-rev", "average", [[0, 5], [1, 4], [2, 3]]),
        (2, "cycle", "random", [[], [], []]),
        (2, "middle-cycle", "stepwise", [[0], [1], [4], [5]]),
        (2, "middle-cycle", "lower", [[0], [1], [2], [5]]),
        (2, "middle-cycle", "average", [[0], [1, 3], [2, 4], [5]]),
    ],
)
def test_init_sources_by_hand(loops: int, strategy: str, init: str, expected: list[list[int]]) -> None:
    assert init_sources(build_schedule(6, loops, strategy), init) == expected


def test_stepwise_keeps_first_and_last_layer_for_deeper_models() -> None:
    assert init_sources(build_schedule(12, 3, "cycle"), "stepwise") == [[0], [4], [7], [11]]
    assert init_sources(build_schedule(30, 3, "cycle"), "stepwise") == [[round(k * 29 / 9 - 1e-9)] for k in range(10)]


# --- exactness at full rank --------------------------------------------------------------------


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("family", FAMILIES)
def test_full_rank_svd_reproduces_original(family: str, strategy: str, init: str) -> None:
    hf, _, _ = _reference(family)
    model = recursify.convert(hf, loops=2, init=init, rank="full", strategy=strategy, lora_init="svd", progress=False)
    assert len(model.layers) < 6  # it really is tied
    assert _max_diff(model, family) < EXACT


@pytest.mark.parametrize(("loops", "strategy"), [(3, "cycle"), (6, "cycle"), (3, "sequence"), (3, "cycle-rev"), (4, "middle-cycle")])
@pytest.mark.parametrize("family", ["qwen2", "gemma3_text"])
def test_full_rank_svd_reproduces_original_at_more_loops(family: str, loops: int, strategy: str) -> None:
    hf, _, _ = _reference(family)
    model = recursify.convert(hf, loops=loops, init="average", rank="full", strategy=strategy, progress=False)
    assert _max_diff(model, family) < EXACT


@pytest.mark.parametrize(
    ("loops", "prelude", "coda", "init"), [(2, 2, 0, "average"), (2, 0, 2, "stepwise"), (2, 1, 3, "lower"), (4, 1, 1, "random")]
)
@pytest.mark.parametrize("family", FAMILIES)
def test_prelude_and_coda_at_full_rank_reproduce_the_original(family: str, loops: int, prelude: int, coda: int, init: str) -> None:
    hf, _, _ = _reference(family)
    model = recursify.convert(hf, loops=loops, prelude=prelude, coda=coda, init=init, rank="full", progress=False)
    assert len(model.layers) == prelude + (6 - prelude - coda) // loops + coda
    for slot in model.schedule:  # prelude and coda layers are the original layers, without LoRA
        if slot.part != "loop":
            assert model.shared_layer(slot.layer).q.lora_A is None
    assert _max_diff(model, family) < EXACT


@pytest.mark.parametrize("family", FAMILIES)
def test_folded_norms_at_full_rank_are_exact(family: str) -> None:
    hf, _, _ = _reference(family)
    model = recursify.convert(hf, loops=2, init="average", rank="full", norms="fold", progress=False)
    assert model.layers[0].attn_norm.weight.shape[0] == 1  # folded pre-norms are tied
    assert _max_diff(model, family) < EXACT


@pytest.mark.parametrize("family", FAMILIES)
def test_tied_norms_are_not_exact_even_at_full_rank(family: str) -> None:
    hf, _, _ = _reference(family)
    model = recursify.convert(hf, loops=2, init="stepwise", rank="full", norms="tied", progress=False)
    assert _max_diff(model, family) > 0.1  # randomised gains differ per depth; a tied gain cannot match them all


@pytest.mark.parametrize("family", ["qwen3", "gemma2"])
def test_tied_norms_are_exact_when_every_depth_has_the_same_gains(family: str) -> None:
    hf = copy.deepcopy(_reference(family)[0])
    with torch.no_grad():
        for layer in hf.model.layers[1:]:
            for name, param in layer.named_parameters():
                if "norm" in name:
                    param.copy_(hf.model.layers[0].get_parameter(name))
    ids = _reference(family)[1]
    with torch.no_grad():
        ref = hf(ids).logits
        got = recursify.convert(hf, loops=2, init="average", rank="full", norms="tied", progress=False)(ids).logits
    assert (got - ref).abs().max() < EXACT


# --- rank 0 is the hand-tied model -------------------------------------------------------------


def _hand_tied(hf: Any, loops: int, strategy: str, init: str, tie_norms: bool, prelude: int = 0, coda: int = 0) -> Any:
    """A transformers copy whose layer at depth d holds the shared weights the schedule assigns it."""
    schedule = build_schedule(len(hf.model.layers), loops, strategy, prelude, coda)
    sources = init_sources(schedule, init)
    originals = [{n: p.detach().clone() for n, p in layer.named_parameters()} for layer in hf.model.layers]
    tied = copy.deepcopy(hf)
    with torch.no_grad():
        for slot in schedule:
            for name, param in tied.model.layers[slot.depth].named_parameters():
                if "norm" in name and not tie_norms:
                    continue  # per-depth norms keep each depth's own gains
                param.copy_(torch.stack([originals[d][name] for d in sources[slot.layer]]).mean(0))
    return tied


@pytest.mark.parametrize("norms", ["tied", "per-depth"])
@pytest.mark.parametrize(
    ("strategy", "init"), [("cycle", "stepwise"), ("cycle", "average"), ("sequence", "lower"), ("middle-cycle", "average")]
)
@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_text"])
def test_rank_zero_equals_hand_tied_transformers_model(family: str, strategy: str, init: str, norms: str) -> None:
    hf, ids, original = _reference(family)
    tied = _hand_tied(hf, 2, strategy, init, tie_norms=norms == "tied")
    model = recursify.convert(hf, loops=2, init=init, rank=0, strategy=strategy, norms=norms, progress=False)
    with torch.no_grad():
        ref = tied(ids).logits
        got = model(ids).logits
    assert (got - ref).abs().max() < 1e-4
    assert (got - original).abs().max() > 0.1  # tying changed the function, so the match above is informative


@pytest.mark.parametrize(("prelude", "coda", "init"), [(2, 0, "stepwise"), (0, 2, "average"), (1, 1, "lower"), (2, 2, "average")])
@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_prelude_coda_rank_zero_equals_hand_tied_transformers_model(family: str, prelude: int, coda: int, init: str) -> None:
    hf, ids, original = _reference(family)
    loops = 2 if prelude + coda < 4 else 1
    tied = _hand_tied(hf, loops, "cycle", init, tie_norms=False, prelude=prelude, coda=coda)
    model = recursify.convert(hf, loops=loops, init=init, rank=0, prelude=prelude, coda=coda, progress=False)
    # by hand: the prelude and coda keep their own depths; the looped middle follows the rule over the middle depths only
    middle = list(range(prelude, 6 - coda))
    expected = {"stepwise": [[middle[0]], [middle[-1]]], "lower": [[middle[0]], [middle[1]]]}.get(init)
    sources = init_sources(model.schedule, init)
    assert sources[:prelude] == [[d] for d in range(prelude)] and sources[len(sources) - coda :] == [[6 - coda + j] for j in range(coda)]
    if expected is not None and loops == 2:
        assert sources[prelude : prelude + 2] == expected
    with torch.no_grad():
        got = model(ids).logits
        assert (got - tied(ids).logits).abs().max() < 1e-4
    assert loops == 1 or (got - original).abs().max() > 0.1


def test_random_init_ignores_the_original_layers() -> None:
    hf, _, _ = _reference("gemma2")
    model = recursify.convert(hf, loops=2, init="random", rank=0, norms="tied", progress=False)
    for layer in model.layers:
        for name in LINEARS:
            weight = layer.linear(name).weight
            assert 0.015 < float(weight.detach().std()) < 0.025
            assert all(not torch.allclose(weight, original.get_parameter(HF_LINEARS[name] + ".weight")) for original in hf.model.layers)
        for norm in ("attn_norm", "mlp_norm", "post_attn_norm", "post_mlp_norm"):
            assert torch.equal(layer.norm(norm).weight, torch.zeros(1, 48))  # unit gain in Gemma's (1 + w) form
    assert torch.equal(model.embed.weight, hf.model.embed_tokens.weight)  # embeddings always come from the source


# --- LoRA init by truncated SVD ----------------------------------------------------------------


@pytest.mark.parametrize("rank", [1, 3, 12])
@pytest.mark.parametrize("shape", [(20, 12), (12, 20)], ids=["tall", "wide"])
def test_svd_lora_is_the_best_rank_r_approximation(shape: tuple[int, int], rank: int) -> None:
    gen = torch.Generator().manual_seed(3)
    residual = torch.randn(*shape, generator=gen)
    a, b = svd_lora(residual, rank, gen)
    assert a.shape == (rank, shape[1]) and b.shape == (shape[0], rank)
    assert a.dtype == b.dtype == torch.float32
    u, s, vh = torch.linalg.svd(residual.double(), full_matrices=False)
    best = (u[:, :rank] * s[:rank]) @ vh[:rank]
    torch.testing.assert_close((b @ a).double(), best, atol=1e-5, rtol=0)
    # A holds orthonormal right singular directions (B = U_r S_r), as in the paper's init
    torch.testing.assert_close((a.double() @ a.double().T), torch.eye(rank, dtype=torch.float64), atol=1e-5, rtol=0)
    # Eckart-Young: the error left is exactly the dropped singular values
    error = torch.linalg.matrix_norm(residual.double() - (b @ a).double()) ** 2
    torch.testing.assert_close(error, (s[rank:] ** 2).sum(), atol=1e-4, rtol=0)


def test_svd_lora_of_a_low_rank_residual_is_exact_at_its_rank() -> None:
    gen = torch.Generator().manual_seed(4)
    residual = torch.randn(16, 2, generator=gen) @ torch.randn(2, 24, generator=gen)  # rank 2
    a, b = svd_lora(residual, 2, gen)
    torch.testing.assert_close(b @ a, residual, atol=1e-5, rtol=0)


def test_svd_lora_of_zero_residual_uses_standard_init() -> None:
    a, b = svd_lora(torch.zeros(20, 12), 4, torch.Generator().manual_seed(0))
    assert torch.equal(b, torch.zeros(20, 4))
    assert a.shape == (4, 12) and bool(a.abs().sum() > 0)  # A random so the pair still gets gradients


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_converted_lora_is_truncated_svd_of_each_depths_residual(family: str) -> None:
    hf, _, _ = _reference(family)
    rank = 5
    model = recursify.convert(hf, loops=2, init="stepwise", rank=rank, progress=False)
    schedule = model.schedule
    for layer_index, layer in enumerate(model.layers):
        for name in LINEARS:
            linear = layer.linear(name)
            for visit, depth in enumerate(depths_of_layer(schedule, layer_index)):
                original = hf.model.layers[depth].get_parameter(HF_LINEARS[name] + ".weight").double()
                residual = original - linear.weight.double()
                delta = (linear.lora_B[visit] @ linear.lora_A[visit]).double()
                if not residual.any():  # stepwise's source depth: standard LoRA init, no change
                    assert torch.equal(linear.lora_B[visit], torch.zeros_like(linear.lora_B[visit]))
                    continue
                u, s, vh = torch.linalg.svd(residual, full_matrices=False)
                torch.testing.assert_close(delta, (u[:, :rank] * s[:rank]) @ vh[:rank], atol=1e-5, rtol=0)
    # stepwise on L=6, K=3 copies depths 0, 2, 5 into layers 0, 1, 2; under cycle layer 0 serves
    # depths 0, 3 and layer 2 serves 2, 5, so only (layer 0, visit 0) and (layer 2, visit 1) copy their own depth
    zero_visits = [(s.layer, s.visit) for s in schedule if not model.layers[s.layer].q.lora_B[s.visit].any()]
    assert zero_visits == [(0, 0), (2, 1)]


def test_zero_lora_init_starts_at_the_pure_recursive_model() -> None:
    hf, ids, _ = _reference("qwen3")
    relaxed = recursify.convert(hf, loops=3, init="average", rank=4, lora_init="zero", progress=False)
    pure = recursify.convert(hf, loops=3, init="average", rank=0, progress=False)
    assert relaxed.layers[0].q.lora_A.abs().sum() > 0
    with torch.no_grad():
        assert (relaxed(ids).logits - pure(ids).logits).abs().max() < 1e-5


def test_rank_above_every_linears_min_in_out_raises_config_error() -> None:
    hf, _, _ = _reference("llama")
    # min(in, out): q, o, gate, up, down 48; k, v (48 -> 32) 32. 48 is the largest usable int rank.
    with pytest.raises(ConfigError, match=r"rank 49 exceeds min\(in, out\) = 48 of every linear.*'full'"):
        recursify.convert(hf, loops=2, rank=49, progress=False)
    for bad in (-1, "two", "1.5"):
        with pytest.raises(ConfigError, match="rank"):
            recursify.convert(hf, loops=2, rank=bad, progress=False)


def test_rank_above_a_narrow_linears_min_in_out_is_capped_there() -> None:
    hf, _, _ = _reference("llama")
    model = recursify.convert(hf, loops=2, rank=40, progress=False)
    assert model.recursion.ranks == {"q": 40, "k": 32, "v": 32, "o": 40, "gate": 40, "up": 40, "down": 40}
    assert model.layers[0].k.lora_A.shape == (2, 32, 48) and model.layers[0].q.lora_A.shape == (2, 40, 48)
    assert resolve_ranks("full", {"q": (48, 64), "down": (80, 48)}) == {"q": 48, "down": 48}
    assert resolve_ranks("7", {"q": (48, 64)}) == {"q": 7}
    assert resolve_ranks(48, {"q": (48, 64), "k": (48, 32)}) == {"q": 48, "k": 32}


# --- parameter accounting ----------------------------------------------------------------------


def _closed_form_counts(hf: Any, loops: int, strategy: str, rank: int | str, norms: str, prelude: int = 0, coda: int = 0) -> dict[str, int]:
    cfg = hf.config
    num_layers, hidden, vocab = cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size
    if strategy == "middle-cycle":
        prelude, coda = 1, 1
    # visits per unique layer: the prelude and coda layers serve one depth each and carry no LoRA
    looped = [loops] * ((num_layers - prelude - coda) // loops)
    visits = [1] * prelude + looped + [1] * coda
    layer0 = hf.model.layers[0]
    bias_residuals = rank != 0 and loops > 1
    linears = nonlinear = lora = 0
    for module_name in HF_LINEARS.values():
        out_f, in_f = layer0.get_submodule(module_name).weight.shape
        r = min(in_f, out_f) if rank == "full" else rank
        linears += out_f * in_f
        lora += sum(looped) * r * (in_f + out_f)
        if layer0.get_submodule(module_name).bias is not None:
            linears += out_f
            lora += sum(looped) * out_f if bias_residuals else 0
    norms_per_layer = {n: p.numel() for n, p in layer0.named_parameters() if "norm" in n}
    sandwich = "pre_feedforward_layernorm.weight" in norms_per_layer  # Gemma2/3: post_attention_layernorm is a sandwich norm
    pre_norms = {"input_layernorm.weight", "pre_feedforward_layernorm.weight" if sandwich else "post_attention_layernorm.weight"}
    for v in visits:
        for name, dim in norms_per_layer.items():
            tied = norms == "tied" or (norms == "fold" and name in pre_norms)  # fold ties exactly the pre-linear norms
            nonlinear += dim * (1 if tied else v)
    embedding = vocab * hidden * (1 if cfg.tie_word_embeddings else 2)
    return {"embedding": embedding, "non_embedding": len(visits) * linears + nonlinear + hidden, "lora": lora}


@pytest.mark.parametrize(
    ("family", "loops", "strategy", "rank", "norms"),
    [
        ("llama", 1, "cycle", 0, "per-depth"),
        ("llama", 2, "cycle", 4, "per-depth"),
        ("qwen2", 3, "cycle", 2, "tied"),
        ("qwen2", 2, "sequence", 0, "per-depth"),
        ("gemma3_text", 2, "cycle", "full", "fold"),
        ("gemma2", 2, "cycle-rev", 3, "fold"),
        ("mistral", 2, "middle-cycle", 6, "tied"),
    ],
)
def test_param_counts_match_closed_form(family: str, loops: int, strategy: str, rank: int | str, norms: str) -> None:
    hf, _, _ = _reference(family)
    model = recursify.convert(hf, loops=loops, strategy=strategy, rank=rank, norms=norms, progress=False)
    counts = model.param_counts()
    expected = _closed_form_counts(hf, loops, strategy, rank, norms)
    source_total = sum(p.numel() for p in hf.parameters())  # transformers counts a tied head once
    assert {k: counts[k] for k in expected} == expected
    assert counts["total"] == sum(expected.values()) == sum(p.numel() for p in model.parameters())
    assert counts["source_total"] == source_total
    assert counts["ratio"] == pytest.approx(counts["total"] / source_total)
    if loops == 1 and rank == 0:
        assert counts["total"] == source_total and counts["ratio"] == 1.0


@pytest.mark.parametrize(
    ("family", "loops", "prelude", "coda", "rank", "norms"),
    [("llama", 2, 2, 0, 4, "per-depth"), ("qwen2", 2, 1, 3, 3, "per-depth"), ("gemma2", 4, 1, 1, 2, "fold"), ("qwen3", 1, 2, 2, 5, "tied")],
)
def test_prelude_coda_param_counts_match_closed_form(family: str, loops: int, prelude: int, coda: int, rank: int, norms: str) -> None:
    hf, _, _ = _reference(family)
    model = recursify.convert(hf, loops=loops, prelude=prelude, coda=coda, rank=rank, norms=norms, progress=False)
    expected = _closed_form_counts(hf, loops, "cycle", rank, norms, prelude, coda)
    assert {k: model.param_counts()[k] for k in expected} == expected


def test_param_counts_worked_example() -> None:
    """Llama tiny (V=97, H=48, I=80, 4x16 q heads, 2x16 kv heads, untied), loops 2, rank 4, per-depth norms."""
    hf, _, _ = _reference("llama")
    counts = recursify.convert(hf, loops=2, rank=4, progress=False).param_counts()
    per_layer = 48 * 64 + 2 * 48 * 32 + 64 * 48 + 3 * 48 * 80  # 21 696
    lora_per_visit = 4 * ((48 + 64) + 2 * (48 + 32) + (64 + 48) + 3 * (48 + 80))  # 3 072
    assert counts["embedding"] == 2 * 97 * 48
    assert counts["non_embedding"] == 3 * per_layer + 6 * 2 * 48 + 48
    assert counts["lora"] == 6 * lora_per_visit
    assert counts["source_total"] == 2 * 97 * 48 + 6 * (per_layer + 2 * 48) + 48


# --- ownership ---------------------------------------------------------------------------------


def _storages(module: torch.nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in module.state_dict().values()}


@pytest.mark.parametrize(("loops", "init", "norms"), [(1, "stepwise", "per-depth"), (2, "stepwise", "tied"), (3, "lower", "per-depth")])
def test_converted_model_never_shares_storage_with_its_source(loops: int, init: str, norms: str) -> None:
    hf, ids, original = _reference("gemma")  # tied embeddings
    teacher = recursify.convert(hf, loops=1, progress=False)
    student = recursify.convert(hf, loops=loops, init=init, norms=norms, rank=2, progress=False)
    assert not _storages(student) & (_storages(hf) | _storages(teacher))
    params = list(student.parameters())
    assert params and all(isinstance(p, torch.nn.Parameter) and p.requires_grad for p in params)
    with torch.no_grad():  # an in-place optimizer step on the student must not touch the teacher or the source
        for param in params:
            param.add_(0.5)
        assert (hf(ids).logits - original).abs().max() == 0
        assert (teacher(ids).logits - original).abs().max() < 1e-4
