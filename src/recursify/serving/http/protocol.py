"""The OpenAI wire format: request bodies (validated), responses, stream chunks and error bodies.

Request models are strict (a string where a number belongs is a 400, not a silent coercion) and
accept unknown fields, which clients send freely (``user``, ``metadata``...); fields whose non-default
values we cannot honour (``logprobs``, ``echo``, penalties...) are refused instead of ignored.
Responses are plain dicts in OpenAI's shapes with one extension object, ``recursify``: the exit
policy, the loops each generated token ran and how often the request was preempted.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from recursify.config import SamplingConfig
from recursify.serving.engine import RequestOutput

# Fields of the OpenAI API this server does not implement, with the values that mean "not used".
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "best_of": (None, 1),
    "echo": (None, False),
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "suffix": (None, ""),
    "logit_bias": (None, {}),
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "tools": (None, []),
    "functions": (None, []),
}


class APIError(Exception):
    """A request the server refuses: becomes ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    include_usage: bool = False


class _GenerationRequest(BaseModel):
    """What completions and chat completions share."""

    model_config = ConfigDict(strict=True, extra="allow")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None

    def check_supported(self) -> None:
        """Refuse what parses but cannot be served: several choices, empty stop strings, unimplemented fields."""
        if self.n != 1:
            raise APIError(400, f"n must be 1 (one choice per request), got {self.n}", "n")
        if any(not stop for stop in self.stop_strings()):
            raise APIError(400, "stop strings must be non-empty", "stop")
        for name, value in (self.model_extra or {}).items():
            if name in UNSUPPORTED and value not in UNSUPPORTED[name]:
                raise APIError(400, f"{name} is not supported by this server; leave it out", name)

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(temperature=self.temperature, top_p=self.top_p, seed=self.seed)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_GenerationRequest):
    """POST /v1/completions: one prompt, as text or token ids (a list holding one of either is accepted too)."""

    prompt: str | list[int] | list[str] | list[list[int]]

    def prompt_input(self) -> str | list[int]:
        prompt: Any = self.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise APIError(400, f"give one prompt per request, got {len(prompt)}", "prompt")
            prompt = prompt[0]
        if not prompt:
            raise APIError(400, "the prompt is empty", "prompt")
        return prompt


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The message's text; content parts other than text are refused."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, "only text content parts are supported", "messages")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_GenerationRequest):
    """POST /v1/chat/completions: messages rendered by the tokenizer's chat template."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def conversation(self) -> list[dict[str, str]]:
        if not self.messages:
            raise APIError(400, "messages is empty; give at least one message", "messages")
        return [{"role": message.role, "content": message.text()} for message in self.messages]

    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# --- responses ------------------------------------------------------------------------------------


class Reply:
    """The response of one request, in completion or chat shape: whole, or as server-sent event chunks."""

    def __init__(self, chat: bool, model: str, exit_policy: str, prompt_tokens: int):
        self.chat, self.model, self.exit_policy, self.prompt_tokens = chat, model, exit_policy, prompt_tokens
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self._tokens_sent = 0

    def _usage(self, output: RequestOutput) -> dict[str, int]:
        completion = len(output.token_ids)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion, "total_tokens": self.prompt_tokens + completion}

    def _extension(self, output: RequestOutput, loops: list[int]) -> dict[str, Any]:
        extension: dict[str, Any] = {"exit_policy": self.exit_policy, "loops_per_token": loops}
        if output.finished:
            every = output.loops_run
            extension["mean_loops"] = sum(every) / len(every) if every else None
            extension["preemptions"] = output.preemptions
        return extension

    def _envelope(self, kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}

    def whole(self, output: RequestOutput, text: str) -> dict[str, Any]:
        """The non-streamed response of a finished request."""
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": output.finish_reason}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        body = self._envelope("chat.completion" if self.chat else "text_completion", [choice])
        body["usage"] = self._usage(output)
        body["recursify"] = self._extension(output, list(output.loops_run))
        return body

    def first_chunk(self) -> str | None:
        """Chat streams open with the assistant's role (an empty content delta), as OpenAI's do."""
        if not self.chat:
            return None
        return self._event(self._envelope("chat.completion.chunk", [self._choice({"role": "assistant", "content": ""}, None)]))

    def chunk(self, output: RequestOutput, delta: str) -> str:
        """One event: new text (maybe empty) and, when the request finished, its finish reason."""
        loops = output.loops_run[self._tokens_sent :]
        self._tokens_sent = len(output.loops_run)
        reason = output.finish_reason if output.finished else None
        content: dict[str, Any] = {"content": delta} if self.chat else {"text": delta}
        body = self._envelope("chat.completion.chunk" if self.chat else "text_completion", [self._choice(content, reason)])
        body["recursify"] = self._extension(output, loops)
        return self._event(body)

    def usage_chunk(self, output: RequestOutput) -> str:
        """``stream_options.include_usage``: a last chunk with no choices and the usage counts."""
        body = self._envelope("chat.completion.chunk" if self.chat else "text_completion", [])
        body["usage"] = self._usage(output)
        return self._event(body)

    def _choice(self, content: dict[str, Any], reason: str | None) -> dict[str, Any]:
        if self.chat:
            return {"index": 0, "delta": content, "logprobs": None, "finish_reason": reason}
        return {"index": 0, **content, "logprobs": None, "finish_reason": reason}

    @staticmethod
    def _event(body: dict[str, Any]) -> str:
        return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"


DONE_EVENT = "data: [DONE]\n\n"


def error_event(message: str, kind: str = "server_error") -> str:
    """An error inside a stream whose 200 status has already been sent."""
    return f"data: {json.dumps(error_body(message, kind))}\n\n"


class TextStream:
    """Turns growing decoded text into deltas that never need taking back.

    Text that might be the start of a stop string is held back until the next token shows whether it
    was (the engine then cuts the text before it), and so is a trailing half of a multi-byte character
    (decoded as U+FFFD); so the deltas of a stream add up to the text of the whole response (unless a
    tokenizer rewrites already decoded text, which a stream cannot take back).
    """

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.sent = ""

    def delta(self, text: str, finished: bool) -> str:
        ready = text if finished else self._settled(text)
        if not ready.startswith(self.sent):
            return ""
        delta, self.sent = ready[len(self.sent) :], ready
        return delta

    def _settled(self, text: str) -> str:
        end = len(text.rstrip("\ufffd"))
        held = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, end), 0, -1):  # longest proper prefix of the stop string ending the text
                if text.endswith(stop[:size], 0, end):
                    held = max(held, size)
                    break
        return text[: end - held]
