"""What stands in front of every route of ``codetune serve`` (issue 21: S2, S4, S5, M3, M4, M7, M12): the API
key on every route but /health, the Host check against DNS rebinding, the security headers, JSON-only
bodies, slow bodies cut off, a client that leaves logged as one line, binding before announcing, and
vLLM found in its own environment."""

import base64
import json
import logging
import os
import socket
import subprocess
import sys
import time

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from codetune.cli import app as cli
from codetune.errors import InputError
from codetune.serve import allowed_hosts_for, create_app, find_vllm, load_engine

from .test_serve import LiveServer, _phi3_run

KEY = "s3cret"
PROMPT = [{"role": "user", "content": "Write a Python function `add(a, b)`."}]


@pytest.fixture(scope="module")
def engine(tiny_dir):
    return load_engine(tiny_dir, name="tiny", max_tokens_limit=8)


def _basic(user: str, password: str) -> dict:
    return {"authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_the_api_key_covers_every_route_but_health(engine):
    client = TestClient(create_app(engine, api_key=KEY))
    assert client.get("/health").status_code == 200
    for path in ("/", "/chat", "/v1/models"):
        res = client.get(path)
        assert res.status_code == 401, (path, res.text)
        assert res.json()["error"]["code"] == "invalid_api_key"
    # a person's browser is asked for the key as a password; an API client is not
    assert client.get("/chat").headers["www-authenticate"].startswith("Basic")
    assert "www-authenticate" not in client.get("/v1/models").headers
    for path in ("/", "/chat", "/v1/models"):
        assert client.get(path, headers=_basic("anyone", KEY)).status_code == 200, path
        assert client.get(path, headers={"authorization": f"Bearer {KEY}"}).status_code == 200, path
        assert client.get(path, headers=_basic("anyone", "wrong")).status_code == 401, path
        assert client.get(path, headers={"authorization": "Basic !!notbase64"}).status_code == 401, path
    res = client.post("/v1/chat/completions", json={"model": "tiny", "messages": PROMPT, "max_tokens": 1})
    assert res.status_code == 401


def test_the_host_header_must_name_the_bound_address(engine):
    loopback = allowed_hosts_for("127.0.0.1")
    assert {"127.0.0.1", "localhost", "::1"} <= loopback
    assert allowed_hosts_for("10.1.2.3") == {"10.1.2.3"}
    assert allowed_hosts_for("0.0.0.0") is None  # reached by names it cannot know
    assert allowed_hosts_for("0.0.0.0", ["coder.lan"]) == {"coder.lan"}
    client = TestClient(create_app(engine, allowed_hosts=loopback))
    for host in ("localhost:8000", "127.0.0.1:8000", "[::1]:8000", "LOCALHOST"):
        assert client.get("/health", headers={"host": host}).status_code == 200, host
    # a DNS-rebinding page reaches the server under its own name
    for host in ("evil.example:8000", "evil.example", "127.0.0.1.evil.example", ""):
        res = client.get("/", headers={"host": host})
        assert res.status_code == 421, host
        assert "--allowed-host" in res.json()["error"]["message"]


def test_every_answer_forbids_framing_and_sniffing(engine):
    client = TestClient(create_app(engine, api_key=KEY, max_request_bytes=100))
    answers = [
        client.get("/", headers=_basic("", KEY)),
        client.get("/chat", headers=_basic("", KEY)),
        client.get("/health"),
        client.get("/v1/models"),  # 401
        client.post("/v1/completions", content=b"x" * 200, headers=_basic("", KEY)),  # 413
        client.get("/nope", headers=_basic("", KEY)),  # 404
    ]
    assert [r.status_code for r in answers] == [200, 200, 200, 401, 413, 404]
    for res in answers:
        assert res.headers["x-frame-options"] == "DENY"
        assert "frame-ancestors 'none'" in res.headers.get_list("content-security-policy")
        assert res.headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize(
    "headers",
    [{}, {"content-type": "text/plain"}, {"content-type": "application/x-www-form-urlencoded"}],
)
def test_a_body_that_is_not_declared_json_is_refused_before_generation(engine, headers):
    """A cross-site form or a fetch with no Content-Type is a 'simple request' a browser sends without
    asking: it must not start a generation."""
    client = TestClient(create_app(engine))
    body = json.dumps({"model": "tiny", "messages": PROMPT, "max_tokens": 1}).encode()
    before = dict(engine.stats)
    res = client.post("/v1/chat/completions", content=body, headers=headers)
    assert res.status_code == 415, res.text
    assert "application/json" in res.json()["error"]["message"]
    assert engine.stats == before


def _open(port: int, body_part: bytes, length: int = 100) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()
    s.sendall(head + body_part)
    return s


def _read_all(s: socket.socket) -> bytes:
    """The whole reply: the server closes a connection whose body it gave up on."""
    reply = b""
    while chunk := s.recv(65536):
        reply += chunk
    return reply


def test_a_stalled_body_is_cut_off_and_a_client_that_leaves_is_one_line(engine):
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    with LiveServer(create_app(engine, body_timeout=1.0)) as url:
        port = int(url.rsplit(":", 1)[1])
        logger = logging.getLogger("uvicorn.error")
        logger.addHandler(handler)
        level = logger.level
        logger.setLevel(logging.INFO)
        try:
            slow = [_open(port, b'{"model": "tiny"') for _ in range(20)]
            t0 = time.monotonic()
            for s in slow:
                reply = _read_all(s)
                assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
                assert b"stalled" in reply
                s.close()
            assert time.monotonic() - t0 < 10
            # a client that sends half a body and leaves
            for _ in range(5):
                _open(port, b'{"model": ').close()
            time.sleep(1.0)
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)
    assert not [r for r in records if r.exc_info], [r.getMessage() for r in records if r.exc_info][:1]
    left = [r for r in records if "left before sending" in r.getMessage()]
    assert len(left) == 5 and all("\n" not in r.getMessage() for r in left)


