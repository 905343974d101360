"""The filter stage's domains in parallel processes: the same report and byte-identical
clean shards as one domain after the other, a worker's UserError reaches the user as is,
and when the stage goes parallel at all."""

from __future__ import annotations

import json
import shutil

import pytest
from test_filter_stage import MATH, _planted, _recipe, _trace, _write_raw

from distill import launch
from distill.errors import UserError
from distill.filter import stage
from distill.filter.stage import DONE, DROPPED, PARALLEL_ENV, _parallel_domains, run
from distill.shards import read_manifest
from teachers.base import get_domain, trace_from_task


def _outputs(recipe, report):
    """What a run produced, less its timings: report entries and every domain's files."""
    domains = {d: {k: v for k, v in e.items() if k != "seconds"} for d, e in report.items()}
    files = {}
    for d in recipe.active_domains():
        clean = recipe.out / "clean" / d
        summary = json.loads((clean / DONE).read_text())
        summary["summary"].pop("seconds")
        files[d] = {
            "shards": [(s["file"], s["sha256"]) for s in read_manifest(clean)["shards"]],
            "dropped": (clean / DROPPED).read_text(),
            "done": summary,
        }
    return list(domains), domains, files


def test_parallel_run_equals_sequential(tmp_path, monkeypatch):
    recipe = _recipe(tmp_path)
    tasks = list(MATH.tasks("train", 12, 0, 1))
    logic_eval = next(iter(get_domain("logic").tasks("eval", 20, recipe.seed, 1)))
    rows, _ = _planted(tasks, next(iter(MATH.tasks("eval", 20, recipe.seed, 1))), logic_eval)
    _write_raw(recipe, rows)

    monkeypatch.setenv(PARALLEL_ENV, "0")
    sequential = _outputs(recipe, run(recipe, progress=False)["domains"])
    shutil.rmtree(recipe.out / "clean")

    monkeypatch.setenv(PARALLEL_ENV, "2")
    calls = []
    real = stage._filter_parallel
    monkeypatch.setattr(stage, "_filter_parallel", lambda *a: calls.append(a[3]) or real(*a))
    parallel = _outputs(recipe, run(recipe, progress=True)["domains"])  # the bar's path too

    assert calls == [2]  # the parallel path did run, in two processes
    assert parallel[0] == recipe.active_domains() == ["math", "logic"]
    assert parallel == sequential
    assert all(f["shards"] for f in parallel[2].values())


def test_user_error_in_a_worker_reaches_the_user(tmp_path, monkeypatch):
    monkeypatch.setenv(PARALLEL_ENV, "2")
    recipe = _recipe(tmp_path)
    good = [_trace(f"ok{i}", t) for i, t in enumerate(MATH.tasks("train", 3, 0, 1))]
    logic = get_domain("logic")
    task = next(iter(logic.tasks("train", 1, 0, 1)))
    stray = trace_from_task(task, "stray", logic.oracle(task), finish_reason="stop")
    _write_raw(recipe, [*good, stray])  # math's raw shards hold a logic row
    with pytest.raises(UserError, match=r"row stray belongs to domain 'logic', not 'math'") as e:
        run(recipe, progress=False)
    assert type(e.value) is UserError and "\n" not in str(e.value)

    shutil.rmtree(recipe.out / "raw" / "logic")  # both fail: the first in recipe order is told
    with pytest.raises(UserError, match="not 'math'"):
        run(recipe, progress=False)

    shutil.rmtree(recipe.out / "raw")
    _write_raw(recipe, good)
    shutil.rmtree(recipe.out / "raw" / "logic")
    with pytest.raises(UserError, match="no raw shards for domain logic"):
        run(recipe, progress=False)


def test_other_worker_errors_name_the_domain(tmp_path, monkeypatch):
    monkeypatch.setenv(PARALLEL_ENV, "2")
    recipe = _recipe(tmp_path)
    _write_raw(recipe, [_trace(f"ok{i}", t) for i, t in enumerate(MATH.tasks("train", 3, 0, 1))])
    (recipe.out / "clean").mkdir()
    (recipe.out / "clean" / "logic").write_text("a file where the domain's directory goes")
    with pytest.raises(UserError, match=r"^filter\.logic: failed in its worker process \("):
        run(recipe, progress=False)
    assert read_manifest(recipe.out / "clean" / "math")["rows"] == 3  # the other one finished


def test_parallel_domains(monkeypatch):
    monkeypatch.setenv(PARALLEL_ENV, "0")
    assert _parallel_domains(4) == 1
    monkeypatch.setenv(PARALLEL_ENV, "3")
    assert [_parallel_domains(n) for n in (1, 2, 4)] == [1, 2, 3]
    monkeypatch.setenv(PARALLEL_ENV, "many")
    with pytest.raises(UserError, match=PARALLEL_ENV):
        _parallel_domains(4)

    monkeypatch.delenv(PARALLEL_ENV)
    monkeypatch.setattr(launch.os, "sched_getaffinity", lambda pid: set(range(2)))
    assert [_parallel_domains(n) for n in (1, 4)] == [1, 1]  # a 2-core CI or demo machine
    monkeypatch.setattr(launch.os, "sched_getaffinity", lambda pid: set(range(16)))
    assert [_parallel_domains(n) for n in (0, 1, 2, 4, 12)] == [1, 1, 2, 4, 8]
    monkeypatch.delattr(launch.os, "sched_getaffinity")  # not on every platform
    monkeypatch.setattr(launch.os, "cpu_count", lambda: 16)
    assert _parallel_domains(4) == 4
