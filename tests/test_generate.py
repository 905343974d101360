"""`distill generate` on tiny real models: raw shards for every domain, resumable,
readable by `datasets` and `distill shards inspect`; SIGKILL mid-run loses nothing."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from gen_fixtures import tiny_model_dir

from distill.errors import UserError
from distill.generate import run
from distill.recipe.schema import load_recipe
from distill.shards import iter_traces, load_dataset
from distill.stages import run_stage
from teachers.base import REGISTRY

torch.set_num_threads(1)
DOMAINS = [
    d
    for d in ("math", "logic", "agents", "code")
    if (Path(__file__).parents[1] / "teachers" / f"{d}.py").exists()
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("random"))


def write_recipe(
    path: Path,
    out: Path,
    model: Path,
    *,
    domains=DOMAINS,
    tasks=6,
    shard_rows=5,
    max_new=12,
    batch=8,
) -> Path:
    doms = "\n".join(f"  {d}: {{train_tasks: {tasks}, max_new_tokens: {max_new}}}" for d in domains)
    teachers = "\n".join(f"  {d}: {{kind: hf, path: '{model}'}}" for d in domains)
    path.write_text(
        f"name: t\noutput_dir: '{out}'\ndomains:\n{doms}\nteachers:\n{teachers}\n"
        f"generate: {{samples_per_task: 2, batch_size: {batch}, shard_rows: {shard_rows}, max_turns: 3, topk_logprobs: 2}}\n"
    )
    return path


def rows_by_id(out: Path, domains=DOMAINS) -> dict[str, dict]:
    rows = {}
    for d in domains:
        for tr in iter_traces(out / "raw" / d):
            assert tr.id not in rows, f"duplicate row {tr.id}"
            rows[tr.id] = tr.to_row()
    return rows


def test_generate_all_domains_then_rerun_is_a_no_op(tmp_path, model_dir):
    assert {"math", "agents"} <= set(DOMAINS) <= set(REGISTRY)
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tmp_path / "out", model_dir))
    res = run_stage(recipe, "generate")  # as `distill generate` runs it: recorded
    assert res["rows"] == {d: 12 for d in DOMAINS}
    rows = rows_by_id(tmp_path / "out")
    assert len(rows) == 12 * len(DOMAINS)
    r = next(iter(rows.values()))
    assert r["lineage"]["teacher_model"] == str(model_dir) and r["lineage"]["recipe_fingerprint"]
    assert json.loads(r["lineage"]["sampling"])["max_new_tokens"] == 12
    assert r["finish_reason"] in ("stop", "length", "tool_calls", "turn_limit")
    assert len(r["topk"]) == r["completion_tokens"] and r["prompt_tokens"] > 0
    agents = [x for x in rows.values() if x["domain"] == "agents"]
    assert all(x["tools"] for x in agents)  # agent rows carry their tool schemas
    ds = load_dataset(tmp_path / "out" / "raw" / "math")
    assert ds.num_rows == 12 and set(ds.column_names) >= {"messages", "lineage", "topk"}
    assert (tmp_path / "out" / "runs" / "raw" / "_stage.json").exists()
    cli = subprocess.run(
        [sys.executable, "-m", "distill", "shards", "inspect", str(tmp_path / "out" / "raw")],
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 0 and "math" in cli.stdout + cli.stderr
    run(recipe)  # everything committed: nothing regenerated, nothing duplicated
    assert rows_by_id(tmp_path / "out") == rows


def test_bootstrap_teacher_missing_is_a_user_error(tmp_path):
    (tmp_path / "r.yaml").write_text(
        f"name: t\noutput_dir: '{tmp_path / 'o'}'\ndomains:\n  math: {{train_tasks: 2}}\nteachers:\n  math: {{kind: bootstrap}}\n"
    )
    with pytest.raises(UserError, match="run `distill teachers` first"):
        run(load_recipe(tmp_path / "r.yaml"))


def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path, model_dir):
    kw = dict(domains=["math"], tasks=20, shard_rows=4, max_new=16, batch=4)
    run(load_recipe(write_recipe(tmp_path / "ref.yaml", tmp_path / "ref", model_dir, **kw)))
    expected = rows_by_id(tmp_path / "ref", ["math"])
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "out", model_dir, **kw)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "distill", "generate", str(recipe)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    # rows are committed a chunk (16 episodes = 4 shards) at a time: kill after the first
    first = tmp_path / "out" / "raw" / "math" / "part-r0-00002.arrow"
    deadline = time.time() + 120
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "out" / "runs" / "raw" / "_stage.json").exists(), (
        "run finished before the kill"
    )
    partial = len(list((tmp_path / "out" / "raw" / "math").glob("part-*.arrow")))
    assert partial >= 3  # killed after committing some rows, before the manifest
    run(load_recipe(recipe))  # the rerun continues where the killed run stopped
    got = rows_by_id(tmp_path / "out", ["math"])
    assert got.keys() == expected.keys() and len(got) == 40
    # per-sample seeds: the regenerated rows are the rows an uninterrupted run writes
    assert all(got[i]["messages"] == expected[i]["messages"] for i in got)


def test_ranks_take_disjoint_slices_and_the_manifest_covers_all(tmp_path, model_dir):
    """What `accelerate launch` does with two processes, one after the other here."""
    from distill.generate import generate_domain
    from distill.shards import finalize
    from distill.stages import fingerprint

    recipe = load_recipe(
        write_recipe(tmp_path / "r.yaml", tmp_path / "o", model_dir, domains=["math"], tasks=5)
    )
    fp = fingerprint(recipe, "generate")
    for rank in (0, 1):
        generate_domain(recipe, "math", rank=rank, world=2, fp=fp, device="cpu")
    d = tmp_path / "o" / "raw" / "math"
    assert sorted(p.name for p in d.glob("_journal-*")) == [
        "_journal-part-r0.json",
        "_journal-part-r1.json",
    ]
    finalize(d, fp)
    ids = [t.id for t in iter_traces(d)]
    assert len(ids) == len(set(ids)) == 10
    single = load_recipe(
        write_recipe(tmp_path / "s.yaml", tmp_path / "s", model_dir, domains=["math"], tasks=5)
    )
    run(single)
    assert sorted(ids) == sorted(t.id for t in iter_traces(tmp_path / "s" / "raw" / "math"))
    # a rerun with one process finds every row committed by the two and adds none
    run(load_recipe(tmp_path / "r.yaml"))
    assert sorted(t.id for t in iter_traces(d)) == sorted(ids)
