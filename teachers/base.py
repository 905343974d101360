"""The small protocol every domain module implements, and the domain registry.

A domain is one module in ``teachers/`` exposing a module-level object that satisfies
:class:`Domain`. Adding a domain touches one new file and one line in ``REGISTRY``.
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from distill.files import short_hash
from distill.messages import Trace, Verdict

__all__ = ["Task", "Verdict", "Domain", "ToolEnv", "REGISTRY", "get_domain", "split_of"]


@dataclass(frozen=True)
class Task:
    """One task of a domain.

    ``messages`` is the chat prompt (system and first user message). ``reference`` is
    JSON-serialisable and holds what the verifier checks against. ``followups`` are the
    user messages injected, in order, after the model answers the previous user turn
    (multi-turn agent tasks). ``tools`` are OpenAI tool schemas the model may call.
    """

    id: str
    domain: str
    messages: list[dict[str, Any]]
    reference: Any
    meta: dict[str, Any] = field(default_factory=dict)
    tools: list[dict[str, Any]] | None = None
    followups: list[str] = field(default_factory=list)


class ToolEnv(Protocol):
    """A live tool environment for one agent episode."""

    def execute(self, name: str, arguments: str) -> str:
        """Run one tool call (``arguments`` is the raw JSON string the model wrote) and
        return the tool message content. Bad JSON, unknown tools and schema violations
        return an ``error: ...`` string; they never raise."""
        ...


@runtime_checkable
class Domain(Protocol):
    name: str
    verifier_name: str
    verifier_version: str

    def tasks(self, split: str, n: int, seed: int, difficulty: int = 1) -> Iterator[Task]:
        """``n`` deterministic tasks of ``split`` ("train" or "eval")."""
        ...

    def oracle(self, task: Task) -> list[dict[str, Any]]:
        """A correct trace: the full conversation (prompt included), reasoning in
        ``reasoning_content`` and the final answer in ``content`` of assistant turns."""
        ...

    def verify(self, task: Task, messages: list[dict[str, Any]]) -> Verdict:
        """Judge a full conversation (prompt included) against the task."""
        ...

    def environment(self, task: Task) -> ToolEnv | None:
        """A fresh tool environment for agent rollouts; None for domains without tools."""
        ...

    def from_record(self, record: dict[str, Any], index: int = 0) -> Task:
        """One task from a real record in the field's usual format (GSM8K, MATH,
        HumanEval, MBPP, ...); a record that fits no known format raises UserError
        naming the missing fields."""
        ...

    def load_records(self, path: str, split: str = "eval") -> Iterator[Task]:
        """Tasks from real records (JSONL/Parquet, read through ``datasets``)."""
        ...


REGISTRY: dict[str, str] = {
    "math": "teachers.math:DOMAIN",
    "code": "teachers.code:DOMAIN",
    "logic": "teachers.logic:DOMAIN",
    "agents": "teachers.agents:DOMAIN",
}


def get_domain(name: str) -> Domain:
    """The registered domain ``name``; a clear error for an unknown one."""
    if name not in REGISTRY:
        raise KeyError(f"unknown domain {name!r}; known: {', '.join(sorted(REGISTRY))}")
    module, attr = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), attr)


def split_of(identity: str, eval_fraction: float = 0.2) -> str:
    """Train/eval split by a hash of a task's identity, so the splits are disjoint by
    construction whatever the seed or the number of tasks asked for."""
    h = int.from_bytes(hashlib.sha256(identity.encode()).digest()[:8], "big")
    return "eval" if h / 2**64 < eval_fraction else "train"


def task_id(domain: str, identity: str) -> str:
    """A stable task id from a task's identity (its canonical content)."""
    return f"{domain}-{short_hash(identity)}"


def task_from_trace(trace: Trace) -> Task:
    """Rebuild the task of a shard row for verification. Verifiers depend only on
    ``reference`` and ``tools`` (and the prompt), which every trace row carries."""
    first_answer = next(
        (i for i, m in enumerate(trace.messages) if m.get("role") == "assistant"),
        len(trace.messages),
    )
    return Task(
        id=trace.task_id,
        domain=trace.domain,
        messages=trace.messages[:first_answer],
        reference=trace.reference,
        tools=trace.tools,
    )
