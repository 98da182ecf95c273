"""The OpenAI wire format on its own: request validation, stream text deltas, response shapes."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from recursify.serving.engine import RequestOutput
from recursify.serving.http.protocol import APIError, ChatCompletionRequest, CompletionRequest, Reply, TextStream


def _output(tokens: list[int], loops: list[int], finished: bool, reason: str | None = None) -> RequestOutput:
    return RequestOutput("r", [1, 2], tokens, tokens[-1:], None, finished, reason, 0.0, None, None, loops_run=loops)


def test_text_stream_holds_back_possible_stop_starts_and_half_characters() -> None:
    stream = TextStream(["Yff", "\n\n"])
    assert stream.delta("6Sw", False) == "6Sw"
    assert stream.delta("6SwY", False) == ""  # "Y" may start "Yff"
    assert stream.delta("6SwYf", False) == ""
    assert stream.delta("6SwYfq", False) == "Yfq"  # it did not
    assert stream.delta("6SwYfq\n", False) == ""
    assert stream.delta("6SwYfq\nx\ufffd", False) == "\nx"  # the half character waits for its other bytes
    assert stream.delta("6SwYfq\nx", True) == ""
    assert stream.sent == "6SwYfq\nx"


@pytest.mark.parametrize("pieces", [["ab", "abY", "abYf", "abYff"], ["a", "aY", "aYf"]])
def test_text_stream_deltas_add_up_to_the_text_the_engine_cuts_at_the_stop(pieces: list[str]) -> None:
    stream = TextStream(["Yff"])
    deltas = [stream.delta(piece, False) for piece in pieces[:-1]]
    final = pieces[-1].split("Yff")[0]  # the engine's final text stops before the stop string
    deltas.append(stream.delta(final, True))
    assert "".join(deltas) == final


def test_requests_are_strict_and_refuse_what_cannot_be_served() -> None:
    with pytest.raises(ValidationError, match="max_tokens"):
        CompletionRequest.model_validate({"model": "m", "prompt": "x", "max_tokens": "8"})
    with pytest.raises(ValidationError, match="temperature"):
        CompletionRequest.model_validate({"model": "m", "prompt": "x", "temperature": -0.1})
    with pytest.raises(ValidationError, match="top_p"):
        CompletionRequest.model_validate({"model": "m", "prompt": "x", "top_p": 1.5})
    with pytest.raises(ValidationError, match="role"):
        ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "robot", "content": "x"}]})
    body = CompletionRequest.model_validate({"model": "m", "prompt": ["hi"], "user": "u1", "stop": "\n", "seed": 3})
    body.check_supported()  # unknown fields such as "user" are ignored
    assert body.prompt_input() == "hi" and body.stop_strings() == ["\n"] and body.sampling().seed == 3
    assert body.sampling().temperature == 1.0  # OpenAI's default
    refused = [{"n": 2}, {"logprobs": 2}, {"echo": True}, {"presence_penalty": 0.5}, {"stop": ["", "x"]}]
    for extra in refused:
        with pytest.raises(APIError) as caught:
            CompletionRequest.model_validate({"model": "m", "prompt": "x", **extra}).check_supported()
        assert caught.value.status == 400 and caught.value.param == next(iter(extra))
    for prompt in ("", [], [[]], ["a", "b"]):
        with pytest.raises(APIError, match="prompt"):
            CompletionRequest.model_validate({"model": "m", "prompt": prompt}).prompt_input()
    chat = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}
    )
    assert chat.conversation() == [{"role": "user", "content": "ab"}] and chat.requested_tokens() is None
    with pytest.raises(APIError, match="messages is empty"):
        ChatCompletionRequest.model_validate({"model": "m", "messages": []}).conversation()


def test_reply_shapes_and_per_chunk_loops() -> None:
    reply = Reply(chat=True, model="m", exit_policy="confidence:0.9", prompt_tokens=2)
    first = reply.first_chunk()
    assert first is not None and json.loads(first[6:])["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    one = json.loads(reply.chunk(_output([5], [2], False), "a")[6:])
    two = json.loads(reply.chunk(_output([5, 6, 7], [2, 3, 1], True, "length"), "bc")[6:])
    assert one["object"] == "chat.completion.chunk" and one["choices"][0]["delta"] == {"content": "a"}
    assert one["recursify"] == {"exit_policy": "confidence:0.9", "loops_per_token": [2]}
    assert two["recursify"]["loops_per_token"] == [3, 1] and two["recursify"]["mean_loops"] == 2.0
    assert two["choices"][0]["finish_reason"] == "length"
    whole = Reply(chat=False, model="m", exit_policy="none", prompt_tokens=2).whole(_output([5, 6], [3, 3], True, "stop"), "xy")
    assert whole["object"] == "text_completion" and whole["choices"][0]["text"] == "xy"
    assert whole["usage"] == {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}
    assert whole["recursify"]["loops_per_token"] == [3, 3] and whole["recursify"]["preemptions"] == 0
