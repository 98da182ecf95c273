"""The engine against plain generation: every batching policy, exit policy and KV mode, token for token.

References: ``model.generate`` (no exits), the model truncated to b loops (fixed exits) and a naive
one-token-at-a-time decoder with exits (confidence, gate, saturation, ensemble) and propagate/share keys
(tests/serving/reference.py); the LM head's calls are counted (once per token with hidden-state exits).
"""

from __future__ import annotations

from functools import cache

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import early_exit_greedy, truncated_greedy

import recursify
from recursify.config import SamplingConfig, parse_speculative
from recursify.errors import ConfigError
from recursify.evaluation.calibration import collect_exit_data
from recursify.modeling.exit_gates import ExitGates
from recursify.modeling.model import RecursiveModel
from recursify.serve import Engine
from recursify.serving.exit_policy import parse_exit_policy
from tiny import tiny_model, tiny_tokenizer

NEW = 8
PROPERTY_NEW = 5  # enough decode steps to reuse keys across tokens and loops; the property test runs many requests
MODELS = [("llama", 3), ("gemma2", 2)]  # gemma2: sliding windows that differ between loops, soft-caps, sandwich norms


@cache
def _model(family: str, loops: int) -> RecursiveModel:
    return recursify.convert(tiny_model(family, seed=3), loops=loops, init="average", rank=4, progress=False)


def _prompt(seed: int, length: int) -> list[int]:
    return torch.randint(3, 97, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@cache
def _generate(family: str, loops: int, prompt: tuple[int, ...], new: int = NEW) -> list[int]:
    out = _model(family, loops).generate(torch.tensor([prompt]), max_new_tokens=new, eos_token_ids=[])
    return out[0, len(prompt) :].tolist()


def _engine(model: RecursiveModel, **options: object) -> Engine:
    """An engine with a small KV pool (allocating the default 16k positions per example costs test time)."""
    return Engine(model, **{"max_kv_tokens": 512, **options})  # type: ignore[arg-type]


def _median_confidences(model: RecursiveModel, prompts: list[list[int]]) -> str:
    """A confidence spec whose per-loop thresholds are the model's median confidences, so tokens exit at every loop."""
    with torch.no_grad():
        exits = [model(torch.tensor([p]), output_exits=True).exit_logits for p in prompts]
    medians = []
    for loop in range(model.loops - 1):
        confidences = torch.cat([torch.softmax(e[loop][0], -1).amax(-1) for e in exits if e is not None])
        medians.append(float(confidences.median()))
    return "confidence:" + ",".join(f"{m:.6f}" for m in medians)


def _serve(engine: Engine, prompts: list[list[int]], new: int = NEW, **options: object) -> dict[str, list[int]]:
    outputs = {out.request_id: out for out in engine.generate(prompts, max_new_tokens=new, stop_token_ids=[], **options)}
    assert len(outputs) == len(prompts)
    return {rid: out.token_ids for rid, out in outputs.items()}


@pytest.mark.parametrize("batching", ["static", "sequence", "depthwise"])  # every policy on every run, not by chance
@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors])
@given(
    model_index=st.integers(0, len(MODELS) - 1),
    max_batch=st.integers(1, 4),
    chunk=st.integers(2, 12),
    lengths=st.lists(st.integers(1, 12), min_size=1, max_size=4),
    arrivals=st.lists(st.integers(0, 6), min_size=4, max_size=4),
    seed=st.integers(0, 10_000),
)
def test_no_exit_equals_generate_for_any_batching_and_arrival(
    batching: str, model_index: int, max_batch: int, chunk: int, lengths: list[int], arrivals: list[int], seed: int
) -> None:
    """Random arrival steps, batch limits, prefill chunks and prompt lengths; PROPERTY_NEW tokens keep each example cheap."""
    family, loops = MODELS[model_index]
    engine = _engine(_model(family, loops), batching=batching, max_batch=max_batch, max_prefill_chunk=chunk, exit="none")
    prompts = {f"r{i}": _prompt(seed + i, n) for i, n in enumerate(lengths)}
    schedule = sorted(zip(arrivals, prompts, strict=False))  # requests arrive at random steps
    done: dict[str, list[int]] = {}
    step = 0
    while schedule or engine.has_unfinished():
        while schedule and schedule[0][0] <= step:
            _, rid = schedule.pop(0)
            engine.add_request(prompts[rid], max_new_tokens=PROPERTY_NEW, stop_token_ids=[], request_id=rid)
        for out in engine.step():
            if out.finished:
                assert out.request_id not in done
                done[out.request_id] = out.token_ids
                assert out.loops_run == [loops] * PROPERTY_NEW
        step += 1
    assert done == {rid: _generate(family, loops, tuple(p), PROPERTY_NEW) for rid, p in prompts.items()}
    assert engine.kv_usage()["used_blocks"] == 0 and engine.kv_usage()["live_requests"] == 0