def test_serve_binds_before_it_announces(tiny_dir):
    runner = CliRunner()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = runner.invoke(cli, ["serve", str(tiny_dir), "--port", str(port)])
    assert res.exit_code == 2, res.output
    assert res.output.startswith(f"error: --host 127.0.0.1 --port {port}: Address already in use"), res.output
    assert "another process listens there" in res.output and "serving" not in res.output
    res = runner.invoke(cli, ["serve", str(tiny_dir), "--host", "999.1.1.1"])
    assert res.exit_code == 2 and res.output.startswith("error: --host '999.1.1.1': not an address"), res.output
    assert "serving" not in res.output and "Traceback" not in res.output


def test_limits_that_would_refuse_every_request_are_refused_at_start(tiny_dir, tmp_path):
    runner = CliRunner()
    res = runner.invoke(cli, ["serve", str(tiny_dir), "--max-tokens-limit", "0"])
    assert res.exit_code == 2 and "--max-tokens-limit" in res.output and "serving" not in res.output
    # the library refuses it before loading anything: the source is not even looked at
    with pytest.raises(InputError, match="--max-tokens-limit 0"):
        load_engine(tmp_path / "does-not-exist", max_tokens_limit=0)


def _fake_vllm(folder) -> str:
    """An executable that records the arguments it was started with."""
    exe = folder / "bin" / "vllm"
    exe.parent.mkdir(parents=True)
    exe.write_text(f'#!/bin/sh\necho "$@" > "{folder}/args"\n')
    exe.chmod(0o755)
    return str(exe)


def test_vllm_is_found_in_its_own_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("CODETUNE_VLLM", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(InputError, match="its own environment") as err:
        find_vllm()
    assert "--vllm" in str(err.value) and "pip install vllm" in str(err.value)
    exe = _fake_vllm(tmp_path / "vllm-env")
    assert str(find_vllm(tmp_path / "vllm-env")) == exe  # the environment's folder
    assert str(find_vllm(exe)) == exe
    monkeypatch.setenv("CODETUNE_VLLM", exe)
    assert str(find_vllm()) == exe
    with pytest.raises(InputError, match="--vllm .*not an executable vllm"):
        find_vllm(tmp_path / "nowhere")
    # one installed into codetune's own environment is refused: it replaced codetune's transformers
    monkeypatch.delenv("CODETUNE_VLLM")
    monkeypatch.setattr(sys, "executable", str(tmp_path / "vllm-env" / "bin" / "python"))
    monkeypatch.setenv("PATH", str(tmp_path / "vllm-env" / "bin"))
    with pytest.raises(InputError, match="codetune's own environment"):
        find_vllm()


def test_serve_engine_vllm_starts_the_found_vllm_with_the_dry_runs_command(tmp_path):
    run = _phi3_run(tmp_path, r=12)
    exe = _fake_vllm(tmp_path / "vllm-env")
    env = {**os.environ, "PATH": os.path.dirname(sys.executable), "CODETUNE_VLLM": ""}
    base = [sys.executable, "-m", "codetune.cli", "serve", str(run), "--engine", "vllm", "--port", "9123"]
    missing = subprocess.run(base, env=env, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "vLLM is not found" in missing.stderr, missing.stderr
    dry = subprocess.run([*base, "--vllm", exe, "--dry-run"], env=env, capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.startswith(f"{exe} serve microsoft/Phi-3-mini-4k-instruct ")
    real = subprocess.run([*base, "--vllm", exe], env=env, capture_output=True, text=True, timeout=300)
    assert real.returncode == 0, real.stderr
    # what ran is what --dry-run printed
    assert (tmp_path / "vllm-env" / "args").read_text().split() == dry.stdout.split()[1:]
