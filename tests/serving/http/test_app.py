"""The server end to end with the official ``openai`` client: a tiny model served on 127.0.0.1 in a background thread.

References are independent of the engine: ``recursify.text.stream_text`` (the model's own cached
generation) for greedy and seeded text, the chat template applied by the tokenizer for chat.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from functools import cache
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

import recursify
from recursify.config import SamplingConfig
from recursify.modeling.model import RecursiveModel
from recursify.serving.config import EngineConfig
from recursify.serving.http.config import ServerConfig
from recursify.serving.http.server import BackgroundServer
from recursify.text import stream_text
from tiny import tiny_model, tiny_tokenizer

NAME = "tiny"
PROMPT = "The capital of France is"
TIMEOUT_S = 30.0
CHAT_TEMPLATE = "{% for m in messages %}"  # a minimal template: the tiny tokenizer ships none
CHAT_TEMPLATE += "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"


@cache
def _model() -> RecursiveModel:
    model = recursify.convert(tiny_model("llama", seed=1), loops=3, init="average", rank=0, progress=False)
    model.tokenizer = tiny_tokenizer()
    model.tokenizer.chat_template = CHAT_TEMPLATE
    return model


def _reference(prompt: str, new: int, chat: bool = False, sampling: SamplingConfig | None = None) -> str:
    """The model's own generation (``stream_text``: cached decoding, EOS ends it), independent of the engine."""
    return "".join(stream_text(_model(), prompt, new, sampling, chat))


def _server(max_waiting: int = 64, **engine: Any) -> BackgroundServer:
    config = EngineConfig(**{"max_kv_tokens": 1024, "max_batch": 8, **engine})
    return BackgroundServer(_model(), config, ServerConfig(port=0, log_level="warning", max_waiting=max_waiting), NAME)


@pytest.fixture(scope="module")
def server() -> Iterator[BackgroundServer]:
    with _server() as running:
        yield running


def _client(server: BackgroundServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT_S)


def _metric(server: BackgroundServer, name: str, **labels: str) -> float:
    text = httpx.get(server.url + "/metrics", timeout=TIMEOUT_S).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def _wait_until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _idle(server: BackgroundServer) -> bool:
    engine = server.worker.engine
    return not engine.has_unfinished() and engine.allocator.used_blocks == 0


def test_completion_equals_generate_and_reports_usage_and_loops(server: BackgroundServer) -> None:
    reply = _client(server).completions.create(model=NAME, prompt=PROMPT, max_tokens=12, temperature=0)
    assert reply.choices[0].text == _reference(PROMPT, 12)
    assert reply.choices[0].finish_reason == "length" and reply.model == NAME and reply.object == "text_completion"
    prompt_tokens = len(_model().tokenizer(PROMPT)["input_ids"])
    assert reply.usage is not None and (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (prompt_tokens, 12)
    extension = reply.model_extra["recursify"]  # type: ignore[index]
    assert extension["loops_per_token"] == [3] * 12 and extension["exit_policy"] == "none" and extension["mean_loops"] == 3.0


def test_chat_applies_the_chat_template(server: BackgroundServer) -> None:
    reply = _client(server).chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "Hello there"}], max_tokens=10, temperature=0
    )
    assert reply.choices[0].message.content == _reference("Hello there", 10, chat=True)
    assert reply.choices[0].message.role == "assistant" and reply.object == "chat.completion"


def test_streaming_chunks_reassemble_to_the_whole_response(server: BackgroundServer) -> None:
    client = _client(server)
    whole = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=16, temperature=0)
    usage = {"include_usage": True}
    chunks = list(client.completions.create(model=NAME, prompt=PROMPT, max_tokens=16, temperature=0, stream=True, stream_options=usage))
    assert "".join(chunk.choices[0].text for chunk in chunks if chunk.choices) == whole.choices[0].text
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] == "length"
    loops = [loop for chunk in chunks if chunk.choices for loop in chunk.model_extra["recursify"]["loops_per_token"]]  # type: ignore[index]
    assert loops == [3] * 16
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage  # include_usage: a last chunk with the counts

    chat = list(
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=8, temperature=0, stream=True)
    )
    assert chat[0].choices[0].delta.role == "assistant"
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chat) == _reference("Hi", 8, chat=True)

    body = {"model": NAME, "prompt": PROMPT, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=TIMEOUT_S) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(event.startswith("data: ") for event in events) and events[-1] == "data: [DONE]"


