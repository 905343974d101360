"""`distill serve` on a free loopback port, driven by the official openai client and by
our openai backend; the backend's retries against a real flaky HTTP server."""

import asyncio
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
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
    app = create_app(model_dir, batch_size=8, name="tiny", max_body_bytes=256_000)
    with _Server(app) as url:
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


# --- one request never harms another (issue #16, items 1 and 2) ------------------------


def _post(url: str, body, timeout: float = 60, **kw) -> httpx.Response:
    return httpx.post(f"{url}/chat/completions", json=body, timeout=timeout, **kw)


GOOD = {"model": "tiny", "messages": PROMPT, "tools": TOOLS, "temperature": 0, "max_tokens": 40}


def test_a_malformed_request_sent_with_good_ones_fails_alone_naming_the_field(server):
    bad = {**GOOD, "tools": [{"foo": 1}]}
    with ThreadPoolExecutor(5) as pool:
        replies = list(pool.map(lambda b: _post(server, b), [GOOD, GOOD, bad, GOOD, GOOD]))
    assert [r.status_code for r in replies] == [200, 200, 400, 200, 200]
    assert replies[2].json()["error"]["message"].startswith("tools.0.function:")
    assert all(r.json()["choices"][0]["finish_reason"] == "tool_calls" for r in replies[:2])
    call = {"role": "assistant", "tool_calls": [{"function": 5}]}
    r = _post(server, {**GOOD, "messages": [*PROMPT, call]})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"].startswith("messages.1.tool_calls.0.function:")


def test_bounds_body_size_and_context(server):
    r = _post(server, {**GOOD, "messages": [{"role": "user", "content": "x" * 300_000}]})
    assert r.status_code == 413 and "body" in r.json()["error"]["message"]
    # longer than the model's context (1024 positions) yet under the body limit: a 400
    # found without tokenizing, and one found by tokenizing
    for text in ("add " * 40_000, "add 2 and 3 " * 300):
        r = _post(server, {**GOOD, "messages": [{"role": "user", "content": text}]})
        assert r.status_code == 400 and "context" in r.json()["error"]["message"], r.text
    r = _post(server, {**GOOD, "messages": [{"role": "user", "content": "add 2 and 3 " * 60}]})
    assert r.status_code == 200


@pytest.fixture(scope="module")
def endless(model_dir):
    """A server whose model never ends a turn (no eos) and takes 5 ms a step: every row
    decodes to its limit, slowly. On the CPU also where a GPU is: the GPU decodes through a
    compiled, graphed step that never calls ``model.forward``, so nothing would slow it."""
    app = create_app(model_dir, batch_size=8, name="tiny", device="cpu")
    backend = app.state.backend
    backend.eos_ids = [10**9]
    forward = backend.model.forward

    def slow(*args, **kwargs):
        time.sleep(0.005)
        return forward(*args, **kwargs)

    backend.model.forward = slow
    with _Server(app) as url:
        yield url, app


def test_rows_of_a_client_that_hung_up_stop_decoding(endless):
    url, app = endless
    long = {"model": "tiny", "messages": PROMPT, "temperature": 1.0, "max_tokens": 900}

    def abandon(body):
        if body.get("stream"):  # read the first events, then hang up
            with httpx.stream("POST", f"{url}/chat/completions", json=body, timeout=30) as r:
                lines = r.iter_lines()
                assert next(lines).startswith("data: ") and next(lines) == ""
            return
        with pytest.raises(httpx.TimeoutException):
            _post(url, body, timeout=0.5)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(abandon, [long] * 3 + [{**long, "stream": True}]))
    t0 = time.time()
    r = _post(url, {**long, "max_tokens": 5})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
    deadline = time.time() + 10
    while len(app.state.batcher.cancelled) < 4 and time.time() < deadline:
        time.sleep(0.05)
    cancelled = app.state.batcher.cancelled
    assert len(cancelled) == 4
    # each stopped long before its 900 tokens, and the fresh request did not wait for them
    assert all(len(row.tokens) < 600 for job in cancelled for row in job.rows)
    assert time.time() - t0 < 30


# --- streaming (issue #17) ------------------------------------------------------------