@pytest.mark.parametrize("batching", ["static", "sequence"])
def test_vanilla_model_serves_like_generate(batching: str) -> None:
    model = recursify.convert(tiny_model("qwen2", seed=4), loops=1, progress=False)
    prompts = [_prompt(40 + i, n) for i, n in enumerate((3, 8, 1))]
    served = _serve(_engine(model, batching=batching, max_batch=2), prompts)
    for i, prompt in enumerate(prompts):
        reference = model.generate(torch.tensor([prompt]), max_new_tokens=NEW, eos_token_ids=[])[0, len(prompt) :].tolist()
        assert served[f"req-{i}"] == reference


@pytest.mark.parametrize(("family", "loops"), MODELS)
def test_confidence_one_never_exits_and_equals_none(family: str, loops: int) -> None:
    prompts = [_prompt(50 + i, n) for i, n in enumerate((4, 9))]
    engine = _engine(_model(family, loops), exit="confidence:1.0")
    outputs = list(engine.generate(prompts, max_new_tokens=NEW, stop_token_ids=[]))
    for out in outputs:
        assert out.loops_run == [loops] * NEW
    none = _serve(_engine(_model(family, loops), exit="none"), prompts)
    assert {out.request_id: out.token_ids for out in outputs} == none


@pytest.mark.parametrize("batching", ["depthwise", "sequence", "static"])
@pytest.mark.parametrize("fixed", [1, 2])
def test_fixed_exit_equals_model_truncated_to_b_loops(batching: str, fixed: int) -> None:
    model = _model("llama", 3)
    prompts = [_prompt(60 + i, n) for i, n in enumerate((5, 2, 11))]
    served = _serve(_engine(model, batching=batching, max_batch=2, exit=f"fixed:{fixed}", max_prefill_chunk=4), prompts)
    for i, prompt in enumerate(prompts):
        assert served[f"req-{i}"] == truncated_greedy(model, prompt, NEW, fixed)


@pytest.mark.parametrize("kv_mode", ["propagate", "share"])
@pytest.mark.parametrize("batching", ["depthwise", "sequence", "static"])
def test_confidence_exits_match_naive_decoder(kv_mode: str, batching: str) -> None:
    """Mixed exit loops (the threshold makes tokens leave at every loop) and deeper keys from propagate/share."""
    model = _model("llama", 3)
    prompts = [_prompt(70 + i, n) for i, n in enumerate((6, 3, 9, 1))]
    spec = _median_confidences(model, [_prompt(75 + i, 16) for i in range(4)])
    engine = _engine(model, batching=batching, max_batch=3, exit=spec, kv_mode=kv_mode)
    outputs = {out.request_id: out for out in engine.generate(prompts, max_new_tokens=NEW, stop_token_ids=[])}
    all_loops = []
    for i, prompt in enumerate(prompts):
        tokens, loops_run = early_exit_greedy(model, prompt, NEW, parse_exit_policy(spec, 3), kv_mode)
        assert outputs[f"req-{i}"].token_ids == tokens
        assert outputs[f"req-{i}"].loops_run == loops_run
        all_loops += loops_run
    assert {1, 2, 3} <= set(all_loops), "the threshold should make tokens exit at every loop"


