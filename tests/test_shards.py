"""Shard store: bounds on real file size, manifest, resume, corruption, datasets."""

from __future__ import annotations

import errno
import hashlib
import json
import os

import datasets
import pytest

from distill.messages import SCHEMA_VERSION, Lineage, Trace, Verdict, tool_call
from distill.shards import (
    MANIFEST,
    ShardError,
    ShardWriter,
    finalize,
    iter_traces,
    load_dataset,
    read_manifest,
    read_table,
    shard_files,
    take,
)


def make_trace(i: int, text: int = 200) -> Trace:
    return Trace(
        id=f"t{i}",
        task_id=f"task{i // 2}",
        domain=["math", "code", "logic", "agents"][i % 4],
        messages=[
            {"role": "system", "content": "You are careful."},
            {"role": "user", "content": f"question {i} " + "x" * text},
            {
                "role": "assistant",
                "reasoning_content": f"think {i}",
                "tool_calls": [tool_call(f"c{i}", "calc", '{"a": 1}')],
            },
            {"role": "tool", "tool_call_id": f"c{i}", "content": "2"},
            {"role": "assistant", "reasoning_content": "so", "content": f"answer {i}"},
        ],
        reference={"answer": i},
        verdict=None if i % 3 == 0 else Verdict(i % 3 == 1, float(i % 3 == 1), "checked"),
        lineage=Lineage(teacher_model="tiny", recipe_fingerprint="fp"),
    )


def write(d, n, **kw) -> dict:
    with ShardWriter(d, **kw) as w:
        w.write(make_trace(i) for i in range(n))
    return read_manifest(d)


def test_roundtrip_and_manifest(tmp_path):
    m = write(tmp_path, 25, max_rows=10, fingerprint="abc")
    assert [s["rows"] for s in m["shards"]] == [10, 10, 5]
    assert m["rows"] == 25 and m["schema_version"] == SCHEMA_VERSION and m["fingerprint"] == "abc"
    for s in m["shards"]:
        data = (tmp_path / s["file"]).read_bytes()
        assert s["bytes"] == len(data) and s["sha256"] == hashlib.sha256(data).hexdigest()
    assert m["bytes"] == sum(s["bytes"] for s in m["shards"])
    assert any(f.startswith("messages: list<") for f in m["schema"])
    back = list(iter_traces(tmp_path, verify=True))
    assert back == [make_trace(i) for i in range(25)]
    assert not list(tmp_path.glob("*.tmp"))


def test_shards_growing_and_shrinking_keep_exact_bytes_and_checksums(tmp_path):
    # every shard is serialised into one reused buffer: a shard larger than the last
    # must get all its bytes, a smaller one none of the last one's tail
    texts = [50, 5000, 10, 20_000, 0, 300, 8000, 1]
    with ShardWriter(tmp_path, max_rows=2) as w:
        w.write(make_trace(i, text=t) for i, t in enumerate(texts))
    m = read_manifest(tmp_path)
    assert len(m["shards"]) == 4
    for s in m["shards"]:
        data = (tmp_path / s["file"]).read_bytes()
        assert s["bytes"] == len(data) and s["sha256"] == hashlib.sha256(data).hexdigest()
    back = list(iter_traces(tmp_path, verify=True))
    assert back == [make_trace(i, text=t) for i, t in enumerate(texts)]


def test_byte_bound_is_on_the_encoded_file(tmp_path):
    m = write(tmp_path, 30, max_rows=1000, max_bytes=8000)
    sizes = [(tmp_path / s["file"]).stat().st_size for s in m["shards"]]
    assert len(sizes) > 3 and max(sizes) <= 8000
    assert m["rows"] == 30 and read_table(tmp_path).column("id").to_pylist() == [
        f"t{i}" for i in range(30)
    ]


def test_a_row_larger_than_the_bound_gets_its_own_shard(tmp_path):
    with ShardWriter(tmp_path, max_bytes=3000) as w:
        w.write([make_trace(0), make_trace(1, text=10_000), make_trace(2)])
    rows = [s["rows"] for s in read_manifest(tmp_path)["shards"]]
    assert sum(rows) == 3 and 1 in rows
    assert read_table(tmp_path).column("id").to_pylist() == ["t0", "t1", "t2"]


