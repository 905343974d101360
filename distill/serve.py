"""``distill serve MODEL_DIR``: an OpenAI-compatible server over the ``hf`` backend.

FastAPI + uvicorn. Concurrent requests are gathered into one batch (requests with the
same sampling settings decode together); each request's seed makes its output
independent of what it was batched with. Responses carry ``reasoning_content`` and
``tool_calls`` like DeepSeek/vLLM servers with reasoning and tool parsers on; with
``stream: true`` they come as server-sent events (:mod:`distill.sse`).

One request never harms another: a request is validated and its prompt rendered on its
own before it joins a batch (a malformed one is a 400 naming the field), bodies and
prompts are bounded (413, 400), and the rows of a client that hung up stop decoding.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from distill import sse
from distill.backends import Completion, Sampling, mix_seed
from distill.errors import UserError
from distill.messages import from_openai, to_openai

GATHER_S = 0.005  # a batch closes once no request arrived for this long
POLL_S = 0.02  # how often a stream sends new tokens and a waiting request checks its client
MAX_BODY_BYTES = 8 << 20  # a request body above this is refused (413)


# --------------------------------------------------------------------------- requests


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")  # fields we do not use are accepted, ignored


class _FunctionDef(_Open):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class _Tool(_Open):
    type: Literal["function"] = "function"
    function: _FunctionDef


class _CallFunction(_Open):
    name: str = Field(min_length=1)
    arguments: str | dict[str, Any] = "{}"


class _ToolCall(_Open):
    id: str | None = None
    type: Literal["function"] = "function"
    function: _CallFunction


class _Part(_Open):
    type: Literal["text"]
    text: str


class _Message(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[_Part] | None = None
    reasoning_content: str | None = None
    tool_calls: list[_ToolCall] | None = None
    tool_call_id: str | None = None

    def plain(self) -> dict[str, Any]:
        """The message as our renderer takes it (text parts joined, developer = system)."""
        c = self.content
        out: dict[str, Any] = {
            "role": "system" if self.role == "developer" else self.role,
            "content": "".join(p.text for p in c) if isinstance(c, list) else c,
            "reasoning_content": self.reasoning_content,
            "tool_call_id": self.tool_call_id,
        }
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump(exclude_none=True) for c in self.tool_calls]
        return out


class _StreamOptions(_Open):
    include_usage: bool = False


class ChatRequest(_Open):
    """The fields of ``/v1/chat/completions`` we honour; others are accepted and ignored."""

    model: str | None = None
    messages: list[_Message] = Field(min_length=1)
    n: int = Field(1, ge=1, le=128)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[_Tool] | None = None
    stream: bool = False
    stream_options: _StreamOptions | None = None
    return_tokens_as_token_ids: bool = False


class _BadRequest(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.kind = status, kind


# --------------------------------------------------------------------------- batching


@dataclass
class _Job:
    """One request's rows (one per choice) on their way through the batcher."""

    rows: list[Any]
    sampling: Sampling
    done: asyncio.Future
    cancelled: bool = False
    completions: list[Completion] = field(default_factory=list)

    def cancel(self) -> None:
        """Stop decoding its rows (the decode loop drops an ended row at its next step)."""
        if not self.done.done():
            self.cancelled = True
            for r in self.rows:
                r.ended = True


class _Batcher:
    """Gathers requests that arrive together and decodes their rows as one batch."""

    def __init__(self, backend, max_batch: int):
        self.backend = backend
        self.max_batch = max_batch
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled: list[_Job] = []  # jobs whose client went away (kept for tests)

    def rows(self, prompt: list[int], sampling: Sampling, n: int, seed: int) -> list[Any]:
        from distill.backends.hf import _Row

        limit = max(0, min(sampling.max_new_tokens, self.backend.max_positions - len(prompt)))
        # the seeds HFBackend.complete gives: a request's output does not depend on its batch
        return [_Row(0, j, prompt, mix_seed(seed, j), limit) for j in range(n)]

    async def submit(self, job: _Job) -> None:
        await self.queue.put(job)

    async def loop(self) -> None:
        while True:
            jobs = [await self.queue.get()]
            # requests sent together arrive over a few ms: gather until the queue is quiet
            while sum(len(j.rows) for j in jobs) < self.max_batch:
                if self.queue.empty():
                    await asyncio.sleep(GATHER_S)
                    if self.queue.empty():
                        break
                jobs.append(self.queue.get_nowait())
            groups: dict[tuple, list[_Job]] = {}
            for job in jobs:
                if job.cancelled:
                    continue
                s = job.sampling
                key = (s.temperature, s.top_p, tuple(s.stop or ()), s.topk_logprobs)
                groups.setdefault(key, []).append(job)
            for group in groups.values():
                await self._run(group)

    async def _run(self, group: list[_Job]) -> None:
        sampling = group[0].sampling
        try:
            # one decode at a time: the model is not reentrant, the event loop stays free
            await asyncio.to_thread(self._decode, [r for j in group for r in j.rows], sampling)
            for job in group:
                job.completions = [self.backend._completion(r, job.sampling) for r in job.rows]
        except Exception as e:  # report to every waiting request, keep serving
            for job in group:
                if not job.done.done():
                    job.done.set_exception(e)
            return
        for job in group:
            if not job.done.done():
                job.done.set_result(job.completions)

    def _decode(self, rows: list[Any], sampling: Sampling) -> None:
        # longest prompts first, as HFBackend.complete orders them; a row whose client
        # hung up before its batch started is skipped
        order = sorted(rows, key=lambda r: -len(r.prompt))
        size = self.backend.batch_size
        for start in range(0, len(order), size):
            batch = [r for r in order[start : start + size] if r.limit > 0 and not r.ended]
            self.backend.decode(batch, sampling)