# --- prelude / coda: the prelude runs with a token's first loop, the coda once when it leaves -------------

PLANS = [("llama", 2, 1, 1), ("gemma2", 2, 2, 0), ("qwen2", 3, 0, 3)]  # (family, loops, prelude, coda); gemma2: windows per depth


@cache
def _plan_model(family: str, loops: int, prelude: int, coda: int) -> RecursiveModel:
    model = recursify.convert(tiny_model(family, seed=5), loops=loops, prelude=prelude, coda=coda, init="average", rank=3, progress=False)
    torch.manual_seed(1)
    with torch.no_grad():  # LoRA off its init, so the loops really differ
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.add_(torch.randn_like(param) * 0.05)
    return model


@pytest.mark.parametrize("batching", ["static", "sequence", "depthwise"])
@pytest.mark.parametrize("plan", PLANS)
def test_prelude_coda_models_serve_like_generate(plan: tuple[str, int, int, int], batching: str) -> None:
    model = _plan_model(*plan)
    prompts = [_prompt(130 + i, n) for i, n in enumerate((5, 1, 11, 3))]
    engine = _engine(model, batching=batching, max_batch=3, max_prefill_chunk=4, exit="none")
    served = _serve(engine, prompts)
    for i, prompt in enumerate(prompts):
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=NEW, eos_token_ids=[])[0, len(prompt) :].tolist()
        assert served[f"req-{i}"] == expected


@pytest.mark.parametrize("batching", ["depthwise", "sequence", "static"])
@pytest.mark.parametrize("plan", PLANS[:2])
def test_prelude_coda_fixed_exit_equals_truncated_model(plan: tuple[str, int, int, int], batching: str) -> None:
    model = _plan_model(*plan)
    prompts = [_prompt(140 + i, n) for i, n in enumerate((5, 2, 9))]
    served = _serve(_engine(model, batching=batching, max_batch=2, exit="fixed:1", max_prefill_chunk=4), prompts)
    for i, prompt in enumerate(prompts):
        assert served[f"req-{i}"] == truncated_greedy(model, prompt, NEW, 1)


@pytest.mark.parametrize(
    ("plan", "batching", "kv_mode"),
    [
        (PLANS[0], "depthwise", "propagate"),
        (PLANS[0], "sequence", "share"),
        (PLANS[0], "static", "propagate"),
        (PLANS[2], "depthwise", "share"),
        (PLANS[2], "sequence", "propagate"),
    ],
)
def test_prelude_coda_confidence_exits_match_naive_decoder(plan: tuple[str, int, int, int], batching: str, kv_mode: str) -> None:
    model = _plan_model(*plan)
    prompts = [_prompt(150 + i, n) for i, n in enumerate((6, 3, 9, 1))]
    spec = _median_confidences(model, [_prompt(155 + i, 16) for i in range(4)])
    outputs = {
        out.request_id: out
        for out in _engine(model, batching=batching, max_batch=3, exit=spec, kv_mode=kv_mode).generate(
            prompts, max_new_tokens=NEW, stop_token_ids=[]
        )
    }
    all_loops = []
    for i, prompt in enumerate(prompts):
        tokens, loops_run = early_exit_greedy(model, prompt, NEW, parse_exit_policy(spec, model.loops), kv_mode)
        assert outputs[f"req-{i}"].token_ids == tokens
        assert outputs[f"req-{i}"].loops_run == loops_run
        all_loops += loops_run
    assert set(range(1, model.loops + 1)) <= set(all_loops), "the threshold should make tokens exit at every loop"


