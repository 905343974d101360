"""A writer killed with SIGKILL mid-shard resumes to exactly the rows of an
uninterrupted run: no row lost, none duplicated."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from tiny_artifacts import child_env

from distill.shards import ShardWriter, read_table

N = 400
ROW = r"""
def row(i):
    return {"id": f"r{i}", "task_id": f"t{i % 7}", "domain": "math",
            "messages": [{"role": "user", "content": "q" * (i % 50)},
                         {"role": "assistant", "reasoning_content": "r", "content": str(i)}]}
"""
# The child is the usual resumable stage loop: skip committed ids, write the rest.
CHILD = (
    ROW
    + r"""
import sys, time
from distill.shards import ShardWriter
out, n, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
w = ShardWriter(out, max_rows=20, fingerprint="fp")
done = w.committed_ids()
print("started", flush=True)
written = 0
for i in range(n):
    if f"r{i}" in done:
        continue
    w.write([row(i)])
    written += 1
    if mode == "pause" and written == 47:  # two shards committed, seven rows buffered
        assert w.committed_rows == 40
        print("mid-shard", flush=True)
        time.sleep(120)
    if mode == "slow":
        time.sleep(0.002)
w.close()
print("done", flush=True)
"""
)


def spawn(out: Path, mode: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(out), str(N), mode],
        stdout=subprocess.PIPE,
        text=True,
        env=child_env(),
    )


def kill_after(p: subprocess.Popen, line: str, delay: float = 0.0) -> None:
    assert p.stdout is not None
    assert p.stdout.readline().strip() == "started"
    if line:
        assert p.stdout.readline().strip() == line
    time.sleep(delay)
    p.send_signal(signal.SIGKILL)
    p.wait()


def rows(d: Path) -> list[dict]:
    return sorted(read_table(d).to_pylist(), key=lambda r: r["id"])


def test_sigkill_mid_shard_then_resume(tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "out"
    ns: dict = {}
    exec(ROW, ns)
    with ShardWriter(ref, max_rows=20) as w:  # the uninterrupted run
        w.write(ns["row"](i) for i in range(N))

    kill_after(spawn(out, "pause"), "mid-shard")
    journal = json.loads((out / "_journal-part.json").read_text())
    assert [s["rows"] for s in journal["shards"]] == [20, 20]  # killed with 7 rows buffered
    rng = random.Random(0)
    for _ in range(2):  # kills at arbitrary points: while encoding, renaming, journaling
        kill_after(spawn(out, "slow"), "", delay=rng.uniform(0.05, 0.4))
    p = spawn(out, "fast")
    assert p.wait() == 0

    got, want = rows(out), rows(ref)
    assert len({r["id"] for r in got}) == len(got) == N
    assert got == want
    assert not list(out.glob("*.tmp"))
