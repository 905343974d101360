"""`distill serve` on a free loopback port, driven by the official openai client and by
our openai backend; the backend's retries against a real flaky HTTP server."""

import asyncio
import json
import socket
import threading
import time

import pytest
import torch
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from gen_fixtures import PROMPT, TOOLS, AddDomain, add_task, taught_model_dir

from distill.backends import Sampling, make_backend
from distill.backends.openai import OpenAIBackend
from distill.errors import UserError
from distill.rollout import rollout
from distill.serve import create_app

torch.set_num_threads(1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    def __init__(self, app):
        self.port = _free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.02)
        return f"http://127.0.0.1:{self.port}/v1"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def model_dir():
    return taught_model_dir()


@pytest.fixture(scope="module")
def server(model_dir):
    with _Server(create_app(model_dir, batch_size=8, name="tiny")) as url:
        yield url


def test_official_client_tool_call_reasoning_logprobs(server):
    from openai import OpenAI

    client = OpenAI(base_url=server, api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    r = client.chat.completions.create(
        model="tiny", messages=PROMPT, tools=TOOLS, n=2, temperature=0, max_tokens=40,
        seed=7, logprobs=True, top_logprobs=2,
    )  # fmt: skip
    assert len(r.choices) == 2
    for c in r.choices:
        assert c.finish_reason == "tool_calls"
        call = c.message.tool_calls[0]
        assert call.function.name == "add" and json.loads(call.function.arguments) == {
            "a": 2,
            "b": 3,
        }
        assert c.message.reasoning_content == "use the tool"
        assert len(c.logprobs.content) > 10 and len(c.logprobs.content[0].top_logprobs) == 2
    assert r.usage.completion_tokens == sum(len(c.logprobs.content) for c in r.choices)


def test_official_client_errors_and_stop(server):
    import openai

    client = openai.OpenAI(base_url=server, api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=PROMPT)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[{"role": "robot", "content": "x"}])
    r = client.chat.completions.create(
        model="tiny", messages=PROMPT, tools=TOOLS, temperature=0, stop=["tool"]
    )
    assert r.choices[0].finish_reason == "stop" and not r.choices[0].message.tool_calls


def test_our_backend_against_serve_matches_local_hf(server, model_dir):
    remote = OpenAIBackend(server, "tiny", max_concurrency=4)
    local = make_backend(path=model_dir)
    s = Sampling(temperature=0, max_new_tokens=40)
    tasks = [add_task("a"), add_task("b", ())]
    via_server = rollout(remote, AddDomain(), tasks, n=2, sampling=s)
    direct = rollout(local, AddDomain(), tasks, n=2, sampling=s)
    assert [t.messages for t in via_server] == [t.messages for t in direct]
    assert via_server[0].messages[-1]["content"] == "10"
    # sampled, concurrent requests with seeds: reproducible through the server
    s = Sampling(temperature=1.0, max_new_tokens=8, seed=5, topk_logprobs=2)
    a = remote.complete([PROMPT] * 6, [None] * 6, s, n=2, seeds=list(range(6)))
    b = remote.complete([PROMPT] * 6, [None] * 6, s, n=2, seeds=list(range(6)))
    assert [[c.text for c in x] for x in a] == [[c.text for c in x] for x in b]
    assert all(len(c.topk) == c.completion_tokens for x in a for c in x)


def test_retries_on_429_and_5xx_then_success():
    calls = []
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def flaky(body: dict):
        calls.append(body)
        if len(calls) <= 2:
            return JSONResponse(
                {"error": {"message": "slow down"}}, status_code=429 if len(calls) == 1 else 503
            )
        msg = {"role": "assistant", "content": "hi", "reasoning_content": "think"}
        return {
            "choices": [{"index": 0, "message": msg, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2},
        }

    @app.post("/bad/chat/completions")
    async def bad(body: dict):
        return JSONResponse({"error": {"message": "unknown model"}}, status_code=400)

    with _Server(app) as url:
        b = OpenAIBackend(url, "m", backoff_s=0.01)
        ((c,),) = b.complete([PROMPT], [None], Sampling())
        assert (c.message["content"], c.message["reasoning_content"]) == ("hi", "think")
        assert len(calls) == 3 and c.completion_tokens == 2
        with pytest.raises(UserError, match="HTTP 400: unknown model"):
            OpenAIBackend(url.replace("/v1", "/bad"), "m").complete([PROMPT], [None], Sampling())


def test_api_key_from_env_never_in_body(monkeypatch):
    with pytest.raises(UserError, match="DISTILL_TEST_KEY"):
        OpenAIBackend("http://127.0.0.1:9/v1", "m", api_key_env="DISTILL_TEST_KEY")
    monkeypatch.setenv("DISTILL_TEST_KEY", "sk-secret")
    b = OpenAIBackend("http://127.0.0.1:9/v1", "m", api_key_env="DISTILL_TEST_KEY")
    assert "sk-secret" not in json.dumps(b.request_body(PROMPT, None, Sampling(), 1, 0))
    asyncio.run(asyncio.sleep(0))