def test_oracle_records_first_loop_agreeing_with_the_last() -> None:
    model = _model("llama", 3)
    prompt = _prompt(80, 6)
    out = next(_engine(model, exit="oracle").generate([prompt], max_new_tokens=NEW, stop_token_ids=[]))
    assert out.token_ids == _generate("llama", 3, tuple(prompt))
    assert out.loops_run == [3] * NEW  # oracle runs every loop: simulation only
    with torch.no_grad():
        exits = model(torch.tensor([prompt + out.token_ids[:-1]]), output_exits=True).exit_logits
    assert exits is not None
    predictions = torch.stack([e[0, len(prompt) - 1 :].argmax(-1) for e in exits])  # (loops, NEW)
    expected = [next(b + 1 for b in range(3) if predictions[b, t] == predictions[-1, t]) for t in range(NEW)]
    assert out.oracle_loops == expected


def test_seeded_sampling_equals_generate() -> None:
    model = _model("gemma2", 2)
    sampling = SamplingConfig(temperature=0.9, top_p=0.9, seed=7)
    prompt = _prompt(90, 5)
    reference = model.generate(torch.tensor([prompt]), max_new_tokens=NEW, eos_token_ids=[], sampling=sampling)[0, 5:].tolist()
    served = _serve(_engine(model, max_batch=4), [prompt, _prompt(91, 3)], sampling=sampling)
    assert served["req-0"] == reference


def test_stop_token_stop_string_and_cancellation() -> None:
    model = _model("llama", 3)
    tokenizer = tiny_tokenizer()
    prompt = _prompt(100, 4)
    free = _generate("llama", 3, tuple(prompt), 12)
    stop_token, stop_text = free[5], tokenizer.decode(free[3:5])
    cut = next(n for n in range(1, 13) if stop_text in tokenizer.decode(free[:n]))  # tokens until the stop string shows
    model.tokenizer = tokenizer
    try:
        engine = _engine(model, max_batch=4)
        stopped = engine.add_request(prompt, max_new_tokens=12, stop_token_ids=[stop_token])
        worded = engine.add_request(prompt, max_new_tokens=12, stop=[stop_text], stop_token_ids=[])
        cancelled = engine.add_request(_prompt(101, 7), max_new_tokens=12, stop_token_ids=[])
        kept = engine.add_request(_prompt(102, 3), max_new_tokens=12, stop_token_ids=[])
        finals = {}
        for step in range(200):
            if step == 4:
                assert engine.cancel(cancelled) is not None
                assert engine.cancel(cancelled) is None
            finals.update({out.request_id: out for out in engine.step() if out.finished})
            if not engine.has_unfinished():
                break
    finally:
        model.tokenizer = None
    assert finals[stopped].token_ids == free[: free.index(stop_token) + 1] and finals[stopped].finish_reason == "stop"
    assert finals[worded].finish_reason == "stop" and finals[worded].token_ids == free[:cut]
    assert finals[worded].text == tokenizer.decode(free[:cut]).split(stop_text)[0]
    assert cancelled not in finals
    assert finals[kept].token_ids == _generate("llama", 3, tuple(_prompt(102, 3)), 12) and finals[kept].finish_reason == "length"
    assert engine.kv_usage()["used_blocks"] == 0


@pytest.mark.parametrize("batching", ["depthwise", "sequence", "static"])
def test_kv_on_demand_preempts_and_recomputes_yet_equals_generate(batching: str) -> None:
    """6 blocks of 8 for 4 running requests that each grow to 3: blocks come as tokens do, the newest is preempted."""
    model = _model("llama", 3)
    prompts = [_prompt(110 + i, n) for i, n in enumerate((10, 3, 7, 12, 5, 9))]
    engine = _engine(model, batching=batching, max_batch=4, max_kv_tokens=48, block_size=8)
    done: dict[str, list[int]] = {}
    peak = 0
    for out in engine.stream(prompts, max_new_tokens=NEW, stop_token_ids=[]):
        peak = max(peak, engine.kv_usage()["live_requests"])
        if out.finished:
            assert out.request_id not in done
            done[out.request_id] = out.token_ids
    assert engine.stats.preemptions > 0 and peak >= 3  # reserving prompt + max_new_tokens would have run 2 at a time
    assert done == {f"req-{i}": _generate("llama", 3, tuple(p)) for i, p in enumerate(prompts)}
    assert engine.kv_usage()["used_blocks"] == 0 and engine.kv_usage()["live_requests"] == 0