# --------------------------------------------------------------------------- the app


def create_app(
    model_dir: str | Path,
    *,
    batch_size: int = 64,
    device: str | None = None,
    name: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> FastAPI:
    """The FastAPI app serving ``model_dir`` (loaded once, here)."""
    from distill.backends.hf import HFBackend

    backend = HFBackend(model_dir, batch_size=batch_size, device=device)
    served = name or Path(model_dir).name
    batcher = _Batcher(backend, max_batch=batch_size)
    # no token covers more characters than this: a prompt with more characters than
    # context * this is too long without tokenizing it
    longest_token = max(len(t) for t in backend.tokenizer.get_vocab())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(batcher.loop())
        yield
        task.cancel()

    app = FastAPI(title=f"distill serve {served}", lifespan=lifespan)
    app.state.backend = backend
    app.state.batcher = batcher

    @app.get("/v1/models")
    async def models() -> dict:
        return {
            "object": "list",
            "data": [{"id": served, "object": "model", "created": 0, "owned_by": "distill"}],
        }

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        try:
            req = ChatRequest.model_validate(await _body(request, max_body_bytes))
            if req.model not in (None, served, str(model_dir)):
                raise _BadRequest(
                    404,
                    f"model {req.model!r} is not served here; this server serves {served!r}",
                    "not_found_error",
                )
            if req.stream and req.logprobs:
                raise _BadRequest(400, "logprobs: not available with stream; ask without stream")
            job = _job(req, backend, batcher, longest_token)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(map(str, err["loc"])) or "body"
            return _error(400, f"{where}: {err['msg']}")
        except _BadRequest as e:
            return _error(e.status, str(e), e.kind)
        await batcher.submit(job)
        if req.stream:
            return StreamingResponse(
                _stream(job, req, served, backend, request), media_type="text/event-stream"
            )
        try:
            completions = await _wait(job, request)
        except UserError as e:
            return _error(400, str(e))
        if completions is None:  # the client hung up; nobody reads this
            return _error(499, "client closed the request")
        return JSONResponse(_response(served, completions, req, backend))

    return app


async def _body(request: Request, limit: int) -> Any:
    """The JSON body, refused (413) past ``limit`` bytes before it is all read."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise _BadRequest(413, f"body: {declared} bytes, more than this server's {limit}")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise _BadRequest(413, f"body: more than this server's {limit} bytes")
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _BadRequest(400, f"body: not valid JSON ({e})") from None


def _job(req: ChatRequest, backend, batcher: _Batcher, longest_token: int) -> _Job:
    """The request's rows: its prompt rendered alone, so a prompt the chat template cannot
    render fails this request only, and checked against the model's context."""
    try:
        convs = from_openai([m.plain() for m in req.messages])
    except (ValueError, TypeError, KeyError) as e:
        raise _BadRequest(400, f"messages: {e}") from None
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    context = backend.max_positions
    # contents are rendered verbatim: a lower bound of the prompt's tokens, for free
    chars = sum(len(m["content"]) for m in convs if isinstance(m.get("content"), str))
    if chars > context * longest_token:
        raise _BadRequest(
            400, f"messages: {chars} characters cannot fit this model's context of {context} tokens"
        )
    try:
        prompt = backend.render(convs, tools)
    except Exception as e:  # noqa: BLE001 - the template fails on this request's input
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        where = "tools" if tools and isinstance(e, KeyError | TypeError) else "messages"
        raise _BadRequest(400, f"{where}: the chat template cannot render it ({first})") from None
    if len(prompt) >= context:
        raise _BadRequest(
            400,
            f"messages: the prompt is {len(prompt)} tokens; this model's context is "
            f"{context} tokens, with room for at least one generated token",
        )
    stop = [req.stop] if isinstance(req.stop, str) else req.stop
    k = (req.top_logprobs or 0) if req.logprobs else 0
    sampling = Sampling(
        temperature=req.temperature, top_p=req.top_p,
        max_new_tokens=req.max_completion_tokens or req.max_tokens or 512,
        stop=stop or None, topk_logprobs=max(k, 1) if req.logprobs else 0,
    )  # fmt: skip
    seed = req.seed if req.seed is not None else random.getrandbits(62)
    future = asyncio.get_running_loop().create_future()
    return _Job(batcher.rows(prompt, sampling, req.n, seed), sampling, future)


async def _wait(job: _Job, request: Request) -> list[Completion] | None:
    """The job's completions; None (its rows cancelled) once the client hung up."""
    while True:
        done, _ = await asyncio.wait({job.done}, timeout=POLL_S * 5)
        if done:
            return job.done.result()
        if await request.is_disconnected():
            _cancel(job, request)
            return None


def _cancel(job: _Job, request: Request) -> None:
    if not job.done.done():
        job.cancel()
        request.app.state.batcher.cancelled.append(job)


async def _stream(
    job: _Job, req: ChatRequest, served: str, backend, request: Request
) -> AsyncIterator[bytes]:
    """The job as server-sent events: settled text as it is generated, then the rest,
    the finish reasons and (``stream_options.include_usage``) the usage."""
    cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    choices = [sse.ChoiceStream(i) for i in range(len(job.rows))]
    seen = [0] * len(job.rows)
    stop, eos = job.sampling.stop, backend.eos_text
    try:
        polls = 0
        while not job.done.done():
            await asyncio.wait({job.done}, timeout=POLL_S)
            polls += 1
            if polls % 5 == 0 and await request.is_disconnected():
                return  # finally cancels its rows
            for i, r in enumerate(job.rows):
                if job.done.done() or len(r.tokens) == seen[i]:
                    continue
                seen[i] = len(r.tokens)
                text = backend.tokenizer.decode(r.tokens[: seen[i]], skip_special_tokens=False)
                for d in choices[i].deltas(sse.partial_message(text, stop, eos), final=False):
                    yield sse.event(sse.chunk(cid, created, served, i, d))
        try:
            completions = job.done.result()
        except Exception as e:  # noqa: BLE001 - the stream has begun: report in it
            yield sse.event({"error": {"message": str(e), "type": "server_error", "code": 500}})
            return
        for i, c in enumerate(completions):
            for d in choices[i].deltas(c.message, final=True):
                yield sse.event(sse.chunk(cid, created, served, i, d))
            yield sse.event(sse.chunk(cid, created, served, i, {}, c.finish_reason))
        if req.stream_options and req.stream_options.include_usage:
            last = {**sse.chunk(cid, created, served, 0, {}), "choices": []}
            yield sse.event({**last, "usage": _usage(completions)})
        yield sse.event("[DONE]")
    finally:  # also when the client hung up (the response task is cancelled)
        _cancel(job, request)


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": kind, "code": status}}, status_code=status
    )


