"""The OpenAI-compatible server, live on 127.0.0.1, driven by the official openai client."""

import asyncio
import json
import socket
import statistics
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn

from codetune.errors import InputError
from codetune.recipe import load_recipe
from codetune.serve import create_app, load_engine, vllm_command

API_KEY = "sk-test-123"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, app):
        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started and time.time() < deadline:
            time.sleep(0.05)
        assert self.server.started
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def run_dir(tiny_run):
    return tiny_run


@pytest.fixture(scope="module")
def engine(run_dir):
    return load_engine(run_dir, name="tiny", max_tokens_limit=256)


@pytest.fixture(scope="module")
def base_url(engine):
    with LiveServer(create_app(engine)) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    from openai import OpenAI

    return OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=60)


PROMPT = "Write a Python function `double(x)` that returns 2 * x."


def test_models_and_health(client, base_url):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(f"{base_url}/health").json() == {"status": "ok", "model": "tiny"}


def test_chat_completion_matches_codetune_generate(client, engine):
    from codetune.generate import generate

    res = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=40, temperature=0
    )
    choice = res.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    cfg = engine.recipe.generation.model_copy(update={"do_sample": False, "max_new_tokens": 40})
    expected = generate(engine.model, engine.tokenizer, [[{"role": "user", "content": PROMPT}]], cfg)[0]
    assert choice.message.content.strip() == expected
    assert (
        res.usage.completion_tokens > 0
        and res.usage.total_tokens == res.usage.prompt_tokens + res.usage.completion_tokens
    )


def test_chat_stream_equals_the_whole_answer(client):
    kwargs = dict(model="tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=40, temperature=0)
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == whole and len(chunks) > 3


def test_completions(client, engine):
    # a raw prompt: here the chat template written out by hand, so the answer must equal the chat endpoint's
    prompt = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True
    )
    res = client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0)
    assert res.object == "text_completion" and res.choices[0].text
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=24, temperature=0
    )
    assert res.choices[0].text == chat.choices[0].message.content
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0, stream=True)
    )
    assert streamed == res.choices[0].text
    assert 0 < res.usage.completion_tokens <= 24


def test_bad_requests_get_openai_style_4xx_and_the_server_keeps_serving(client, base_url):
    import openai

    bad = [
        (dict(model="nope", messages=[{"role": "user", "content": "hi"}]), 404, "does not exist"),
        (dict(model="tiny", messages=[{"role": "user", "content": "hi"}], temperature=5), 400, "temperature"),
        (dict(model="tiny", messages=[{"role": "user", "content": "hi"}], top_p=0), 400, "top_p"),
        (dict(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=100000), 400, "over this server"),
        (dict(model="tiny", messages=[{"role": "user", "content": "word " * 3000}]), 400, "context"),
        (dict(model="tiny", messages=[]), 400, "messages"),
        (dict(model="tiny", messages=[{"role": "wizard", "content": "hi"}]), 400, "role"),
    ]
    for kwargs, status, text in bad:
        with pytest.raises(openai.APIStatusError) as info:
            client.chat.completions.create(**kwargs)
        assert info.value.status_code == status, kwargs
        body = info.value.response.json()
        assert text in body["error"]["message"] and body["error"]["type"]
    raw = httpx.post(
        f"{base_url}/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert raw.status_code == 400 and "not valid JSON" in raw.json()["error"]["message"]
    ok = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert ok.choices[0].message.role == "assistant"


def test_api_key(engine):
    from openai import AuthenticationError, OpenAI

    with LiveServer(create_app(engine, api_key=API_KEY)) as url:
        good = OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0)
        assert good.models.list().data[0].id == "tiny"
        for key in ("wrong", ""):
            with pytest.raises(AuthenticationError):
                OpenAI(base_url=f"{url}/v1", api_key=key or "x", max_retries=0).models.list()
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert httpx.get(f"{url}/health").status_code == 200


def test_disconnect_mid_stream_frees_the_slot(base_url, client, engine):
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 256,
        "temperature": 1.0,
        "stream": True,
    }
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=60) as res:
        for _ in res.iter_lines():
            break  # read the first event, then hang up
    t0 = time.perf_counter()
    deadline = t0 + 30
    while engine.slot.locked() and time.perf_counter() < deadline:
        time.sleep(0.02)
    assert not engine.slot.locked()
    quick = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert quick.choices[0].message.role == "assistant"


def test_load_32_concurrent_clients_200_requests(base_url):
    from openai import AsyncOpenAI

    async def main():
        client = AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)
        sem = asyncio.Semaphore(32)
        latencies, statuses = [], []

        async def one(i):
            async with sem:
                t0 = time.perf_counter()
                try:
                    res = await client.chat.completions.create(
                        model="tiny",
                        messages=[{"role": "user", "content": f"Write `f{i}(x)`."}],
                        max_tokens=8,
                        temperature=0,
                        stream=i % 4 == 0,
                    )
                    if i % 4 == 0:
                        async for _ in res:
                            pass
                    statuses.append(200)
                except Exception as exc:  # noqa: BLE001 - every failure is counted, then asserted on
                    statuses.append(getattr(exc, "status_code", 599))
                latencies.append(time.perf_counter() - t0)

        await asyncio.gather(*(one(i) for i in range(200)))
        await client.close()
        return latencies, statuses

    latencies, statuses = asyncio.run(main())
    q = statistics.quantiles(latencies, n=100)
    print(
        f"\n200 requests, 32 concurrent: p50 {q[49]:.3f}s p90 {q[89]:.3f}s p99 {q[98]:.3f}s max {max(latencies):.3f}s"
    )
    assert statuses == [200] * 200


