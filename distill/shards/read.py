"""Reading a shard directory: the manifest, checksums, and the rows as Arrow, Python
traces or a ``datasets.Dataset``.

A reader trusts only shards named in ``_manifest.json`` (the writer side is
:mod:`distill.shards.write`); sizes are always checked against it, checksums on request.
The stages that learn from shards (filter, train) ask: a shard changed in place without
changing its size would otherwise be used silently. Checking costs about 1 s per GB
(157 MB of trace shards hashed and validated in 0.16 s on the 2-core bench machine, where
only turning the same rows into Python objects takes 0.2 s and tokenizing them minutes).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

from distill.errors import UserError
from distill.messages import SCHEMA_VERSION, Trace, rows_table

MANIFEST = "_manifest.json"


class ShardError(UserError):
    """A missing, corrupt or truncated shard or manifest."""


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 1 MB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
        # version 1 held flat tool calls and tools as a JSON string: rewriting is cheaper
        # than two readers
        raise ShardError(
            f"{path}: shards of schema version {manifest.get('schema_version')}, this distill "
            f"reads {SCHEMA_VERSION}: rerun `distill generate` (and the stages after it)"
        )
    for key in ("rows", "bytes"):
        if not _count(manifest.get(key)):
            raise ShardError(f"{path}: corrupt manifest (no {key!r} count)")
    for s in manifest["shards"]:
        if not isinstance(s, dict) or not {"file", "rows", "bytes", "sha256"} <= s.keys():
            raise ShardError(f"{path}: corrupt manifest (bad shard entry {s!r})")
        f = s["file"]
        if not isinstance(f, str) or not f or f != Path(f).name or f.startswith("."):
            # a manifest names files of its own directory, never a path out of it
            raise ShardError(f"{path}: corrupt manifest (shard path {f!r} is not a file name)")
        if not (_count(s["rows"]) and _count(s["bytes"])):
            raise ShardError(f"{path}: corrupt manifest (bad shard entry {s!r})")
    return manifest


def _count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


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
        if verify and file_sha256(p) != s["sha256"]:
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
        return rows_table([])
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
        return rows_table([])
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
        return datasets.Dataset(rows_table([]))
    return datasets.concatenate_datasets([datasets.Dataset.from_file(f) for f in files])
