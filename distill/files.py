"""Small file and hashing helpers every stage uses: writes that a crash cannot leave half
done, and the short content hashes that name fingerprints and cache keys."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def atomic_write_text(path: str | Path, text: str, *, sync: bool = False) -> None:
    """Write ``text`` beside ``path`` and rename it into place: a reader (or a crash) sees
    the old file or the new one, never half of one. ``sync`` also fsyncs the data first
    (for records whose loss after a power cut would lose committed work)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)  # a run directory is made on first use
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        if sync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(
    path: str | Path, data: Any, *, indent: int | None = 1, sync: bool = False, default=None
) -> None:
    """:func:`atomic_write_text` of ``data`` as JSON."""
    atomic_write_text(path, json.dumps(data, indent=indent, default=default), sync=sync)


def short_hash(blob: str | bytes, n: int = 16) -> str:
    """The first ``n`` hex digits of the sha256 of ``blob``."""
    return hashlib.sha256(blob.encode() if isinstance(blob, str) else blob).hexdigest()[:n]


def json_hash(data: Any, default=None) -> str:
    """:func:`short_hash` of ``data`` as compact JSON with sorted keys (stable across key
    order and whitespace)."""
    return short_hash(json.dumps(data, sort_keys=True, separators=(",", ":"), default=default))