def test_stream_with_the_official_client_adds_up_to_the_plain_reply(server):
    from openai import OpenAI

    client = OpenAI(base_url=server, api_key="unused", max_retries=0)
    args = dict(model="tiny", messages=PROMPT, tools=TOOLS, n=2, temperature=0, max_tokens=40)
    plain = client.chat.completions.create(**args)
    chunks = list(
        client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True})
    )
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage
    for i, want in enumerate(plain.choices):
        deltas = [c.choices[0] for c in chunks[:-1] if c.choices[0].index == i]
        assert deltas[0].delta.role == "assistant"
        reasoning = "".join(getattr(d.delta, "reasoning_content", None) or "" for d in deltas)
        content = "".join(d.delta.content or "" for d in deltas)
        calls = [tc for d in deltas for tc in d.delta.tool_calls or []]
        assert reasoning == want.message.reasoning_content == "use the tool"
        assert content == (want.message.content or "")
        assert [(c.index, c.id, c.function.name, c.function.arguments) for c in calls] == [
            (k, c.id, c.function.name, c.function.arguments)
            for k, c in enumerate(want.message.tool_calls)
        ]
        assert [d.finish_reason for d in deltas][-1] == "tool_calls"
        assert all(d.finish_reason is None for d in deltas[:-1])
    # without include_usage: no usage chunk; with stop: cut there, finish_reason "stop"
    stream = client.chat.completions.create(
        model="tiny", messages=PROMPT, tools=TOOLS, temperature=0, stop=["tool"], stream=True
    )
    chunks = list(stream)
    assert all(c.choices for c in chunks) and chunks[-1].choices[0].finish_reason == "stop"
    assert not any(c.choices[0].delta.tool_calls for c in chunks)


def test_stream_sends_tokens_while_they_are_generated(endless):
    from openai import OpenAI

    url, _ = endless
    client = OpenAI(base_url=url, api_key="unused", max_retries=0)
    stream = client.chat.completions.create(
        model="tiny", messages=PROMPT, temperature=1.0, seed=3, max_tokens=400, stream=True
    )
    arrivals, text = [], []
    for c in stream:
        arrivals.append(time.time())
        d = c.choices[0].delta
        text.append((getattr(d, "reasoning_content", None) or "") + (d.content or ""))
    assert len([t for t in text if t]) > 3  # several text deltas, not one at the end
    assert c.choices[0].finish_reason == "length"
    assert arrivals[len(arrivals) // 2] < arrivals[-1]


def test_stream_errors_are_plain_http_errors_before_the_stream(server):
    r = _post(server, {**GOOD, "stream": True, "logprobs": True})
    assert r.status_code == 400 and "logprobs" in r.json()["error"]["message"]
    r = _post(server, {**GOOD, "stream": True, "tools": [{"type": "function"}]})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("tools.0.function")


_USER = [{"role": "user", "content": "hi"}]
BAD_BODIES = [  # (body, status, what the message starts with)
    ("{not json", 400, "body: not valid JSON"),
    ("[1, 2]", 400, "body: Input should be a valid dictionary"),
    ({}, 400, "messages: Field required"),
    ({"messages": []}, 400, "messages: List should have at least 1 item"),
    ({"messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     400, "messages.0.content"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"function": {}}]}]}, 400,
     "messages.0.tool_calls.0.function.name: Field required"),
    ({"messages": _USER, "n": 0}, 400, "n: Input should be greater than or equal to 1"),
    ({"messages": _USER, "temperature": 5}, 400, "temperature"),
    ({"messages": _USER, "top_p": 0}, 400, "top_p"),
    ({"messages": _USER, "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": _USER, "stop": 3}, 400, "stop"),
    ({"messages": _USER, "seed": "x"}, 400, "seed"),
    ({"messages": _USER, "tools": {"type": "function"}}, 400, "tools: Input should be a valid list"),
    ({"messages": _USER, "tools": [{"type": "web", "function": {"name": "f"}}]}, 400,
     "tools.0.type"),
    ({"messages": _USER, "stream": True, "stream_options": 1}, 400, "stream_options"),
    ({"messages": _USER, "model": "other"}, 404, "model 'other' is not served here"),
]  # fmt: skip


def test_bad_bodies_are_4xx_naming_the_field_and_the_server_keeps_serving(server):
    for body, status, start in BAD_BODIES:
        kw = {"content": body} if isinstance(body, str) else {"json": body}
        r = httpx.post(f"{server}/chat/completions", timeout=30, **kw)
        assert r.status_code == status, (body, r.text)
        assert r.json()["error"]["message"].startswith(start), (body, r.text)
    assert httpx.get(f"{server}/chat/completions").status_code == 405
    assert httpx.post(f"{server}/models").status_code == 405
    assert httpx.get(f"{server}/nowhere").status_code == 404
    assert _post(server, GOOD).status_code == 200
