"""``distill serve MODEL_DIR``: an OpenAI-compatible server over the ``hf`` backend.

FastAPI + uvicorn. Concurrent requests are gathered into one batch (requests with the
same sampling settings decode together); each request's seed makes its output
independent of what it was batched with. Responses carry ``reasoning_content`` and
``tool_calls`` like DeepSeek/vLLM servers with reasoning and tool parsers on.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from distill.backends import Completion, Sampling
from distill.errors import UserError
from distill.messages import from_openai, to_openai

GATHER_S = 0.005  # a batch closes once no request arrived for this long


class ChatRequest(BaseModel):
    """The fields of ``/v1/chat/completions`` we honour; others are accepted and ignored."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    messages: list[dict[str, Any]] = Field(min_length=1)
    n: int = Field(1, ge=1, le=128)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    stream: bool = False
    return_tokens_as_token_ids: bool = False


class _Batcher:
    """Gathers requests that arrive together and decodes them as one batch."""

    def __init__(self, backend, max_batch: int):
        self.backend = backend
        self.max_batch = max_batch
        self.queue: asyncio.Queue = asyncio.Queue()

    async def submit(self, convs, tools, sampling: Sampling, n: int, seed: int) -> list[Completion]:
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put((convs, tools, sampling, n, seed, fut))
        return await fut

    async def loop(self) -> None:
        while True:
            items = [await self.queue.get()]
            # requests sent together arrive over a few ms: gather until the queue is quiet
            while len(items) < self.max_batch:
                if self.queue.empty():
                    await asyncio.sleep(GATHER_S)
                    if self.queue.empty():
                        break
                items.append(self.queue.get_nowait())
            groups: dict[tuple, list] = {}
            for it in items:
                s, n = it[2], it[3]
                key = (
                    s.temperature,
                    s.top_p,
                    s.max_new_tokens,
                    tuple(s.stop or ()),
                    s.topk_logprobs,
                    n,
                )
                groups.setdefault(key, []).append(it)
            for group in groups.values():
                await self._run(group)

    async def _run(self, group: list) -> None:
        s, n = group[0][2], group[0][3]
        try:
            # one decode at a time: the model is not reentrant, the event loop stays free
            out = await asyncio.to_thread(
                self.backend.complete, [g[0] for g in group], [g[1] for g in group], s, n,
                seeds=[g[4] for g in group],
            )  # fmt: skip
        except Exception as e:  # report to every waiting request, keep serving
            for g in group:
                if not g[5].done():
                    g[5].set_exception(e)
            return
        for g, completions in zip(group, out, strict=True):
            if not g[5].done():
                g[5].set_result(completions)


def create_app(
    model_dir: str | Path,
    *,
    batch_size: int = 64,
    device: str | None = None,
    name: str | None = None,
) -> FastAPI:
    """The FastAPI app serving ``model_dir`` (loaded once, here)."""
    from distill.backends.hf import HFBackend

    backend = HFBackend(model_dir, batch_size=batch_size, device=device)
    served = name or Path(model_dir).name
    batcher = _Batcher(backend, max_batch=batch_size)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(batcher.loop())
        yield
        task.cancel()

    app = FastAPI(title=f"distill serve {served}", lifespan=lifespan)
    app.state.backend = backend

    @app.get("/v1/models")
    async def models() -> dict:
        return {
            "object": "list",
            "data": [{"id": served, "object": "model", "created": 0, "owned_by": "distill"}],
        }

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> JSONResponse:
        try:
            req = ChatRequest.model_validate(await request.json())
            convs = from_openai([_text_content(m) for m in req.messages])
        except ValidationError as e:
            err = e.errors()[0]
            return _error(400, f"{'.'.join(map(str, err['loc']))}: {err['msg']}")
        except (ValueError, TypeError, KeyError) as e:
            return _error(400, f"messages: {e}")
        if req.model not in (None, served, str(model_dir)):
            return _error(
                404,
                f"model {req.model!r} is not served here; this server serves {served!r}",
                "not_found_error",
            )
        if req.stream:
            return _error(400, "stream: streaming is not supported by distill serve")
        stop = [req.stop] if isinstance(req.stop, str) else req.stop
        k = (req.top_logprobs or 0) if req.logprobs else 0
        sampling = Sampling(
            temperature=req.temperature, top_p=req.top_p,
            max_new_tokens=req.max_completion_tokens or req.max_tokens or 512,
            stop=stop or None, topk_logprobs=max(k, 1) if req.logprobs else 0,
        )  # fmt: skip
        seed = req.seed if req.seed is not None else random.getrandbits(62)
        try:
            completions = await batcher.submit(convs, req.tools, sampling, req.n, seed)
        except UserError as e:
            return _error(400, str(e))
        return JSONResponse(_response(served, completions, req, backend))

    return app


def _text_content(m: dict[str, Any]) -> dict[str, Any]:
    """Content given as a list of parts becomes its text."""
    c = m.get("content")
    if isinstance(c, list):
        m = {**m, "content": "".join(p.get("text", "") for p in c if isinstance(p, dict))}
    return m


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": kind, "code": status}}, status_code=status
    )


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
    prompt = completions[0].prompt_tokens if completions else 0
    gen = sum(c.completion_tokens for c in completions)
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": served,
        "choices": choices,
        "usage": {"prompt_tokens": prompt, "completion_tokens": gen, "total_tokens": prompt + gen},
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
