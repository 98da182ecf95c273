"""``recursify serve`` as users run it: a subprocess on a free loopback port, stopped by a signal; the missing extra."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

import recursify
from recursify.cli import main
from recursify.serving.http.server import default_model_name
from tiny import save_tiny_checkpoint

SRC = str(Path(recursify.__file__).resolve().parents[1])


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_serve_without_the_extra_says_what_to_install(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real(name, *a))
    assert main(["serve", "runs/absent"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("recursify: error:") and 'pip install "recursify[serve]"' in err and "fastapi" in err


def test_serve_options_reach_the_engine_and_server_configs(monkeypatch: pytest.MonkeyPatch) -> None:
    import recursify.serving.http.server as server

    calls: list[tuple[object, ...]] = []
    monkeypatch.setattr(server, "serve", lambda *args: calls.append(args))
    argv = ["serve", "runs/rrt", "--port", "0", "--exit", "fixed:2", "--max-model-len", "99", "--max-batch", "3"]
    assert main([*argv, "--max-waiting", "5", "--served-model-name", "m", "--shutdown-timeout", "2.5"]) == 0
    (source, engine, config) = calls[0]
    assert source == "runs/rrt" and (engine.exit, engine.max_model_len, engine.max_batch) == ("fixed:2", 99, 3)  # type: ignore[attr-defined]
    assert (config.host, config.port, config.max_waiting, config.model_name, config.shutdown_timeout) == ("127.0.0.1", 0, 5, "m", 2.5)  # type: ignore[attr-defined]


def test_default_model_name(tmp_path: Path) -> None:
    (tmp_path / "rrt").mkdir()
    assert default_model_name(tmp_path / "rrt") == "rrt"
    assert default_model_name("smollm2-135m") == "smollm2-135m"


@pytest.mark.slow
def test_the_library_imports_without_fastapi() -> None:
    code = "import sys, recursify.serve, recursify.serving.http.config, recursify.cli as cli; cli.build_parser(); "
    code += "assert not [m for m in sys.modules if m.split('.')[0] in ('fastapi', 'uvicorn', 'prometheus_client', 'starlette')]"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": SRC}, timeout=120)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_mid_stream_ends_the_stream_properly_and_exits_zero(tmp_path: Path, sig: signal.Signals) -> None:
    source, run = tmp_path / "source", tmp_path / "rrt"
    save_tiny_checkpoint(source, "llama", seed=1)
    recursify.convert(str(source), loops=3, init="average", rank=0, progress=False).save_pretrained(str(run))
    port = _free_port()
    argv = [sys.executable, "-m", "recursify", "serve", str(run), "--port", str(port), "--max-model-len", "4096"]
    argv += ["--max-kv-tokens", "8192", "--shutdown-timeout", "1", "--log-level", "warning"]
    server = subprocess.Popen(argv, env={**os.environ, "PYTHONPATH": SRC}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.communicate()[0]
            assert time.monotonic() < deadline, "the server did not come up"
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        body = {"model": "rrt", "prompt": "The capital of France is", "max_tokens": 3000, "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            events = [next(lines)]
            server.send_signal(sig)
            events += [line for line in lines if line]
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "cancelled"  # 3000 tokens outlive a 1 s grace
        output, _ = server.communicate(timeout=60)
        assert server.returncode == 0, output
        assert "recursify: serving 'rrt'" in output
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
