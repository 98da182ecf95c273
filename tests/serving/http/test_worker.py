"""The engine thread on its own: bounded admission, snapshots over asyncio queues, cancellation, failure."""

from __future__ import annotations

import asyncio
import threading
from functools import cache
from typing import Any

import pytest
import torch

import recursify
from recursify.config import SamplingConfig
from recursify.modeling.model import RecursiveModel
from recursify.serve import Engine
from recursify.serving.http.worker import EngineWorker, QueueFull, ShuttingDown, Submission, Update
from tiny import tiny_model

TIMEOUT_S = 30.0


@cache
def _model() -> RecursiveModel:
    return recursify.convert(tiny_model("llama", seed=1), loops=3, init="average", rank=0, progress=False)


def _submission(prompt: list[int], new: int) -> Submission:
    return Submission(prompt, new, SamplingConfig())


async def _final(channel: asyncio.Queue[Update]) -> Any:
    while True:
        update = await asyncio.wait_for(channel.get(), TIMEOUT_S)
        if isinstance(update, BaseException) or update.finished:
            return update


def test_admission_is_bounded_and_stops_at_shutdown() -> None:
    worker = EngineWorker(Engine(_model(), max_kv_tokens=256), max_waiting=2)  # not started: nothing leaves the queue

    async def submit_three() -> None:
        worker.submit(_submission([5, 6], 4))
        worker.submit(_submission([5, 6], 4))
        with pytest.raises(QueueFull, match="max-waiting 2"):
            worker.submit(_submission([5, 6], 4))
        worker.begin_shutdown(0.0)
        with pytest.raises(ShuttingDown):
            worker.submit(_submission([5, 6], 4))

    asyncio.run(submit_three())


def test_outputs_cross_to_the_event_loop_and_model_code_runs_on_the_engine_thread_only() -> None:
    model = _model()
    threads: set[str] = set()
    hook = model.embed.register_forward_hook(lambda *_: threads.add(threading.current_thread().name))
    prompts = [[5, 9, 14], [7, 3]]

    async def run() -> list[Any]:
        worker = EngineWorker(Engine(model, max_kv_tokens=256, max_batch=4), max_waiting=8)
        worker.start(asyncio.get_running_loop())
        try:
            channels = [worker.submit(_submission(prompt, 6))[1] for prompt in prompts]
            long_id, long_channel = worker.submit(_submission([4], 200))
            await asyncio.wait_for(long_channel.get(), TIMEOUT_S)  # it runs: one token out
            worker.cancel(long_id)
            finals = [await _final(channel) for channel in [*channels, long_channel]]
            await asyncio.sleep(0)
            assert worker.engine.kv_usage()["used_blocks"] == 0 and not worker.engine.has_unfinished()
            return finals
        finally:
            worker.stop()

    try:
        finals = asyncio.run(run())
    finally:
        hook.remove()
    for prompt, final in zip(prompts, finals, strict=False):
        reference = model.generate(torch.tensor([prompt]), max_new_tokens=6, eos_token_ids=list(model.arch.eos_token_ids))
        assert final.token_ids == reference[0, len(prompt) :].tolist()[: len(final.token_ids)] and final.finish_reason in ("length", "stop")
    assert finals[-1].finish_reason == "cancelled" and len(finals[-1].token_ids) < 200
    assert threads == {"recursify-engine"}


def test_an_engine_failure_fails_open_requests_instead_of_hanging_them(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = Engine(_model(), max_kv_tokens=256)
    monkeypatch.setattr(engine, "step", lambda: (_ for _ in ()).throw(RuntimeError("broken kernel")))

    async def run() -> Any:
        worker = EngineWorker(engine, max_waiting=8)
        worker.start(asyncio.get_running_loop())
        _, channel = worker.submit(_submission([5, 6], 4))
        update = await _final(channel)
        assert not worker.accepting
        with pytest.raises(ShuttingDown, match="broken kernel"):
            worker.submit(_submission([5, 6], 4))
        worker.stop()
        return update

    assert isinstance(asyncio.run(run()), RuntimeError)
