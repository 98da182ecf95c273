"""The FastAPI application: OpenAI routes over an EngineWorker, health and Prometheus metrics.

Handlers validate the body, tokenize in Starlette's thread pool (tokenizing a long prompt must not
stall the event loop that streams everyone else's tokens), check the request against the model's
limits, submit it to the engine thread and await its snapshots. A streaming client that disconnects
has its request cancelled at the engine's next step (Starlette cancels the stream on disconnect; the
generator's ``finally`` sends the cancel); a non-streaming one is noticed within a second.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from recursify.errors import RecursifyError
from recursify.serving.engine import RequestOutput
from recursify.serving.http.config import ServerConfig
from recursify.serving.http.metrics import ServerMetrics
from recursify.serving.http.protocol import (
    DONE_EVENT,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    Reply,
    TextStream,
    error_body,
    error_event,
)
from recursify.serving.http.worker import EngineWorker, QueueFull, ShuttingDown, Submission, Update
from recursify.text import apply_chat_template

DISCONNECT_POLL_S = 1.0  # how often a non-streaming handler checks that its client is still there


def create_app(worker: EngineWorker, config: ServerConfig, model_name: str, metrics: ServerMetrics) -> FastAPI:
    """The routes of one server; the worker's thread starts and stops with the app's lifespan."""
    engine = worker.engine

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start(asyncio.get_running_loop())
        yield
        await run_in_threadpool(worker.stop)

    app = FastAPI(title="recursify", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        metrics.refused(error.status)
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, error: RequestValidationError) -> JSONResponse:
        metrics.refused(400)
        message, param = _validation_message(error.errors())
        return JSONResponse(error_body(message, "invalid_request_error", param), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(error.detail), kind), status_code=error.status_code, headers=error.headers)

    @app.get("/health")
    async def health() -> JSONResponse:
        if worker.accepting:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "failed" if worker.failure else "shutting down"}, status_code=503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": model_name, "object": "model", "created": 0, "owned_by": "recursify", "max_model_len": engine.max_model_len}
        card["recursify"] = {"loops": engine.model.loops, "exit_policy": engine.policy.spec, "batching": engine.config.batching}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        _check(body, model_name)
        prompt = body.prompt_input()
        prompt_ids = await run_in_threadpool(_encode_or_400, engine.encode, prompt, "prompt")
        return await _respond(body, request, prompt_ids, body.max_tokens or config.completion_max_tokens, chat=False)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        _check(body, model_name)
        conversation = body.conversation()
        prompt_ids = await run_in_threadpool(_encode_or_400, _chat_ids, conversation, "messages")
        return await _respond(body, request, prompt_ids, body.requested_tokens(), chat=True)

    def _chat_ids(conversation: list[dict[str, str]]) -> list[int]:
        if engine.tokenizer is None:
            raise APIError(400, "this model has no tokenizer, so it cannot apply a chat template", "messages")
        text = apply_chat_template(engine.tokenizer, conversation)
        return engine.encode(list(engine.tokenizer(text, add_special_tokens=False)["input_ids"]))

    async def _respond(body: Any, request: Request, prompt_ids: list[int], requested: int | None, chat: bool) -> Response:
        try:
            allowed = engine.new_tokens_allowed(len(prompt_ids))
        except RecursifyError as err:
            raise APIError(400, str(err), "messages" if chat else "prompt") from None
        submission = Submission(prompt_ids, min(requested or allowed, allowed), body.sampling(), body.stop_strings())
        try:
            request_id, channel = worker.submit(submission)
        except QueueFull as err:
            raise APIError(429, f"{err}; retry later", kind="rate_limit_error", code="queue_full") from None
        except ShuttingDown as err:
            raise APIError(503, str(err), kind="service_unavailable") from None
        reply = Reply(chat, model_name, engine.policy.spec, len(prompt_ids))
        if body.stream:
            events = _events(reply, channel, request_id, TextStream(list(submission.stop)), body.include_usage)
            return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        output = await _final(channel, request_id, request)
        if output is None:
            return Response(status_code=499)  # the client left; nobody reads this
        return JSONResponse(reply.whole(output, output.text or ""))

    async def _events(reply: Reply, channel: asyncio.Queue[Update], request_id: str, text: TextStream, usage: bool) -> AsyncIterator[str]:
        done = False
        try:
            first = reply.first_chunk()
            if first is not None:
                yield first
            while not done:
                update = await channel.get()
                while not channel.empty():  # snapshots are cumulative: a slow reader skips to the newest
                    update = channel.get_nowait()
                if isinstance(update, BaseException):
                    done = True
                    yield error_event(f"generation failed: {update}")
                    break
                done = update.finished
                delta = text.delta(update.text or "", done)
                if delta or done:
                    yield reply.chunk(update, delta)
                if done and usage:
                    yield reply.usage_chunk(update)
            yield DONE_EVENT
        finally:
            if not done:  # the client disconnected (or the server is cancelling this task): free the request's KV
                worker.cancel(request_id)

    async def _final(channel: asyncio.Queue[Update], request_id: str, request: Request) -> RequestOutput | None:
        """The finished output; None if the client left first (its request is cancelled)."""
        check_at = time.monotonic() + DISCONNECT_POLL_S
        try:
            while True:
                try:
                    update = await asyncio.wait_for(channel.get(), DISCONNECT_POLL_S)
                except TimeoutError:
                    update = None
                if isinstance(update, BaseException):
                    raise APIError(500, f"generation failed: {update}", kind="server_error")
                if update is not None and update.finished:
                    return update
                if time.monotonic() >= check_at:  # whether tokens keep coming or not
                    if await request.is_disconnected():
                        worker.cancel(request_id)
                        return None
                    check_at = time.monotonic() + DISCONNECT_POLL_S
        except asyncio.CancelledError:
            worker.cancel(request_id)
            raise

    return app


def _check(body: Any, model_name: str) -> None:
    if body.model != model_name:
        raise APIError(404, f"the model {body.model!r} does not exist; this server serves {model_name!r}", "model", code="model_not_found")
    body.check_supported()


def _encode_or_400(encode: Any, prompt: Any, param: str) -> list[int]:
    try:
        return list(encode(prompt))
    except RecursifyError as err:
        raise APIError(400, str(err), param) from None


def _validation_message(errors: Sequence[Any]) -> tuple[str, str | None]:
    """One line from pydantic's first error: what is wrong and where (OpenAI's ``param``)."""
    first: dict[str, Any] = dict(errors[0]) if errors else {"msg": "invalid request body", "loc": ()}
    if first.get("type") == "json_invalid":
        return f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}", None
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    if not loc:
        return "the body must be a JSON object of the request's fields (Content-Type: application/json)", None
    return f"{'.'.join(loc)}: {first['msg']}", loc[0]
