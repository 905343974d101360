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

This module is the public face of the store: writing lives in
:mod:`distill.shards.write`, reading and verification in :mod:`distill.shards.read`.
"""

from __future__ import annotations

from distill.shards.read import (
    MANIFEST,
    ShardError,
    iter_traces,
    load_dataset,
    read_manifest,
    read_shard,
    read_table,
    shard_files,
    take,
)
from distill.shards.write import ShardWriter, finalize

__all__ = [
    "MANIFEST",
    "ShardError",
    "ShardWriter",
    "finalize",
    "iter_traces",
    "load_dataset",
    "read_manifest",
    "read_shard",
    "read_table",
    "shard_files",
    "take",
]
