"""Parallel verification: :func:`verify_many` (used by the filter stage) and the
``distill verify DOMAIN INPUT.jsonl`` command (:func:`run`).

Work goes to a process pool in chunks, so a process starts once per worker, not per
item. A verifier exception becomes a failed verdict (``verifier error: ...``); a worker
that dies takes no other item down with it: the items of the broken pool are retried one by
one in a fresh worker, and only those that kill it again fail.
"""

from __future__ import annotations

import importlib
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from distill.errors import UserError, storage_errors
from distill.files import atomic_write_text
from distill.messages import Verdict
from teachers.base import Domain, Task, get_domain

Item = tuple[Task, list[dict[str, Any]]]


def resolve(domain: str) -> Domain:
    """A registered domain name, or ``package.module:ATTR`` for a domain outside the
    registry (worker processes import it by that path)."""
    if ":" in domain:
        module, attr = domain.split(":", 1)
        return getattr(importlib.import_module(module), attr)
    return get_domain(domain)


def verify_one(domain: str, task: Task, messages: list[dict[str, Any]]) -> Verdict:
    """One verdict; an exception of the verifier becomes a failed verdict."""
    try:
        verdict = resolve(domain).verify(task, messages)
        if not isinstance(verdict, Verdict):
            return Verdict.fail(f"verifier error: returned {type(verdict).__name__}, not a Verdict")
        return verdict
    except Exception as e:  # noqa: BLE001 - one bad item must not end the run
        text = str(e).splitlines()[0][:200] if str(e) else ""
        return Verdict.fail(f"verifier error: {type(e).__name__}: {text}".rstrip(": "))


def _verify_chunk(domain: str, chunk: list[Item]) -> list[Verdict]:
    return [verify_one(domain, task, messages) for task, messages in chunk]


def _context() -> multiprocessing.context.BaseContext:
    # fork: workers start in milliseconds with the domain already imported, and scripts
    # need no __main__ guard. This module starts no thread of its own (the progress bar
    # refreshes by hand), so no lock of ours is held across the fork.
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def _run_pool(
    domain: str,
    chunks: list[list[int]],
    items: list[Item],
    workers: int,
    tick: Callable[[int], None],
) -> tuple[dict[int, Verdict], list[int]]:
    """Verdicts by item index, and the indices whose worker died."""
    done: dict[int, Verdict] = {}
    lost: list[int] = []
    with ProcessPoolExecutor(max_workers=workers, mp_context=_context()) as pool:
        futures: list[tuple[list[int], Future]] = [
            (idx, pool.submit(_verify_chunk, domain, [items[i] for i in idx])) for idx in chunks
        ]
        for idx, fut in futures:
            try:
                verdicts = fut.result()
            except BrokenProcessPool:
                lost.extend(idx)
                continue
            done.update(zip(idx, verdicts, strict=True))
            tick(len(idx))
    return done, lost


def _isolate(
    domain: str, indices: list[int], items: list[Item], tick: Callable[[int], None]
) -> dict[int, Verdict]:
    """Verdicts of ``indices`` in a one-worker pool, one item at a time: an item whose
    verification kills the worker fails, and a fresh worker takes the next item."""
    done: dict[int, Verdict] = {}
    pool = ProcessPoolExecutor(max_workers=1, mp_context=_context())
    try:
        for i in indices:
            try:
                done[i] = pool.submit(_verify_chunk, domain, [items[i]]).result()[0]
            except BrokenProcessPool:
                done[i] = Verdict.fail("verifier error: the verifier process died")
                pool.shutdown(wait=False)
                pool = ProcessPoolExecutor(max_workers=1, mp_context=_context())
            tick(1)
    finally:
        pool.shutdown(wait=True)
    return done


