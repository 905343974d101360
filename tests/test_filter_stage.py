"""The filter stage end to end on hand-made raw shards with planted cases, through the
real math domain (tasks, verifier) and real Arrow shards."""

from __future__ import annotations

import json
import random

import pytest

from distill.errors import UserError
from distill.filter.stage import DONE, DROPPED, run
from distill.messages import Trace, Verdict, tool_call
from distill.recipe.schema import validate
from distill.shards import ShardWriter, iter_traces, read_manifest
from distill.stages import run_stage
from teachers.base import get_domain, trace_from_task

MATH = get_domain("math")


def _recipe(tmp_path, **filter_cfg):
    return validate(
        {
            "name": "t",
            "output_dir": str(tmp_path / "out"),
            "domains": {"math": {"eval_tasks": 20}, "logic": {"eval_tasks": 20}},
            "teachers": {"math": {"kind": "bootstrap"}, "logic": {"kind": "bootstrap"}},
            "filter": {"workers": 1, "max_per_task": 2, **filter_cfg},
        }
    )


def _filler(seed: int, n: int) -> str:
    rng = random.Random(seed)
    return " ".join(f"w{rng.randrange(10**6)}" for _ in range(n))


def _trace(id_, task, extra="", content=None, reasoning=None, **kw) -> Trace:
    messages = MATH.oracle(task)
    answer = dict(messages[-1])
    if reasoning is not None:
        answer["reasoning_content"] = reasoning
    if extra:
        answer["reasoning_content"] += "\n" + extra
    if content is not None:
        answer["content"] = content
    messages = [*messages[:-1], answer]
    words = len((answer.get("reasoning_content") or "").split())
    kw.setdefault("finish_reason", "stop")
    kw.setdefault("completion_tokens", words + 3)
    return trace_from_task(task, id_, messages, teacher="math", **kw)


def _planted(tasks, eval_task, logic_eval=None):
    """Raw rows: one clean trace per task plus planted rows; {planted id: (step, reason)}."""
    t = tasks
    rows = [_trace(f"ok{i}", task) for i, task in enumerate(t)]
    long_text = _filler(1, 200)
    words = long_text.split()
    words[100] = "changed"
    rows += [
        _trace("wrong", t[0], content="\\boxed{0}", reasoning="guess"),
        _trace("truncated", t[1], reasoning="2+4 is", finish_reason="length"),
        _trace("noanswer", t[2], content="", reasoning="thinking only"),
        _trace("noreason", t[3], reasoning=""),
        _trace("longA", t[4], extra=long_text),
        _trace("neardup", t[4], extra=" ".join(words)),
        _trace("exactdup", t[5]),  # the same text as ok5, in other case and spacing
        _trace("more1", t[6], extra=_filler(2, 20)),
        _trace("more2", t[6], extra=_filler(3, 40)),  # third correct trace, the longest
        _trace("leak", eval_task),
    ]
    bad_tool = _trace("badtool", t[7], reasoning="call it")
    bad_tool.messages[-1]["tool_calls"] = [tool_call("c1", "calc", "{oops")]
    rows.append(bad_tool)
    if logic_eval is not None:  # a logic eval question inside a (correct) math trace
        cross = _trace("crossleak", t[8], extra=_filler(4, 12))
        cross.messages[0] = {"role": "user", "content": logic_eval.messages[-1]["content"]}
        rows.append(cross)
    exact = rows[[r.id for r in rows].index("exactdup")]
    exact.messages[-1]["reasoning_content"] = "  " + exact.messages[-1]["reasoning_content"].upper()
    planted = {
        "wrong": ("failed", "failed"),
        "truncated": ("malformed", "truncated"),
        "noanswer": ("malformed", "no_answer"),
        "noreason": ("malformed", "no_reasoning"),
        "badtool": ("malformed", "bad_tool_call"),
        "neardup": ("dedup_near", "near_duplicate"),
        "exactdup": ("dedup_exact", "exact_duplicate"),
        "more2": ("select", "max_per_task"),
        "leak": ("decontaminate", "prompt:math"),
    }
    if logic_eval is not None:
        planted["crossleak"] = ("decontaminate", "prompt:logic")
    return rows, planted


def _write_raw(recipe, rows):
    with ShardWriter(recipe.out / "raw" / "math", max_rows=7) as w:
        w.write(rows)
    logic = get_domain("logic")
    with ShardWriter(recipe.out / "raw" / "logic") as w:
        for i, task in enumerate(logic.tasks("train", 3, 0, 1)):
            w.write([trace_from_task(task, f"l{i}", logic.oracle(task), finish_reason="stop")])


def test_planted_rows_dropped_for_the_right_reason(tmp_path):
    recipe = _recipe(tmp_path)
    tasks = list(MATH.tasks("train", 12, 0, 1))
    eval_task = next(iter(MATH.tasks("eval", 20, recipe.seed, 1)))
    logic_eval = next(iter(get_domain("logic").tasks("eval", 20, recipe.seed, 1)))
    rows, planted = _planted(tasks, eval_task, logic_eval)
    _write_raw(recipe, rows)

    report = run_stage(recipe, "filter")  # as `distill filter` runs it: recorded

    clean = recipe.out / "clean" / "math"
    kept = {t.id: t for t in iter_traces(clean)}
    assert set(kept) == {r.id for r in rows} - set(planted)
    dropped = [json.loads(x) for x in (clean / DROPPED).read_text().splitlines()]
    assert {d["id"]: (d["step"], d["reason"]) for d in dropped} == planted
    # verdicts and lineage are stored on the clean rows
    t = kept["ok0"]
    assert t.verdict == Verdict(True, 1.0, "correct")
    assert (t.lineage.verifier, t.lineage.verifier_version) == ("math-equiv", "1")
    assert json.loads(t.lineage.extra)["filter"]["max_per_task"] == 2
    # the funnel adds up: every step's in = previous out, out = in - dropped
    d = report["domains"]["math"]
    assert d["raw"] == len(rows) and d["kept"] == len(kept)
    prev = d["raw"]
    for step in d["steps"]:
        assert step["in"] == prev and step["out"] == step["in"] - sum(step["dropped"].values())
        prev = step["out"]
    assert prev == len(kept)
    assert d["steps"][0]["passed"] + d["steps"][0]["failed"] == len(rows)
    assert 0 < d["pass_rate"] < 1 and d["mean_tokens"] > 0
    on_disk = json.loads((recipe.out / "clean" / "filter_report.json").read_text())
    assert on_disk["domains"]["math"]["steps"] == d["steps"]
    assert "| malformed |" in (recipe.out / "clean" / "filter_report.md").read_text()
    assert json.loads((recipe.out / "runs" / "clean" / "_stage.json").read_text())["rows"] == {
        "math": len(kept),
        "logic": 3,
    }


