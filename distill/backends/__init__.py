"""Teacher backends: one interface over a local HF model and any OpenAI-compatible server.

Both return the same :class:`Completion` objects (a parsed assistant message with flat
tool calls, finish reason, token counts, optional top-k logprobs), so a rollout writes the
same trace rows whichever backend produced them.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from distill.errors import UserError

if TYPE_CHECKING:
    from distill.recipe.schema import TeacherConfig

__all__ = ["Sampling", "Completion", "Backend", "make_backend", "mix_seed"]


@dataclass
class Sampling:
    """How to sample one assistant turn. ``temperature`` 0 is greedy.

    ``top_k`` (0: off) truncates before ``top_p``, as vLLM and transformers do.
    ``sampler_logprobs`` records, per generated token, what an RL trainer needs (see
    :class:`Completion`); with ``top_p`` < 1 and no ``top_k`` the nucleus is then looked for
    among the ``sample.KEPT_MAX`` (1024) most likely tokens, so that it fits a fixed width.
    """

    temperature: float = 0.8
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0
    stop: list[str] | None = None
    topk_logprobs: int = 0
    top_k: int = 0
    sampler_logprobs: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Completion:
    """One generated assistant turn.

    ``message`` is the parsed assistant message (flat tool calls); ``finish_reason`` is
    "stop", "length" or "tool_calls". ``topk`` has one ``{"ids", "logprobs"}`` entry per
    generated token (plus ``token``/``logprob`` of the sampled one) when asked for.

    With ``sampling.sampler_logprobs`` (all None otherwise): ``prompt_ids`` is the exact
    prompt decoded from; ``token_ids`` the generated ids (eos included when it ended on
    eos); ``logprobs`` per generated token, log π_old(token) under the sampling
    distribution, softmax(logits / temperature) renormalised over the kept set of the
    truncation (softmax(logits) at temperature 0); ``kept`` per generated token the token
    ids the top-k/top-p truncation kept, None when no truncation is active.
    """

    message: dict
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    topk: list[dict] | None = None
    prompt_ids: list[int] | None = None
    token_ids: list[int] | None = None
    logprobs: list[float] | None = None
    kept: list[list[int]] | None = None


class Backend(Protocol):
    name: str  # model identifier for lineage
    revision: str | None

    def complete(
        self,
        conversations: list[list[dict]],
        tools: list[list[dict] | None],
        sampling: Sampling,
        n: int = 1,
        *,
        seeds: list[int] | None = None,
    ) -> list[list[Completion]]:
        """``n`` completions of each conversation. ``seeds`` (one per conversation)
        replaces ``sampling.seed`` so a row's output does not depend on its batch."""
        ...

    def close(self) -> None: ...


def mix_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts (stable across processes, unlike ``hash``)."""
    blob = "\x1f".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "big") >> 1


def make_backend(
    teacher: TeacherConfig | None = None,
    *,
    path: str | Path | None = None,
    batch_size: int = 64,
    device: str | None = None,
) -> Backend:
    """The backend of a teacher config, or an HF backend on ``path`` when no config.

    Bootstrap teachers live at ``<out>/teachers/<domain>/``: the caller passes that
    ``path``. ``kind: hf`` uses ``teacher.path`` unless ``path`` is given; ``kind: openai``
    talks to ``teacher.base_url``.
    """
    if teacher is not None and teacher.kind == "openai":
        from distill.backends.openai import OpenAIBackend

        return OpenAIBackend(
            base_url=teacher.base_url,
            model=teacher.model,
            api_key_env=teacher.api_key_env,
            max_concurrency=teacher.max_concurrency,
            timeout_s=teacher.request_timeout_s,
        )
    model_dir = path or (teacher.path if teacher is not None else None)
    if model_dir is None:
        raise UserError("make_backend: no model path (teacher kind bootstrap needs path=)")
    from distill.backends.hf import HFBackend

    return HFBackend(model_dir, batch_size=batch_size, device=device)