@pytest.mark.parametrize("batching", ["depthwise", "sequence", "static"])
@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors])
@given(
    blocks=st.integers(4, 8),
    max_batch=st.integers(2, 5),
    chunk=st.integers(2, 8),
    lengths=st.lists(st.integers(1, 9), min_size=3, max_size=6),
    fixed=st.sampled_from(["none", "fixed:2"]),
    seed=st.integers(0, 10_000),
)
def test_preemption_never_changes_greedy_outputs(
    batching: str, blocks: int, max_batch: int, chunk: int, lengths: list[int], fixed: str, seed: int
) -> None:
    """Random tiny pools (blocks of 4; a request fits alone), batches and chunks: outputs equal the reference, none lost."""
    model = _model("llama", 3)
    options = {"max_batch": max_batch, "max_prefill_chunk": chunk, "exit": fixed, "max_kv_tokens": 4 * blocks, "block_size": 4}
    engine = _engine(model, batching=batching, **options)  # the longest request holds 9 + 5 - 1 = 13 positions
    prompts = [_prompt(seed + i, n) for i, n in enumerate(lengths)]
    done = {out.request_id: out.token_ids for out in engine.generate(prompts, max_new_tokens=PROPERTY_NEW, stop_token_ids=[])}
    for i, prompt in enumerate(prompts):
        new = PROPERTY_NEW
        reference = _generate("llama", 3, tuple(prompt), new) if fixed == "none" else truncated_greedy(model, prompt, new, 2)
        assert done[f"req-{i}"] == reference
    assert len(done) == len(prompts) and engine.kv_usage()["used_blocks"] == 0


@pytest.mark.parametrize("kv_mode", ["propagate", "share"])
def test_confidence_exits_under_preemption_finish_every_request(kv_mode: str) -> None:
    """With early exits a recomputed prefix runs as one prefill chunk, not at the loops its tokens once exited at,
    so later tokens may differ from an unpreempted run (documented); every request still finishes exactly once."""
    model = _model("llama", 3)
    spec = _median_confidences(model, [_prompt(75 + i, 16) for i in range(4)])
    prompts = [_prompt(130 + i, n) for i, n in enumerate((10, 3, 7, 12, 5, 9))]
    engine = _engine(model, max_batch=4, max_kv_tokens=48, block_size=8, exit=spec, kv_mode=kv_mode)
    outputs = list(engine.generate(prompts, max_new_tokens=NEW, stop_token_ids=[]))
    assert sorted(out.request_id for out in outputs) == [f"req-{i}" for i in range(len(prompts))]
    assert all(len(out.token_ids) == len(out.loops_run) == NEW for out in outputs)
    assert engine.stats.preemptions > 0 and engine.kv_usage()["used_blocks"] == 0


def test_seeded_sampling_survives_preemption() -> None:
    """The sampled request arrives last, so it is the one preempted; its generator resumes where it stopped."""
    model = _model("gemma2", 2)
    sampling = SamplingConfig(temperature=0.9, top_p=0.9, seed=7)
    prompt = _prompt(90, 5)
    reference = model.generate(torch.tensor([prompt]), max_new_tokens=NEW, eos_token_ids=[], sampling=sampling)[0, 5:].tolist()
    engine = _engine(model, max_batch=4, max_kv_tokens=16, block_size=4)
    for i in range(2):
        engine.add_request(_prompt(91 + i, 3), max_new_tokens=NEW, stop_token_ids=[])
    sampled = engine.add_request(prompt, max_new_tokens=NEW, sampling=sampling, stop_token_ids=[])
    final = None
    while engine.has_unfinished():
        final = next((out for out in engine.step() if out.request_id == sampled and out.finished), final)
    assert final is not None and final.preemptions > 0
    assert final.token_ids == reference