def test_rerun_is_idempotent_and_replaces_a_partial_run(tmp_path):
    recipe = _recipe(tmp_path, keep_failed=True)
    tasks = list(MATH.tasks("train", 12, 0, 1))
    rows, _ = _planted(tasks, next(iter(MATH.tasks("eval", 20, 0, 1))))
    _write_raw(recipe, rows)
    run(recipe, progress=False)
    clean = recipe.out / "clean" / "math"
    first = read_manifest(clean)
    kept = list(iter_traces(clean))
    # keep_failed keeps the wrong answer, flagged by its verdict
    assert [t.verdict.passed for t in kept if t.id == "wrong"] == [False]

    run(recipe, progress=False)  # complete: kept as is
    assert read_manifest(clean)["shards"] == first["shards"]

    (clean / DONE).unlink()  # a run killed after writing shards: redone whole
    (clean / "part-00009.arrow.tmp").write_bytes(b"junk")
    run(recipe, progress=False)
    assert [s["sha256"] for s in read_manifest(clean)["shards"]] == [
        s["sha256"] for s in first["shards"]
    ]
    assert not list(clean.glob("*.tmp"))


def test_missing_raw_shards_is_a_user_error(tmp_path):
    recipe = _recipe(tmp_path)
    with pytest.raises(UserError, match="raw shards"):
        run(recipe, progress=False)


def _cli(args, capsys):
    import sys

    from distill.cli import main

    old, sys.argv = sys.argv, ["distill", *map(str, args)]
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = old
    return code, capsys.readouterr().err


def test_cli_filter(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(
        f"name: t\noutput_dir: {tmp_path / 'out'}\n"
        "domains: {math: {eval_tasks: 20}}\nteachers: {math: {kind: bootstrap}}\n"
    )
    code, err = _cli(["filter", path, "--set", "filter.workers=1"], capsys)
    last = err.strip().splitlines()[-1]
    assert (
        code == 2 and last.startswith("error: ") and "raw shards" in last and "Traceback" not in err
    )
    recipe = _recipe(tmp_path)
    _write_raw(recipe, [_trace(f"ok{i}", t) for i, t in enumerate(MATH.tasks("train", 3, 0, 1))])
    code, err = _cli(
        ["filter", path, "--set", "filter.workers=1", "--set", "filter.max_per_task=1"], capsys
    )
    assert code == 0 and "filter funnel" in err
    assert len(list(iter_traces(recipe.out / "clean" / "math"))) == 3


def test_steps_switched_off_are_skipped_and_counted():
    from distill.filter.stage import filter_traces
    from distill.recipe.schema import FilterConfig

    rows, _ = _planted(
        list(MATH.tasks("train", 12, 0, 1)), next(iter(MATH.tasks("eval", 20, 0, 1)))
    )
    for r in rows:
        r.verdict = Verdict.ok() if r.id != "wrong" else Verdict.fail("wrong answer")
    cfg = FilterConfig(
        drop_malformed=False,
        keep_failed=True,
        dedup_exact=False,
        dedup_near=False,
        decontaminate=False,
        max_per_task=None,
    )
    kept, funnel, dropped = filter_traces("math", rows, cfg, None)
    assert len(kept) == len(rows) and dropped == []
    skipped = [s["step"] for s in funnel.steps if s.get("skipped")]
    assert skipped == ["malformed", "dedup_exact", "dedup_near", "decontaminate"]
    assert all(s["in"] == s["out"] == len(rows) for s in funnel.steps)


def test_real_eval_records_are_decontaminated_against(tmp_path):
    from distill.filter.decontam import canonical
    from distill.filter.stage import build_index

    rec = {
        "question": "Natalia sold clips to 48 of her friends in April, and then she sold "
        "half as many clips in May. How many clips did Natalia sell altogether?",
        "answer": "In May she sold 48/2 = 24 clips.\n#### 72",
    }
    (tmp_path / "eval.jsonl").write_text(json.dumps(rec) + "\n")
    recipe = validate(
        {
            "name": "t",
            "output_dir": str(tmp_path / "out"),
            "domains": {
                "math": {
                    "eval_tasks": 5,
                    "source": {
                        "kind": "file",
                        "path": str(tmp_path / "eval.jsonl"),
                        "eval_path": str(tmp_path / "eval.jsonl"),
                    },
                }
            },
            "teachers": {"math": {"kind": "bootstrap"}},
        }
    )
    index = build_index(recipe)
    hit = index.contaminated(
        [rec["question"], "What is 3 + 4?"], [canonical({"answer": "72"}), None]
    )
    assert hit[0] >= 0 and index.evals[hit[0]].domain == "math" and hit[1] == -1
