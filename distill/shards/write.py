"""Writing a shard directory: bounded Arrow IPC stream files, atomic commits, one
journal per writer, the manifest written last (reading is :mod:`distill.shards.read`).

A shard is serialised into memory, written to ``<name>.tmp``, hashed and fsynced on
background threads while the next rows are converted, then renamed and journaled: a
shard that is not in its writer's journal does not exist for a resumed run.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa

from distill.files import atomic_write_json
from distill.messages import SCHEMA_VERSION, TRACE_SCHEMA, Trace, storage_schema
from distill.shards.read import MANIFEST, ShardError, read_shard

# Rows are converted to Arrow in chunks of at most this many (fewer when rows are big
# relative to max_bytes): big enough that conversion runs in C at full speed, small
# enough that the byte bound is checked often.
_CHUNK = 1000
# A shard goes to its file in writes of this size: in the writer on the 2-core bench
# machine (ext4) one 5 MB write() took ~8 ms (strace), five of 1 MB ~1.5 ms together.
_WRITE_BLOCK = 1 << 20


def _write_json_atomic(path: Path, data: Any, sync: bool = True, indent: int | None = 1) -> None:
    atomic_write_json(path, data, indent=indent, sync=sync)


def _ipc_size(table: pa.Table) -> int:
    """The exact size of ``table`` as an IPC stream file, without writing it."""
    sink = pa.MockOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.size()


def _write_file(path: Path, data: pa.Buffer) -> BinaryIO:
    """``data`` in a new file, flushed but not synced: the caller fsyncs and closes it."""
    f = open(path, "wb")
    try:
        with memoryview(data) as view:
            for i in range(0, len(view), _WRITE_BLOCK):
                f.write(view[i : i + _WRITE_BLOCK])
        f.flush()
    except BaseException:
        f.close()
        raise
    return f


def _sha256(data: pa.Buffer) -> str:
    return hashlib.sha256(data).hexdigest()  # releases the GIL while it hashes


class _Background:
    """One thread for a blocking call that releases the GIL (a shard's fsync)."""

    def __init__(self, name: str):
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=name)

    def start(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        """Run ``fn(*args)`` on the thread; return once it has started."""
        started = threading.Event()

        def run() -> Any:
            started.set()
            return fn(*args)

        future = self._pool.submit(run)
        # The woken thread needs the GIL to reach fn, and the converting thread gives it
        # up only after the switch interval (5 ms) and its current C call: waiting here
        # hands it over at once, so the fsync starts as soon as the shard is written.
        started.wait()
        return future


class ShardWriter:
    """Writes rows into shards of at most ``max_rows`` rows and ``max_bytes`` bytes.

    The byte bound applies to the encoded file; the only shard that may exceed it holds
    a single row larger than the bound. Reopened on a directory a previous run left
    partly written, the writer keeps every shard that run committed, discards leftover
    temporary files, and reports the committed row ids (:meth:`committed_ids`) so the
    caller skips work already done. A changed ``fingerprint`` discards them instead.
    """

    def __init__(
        self,
        directory: str | Path,
        schema: pa.Schema = TRACE_SCHEMA,
        max_rows: int = 2000,
        max_bytes: int = 64 << 20,
        fingerprint: str | None = None,
        prefix: str = "part",
    ):
        if max_rows < 1 or max_bytes < 1:
            raise ValueError("max_rows and max_bytes must be positive")
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.schema = schema
        self._storage = storage_schema(schema)  # what Python rows convert to (JSON as text)
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.fingerprint = fingerprint
        self.prefix = prefix
        self.journal_path = self.dir / f"_journal-{prefix}.json"
        self.shards: list[dict[str, Any]] = self._recover()
        self._rows: list[dict[str, Any]] = []
        self._batches: list[pa.RecordBatch] = []
        self._chunk = min(_CHUNK, max_rows)
        self._row_bytes = 0.0  # mean Arrow size of a row, learnt from converted rows
        # A shard's fsync mostly waits for the disk (~13 ms per 5 MB shard on the 2-core
        # bench machine, almost no CPU) and sha256 releases the GIL (~4 ms per 5 MB), so
        # both run on their own threads while this one converts the next rows (~20 ms a
        # shard); on one thread, the two in a row outlasted the conversion.
        self._fsync = _Background("shard-fsync")
        self._hash = ThreadPoolExecutor(1, thread_name_prefix="shard-sha256")
        self._in_flight: tuple[dict[str, Any], BinaryIO, Future[None], Future[str]] | None = None
        self._failed: BaseException | None = None  # a shard that could not be committed
        # the serialised shard, reused (fresh pages for every shard cost page faults);
        # free again once the shard in flight is committed
        self._buf: pa.Buffer | None = None

    def _recover(self) -> list[dict[str, Any]]:
        shards: list[dict[str, Any]] = []
        if self.journal_path.exists():
            try:
                journal = json.loads(self.journal_path.read_text())
            except json.JSONDecodeError:
                raise ShardError(f"{self.journal_path}: corrupt journal") from None
            if (
                self.fingerprint is not None
                and journal.get("fingerprint") not in (None, self.fingerprint)
            ) or journal.get("schema_version", 1) != SCHEMA_VERSION:
                # inputs changed, or an older format: committed rows cannot be kept
                for s in journal["shards"]:
                    (self.dir / s["file"]).unlink(missing_ok=True)
                self.journal_path.unlink()
            else:
                # after a power cut a journaled shard may be missing or short: redo its rows
                shards = [
                    x
                    for x in journal["shards"]
                    if (self.dir / x["file"]).exists()
                    and (self.dir / x["file"]).stat().st_size == x["bytes"]
                ]
        # only this writer's files: another writer's prefix may start with ours
        mine = re.compile(rf"{re.escape(self.prefix)}-\d{{5,}}\.arrow(\.tmp)?")
        journaled = {s["file"] for s in shards}
        for f in self.dir.iterdir():
            # a leftover .tmp is a shard cut short; a shard renamed but not journaled
            # (killed between the two) is written again by the caller
            if mine.fullmatch(f.name) and f.name not in journaled:
                f.unlink()
        self.journal_path.with_name(self.journal_path.name + ".tmp").unlink(missing_ok=True)
        (self.dir / MANIFEST).unlink(missing_ok=True)  # the output is incomplete again
        return shards

    def committed_ids(self) -> set[str]:
        """Ids of rows committed so far (by earlier runs of this writer, and this one)."""
        self._finish_commit()
        ids: set[str] = set()
        for s in self.shards:
            ids.update(read_shard(self.dir / s["file"]).column("id").to_pylist())
        return ids

    @property
    def committed_rows(self) -> int:
        """Rows committed so far (waits for the shard in flight, if any)."""
        self._finish_commit()
        return sum(s["rows"] for s in self.shards)

    def write(self, rows: Iterable[dict[str, Any] | Trace]) -> None:
        """Buffer rows (dicts of the schema or :class:`Trace`); commit full shards.

        The last full shard may still be in flight when this returns: it is committed by
        the next shard, :meth:`flush`, :meth:`close`, or asking for the committed rows.
        """
        for row in rows:
            self._rows.append(row.to_row() if isinstance(row, Trace) else row)
            if len(self._rows) >= self._chunk:
                self._convert()
                while (
                    self._pending_rows() >= self.max_rows or self._pending_bytes() >= self.max_bytes
                ):
                    self._commit_one()

    def flush(self) -> None:
        """Commit every buffered row (one shard, or more if the bounds require)."""
        self._check_not_failed()
        self._convert()
        while self._batches:
            self._commit_one()
        self._finish_commit()

    def _convert(self) -> None:
        if not self._rows:
            return
        try:
            batch = pa.RecordBatch.from_pylist(self._rows, schema=self._storage)
            batch = batch.cast(self.schema)
        except (pa.ArrowException, TypeError, ValueError) as e:
            first = self._rows[0].get("id") if isinstance(self._rows[0], dict) else None
            raise ShardError(
                f"{self.dir}: rows do not match the shard schema (batch from id {first!r}): {e}"
            ) from None
        self._batches.append(batch)
        self._rows = []
        self._row_bytes = batch.nbytes / max(1, batch.num_rows)
        # a chunk should stay well under one shard, so the byte bound is checked in time
        self._chunk = max(
            1, min(_CHUNK, self.max_rows, int(self.max_bytes / 2 / max(1.0, self._row_bytes)))
        )

    def _pending_rows(self) -> int:
        return sum(b.num_rows for b in self._batches)

    def _pending_bytes(self) -> int:
        return sum(b.nbytes for b in self._batches)

    def _check_not_failed(self) -> None:
        if self._failed is not None:
            raise ShardError(
                f"{self.dir}: an earlier shard could not be committed ({self._failed}); "
                "run again to resume"
            )

    def _commit_one(self) -> None:
        self._check_not_failed()
        table = pa.Table.from_batches(self._batches, schema=self.schema)
        n = min(
            table.num_rows, self.max_rows, max(1, int(self.max_bytes / max(1.0, self._row_bytes)))
        )
        size = _ipc_size(table.slice(0, n))
        while size > self.max_bytes and n > 1:
            # shrink in proportion to the overshoot; at least one row less each time
            n = max(1, min(n - 1, int(n * self.max_bytes / size * 0.98)))
            size = _ipc_size(table.slice(0, n))
        self._finish_commit()  # one shard in flight at most: commits stay in order
        data = self._serialize(table.slice(0, n), size)
        name = self._next_name()
        f = _write_file(self.dir / (name + ".tmp"), data)
        entry = {"file": name, "rows": n, "bytes": size, "sha256": None}
        synced = self._fsync.start(os.fsync, f.fileno())
        # No hand-over for the hash: its thread gets the GIL within ~10 ms, well before
        # the next shard is converted (~20 ms); started before the fsync it delayed it.
        self._in_flight = (entry, f, synced, self._hash.submit(_sha256, data))
        rest = table.slice(n)
        self._batches = rest.combine_chunks().to_batches() if rest.num_rows else []

    def _serialize(self, table: pa.Table, size: int) -> pa.Buffer:
        """``table`` as the ``size`` bytes of an IPC stream file (a view of ``_buf``)."""
        if self._buf is None or self._buf.size < size:
            # room for the next shards' variation (pyarrow's resizable buffers keep their
            # first length in the buffer protocol, so hashlib would read stale lengths)
            self._buf = pa.allocate_buffer(size + size // 8)
        sink = pa.FixedSizeBufferWriter(self._buf)
        with pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table)
        if sink.tell() != size:
            raise ShardError(f"{self.dir}: shard encoded to {sink.tell()} bytes, not {size}")
        return self._buf.slice(0, size)

    def _finish_commit(self) -> None:
        """Commit the shard in flight: wait for its fsync and hash, rename it, journal it."""
        if self._in_flight is None:
            return
        entry, f, synced, digest = self._in_flight
        self._in_flight = None
        # both, even if one fails: the next shard is serialised into the buffer they read
        concurrent.futures.wait((synced, digest))
        try:
            with f:
                synced.result()
            entry["sha256"] = digest.result()
            os.replace(f.name, self.dir / entry["file"])
        except BaseException as e:
            # Its rows are no longer buffered (holding the table until the fsync returned
            # raised the writer's peak memory from ~23 to ~67 MB: the allocator kept the
            # freed pages), so nothing may be committed after it: resuming redoes them.
            self._failed = e
            raise
        self.shards.append(entry)
        # the journal entry is the commit point: a shard not in it is deleted on resume.
        # No fsync: a journal lost to a power cut only makes the next run redo its shards
        # (a shard missing from the journal is deleted); the shard itself was synced.
        # Not indented: json's C encoder only runs without indent, and the journal is
        # rewritten for every shard (100 entries: 1.6 ms indented, 0.2 ms not).
        _write_json_atomic(
            self.journal_path,
            {
                "fingerprint": self.fingerprint,
                "schema_version": SCHEMA_VERSION,
                "shards": self.shards,
            },
            sync=False,
            indent=None,
        )

    def _next_name(self) -> str:
        # numbered after the highest committed shard, so a dropped entry never gets reused
        last = max(
            (int(x["file"].rsplit("-", 1)[1].split(".")[0]) for x in self.shards), default=-1
        )
        return f"{self.prefix}-{last + 1:05d}.arrow"

    def close(self, finalize_manifest: bool = True) -> dict[str, Any] | None:
        """Commit what is buffered; write the manifest unless other writers still run."""
        self.flush()
        self._buf = None
        if not self.journal_path.exists():  # nothing written by any run: still journal it
            _write_json_atomic(
                self.journal_path,
                {"fingerprint": self.fingerprint, "schema_version": SCHEMA_VERSION, "shards": []},
            )
        if finalize_manifest:
            return finalize(self.dir, self.fingerprint, self.schema)
        return None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # on error keep what is committed, write no manifest: the run is incomplete
        if exc_type is None:
            self.close()
        elif self._failed is None:
            self.flush()


def finalize(
    directory: str | Path, fingerprint: str | None = None, schema: pa.Schema = TRACE_SCHEMA
) -> dict[str, Any]:
    """Merge every writer's journal into ``_manifest.json`` (written last)."""
    d = Path(directory)
    shards: list[dict[str, Any]] = []
    for j in sorted(d.glob("_journal-*.json")):
        shards.extend(json.loads(j.read_text())["shards"])
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "fingerprint": fingerprint,
        "rows": sum(s["rows"] for s in shards),
        "bytes": sum(s["bytes"] for s in shards),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "schema": [f"{f.name}: {f.type}" for f in schema],
        "shards": shards,
    }
    _write_json_atomic(d / MANIFEST, manifest)
    return manifest