def test_resume_keeps_committed_discards_partial(tmp_path):
    w = ShardWriter(tmp_path, max_rows=10)
    w.write(make_trace(i) for i in range(25))  # no close: as if killed here
    assert w.committed_rows == 20  # 5 rows were still buffered
    (tmp_path / "part-00002.arrow.tmp").write_bytes(b"half a shard")
    (tmp_path / "part-00005.arrow").write_bytes(b"renamed, never journaled")
    w2 = ShardWriter(tmp_path, max_rows=10)
    assert w2.committed_ids() == {f"t{i}" for i in range(20)}
    assert not (tmp_path / "part-00002.arrow.tmp").exists()
    assert not (tmp_path / "part-00005.arrow").exists()
    with pytest.raises(ShardError, match="no _manifest.json"):
        read_table(tmp_path)  # unfinished output is not readable
    done = w2.committed_ids()
    w2.write(make_trace(i) for i in range(30) if f"t{i}" not in done)
    w2.close()
    ids = read_table(tmp_path).column("id").to_pylist()
    assert sorted(ids) == sorted(f"t{i}" for i in range(30)) and len(ids) == 30


def test_changed_fingerprint_discards_committed_rows(tmp_path):
    w = ShardWriter(tmp_path, max_rows=5, fingerprint="old")
    w.write(make_trace(i) for i in range(10))
    assert w.committed_rows == 10
    w2 = ShardWriter(tmp_path, max_rows=5, fingerprint="new")
    assert w2.committed_ids() == set()
    w2.write([make_trace(99)])
    m = w2.close()
    assert m["rows"] == 1 and m["fingerprint"] == "new"
    assert read_table(tmp_path).column("id").to_pylist() == ["t99"]


def test_writers_with_prefixes_merge_in_finalize(tmp_path):
    for rank in range(2):  # "part" and "part-1": one prefix starts with the other
        w = ShardWriter(tmp_path, max_rows=4, prefix="part" if rank == 0 else "part-1")
        w.write(make_trace(i) for i in range(rank * 10, rank * 10 + 6))
        w.close(finalize_manifest=False)
    ShardWriter(tmp_path, prefix="part")  # reopening one writer leaves the other's files
    m = finalize(tmp_path, "fp")
    assert m["rows"] == 12 and len(m["shards"]) == 4
    ids = read_table(tmp_path).column("id").to_pylist()
    assert sorted(ids) == sorted(f"t{i}" for i in [*range(6), *range(10, 16)])
    assert take(tmp_path, [0, 11]).column("id").to_pylist() == [ids[0], ids[11]]


def test_truncated_shard_names_the_file(tmp_path):
    write(tmp_path, 10)
    f = tmp_path / "part-00000.arrow"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ShardError, match="part-00000.arrow: truncated"):
        read_table(tmp_path)
    # the manifest updated to the truncated size: Arrow itself reports it
    m = json.loads((tmp_path / MANIFEST).read_text())
    m["shards"][0]["bytes"] = f.stat().st_size
    (tmp_path / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ShardError, match="part-00000.arrow: corrupt or truncated"):
        read_table(tmp_path)


def test_flipped_byte_fails_verification(tmp_path):
    write(tmp_path, 10)
    f = tmp_path / "part-00000.arrow"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="part-00000.arrow: checksum mismatch"):
        read_table(tmp_path, verify=True)
    with pytest.raises(ShardError, match="checksum mismatch"):
        list(iter_traces(tmp_path, verify=True))


def test_bad_manifest_and_missing_shard(tmp_path):
    with pytest.raises(ShardError, match="no _manifest.json"):
        shard_files(tmp_path)
    write(tmp_path, 3)
    (tmp_path / "part-00000.arrow").unlink()
    with pytest.raises(ShardError, match="listed in the manifest but missing"):
        read_table(tmp_path)
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(ShardError, match="_manifest.json: corrupt manifest"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST).write_text(json.dumps({"schema_version": 99, "shards": []}))
    with pytest.raises(ShardError, match="schema version 99"):
        read_manifest(tmp_path)


def test_rows_not_matching_the_schema(tmp_path):
    w = ShardWriter(tmp_path)
    w.write([{"id": "x", "task_id": "t", "domain": "math", "messages": "not a list"}])
    with pytest.raises(ShardError, match="rows do not match the shard schema"):
        w.flush()


