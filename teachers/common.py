"""Helpers shared by the domain modules: distinct seeded task generation with a hash
split, final-answer extraction from an assistant turn, and reading real-record files."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from distill.errors import UserError
from distill.messages import Verdict
from teachers.base import Task, split_of, task_id

SPLITS = ("train", "eval", "all")

# A candidate task: (identity, prompt text, reference, meta). The identity is the
# task's canonical content: it alone decides the task id and the split.
Candidate = tuple[str, str, Any, dict[str, Any]]


def generate_tasks(
    domain: str,
    make: Callable[[random.Random, int], Candidate],
    split: str,
    n: int,
    seed: int,
    difficulty: int,
    system: str | None = None,
) -> Iterator[Task]:
    """``n`` distinct tasks of ``split`` drawn from one RNG seeded by (domain, seed,
    difficulty): the same arguments give the same tasks, and a larger ``n`` extends the
    list. Candidates of the other split are skipped, so train and eval never overlap."""
    if split not in ("train", "eval"):
        raise UserError(f"{domain}: split must be 'train' or 'eval', got {split!r}")
    rng = random.Random(f"{domain}:{seed}:{difficulty}")
    seen: set[str] = set()
    made, attempts, limit = 0, 0, 200 * n + 10_000
    while made < n:
        attempts += 1
        if attempts > limit:
            raise UserError(
                f"{domain}: only {made} distinct {split} tasks at difficulty {difficulty} "
                f"(asked for {n})"
            )
        identity, prompt, reference, meta = make(rng, difficulty)
        if identity in seen or split_of(identity) != split:
            continue
        seen.add(identity)
        made += 1
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": prompt})
        yield Task(
            id=task_id(domain, identity),
            domain=domain,
            messages=messages,
            reference=reference,
            meta={"difficulty": difficulty, "split": split, **meta},
        )


def last_assistant_content(messages: list[dict[str, Any]]) -> str | None:
    """The ``content`` of the last assistant turn (None when there is none)."""
    for m in reversed(messages):
        if m.get("role") == "assistant":
            content = m.get("content")
            return content if isinstance(content, str) else None
    return None


def last_boxed(text: str) -> str | None:
    r"""The contents of the last ``\boxed{...}`` (or ``\fbox{...}``), braces matched."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, j = 1, i
    while j < len(text):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j].strip()
        j += 1
    return None


def read_answer(
    messages: list[dict[str, Any]],
    max_chars: int,
    extract: Callable[[str | None], str | None] | None = None,
) -> str | Verdict:
    """The final answer of the last assistant turn (by ``extract``, default
    :func:`final_answer`), or the failed verdict saying why there is none: no assistant
    turn, no final answer, or one longer than ``max_chars`` (not an answer)."""
    content = last_assistant_content(messages)
    if content is None:
        return Verdict.fail("no assistant answer")
    answer = (extract or final_answer)(content)
    if answer is None or not answer.strip():
        return Verdict.fail("no final answer")
    if len(answer) > max_chars:
        return Verdict.fail(f"answer too long ({len(answer)} characters)")
    return answer


_ANSWER_LINE = re.compile(r"\banswer\s*(?:is\b\s*[:=]?|[:=])\s*(.+)", re.IGNORECASE)
_HASHES = re.compile(r"####\s*(.+)")


def final_answer(text: str | None) -> str | None:
    r"""The final answer of an assistant turn: the last ``\boxed{...}``, else the last
    ``Answer: ...`` line, else the last ``#### ...`` line; None when none is present."""
    if not text:
        return None
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    for pattern in (_ANSWER_LINE, _HASHES):
        hits = [m.group(1).strip() for m in pattern.finditer(text)]
        hits = [h.rstrip(".").strip() for h in hits if h.strip()]
        if hits:
            return hits[-1]
    return None


def read_records(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) of a JSONL file, or (row number, record) of a Parquet file.
    A line that is not a JSON object raises UserError naming the file and line."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.suffix == ".parquet":
        # pyarrow directly: the rows datasets would give, without writing its cache
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # noqa: BLE001 - any unreadable file is bad input
            raise UserError(f"{path}: not a readable Parquet file ({e})") from None
        yield from enumerate(rows, start=1)
        return
    if path.is_dir():
        raise UserError(f"{path}: a directory, not a JSONL or Parquet file")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(
                    f"{path}:{lineno}: not UTF-8 text (byte {raw[e.start]:#04x}); records "
                    "are JSONL (UTF-8, one object per line) or Parquet"
                ) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(
                    f"{path}:{lineno}: invalid JSON ({e.msg}); records are JSONL (one object "
                    "per line) or Parquet (.parquet)"
                ) from None
            if not isinstance(record, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object per line")
            yield lineno, record


def load_split(
    path: str | Path, split: str, from_record: Callable[[dict[str, Any], int], Task]
) -> Iterator[Task]:
    """Tasks of a real-record file. ``split`` "train"/"eval" keeps the records whose
    task identity hashes to that split (so one file gives disjoint splits); "all" keeps
    every record (a file that is already a held-out set)."""
    if split not in SPLITS:
        raise UserError(f"split must be one of {SPLITS}, got {split!r}")
    for index, (lineno, record) in enumerate(read_records(path)):
        try:
            task = from_record(record, index)
        except UserError as e:
            raise UserError(f"{path}:{lineno}: {e}") from None
        if split == "all" or task.meta.get("split_key", split) == split:
            yield task


def split_key(identity: str) -> dict[str, str]:
    """The meta entry :func:`load_split` filters on."""
    return {"split_key": split_of(identity)}
