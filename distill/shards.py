"""Arrow shard store: bounded IPC stream files, atomic commits, a manifest written last.

Layout of one shard directory::

    part-00000.arrow  part-00001.arrow ...   committed shards (Arrow IPC stream format)
    part-00002.arrow.tmp                     the shard being written (discarded on resume)
    _journal-part.json                       shards committed so far by the writer "part"
    _manifest.json                           written last: every shard with rows, bytes,
                                             sha256, schema version, stage fingerprint

A reader trusts only shards named in ``_manifest.json``. Several writers (one per
process under ``accelerate launch``) use distinct prefixes; :func:`finalize` merges their
journals into the manifest. Shards are the IPC stream format ``datasets`` caches in, so
``datasets.Dataset.from_file`` and ``load_dataset("arrow", ...)`` read them unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa

from distill.errors import UserError
from distill.messages import SCHEMA_VERSION, TRACE_SCHEMA, Trace

MANIFEST = "_manifest.json"
# Rows are converted to Arrow in chunks of at most this many (fewer when rows are big
# relative to max_bytes): big enough that conversion runs in C at full speed, small
# enough that the byte bound is checked often.
_CHUNK = 1000


class ShardError(UserError):
    """A missing, corrupt or truncated shard or manifest."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_json_atomic(path: Path, data: Any, sync: bool = True) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        if sync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


class _HashingFile:
    """A binary file that hashes what goes through it (no second read for the sha256)."""

    def __init__(self, f: Any):
        self.f, self.sha, self.closed = f, hashlib.sha256(), False

    def write(self, data: Any) -> int:
        self.sha.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()

    def close(self) -> None:
        self.closed = True  # the stream writer closes its sink; the real file stays open


def _ipc_size(table: pa.Table) -> int:
    """The exact size of ``table`` as an IPC stream file, without writing it."""
    sink = pa.MockOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.size()