def test_datasets_reads_shards_unchanged(tmp_path):
    write(tmp_path, 12, max_rows=5)
    files = [str(p) for p in shard_files(tmp_path)]
    cache = str(tmp_path / "hf_cache")
    ds = datasets.load_dataset("arrow", data_files=files, split="train", cache_dir=cache)
    assert ds.num_rows == 12 and ds[3]["id"] == "t3"
    assert ds[2]["messages"][2]["tool_calls"][0]["function"]["name"] == "calc"
    assert ds[2]["reference"] == {"answer": 2}  # arrow.json: datasets decodes it
    one = datasets.Dataset.from_file(files[0])
    assert one.num_rows == 5 and one[4]["messages"][4]["reasoning_content"] == "so"
    ours = load_dataset(tmp_path)
    assert ours["id"] == [f"t{i}" for i in range(12)]


def test_the_shard_in_flight_is_committed_only_after_its_fsync(tmp_path):
    w = ShardWriter(tmp_path, max_rows=10)
    w.write(make_trace(i) for i in range(25))
    journal = json.loads((tmp_path / "_journal-part.json").read_text())
    assert [s["file"] for s in journal["shards"]] == ["part-00000.arrow"]
    assert (tmp_path / "part-00001.arrow.tmp").exists()  # written, its fsync in flight
    # killed here: a reopened writer redoes the rows of the shard that was in flight
    assert ShardWriter(tmp_path, max_rows=10).committed_ids() == {f"t{i}" for i in range(10)}


def test_a_failed_fsync_stops_the_writer_and_resume_redoes_its_rows(tmp_path, monkeypatch):
    real_fsync, calls = os.fsync, []

    def fsync(fd):  # the second shard's fsync fails, as on a disk error
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    w = ShardWriter(tmp_path, max_rows=5)
    with pytest.raises(OSError, match="Input/output error"):
        w.write(make_trace(i) for i in range(20))  # surfaces when the third shard commits
    with pytest.raises(ShardError, match="an earlier shard could not be committed"):
        w.close()  # no manifest that would miss the failed shard's rows
    assert not (tmp_path / MANIFEST).exists()
    monkeypatch.undo()
    w2 = ShardWriter(tmp_path, max_rows=5)
    done = w2.committed_ids()
    assert done == {f"t{i}" for i in range(5)}
    w2.write(make_trace(i) for i in range(20) if f"t{i}" not in done)
    w2.close()
    ids = read_table(tmp_path, verify=True).column("id").to_pylist()
    assert sorted(ids) == sorted(f"t{i}" for i in range(20)) and len(ids) == 20


def test_journaled_shard_lost_after_power_cut_is_redone(tmp_path):
    w = ShardWriter(tmp_path, max_rows=5)
    w.write(make_trace(i) for i in range(15))
    assert w.committed_rows == 15
    (tmp_path / "part-00001.arrow").unlink()  # its rename never reached the disk
    w2 = ShardWriter(tmp_path, max_rows=5)
    done = w2.committed_ids()
    assert done == {f"t{i}" for i in (0, 1, 2, 3, 4, 10, 11, 12, 13, 14)}
    w2.write(make_trace(i) for i in range(15) if f"t{i}" not in done)
    m = w2.close()
    assert [s["file"] for s in m["shards"]] == [
        "part-00000.arrow",
        "part-00002.arrow",
        "part-00003.arrow",
    ]
    assert sorted(read_table(tmp_path, verify=True).column("id").to_pylist()) == sorted(
        f"t{i}" for i in range(15)
    )


def test_take_reads_rows_across_shards_in_the_order_asked(tmp_path):
    write(tmp_path, 23, max_rows=5)
    idx = [22, 0, 7, 7, 14, 3]
    assert take(tmp_path, idx).column("id").to_pylist() == [f"t{i}" for i in idx]
    assert take(tmp_path, []).num_rows == 0
    with pytest.raises(IndexError, match="row 23 out of range"):
        take(tmp_path, [1, 23])
    with pytest.raises(IndexError):
        take(tmp_path, [-1])


def test_a_bad_message_role_is_a_user_error(tmp_path):
    from distill.errors import UserError

    bad = make_trace(0)
    bad.messages = [{"role": "bot", "content": "hi"}]
    with pytest.raises(
        UserError, match="message role must be one of system, user, assistant, tool, got 'bot'"
    ):
        ShardWriter(tmp_path).write([bad])