def verify_many(
    domain: str,
    items: list[Item],
    workers: int | None = None,
    progress: bool | Callable[[int], None] = False,
) -> list[Verdict]:
    """Verdicts for ``(task, messages)`` pairs, in order. ``domain`` is a registered
    name (or ``module:ATTR``, see :func:`resolve`). ``workers=None`` uses every core;
    ``workers=1`` verifies in this process. ``progress``: a bar of its own, or the
    caller's ``tick(n)``. Never raises for a bad item."""
    workers = workers or os.cpu_count() or 1
    resolve(domain)  # an unknown domain fails here, once, with a clear KeyError
    with _progress(progress, len(items), f"verify {domain}") as tick:
        if workers == 1 or len(items) <= 1:
            out = []
            for task, messages in items:
                out.append(verify_one(domain, task, messages))
                tick(1)
            return out
        workers = min(workers, len(items))
        # several chunks per worker balance the load; chunks of at most 256 keep it moving
        size = max(1, min(256, -(-len(items) // (workers * 4))))
        chunks = [list(range(i, min(i + size, len(items)))) for i in range(0, len(items), size)]
        done, lost = _run_pool(domain, chunks, items, workers, tick)
        if lost:  # a worker died: retry its items one by one, so only the culprit fails
            done.update(_isolate(domain, lost, items, tick))
    return [done[i] for i in range(len(items))]


class _progress:
    """A rich progress bar (or nothing) whose ``tick(n)`` advances it."""

    def __init__(self, enabled: bool | Callable[[int], None], total: int, label: str):
        self.enabled, self.total, self.label = enabled, total, label

    def __enter__(self) -> Callable[[int], None]:
        if callable(self.enabled):  # the caller's bar
            return self.enabled
        if not self.enabled:
            return lambda n: None
        from distill.progress import progress

        # No auto-refresh thread: workers fork while the bar is live
        self.bar = progress(auto_refresh=False)
        self.bar.start()
        task = self.bar.add_task(self.label, total=self.total, unit="traces")

        last = [0.0]

        def tick(n: int) -> None:
            self.bar.advance(task, n)
            if time.monotonic() - last[0] > 0.1:  # ten redraws a second at most
                last[0] = time.monotonic()
                self.bar.refresh()

        return tick

    def __exit__(self, *exc: object) -> None:
        if self.enabled is True:
            self.bar.refresh()
            self.bar.stop()


# --------------------------------------------------------------------------- CLI


def read_items(domain: str, path: Path) -> Iterator[tuple[str, Task, list[dict[str, Any]]]]:
    """(id, task, messages) for each record of ``path``: the domain's real-record
    format plus ``completion`` (the answer text) or ``messages`` (a full conversation)."""
    from teachers.common import read_records

    dom = get_domain(domain)
    for index, (lineno, record) in enumerate(read_records(path)):
        where = f"{path}:{lineno}"
        try:
            task = dom.from_record(record, index)
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
        except Exception as e:  # noqa: BLE001 - a loader bug on odd input is still bad input
            raise UserError(f"{where}: not a {domain} record ({type(e).__name__}: {e})") from None
        completion, messages = record.get("completion"), record.get("messages")
        if isinstance(completion, str):
            messages = [*task.messages, {"role": "assistant", "content": completion}]
        elif not (isinstance(messages, list) and all(isinstance(m, dict) for m in messages)):
            raise UserError(f"{where}: needs a 'completion' string or a 'messages' list")
        rid = record.get("id", record.get("task_id", task.id))
        yield str(rid), task, messages


def _check_writable(out: Path) -> None:
    if out.is_dir():
        raise UserError(f"--out {out}: a directory; give a file name")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: no such directory {out.parent}")
    if not os.access(out.parent, os.W_OK):
        raise UserError(f"--out {out}: directory {out.parent} is not writable")


def run(
    domain: str, path: Path, out: Path | None = None, workers: int | None = None
) -> tuple[int, int]:
    """Verify every record of ``path``; one JSON verdict per line to ``out`` (or
    stdout, which then holds nothing else), then ``N passed, M failed`` on stderr.
    Returns (passed, failed)."""
    try:
        get_domain(domain)
    except KeyError as e:
        raise UserError(str(e).strip("'\"")) from None
    if out is not None:  # before the work, not after it
        _check_writable(Path(out))
    rows = list(read_items(domain, path))
    if not rows:
        print(f"warning: {path} holds no records; nothing verified", file=sys.stderr)
    verdicts = verify_many(
        domain, [(t, m) for _, t, m in rows], workers=workers, progress=out is not None
    )
    lines = (
        json.dumps({"id": rid, "passed": v.passed, "score": v.score, "reason": v.reason}) + "\n"
        for (rid, _, _), v in zip(rows, verdicts, strict=True)
    )
    if out is None:
        sys.stdout.writelines(lines)
    else:
        with storage_errors(Path(out).parent):
            atomic_write_text(out, "".join(lines))
    passed = sum(v.passed for v in verdicts)
    print(f"{passed} passed, {len(verdicts) - passed} failed", file=sys.stderr, flush=True)
    return passed, len(verdicts) - passed
