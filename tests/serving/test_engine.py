"""The engine against plain generation: every batching policy, exit policy and KV mode, token for token.

References: ``model.generate`` (no exits), the model truncated to b loops (fixed exits) and a naive
one-token-at-a-time decoder with exits and propagate/share keys (tests/serving/reference.py).
"""

from __future__ import annotations

from functools import cache

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import early_exit_greedy, truncated_greedy

import recursify
from recursify.config import SamplingConfig
from recursify.errors import ConfigError
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


def test_kv_admission_waits_instead_of_overflowing() -> None:
    model = _model("llama", 3)
    prompts = [_prompt(110 + i, 10) for i in range(4)]
    engine = _engine(model, max_batch=4, max_kv_tokens=48, block_size=8)  # room for two requests of 17 positions (3 blocks each)
    peak = 0
    for _ in engine.stream(prompts, max_new_tokens=NEW, stop_token_ids=[]):
        peak = max(peak, engine.kv_usage()["live_requests"])
    assert peak == 2
    assert engine.kv_usage()["used_blocks"] == 0
    with pytest.raises(ConfigError, match="max_kv_tokens"):
        engine.add_request(_prompt(120, 45), max_new_tokens=8)


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
