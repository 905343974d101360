"""Arrow shard store: bounded IPC stream files, atomic commits, a manifest written last.

Layout of one shard directory::

    part-00000.arrow  part-00001.arrow ...   committed shards (Arrow IPC stream format)
    part-00002.arrow.tmp                     the shard being written (discarded on resume)
    _journal-part.json                       shards committed so far by the writer "part"
    _manifest.json                           written last: every shard with rows, bytes,
                                             sha256, schema version, stage fingerprint

A reader trusts only shards named in ``_manifest.json``. Several writers (one per
process under ``accelerate launch``) use distinct prefixes; :func:`finalize` merges their
journals into the manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from distill.errors import UserError
from distill.messages import SCHEMA_VERSION, TRACE_SCHEMA, Trace

MANIFEST = "_manifest.json"


class ShardError(UserError):
    """A missing, corrupt or truncated shard or manifest."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ShardWriter:
    """Writes rows into shards of at most ``max_rows`` rows and ``max_bytes`` bytes.

    Reopened on a directory a previous run left partly written, it keeps every shard that
    run committed, discards a leftover temporary file, and reports the committed row ids
    (:meth:`committed_ids`) so the caller skips work already done.
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
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.schema = schema
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.fingerprint = fingerprint
        self.prefix = prefix
        self.journal_path = self.dir / f"_journal-{prefix}.json"
        self.shards: list[dict[str, Any]] = []
        if self.journal_path.exists():
            journal = json.loads(self.journal_path.read_text())
            if fingerprint is not None and journal.get("fingerprint") not in (None, fingerprint):
                # inputs changed: committed rows belong to another configuration
                for s in journal["shards"]:
                    (self.dir / s["file"]).unlink(missing_ok=True)
            else:
                self.shards = journal["shards"]
        for tmp in self.dir.glob(f"{prefix}-*.arrow.tmp"):
            tmp.unlink()
        # a shard renamed but not yet journaled (killed between the two) is rewritten later
        journaled = {s["file"] for s in self.shards}
        for f in self.dir.glob(f"{prefix}-*.arrow"):
            if f.name not in journaled:
                f.unlink()
        (self.dir / MANIFEST).unlink(missing_ok=True)
        self._buffer: list[dict[str, Any]] = []
        self._buffer_bytes = 0

    def committed_ids(self) -> set[str]:
        """Ids of rows committed by earlier runs of this writer."""
        ids: set[str] = set()
        for s in self.shards:
            table = _read_ipc(self.dir / s["file"])
            ids.update(table.column("id").to_pylist())
        return ids

    @property
    def committed_rows(self) -> int:
        return sum(s["rows"] for s in self.shards)

    def write(self, rows: Iterable[dict[str, Any] | Trace]) -> None:
        for row in rows:
            if isinstance(row, Trace):
                row = row.to_row()
            self._buffer.append(row)
            # cheap size estimate; the bound is enforced on the encoded batch below
            self._buffer_bytes += len(json.dumps(row, default=str))
            if len(self._buffer) >= self.max_rows or self._buffer_bytes >= self.max_bytes:
                self.flush()

    def flush(self) -> None:
        """Commit buffered rows as one complete shard."""
        if not self._buffer:
            return
        name = f"{self.prefix}-{len(self.shards):05d}.arrow"
        final = self.dir / name
        tmp = self.dir / (name + ".tmp")
        table = pa.Table.from_pylist(self._buffer, schema=self.schema)
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, self.schema) as w:
            w.write_table(table)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        self.shards.append(
            {"file": name, "rows": table.num_rows, "bytes": final.stat().st_size, "sha256": _sha256(final)}
        )
        _write_json_atomic(
            self.journal_path, {"fingerprint": self.fingerprint, "shards": self.shards}
        )
        self._buffer = []
        self._buffer_bytes = 0

    def close(self, finalize_manifest: bool = True) -> dict[str, Any] | None:
        """Commit what is buffered; write the manifest unless other writers still run."""
        self.flush()
        if finalize_manifest:
            return finalize(self.dir, self.fingerprint)
        return None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # on error keep what is committed, write no manifest: the run is incomplete
        if exc_type is None:
            self.close()
        else:
            self.flush()


def finalize(directory: str | Path, fingerprint: str | None = None) -> dict[str, Any]:
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
        "shards": shards,
    }
    _write_json_atomic(d / MANIFEST, manifest)
    return manifest


def read_manifest(directory: str | Path) -> dict[str, Any]:
    d = Path(directory)
    path = d / MANIFEST
    if not path.exists():
        raise ShardError(f"{d}: no {MANIFEST} (stage not run or not finished)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ShardError(f"{path}: corrupt manifest ({e.msg} at line {e.lineno})") from None
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ShardError(
            f"{path}: schema version {manifest.get('schema_version')}, expected {SCHEMA_VERSION}"
        )
    return manifest


def shard_files(directory: str | Path, verify: bool = False) -> list[Path]:
    """Paths of the manifest's shards; with ``verify``, sizes and checksums are checked."""
    d = Path(directory)
    files = []
    for s in read_manifest(d)["shards"]:
        p = d / s["file"]
        if not p.exists():
            raise ShardError(f"{p}: listed in the manifest but missing")
        if p.stat().st_size != s["bytes"]:
            raise ShardError(f"{p}: truncated ({p.stat().st_size} bytes, manifest says {s['bytes']})")
        if verify and _sha256(p) != s["sha256"]:
            raise ShardError(f"{p}: checksum mismatch (corrupt shard)")
        files.append(p)
    return files


def _read_ipc(path: Path) -> pa.Table:
    try:
        with pa.memory_map(str(path), "r") as source:
            return pa.ipc.open_stream(source).read_all()
    except (pa.ArrowInvalid, OSError) as e:
        raise ShardError(f"{path}: corrupt or truncated shard ({e})") from None


def read_table(directory: str | Path, verify: bool = False) -> pa.Table:
    """All committed rows of a shard directory as one memory-mapped Arrow table."""
    tables = [_read_ipc(p) for p in shard_files(directory, verify)]
    if not tables:
        return TRACE_SCHEMA.empty_table()
    return pa.concat_tables(tables)


def iter_traces(directory: str | Path, verify: bool = False) -> Iterator[Trace]:
    for p in shard_files(directory, verify):
        for batch in _read_ipc(p).to_batches():
            for row in batch.to_pylist():
                yield Trace.from_row(row)


def load_dataset(directory: str | Path):
    """The shards as a ``datasets.Dataset`` (memory-mapped, no copy)."""
    import datasets

    files = [str(p) for p in shard_files(directory)]
    if not files:
        return datasets.Dataset(TRACE_SCHEMA.empty_table())
    return datasets.concatenate_datasets([datasets.Dataset.from_file(f) for f in files])