def _write_ipc(table: pa.Table, path: Path) -> tuple[BinaryIO, int, str]:
    """Write ``table`` as one Arrow IPC stream file: (the open file, bytes, sha256).

    The file is flushed but not synced: the caller fsyncs and closes it.
    """
    f = open(path, "wb")
    try:
        sink = _HashingFile(f)
        # Arrow writes every buffer of every column on its own (~220 writes for a 5 MB
        # shard); a C++ buffer in front makes them ~10 Python calls (7.5 -> 6.3 ms).
        out = pa.BufferedOutputStream(pa.PythonFile(sink, mode="w"), 256 << 10)
        with pa.ipc.new_stream(out, table.schema) as w:
            w.write_table(table)
        out.close()  # flushes the buffer into the sink
        f.flush()
    except BaseException:
        f.close()
        raise
    return f, f.tell(), sink.sha.hexdigest()


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
        # bench machine, almost no CPU), so it runs on this thread while the caller's
        # converts the next rows. Only the fsync: hashing or renaming there too was slower
        # (each return from a blocking call must win back the GIL from Arrow's converter).
        self._fsync = ThreadPoolExecutor(1, thread_name_prefix="shard-fsync")
        self._in_flight: tuple[dict[str, Any], BinaryIO, Future[None]] | None = None
        self._failed: BaseException | None = None  # a shard that could not be committed

    def _recover(self) -> list[dict[str, Any]]:
        shards: list[dict[str, Any]] = []
        if self.journal_path.exists():
            try:
                journal = json.loads(self.journal_path.read_text())
            except json.JSONDecodeError:
                raise ShardError(f"{self.journal_path}: corrupt journal") from None
            if self.fingerprint is not None and journal.get("fingerprint") not in (
                None,
                self.fingerprint,
            ):
                # inputs changed: committed rows belong to another configuration
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
            batch = pa.RecordBatch.from_pylist(self._rows, schema=self.schema)
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
        name = self._next_name()
        f, size, digest = _write_ipc(table.slice(0, n), self.dir / (name + ".tmp"))
        entry = {"file": name, "rows": n, "bytes": size, "sha256": digest}
        self._in_flight = (entry, f, self._fsync.submit(os.fsync, f.fileno()))
        rest = table.slice(n)
        self._batches = rest.combine_chunks().to_batches() if rest.num_rows else []

    def _finish_commit(self) -> None:
        """Commit the shard in flight: wait for its fsync, rename it, journal it."""
        if self._in_flight is None:
            return
        entry, f, synced = self._in_flight
        self._in_flight = None
        try:
            with f:
                synced.result()
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
        _write_json_atomic(
            self.journal_path, {"fingerprint": self.fingerprint, "shards": self.shards}, sync=False
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
        if not self.journal_path.exists():  # nothing written by any run: still journal it
            _write_json_atomic(self.journal_path, {"fingerprint": self.fingerprint, "shards": []})
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


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of a finished shard directory; :class:`ShardError` if absent or bad."""
    d = Path(directory)
    path = d / MANIFEST
    if not path.exists():
        raise ShardError(f"{d}: no {MANIFEST} (stage not run or not finished)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"{path}: corrupt manifest ({e})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise ShardError(f"{path}: corrupt manifest (no shard list)")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ShardError(
            f"{path}: schema version {manifest.get('schema_version')}, expected {SCHEMA_VERSION}"
        )
    for s in manifest["shards"]:
        if not isinstance(s, dict) or not {"file", "rows", "bytes", "sha256"} <= s.keys():
            raise ShardError(f"{path}: corrupt manifest (bad shard entry {s!r})")
    return manifest


def shard_files(directory: str | Path, verify: bool = False) -> list[Path]:
    """Paths of the manifest's shards; sizes are checked, checksums with ``verify``."""
    d = Path(directory)
    files = []
    for s in read_manifest(d)["shards"]:
        p = d / s["file"]
        if not p.exists():
            raise ShardError(f"{p}: listed in the manifest but missing")
        if p.stat().st_size != s["bytes"]:
            raise ShardError(
                f"{p}: truncated ({p.stat().st_size} bytes, manifest says {s['bytes']})"
            )
        if verify and _sha256(p) != s["sha256"]:
            raise ShardError(f"{p}: checksum mismatch (corrupt shard)")
        files.append(p)
    return files


def read_shard(path: Path, validate: bool = False) -> pa.Table:
    """One shard, memory-mapped (zero copy: pages are read when touched)."""
    try:
        with pa.memory_map(str(path), "r") as source:
            table = pa.ipc.open_stream(source).read_all()
        if validate:
            table.validate(full=True)
        return table
    except (pa.ArrowException, OSError) as e:
        raise ShardError(f"{path}: corrupt or truncated shard ({e})") from None


def read_table(directory: str | Path, verify: bool = False) -> pa.Table:
    """All committed rows of a shard directory as one memory-mapped Arrow table.

    With ``verify``, checksums are compared with the manifest and the data validated.
    """
    tables = [read_shard(p, verify) for p in shard_files(directory, verify)]
    if not tables:
        return TRACE_SCHEMA.empty_table()
    return pa.concat_tables(tables)


def take(directory: str | Path, indices: Sequence[int]) -> pa.Table:
    """Rows at global positions ``indices``, in that order.

    Each shard is memory-mapped and only the rows asked for are copied out, so memory
    follows the number of rows taken, not the size of the directory.
    """
    d = Path(directory)
    shards = read_manifest(d)["shards"]
    files = shard_files(d)
    starts = [0]
    for s in shards:
        starts.append(starts[-1] + s["rows"])
    order = sorted(range(len(indices)), key=indices.__getitem__)
    pieces, k = [], 0
    for f, lo, hi in zip(files, starts[:-1], starts[1:], strict=True):
        local = []
        while k < len(order) and indices[order[k]] < hi:
            if indices[order[k]] < lo:
                break
            local.append(indices[order[k]] - lo)
            k += 1
        if local:
            pieces.append(read_shard(f).take(pa.array(local, pa.int64())))
    if k < len(order):
        raise IndexError(f"{d}: row {indices[order[k]]} out of range ({starts[-1]} rows)")
    if not pieces:
        return TRACE_SCHEMA.empty_table()
    by_position = pa.concat_tables(pieces)
    inverse = [0] * len(order)
    for pos, i in enumerate(order):
        inverse[i] = pos
    return by_position.take(pa.array(inverse, pa.int64()))


def iter_traces(directory: str | Path, verify: bool = False) -> Iterator[Trace]:
    """Every committed row as a :class:`Trace`, shard by shard."""
    for p in shard_files(directory, verify):
        for batch in read_shard(p, verify).to_batches():
            for row in batch.to_pylist():
                yield Trace.from_row(row)


def load_dataset(directory: str | Path, verify: bool = False):
    """The shards as a ``datasets.Dataset`` (memory-mapped, no copy)."""
    import datasets

    files = [str(p) for p in shard_files(directory, verify)]
    if not files:
        return datasets.Dataset(TRACE_SCHEMA.empty_table())
    return datasets.concatenate_datasets([datasets.Dataset.from_file(f) for f in files])
