"""The ``openai`` backend: any OpenAI-compatible ``/v1/chat/completions`` endpoint
(vLLM, SGLang, a hosted API, ``distill serve``).

Requests run concurrently on one asyncio loop with a bounded number in flight; 429, 5xx,
timeouts and dropped connections are retried with exponential backoff and jitter. The API
key is read from the environment variable the recipe names and is never logged or stored.
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
from typing import Any

import httpx

from distill.backends import Completion, Sampling, mix_seed
from distill.chat.parse import parse_assistant
from distill.errors import UserError
from distill.messages import drop_old_reasoning, to_openai, tool_call

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class OpenAIBackend:
    """Chat completions from an OpenAI-compatible server."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str | None = None,
        max_concurrency: int = 16,
        timeout_s: float = 600.0,
        max_retries: int = 6,
        backoff_s: float = 1.0,
    ):
        self.key = None
        if api_key_env:
            self.key = os.environ.get(api_key_env)
            if not self.key:
                raise UserError(
                    f"teacher api_key_env: environment variable {api_key_env} is not set"
                )
        self.base_url = base_url.rstrip("/")
        self.name = model
        self.revision: str | None = None
        self.max_concurrency = max_concurrency
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s

    def complete(
        self,
        conversations: list[list[dict]],
        tools: list[list[dict] | None],
        sampling: Sampling,
        n: int = 1,
        *,
        seeds: list[int] | None = None,
    ) -> list[list[Completion]]:
        """``n`` completions per conversation, all requests concurrently."""
        coro = self._complete_all(conversations, tools, sampling, n, seeds)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(coro)
        # called from inside an event loop (a notebook, a server): run on a fresh thread
        box: dict[str, Any] = {}
        t = threading.Thread(target=lambda: box.update(r=asyncio.run(coro)))
        t.start()
        t.join()
        return box["r"]

    async def _complete_all(self, conversations, tools, sampling, n, seeds):
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        limits = httpx.Limits(
            max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency
        )
        timeout = httpx.Timeout(self.timeout_s, connect=min(30.0, self.timeout_s))
        sem = asyncio.Semaphore(self.max_concurrency)
        async with httpx.AsyncClient(headers=headers, limits=limits, timeout=timeout) as client:
            jobs = []
            for i, conv in enumerate(conversations):
                seed = seeds[i] if seeds is not None else mix_seed(sampling.seed, i)
                body = self.request_body(conv, tools[i] if tools else None, sampling, n, seed)
                jobs.append(self._post(client, sem, body))
            responses = await asyncio.gather(*jobs)
        return [completions_of(r, n) for r in responses]

    def request_body(
        self, conv: list[dict], tools: list[dict] | None, sampling: Sampling, n: int, seed: int
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.name,
            "messages": to_openai(drop_old_reasoning(conv)),
            "n": n,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_tokens": sampling.max_new_tokens,
            "seed": seed % (1 << 31),  # many servers take a 32-bit seed
        }
        if sampling.stop:
            body["stop"] = sampling.stop
        if tools:
            body["tools"] = tools
        if sampling.topk_logprobs:
            # token ids (vLLM and `distill serve` understand this) let KD use the logprobs
            body.update(
                logprobs=True, top_logprobs=sampling.topk_logprobs, return_tokens_as_token_ids=True
            )
        return body

    async def _post(self, client: httpx.AsyncClient, sem: asyncio.Semaphore, body: dict) -> dict:
        url = f"{self.base_url}/chat/completions"
        for attempt in range(self.max_retries + 1):
            async with sem:
                try:
                    r = await client.post(url, json=body)
                except (httpx.TimeoutException, httpx.TransportError) as e:
                    problem = f"{type(e).__name__}"
                else:
                    if r.status_code == 200:
                        return r.json()
                    if r.status_code not in RETRY_STATUS:
                        raise UserError(f"{url}: HTTP {r.status_code}: {_error_text(r)}")
                    problem = f"HTTP {r.status_code}"
            if attempt == self.max_retries:
                raise UserError(f"{url}: gave up after {attempt + 1} attempts ({problem})")
            # exponential backoff with full jitter: retries of many clients spread out
            await asyncio.sleep(random.uniform(0.5, 1.0) * min(60.0, self.backoff_s * 2**attempt))
        raise AssertionError("unreachable")

    def close(self) -> None:
        pass


def _error_text(r: httpx.Response) -> str:
    try:
        err = r.json().get("error", r.json())
        msg = err.get("message", err) if isinstance(err, dict) else err
    except (ValueError, AttributeError):
        msg = r.text
    return " ".join(str(msg).split())[:300]


def completions_of(response: dict[str, Any], n: int) -> list[Completion]:
    """Our completions from one chat.completion response (choices by index)."""
    choices = sorted(response.get("choices") or [], key=lambda c: c.get("index", 0))
    if len(choices) != n:
        raise UserError(f"server returned {len(choices)} choices, asked for {n}")
    usage = response.get("usage") or {}
    prompt = int(usage.get("prompt_tokens") or 0)
    total = int(usage.get("completion_tokens") or 0)
    out = []
    for c in choices:
        topk, count = _logprobs(c.get("logprobs"))
        msg = message_of(c.get("message") or {})
        reason = c.get("finish_reason") or "stop"
        if reason != "length":
            reason = "tool_calls" if msg.get("tool_calls") else "stop"
        out.append(
            Completion(
                message=msg,
                text=(c.get("message") or {}).get("content") or "",
                finish_reason=reason,
                prompt_tokens=prompt,
                # usage covers all n choices; per-choice counts come from logprobs if any
                completion_tokens=count if count is not None else round(total / n),
                topk=topk,
            )
        )
    return out


def message_of(m: dict[str, Any]) -> dict[str, Any]:
    """A response message (the OpenAI form, arguments as JSON text); raw ``<think>`` or
    ``<tool_call>`` text (a server without reasoning or tool parsers) is parsed like
    local output."""
    content = m.get("content") or ""
    reasoning = m.get("reasoning_content") or m.get("reasoning")
    calls = m.get("tool_calls") or []
    if (
        not reasoning
        and not calls
        and ("<think>" in content or "</think>" in content or "<tool_call>" in content)
    ):
        return parse_assistant(content)
    msg: dict[str, Any] = {"role": "assistant", "content": content}
    if reasoning:
        msg["reasoning_content"] = reasoning
    if calls:
        msg["tool_calls"] = [
            tool_call(
                c.get("id"),
                (c.get("function") or {}).get("name"),
                (c.get("function") or {}).get("arguments") or "{}",
            )
            for c in calls
        ]
    return msg


def _logprobs(lp: dict[str, Any] | None) -> tuple[list[dict] | None, int | None]:
    """Top-k entries with token ids when the server gave ids (``token_id:N``)."""
    content = (lp or {}).get("content")
    if not content:
        return None, None
    out = []
    for t in content:
        ids = [_token_id(x.get("token")) for x in t.get("top_logprobs") or []]
        if any(i is None for i in ids) or _token_id(t.get("token")) is None:
            return None, len(content)
        out.append(
            {
                "ids": ids,
                "logprobs": [float(x["logprob"]) for x in t["top_logprobs"]],
                "token": _token_id(t.get("token")),
                "logprob": float(t.get("logprob", 0.0)),
            }
        )
    return out, len(content)


def _token_id(token: Any) -> int | None:
    if isinstance(token, str) and token.startswith("token_id:"):
        try:
            return int(token[len("token_id:") :])
        except ValueError:
            return None
    return None