def test_max_new_tokens_capped_at_the_context_and_the_pool() -> None:
    model = _model("llama", 3)
    engine = _engine(model, max_model_len=20)
    out = next(engine.generate([_prompt(120, 6)], max_new_tokens=100, stop_token_ids=[]))
    assert len(out.token_ids) == 14 and out.finish_reason == "length"  # 6 + 14 = the 20-token context
    assert out.token_ids == _generate("llama", 3, tuple(_prompt(120, 6)), 14)
    with pytest.raises(ConfigError, match="context is 20 tokens"):
        engine.add_request(_prompt(121, 20), max_new_tokens=1)
    small = _engine(model, max_kv_tokens=48, block_size=8)  # a request must fit the pool alone: 49 tokens at most
    assert small.new_tokens_allowed(45) == 4
    with pytest.raises(ConfigError, match="KV pool holds 48 positions"):
        small.add_request(_prompt(122, 49), max_new_tokens=8)
    assert Engine(model, max_kv_tokens=512).max_model_len == 256  # the tiny models' max_position_embeddings


def test_bad_options_raise_config_errors() -> None:
    model = _model("llama", 3)
    with pytest.raises(ConfigError, match="batching"):
        _engine(model, batching="pipeline")
    with pytest.raises(ConfigError, match="fixed"):
        _engine(model, exit="fixed:4")
    with pytest.raises(ConfigError, match="kv_mode"):
        _engine(model, kv_mode="recompute")
    with pytest.raises(ConfigError, match="cycle"):
        _engine(recursify.convert(tiny_model("llama", seed=3), loops=3, strategy="sequence", progress=False))
    with pytest.raises(ConfigError, match="tokenizer"):
        _engine(model).add_request("text prompt")


@cache
def _exit_model(prelude: int = 0, coda: int = 0) -> RecursiveModel:
    """The llama model with random exit gates and a random exit ensemble attached (a copy: other tests see none).

    With a prelude and a coda it also gets random exit heads, which run after the coda.
    """
    model = recursify.convert(tiny_model("llama", seed=3), loops=3, init="average", rank=4, prelude=prelude, coda=coda, progress=False)
    torch.manual_seed(4)
    if prelude or coda:
        model.add_exit_heads(4)
        with torch.no_grad():
            assert model.exit_heads is not None
            model.exit_heads.up.normal_(0, 0.05)
    model.addons.gates = ExitGates(model.arch.hidden_size, 3, width=8).eval().requires_grad_(False)
    model.addons.ensemble = torch.tensor([[0.8, 0.0], [0.3, 0.9]])
    return model


def _median_spec(model: RecursiveModel, kind: str, prompts: list[list[int]]) -> str:
    """A ``kind`` spec at each loop's median signal, so tokens exit at every loop."""
    data = collect_exit_data(model, torch.tensor([t for p in prompts for t in p]), window=16)
    medians = data.scores[kind].median(dim=0).values.tolist()
    return f"{kind}:" + ",".join(f"{m:.6f}" for m in medians)