def test_stop_strings_cut_both_whole_and_streamed_text(server: BackgroundServer) -> None:
    free = _reference(PROMPT, 20)
    stop = free[5:8]
    expected = free[: free.index(stop)]
    client = _client(server)
    whole = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=20, temperature=0, stop=["zzz", stop])
    assert whole.choices[0].text == expected and whole.choices[0].finish_reason == "stop"
    stream = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=20, temperature=0, stop=stop, stream=True)
    assert "".join(chunk.choices[0].text for chunk in stream) == expected


def test_seeded_sampling_is_reproducible_and_equals_generate(server: BackgroundServer) -> None:
    client = _client(server)
    first, second = (client.completions.create(model=NAME, prompt=PROMPT, max_tokens=12, temperature=0.8, top_p=0.9, seed=5) for _ in "ab")
    sampling = SamplingConfig(temperature=0.8, top_p=0.9, seed=5)
    assert first.choices[0].text == second.choices[0].text == _reference(PROMPT, 12, sampling=sampling)


BAD_REQUESTS = [
    (b'{"model": "tiny", "prompt": ', 400, None),  # malformed JSON
    (b'["not", "an", "object"]', 400, None),
    ({"model": NAME, "prompt": "x", "max_tokens": "eight"}, 400, "max_tokens"),
    ({"model": NAME, "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ({"model": NAME, "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ({"model": NAME, "prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ({"model": NAME, "prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"model": NAME, "prompt": "x", "top_p": 1.01}, 400, "top_p"),
    ({"model": NAME, "prompt": ""}, 400, "prompt"),
    ({"model": NAME, "prompt": "x", "n": 2}, 400, "n"),
    ({"model": NAME, "prompt": "x", "logprobs": 3}, 400, "logprobs"),
    ({"model": NAME, "prompt": [5, 1000]}, 400, "prompt"),  # a token id outside the vocabulary
    ({"model": NAME, "prompt": "x" * 300}, 400, "prompt"),  # longer than the 256-token context
    ({"prompt": "x"}, 400, "model"),
    ({"model": "gpt-4", "prompt": "x"}, 404, "model"),
]


@pytest.mark.parametrize(("body", "status", "param"), BAD_REQUESTS)
def test_bad_input_gets_an_openai_error_and_the_server_keeps_serving(
    server: BackgroundServer, body: bytes | dict[str, object], status: int, param: str | None
) -> None:
    options = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    response = httpx.post(server.url + "/v1/completions", timeout=TIMEOUT_S, **options)  # type: ignore[arg-type]
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param"} and error["message"] and error["param"] == param
    if param == "prompt" and isinstance(body, dict) and len(str(body["prompt"])) > 256:
        assert "context is 256 tokens" in error["message"]
    assert _client(server).completions.create(model=NAME, prompt="ok", max_tokens=1).choices[0].finish_reason in ("length", "stop")


def test_the_official_client_raises_on_errors(server: BackgroundServer) -> None:
    with pytest.raises(openai.BadRequestError, match="temperature"):
        _client(server).completions.create(model=NAME, prompt="x", temperature=-1)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        _client(server).chat.completions.create(model="other", messages=[{"role": "user", "content": "x"}])


def test_models_health_and_metrics(server: BackgroundServer) -> None:
    models = _client(server).models.list().data
    assert [model.id for model in models] == [NAME] and models[0].model_extra["max_model_len"] == 256  # type: ignore[index]
    assert httpx.get(server.url + "/health", timeout=TIMEOUT_S).json() == {"status": "ok"}
    before = _metric(server, "recursify_generated_tokens_total")
    _client(server).completions.create(model=NAME, prompt=PROMPT, max_tokens=5, temperature=0)
    assert _metric(server, "recursify_generated_tokens_total") == before + 5
    assert _metric(server, "recursify_requests_total", status="length") >= 1
    assert _metric(server, "recursify_requests_total", status="invalid") >= 1  # test order: the bad inputs ran before
    assert _metric(server, "recursify_mean_loops_per_token") == 3.0
    assert _metric(server, "recursify_kv_blocks_total") == 1024 // 16 and _metric(server, "recursify_step_seconds_count") > 0
    for gauge in ("recursify_waiting_requests", "recursify_running_requests", "recursify_kv_blocks_used"):
        assert _metric(server, gauge) == 0.0


def _open_stream(client: httpx.Client, url: str, max_tokens: int) -> httpx.Response:
    """A greedy stream (the prompt's greedy continuation has no EOS for hundreds of tokens, so long ones stay long)."""
    body = {"model": NAME, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    request = client.build_request("POST", url + "/v1/completions", json=body)
    return client.send(request, stream=True)


def test_a_client_that_disconnects_mid_stream_cancels_its_request_and_frees_its_kv() -> None:
    with _server(max_model_len=4096, max_kv_tokens=8192) as server, httpx.Client(timeout=TIMEOUT_S) as client:
        response = _open_stream(client, server.url, 3000)
        lines = response.iter_lines()
        received = [next(lines) for _ in range(6)]  # three events (each followed by a blank line)
        assert json.loads(received[0][6:])["choices"][0]["text"] is not None
        assert server.worker.engine.allocator.used_blocks > 0
        response.close()
        _wait_until(lambda: _idle(server))
        assert _metric(server, "recursify_requests_total", status="cancelled") == 1
        assert _metric(server, "recursify_generated_tokens_total") < 3000


def test_a_non_streaming_client_that_gives_up_cancels_its_request() -> None:
    with _server(max_model_len=4096, max_kv_tokens=8192) as server:
        body = {"model": NAME, "prompt": PROMPT, "max_tokens": 3000, "temperature": 0}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/completions", json=body, timeout=0.5)
        _wait_until(lambda: _metric(server, "recursify_requests_total", status="cancelled") == 1)  # within DISCONNECT_POLL_S
        _wait_until(lambda: _idle(server))
        assert _metric(server, "recursify_generated_tokens_total") < 3000


def test_a_full_queue_answers_429_and_recovers() -> None:
    with _server(max_model_len=4096, max_kv_tokens=8192, max_batch=1, max_waiting=1) as server, httpx.Client(timeout=TIMEOUT_S) as client:
        running = _open_stream(client, server.url, 3000)
        lines = running.iter_lines()  # kept: a dropped line iterator closes its connection, which cancels the request
        next(lines)  # its first token is out: it runs
        waiting = _open_stream(client, server.url, 3000)  # accepted (200), waits for the one running slot
        assert waiting.status_code == 200
        refused = client.post(server.url + "/v1/completions", json={"model": NAME, "prompt": PROMPT, "max_tokens": 4})
        assert refused.status_code == 429
        error = refused.json()["error"]
        assert error["type"] == "rate_limit_error" and "max-waiting 1" in error["message"]
        running.close()
        waiting.close()
        _wait_until(lambda: _idle(server))
        assert _metric(server, "recursify_requests_total", status="rejected") == 1
        assert client.post(server.url + "/v1/completions", json={"model": NAME, "prompt": PROMPT, "max_tokens": 4}).status_code == 200


def test_shutdown_lets_running_requests_finish_and_ends_streams_properly() -> None:
    with _server(max_model_len=4096, max_kv_tokens=8192) as server, httpx.Client(timeout=TIMEOUT_S) as client:
        short = _open_stream(client, server.url, 2)
        long = _open_stream(client, server.url, 3000)
        lines = short.iter_lines()
        first = next(lines)
        server.worker.begin_shutdown(grace_s=2.0)  # what SIGTERM does; the long one outlives the grace period
        assert httpx.get(server.url + "/health", timeout=TIMEOUT_S).status_code == 503
        events = [first, *[line for line in lines if line]]
        assert events[-1] == "data: [DONE]" and json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"
        events = [line for line in long.iter_lines() if line]
        assert events[-1] == "data: [DONE]" and json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "cancelled"
        refused = client.post(server.url + "/v1/completions", json={"model": NAME, "prompt": PROMPT, "max_tokens": 4})
        assert refused.status_code == 503 and refused.json()["error"]["type"] == "service_unavailable"
        _wait_until(lambda: _idle(server))