def test_vllm_command_refuses_the_local_only_tiny_model(run_dir):
    from codetune.recipe import RecipeError

    with pytest.raises(RecipeError, match="vLLM needs a hub id or a model folder"):
        vllm_command(run_dir, host="127.0.0.1", port=9000)


def _phi3_run(root: Path, r: int) -> Path:
    """A run directory as vllm_command reads it: recipe, adapter config, the saved chat template."""
    from codetune.recipe import save_recipe

    run = root / "mine"
    # a run's recipe.yaml holds the family's values resolved (no hub needed to read it back)
    phi3 = [
        "model.name_or_path=microsoft/Phi-3-mini-4k-instruct", "tokenizer.chat_template=phi3",
        "tokenizer.pad_token=<|endoftext|>", "lora.target_modules=[qkv_proj,o_proj,gate_up_proj,down_proj]",
        "generation.stop_tokens=[<|end|>,<|endoftext|>]", f"lora.r={r}",
    ]  # fmt: skip
    save_recipe(load_recipe("tiny-cpu", phi3), run)
    (run / "adapter").mkdir()
    (run / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": 2 * r}))
    (run / "adapter" / "chat_template.jinja").write_text("{{ messages }}")
    import torch
    from safetensors.torch import save_file

    save_file({"base_model.model.lm_head.lora_A.weight": torch.zeros(r, 4)}, run / "adapter" / "adapter_model.safetensors")
    return run


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


def test_vllm_command_for_a_phi3_run(tmp_path):
    run = _phi3_run(tmp_path, r=12)
    cmd = vllm_command(run, host="0.0.0.0", port=9000, name="coder", api_key="k")
    assert cmd[:3] == ["vllm", "serve", "microsoft/Phi-3-mini-4k-instruct"]
    i = cmd.index("--lora-modules")
    assert cmd[i + 1] == f"coder={(run / 'adapter').resolve()}"
    # vLLM accepts 8, 16, 32, ... only: rank 12 is served with room for 16
    assert "--enable-lora" in cmd and cmd[cmd.index("--max-lora-rank") + 1] == "16"
    assert cmd[cmd.index("--chat-template") + 1] == str((run / "adapter" / "chat_template.jinja").resolve())
    assert cmd[cmd.index("--api-key") + 1] == "k" and cmd[cmd.index("--port") + 1] == "9000"
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"


def test_vllm_command_refuses_an_adapter_config_that_is_not_lora(tmp_path):
    run = _phi3_run(tmp_path, r=8)
    (run / "adapter" / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16}))
    with pytest.raises(InputError, match="peft_type"):
        vllm_command(run, host="127.0.0.1", port=9000, name="coder", api_key=None)


def test_vllm_lora_rank_rounds_up_to_what_vllm_accepts():
    from codetune.recipe import RecipeError
    from codetune.serve import vllm_lora_rank

    assert [vllm_lora_rank(r) for r in (1, 8, 9, 12, 16, 17, 64, 65, 256, 300, 512)] == [
        8, 8, 16, 16, 16, 32, 64, 128, 256, 320, 512,
    ]  # fmt: skip
    with pytest.raises(RecipeError, match="largest LoRA rank"):
        vllm_lora_rank(513)


def test_serve_vllm_dry_run_writes_nothing_and_refuses_missing_paths(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from codetune.cli import app

    runner = CliRunner()
    run = _phi3_run(tmp_path, r=12)
    before = _tree(tmp_path)
    res = runner.invoke(app, ["serve", str(run), "--engine", "vllm", "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "--max-lora-rank 16" in res.output and _tree(tmp_path) == before
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for missing in (str(tmp_path / "nope"), "./nope", "runs/nope", "a/b/c"):
        res = runner.invoke(app, ["serve", missing, "--engine", "vllm", "--dry-run"])
        assert res.exit_code == 2 and "does not exist" in res.output, (missing, res.output)
        assert "Traceback" not in res.output
    (tmp_path / "empty").mkdir()
    res = runner.invoke(app, ["serve", "empty", "--engine", "vllm", "--dry-run"])
    assert res.exit_code == 2 and "neither a run directory" in res.output
    # a hub id is passed on as it is
    res = runner.invoke(app, ["serve", "microsoft/Phi-3-mini-4k-instruct", "--engine", "vllm", "--dry-run"])
    assert res.exit_code == 0 and "vllm serve microsoft/Phi-3-mini-4k-instruct" in res.output
