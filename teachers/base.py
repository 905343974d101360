"""The small protocol every domain module implements, and the domain registry.

A domain is one module exposing a module-level object that satisfies :class:`Domain`.
Adding a domain touches one new file and one line in ``REGISTRY`` (or one
:func:`register` call, or one ``DISTILL_DOMAINS`` entry, for a module outside this
repository); ``tests/test_domains.py`` then checks it against the contract. See
docs/adding-a-domain.md. Domain modules are imported on first use, not here.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from distill.errors import UserError
from distill.files import short_hash
from distill.messages import Trace, Verdict

__all__ = [
    "Task",
    "Verdict",
    "Domain",
    "ToolEnv",
    "REGISTRY",
    "get_domain",
    "register",
    "split_of",
]


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
    """What every domain gives the pipeline (docs/adding-a-domain.md). Optional, outside
    the protocol: ``record_examples``, a few real records each with a right
    ``completion`` or ``messages``, which tests/test_domains.py loads and verifies."""

    name: str
    verifier_name: str
    verifier_version: str

    def tasks(self, split: str, n: int, seed: int, difficulty: int = 1) -> Iterator[Task]:
        """``n`` deterministic tasks of ``split`` ("train" or "eval")."""
        ...

    def oracle(self, task: Task, check: bool = False) -> list[dict[str, Any]]:
        """A correct trace: the full conversation (prompt included), reasoning in
        ``reasoning_content`` and the final answer in ``content`` of assistant turns.
        ``check``: the same trace with a redundant self-check before each answer (work
        redone, a test run in the head, balances read again): correct, and longer than it
        needs to be (``teachers.<d>.oracle_check_share``; docs/teachers.md)."""
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


# name -> "package.module:ATTR", imported on first use. Every stage, the recipe's domain
# names and the CLI's defaults read this table; tests/test_domains.py checks each entry.
REGISTRY: dict[str, str] = {
    "math": "teachers.math:DOMAIN",
    "code": "teachers.code:DOMAIN",
    "logic": "teachers.logic:DOMAIN",
    "agents": "teachers.agents:DOMAIN",
}

# Domains added from outside, ``name=package.module:ATTR`` separated by commas. Spawned
# worker processes import this module afresh: they find run-time registrations here.
ENV = "DISTILL_DOMAINS"


def _from_env() -> dict[str, str]:
    entries = (e.strip() for e in os.environ.get(ENV, "").split(","))
    return {
        name.strip(): target.strip() for name, _, target in (e.partition("=") for e in entries if e)
    }


REGISTRY.update(_from_env())


def get_domain(name: str) -> Domain:
    """The registered domain ``name``; a clear error for an unknown one."""
    if name not in REGISTRY:
        raise KeyError(f"unknown domain {name!r}; known: {', '.join(sorted(REGISTRY))}")
    return _load(name, REGISTRY[name])


def register(name: str, target: str) -> Domain:
    """Add domain ``name`` found at ``target`` ("package.module:ATTR", importable here
    and in worker processes: an installed module or one on PYTHONPATH) and return it.
    It is imported and checked now; spawned workers see it through ``DISTILL_DOMAINS``."""
    domain = _load(name, target)
    if not isinstance(domain, Domain) or domain.name != name:
        raise UserError(
            f"domain {name!r}: {target} is not a Domain named {name!r} "
            "(see teachers/base.py and docs/adding-a-domain.md)"
        )
    REGISTRY[name] = target
    os.environ[ENV] = ",".join(f"{n}={t}" for n, t in {**_from_env(), name: target}.items())
    return domain


def _load(name: str, target: str) -> Domain:
    module, sep, attr = target.partition(":")
    if not (sep and module and attr):
        raise UserError(f"domain {name!r}: {target!r} is not 'package.module:ATTR'")
    try:
        found = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if not (e.name and (module == e.name or module.startswith(e.name + "."))):
            raise  # a dependency of the domain module is missing: its own error says best
        raise UserError(
            f"domain {name!r}: cannot import {module} (install it, or put its folder on PYTHONPATH)"
        ) from None
    if not hasattr(found, attr):
        raise UserError(f"domain {name!r}: {module} has no {attr}")
    return getattr(found, attr)


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


def trace_from_task(task: Task, id_: str, messages: list[dict[str, Any]], **fields: Any) -> Trace:
    """A shard row of ``task`` answered with ``messages``: the task's id, domain, tools and
    reference carried over (what :func:`task_from_trace` reads back); ``fields`` sets the
    rest of :class:`~distill.messages.Trace`, or replaces what is carried over (``tools``
    of a short prompt, :func:`shorten_prompt`)."""
    carried = {
        "task_id": task.id,
        "domain": task.domain,
        "tools": task.tools,
        "reference": task.reference,
    }
    return Trace(id=id_, messages=messages, **(carried | fields))


def oracle_messages(domain: Domain, task: Task, check: bool = False) -> list[dict[str, Any]]:
    """``domain.oracle(task)``, with its self-check when ``check``; a domain whose oracle
    takes no ``check`` (written before it existed) is asked only for the plain trace, and
    is refused one with a check by name."""
    if not check:
        return domain.oracle(task)
    if not _oracle_takes_check(type(domain)):
        raise UserError(
            f"teachers.{domain.name}.oracle_check_share: the {domain.name} domain's oracle "
            "takes no 'check' argument (it cannot write self-checked traces); set it to 0"
        )
    return domain.oracle(task, check=True)


@functools.cache
def _oracle_takes_check(cls: type) -> bool:
    # read once per domain class: inspect.signature cost 15x the oracle itself per task
    return "check" in inspect.signature(cls.oracle).parameters


def self_check(steps: list[str]) -> str:
    """The oracle's self-check line of math and logic: their steps again, on one line."""
    return f"Check: {'; '.join(steps)}. Same answer."


def check_at(task_id: str, share: float) -> bool:
    """Whether the oracle trace of ``task_id`` gets a self-check
    (``teachers.<d>.oracle_check_share``): a hash of the id, so the choice is the same on
    every run and independent of the short-prompt spread."""
    if share <= 0:
        return False
    h = int(hashlib.sha256(f"check:{task_id}".encode()).hexdigest()[:8], 16)
    return h < share * 2**32


def short_prompt_at(i: int, share: float) -> bool:
    """Whether trace ``i`` of a run of traces gets the short prompt (no system message, no
    tool list): ``share`` of them, spread evenly (i when floor((i + 1) * share) passes an
    integer)."""
    return math.floor((i + 1) * share) > math.floor(i * share)


def shorten_prompt(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` (a trace's fields: a shard row, or a :class:`Trace`'s being built) with the
    short prompt: no system message, no tool list. The one cut of the copying curriculum,
    for the teachers' oracle shards (``teachers.<d>.oracle_short_prompt_share``) and the
    student's tokenized rows (``domains.<d>.short_prompt_share``); docs/teachers.md says
    why it exists."""
    messages = [m for m in row["messages"] if m.get("role") != "system"]
    return {**row, "messages": messages, "tools": None}