def _usage(completions: list[Completion]) -> dict[str, int]:
    prompt = completions[0].prompt_tokens if completions else 0
    gen = sum(c.completion_tokens for c in completions)
    return {"prompt_tokens": prompt, "completion_tokens": gen, "total_tokens": prompt + gen}


def _response(served: str, completions: list[Completion], req: ChatRequest, backend) -> dict:
    choices = []
    for i, c in enumerate(completions):
        (msg,) = to_openai([c.message])
        msg.setdefault("content", "")
        choices.append(
            {
                "index": i,
                "message": msg,
                "finish_reason": c.finish_reason,
                "logprobs": _logprobs(c, req, backend.tokenizer) if req.logprobs else None,
            }
        )
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": served,
        "choices": choices,
        "usage": _usage(completions),
    }


def _logprobs(c: Completion, req: ChatRequest, tokenizer) -> dict:
    def tok(i: int) -> str:
        return (
            f"token_id:{i}"
            if req.return_tokens_as_token_ids
            else tokenizer.convert_ids_to_tokens(i)
        )

    k = req.top_logprobs or 0
    content = []
    for t in c.topk or []:
        top = [
            {"token": tok(i), "logprob": lp, "bytes": None}
            for i, lp in zip(t["ids"][:k], t["logprobs"][:k], strict=True)
        ]
        content.append(
            {"token": tok(t["token"]), "logprob": t["logprob"], "bytes": None, "top_logprobs": top}
        )
    return {"content": content}


def serve(
    model_dir: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    batch_size: int = 64,
    device: str | None = None,
) -> None:
    """Run the server until interrupted."""
    import uvicorn

    uvicorn.run(
        create_app(model_dir, batch_size=batch_size, device=device),
        host=host,
        port=port,
        log_level="info",
    )