@pytest.mark.parametrize("plan", [(0, 0), (1, 2)], ids=["cycle", "prelude1-coda2-exit-heads"])
@pytest.mark.parametrize("kind", ["gate", "saturation", "ensemble"])
def test_gate_saturation_and_ensemble_exits_match_naive_decoder(kind: str, plan: tuple[int, int]) -> None:
    model = _exit_model(*plan)
    prompts = [_prompt(130 + i, n) for i, n in enumerate((6, 3, 9, 1))]
    spec = _median_spec(model, kind, [_prompt(135 + i, 16) for i in range(4)])
    engine = _engine(model, batching="depthwise", max_batch=3, exit=spec)
    outputs = {out.request_id: out for out in engine.generate(prompts, max_new_tokens=NEW, stop_token_ids=[])}
    all_loops = []
    for i, prompt in enumerate(prompts):
        tokens, loops_run = early_exit_greedy(model, prompt, NEW, parse_exit_policy(spec, 3, model.addons), "propagate")
        assert outputs[f"req-{i}"].token_ids == tokens
        assert outputs[f"req-{i}"].loops_run == loops_run
        all_loops += loops_run
    assert {1, 2, 3} <= set(all_loops), "the thresholds should make tokens exit at every loop"


@pytest.mark.parametrize("plan", [(0, 0), (1, 2)], ids=["cycle", "prelude1-coda2-exit-heads"])
@pytest.mark.parametrize(("kind", "head_every_loop"), [("gate", False), ("saturation", False), ("confidence", True)])
def test_lm_head_runs_once_per_token_with_hidden_state_exits(
    kind: str, head_every_loop: bool, plan: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _exit_model(*plan)
    prompts = [_prompt(140 + i, n) for i, n in enumerate((5, 8, 2))]
    spec = _median_spec(model, kind, [_prompt(145 + i, 16) for i in range(3)])
    rows = []
    original = model.lm_logits
    monkeypatch.setattr(model, "lm_logits", lambda z: rows.append(z.reshape(-1, z.shape[-1]).shape[0]) or original(z))
    outputs = list(_engine(model, max_batch=3, exit=spec).generate(prompts, max_new_tokens=NEW, stop_token_ids=[]))
    tokens = sum(len(out.token_ids) for out in outputs)
    loops = sum(sum(out.loops_run) for out in outputs)
    assert sum(rows) == (loops if head_every_loop else tokens)
    assert 3 * tokens > loops > tokens  # tokens left at different loops


def test_speculative_engine_serves_one_request_at_a_time_like_generate() -> None:
    model = _model("gemma2", 2)  # sliding windows; its loop-1 drafts are often accepted
    prompts = [_prompt(150 + i, n) for i, n in enumerate((5, 9, 2))]
    engine = _engine(model, max_batch=1, speculative="1x3")
    outputs = {out.request_id: out for out in engine.generate(prompts, max_new_tokens=NEW, stop_token_ids=[])}
    for i, prompt in enumerate(prompts):
        assert outputs[f"req-{i}"].token_ids == _generate("gemma2", 2, tuple(prompt)), i
        assert outputs[f"req-{i}"].finish_reason == "length"
    assert engine.speculative_stats.rounds > 0 and engine.stats.steps < len(prompts) * NEW  # several tokens per step
    sampling = SamplingConfig(temperature=0.8, top_k=5, seed=3)
    reference = model.generate(
        torch.tensor([prompts[0]]), max_new_tokens=NEW, eos_token_ids=[], sampling=sampling, speculative=parse_speculative("1x3")
    )
    served = _serve(_engine(model, max_batch=1, speculative="1x3"), prompts[:1], sampling=sampling)
    assert served["req-0"] == reference[0, len(prompts[0]) :].tolist()
    free = _generate("gemma2", 2, tuple(prompts[1]))
    stopped = next(_engine(model, max_batch=1, speculative="1x3").generate([prompts[1]], max_new_tokens=NEW, stop_token_ids=[free[4]]))
    assert stopped.token_ids == free[: free.index(free[4]) + 1] and stopped.finish_reason == "stop"
    with pytest.raises(ConfigError, match="max_batch=1"):
        _engine(model, max_batch=2, speculative="1x3")
    with pytest.raises(ConfigError, match="BxD"):
        _engine(model, max_batch=1, speculative="1")
    with pytest.raises(ConfigError, match="1..1 loops"):
        _engine(model, max_batch=1, speculative="2x3")
