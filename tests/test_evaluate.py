"""The report's scoring (pure functions) and its rendering: Markdown, JSON, PNG, table."""

import json
import math

import pytest

from distill.eval import report as rep


def test_pass_at_k_matches_the_combinatorial_definition():
    # 1 - C(n-c, k)/C(n, k) by brute force over all k-subsets of n samples with c correct
    from itertools import combinations

    for n, c, k in [(5, 0, 1), (5, 1, 1), (5, 2, 3), (4, 4, 2), (6, 3, 6), (10, 2, 4)]:
        samples = [1] * c + [0] * (n - c)
        subsets = list(combinations(samples, k))
        brute = sum(any(s) for s in subsets) / len(subsets)
        assert rep.pass_at_k(n, c, k) == pytest.approx(brute)
    assert rep.pass_at_k(4, 1, 1) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        rep.pass_at_k(3, 4, 1)


def test_score_aggregates_greedy_sampled_and_tokens():
    outcomes = [
        rep.Outcome("a", True, 10, [True, False, False, False]),
        rep.Outcome("b", True, 30, [False, False, False, False]),
        rep.Outcome("c", False, 99, [True, True, True, True]),
        rep.Outcome("d", False, 50, [False, False, False, False]),
    ]
    s = rep.score("student", "math", outcomes, k=4)
    assert s.pass1 == 0.5
    assert s.tokens_per_correct == 20  # only correct greedy answers count
    assert s.mean_tokens == pytest.approx((10 + 30 + 99 + 50) / 4)
    assert s.passk == pytest.approx(0.5)  # a and c have at least one correct sample
    assert s.sampled_pass1 == pytest.approx((0.25 + 0 + 1 + 0) / 4)
    none = rep.score("student", "math", [rep.Outcome("a", False, 5)], k=4)
    assert none.tokens_per_correct is None and none.passk is None


def _scores():
    def cell(model, domain, acc, tok):
        n = 10
        c = round(acc * n)
        outs = [rep.Outcome(f"{domain}{i}", i < c, tok, [i < c, False]) for i in range(n)]
        return rep.score(model, domain, outs, k=2)

    return [
        cell("teacher:math", "math", 0.8, 40),
        cell("teacher:logic", "logic", 0.5, 20),
        cell("student", "math", 0.7, 44),
        cell("student", "logic", 0.5, 18),
    ]


def test_recovery_and_targets_say_met_or_missed_and_by_how_much():
    r = rep.build(_scores(), name="t", models={}, target_teacher_acc=0.6, target_recovery=0.9)
    assert r["recovery"]["math"]["ratio"] == pytest.approx(0.7 / 0.8)
    assert r["recovery"]["logic"]["ratio"] == pytest.approx(1.0)
    t = {x["target"]: x for x in r["targets"]}
    assert t["teacher:math pass@1 on math"]["met"]
    assert not t["teacher:logic pass@1 on logic"]["met"]
    assert t["teacher:logic pass@1 on logic"]["gap"] == pytest.approx(0.1)
    miss = t["student recovery of teacher:math on math"]
    assert not miss["met"] and miss["gap"] == pytest.approx(0.9 - 0.875)
    assert t["student recovery of teacher:logic on logic"]["met"]
    assert rep.recovery(0.3, 0.0) is None


def test_write_produces_markdown_json_and_a_small_png(tmp_path):
    r = rep.build(
        _scores(),
        name="demo",
        models={"student": {"kind": "student"}},
        target_teacher_acc=0.6,
        target_recovery=0.9,
    )
    paths = rep.write(r, tmp_path)
    md = paths["md"].read_text()
    for needle in (
        "| math |",
        "| logic |",
        "teacher:math",
        "student",
        "87.5%",
        "**MISSED** by 2.5 points",
        "Targets: 2 of 4 met",
    ):
        assert needle in md, needle
    assert json.loads(paths["json"].read_text())["recovery"]["math"]["student"] == pytest.approx(
        0.7
    )
    png = paths["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and 5_000 < len(png) < 200_000


def test_print_table_shows_every_domain_and_model():
    from rich.console import Console

    console = Console(record=True, width=200)
    r = rep.build(_scores(), name="demo", models={}, target_recovery=0.9)
    rep.print_table(r, console)
    text = console.export_text()
    for needle in ("math", "logic", "teacher:math", "student", "MISSED", "87.5%"):
        assert needle in text
    assert not math.isnan(r["recovery"]["math"]["ratio"])


def test_recovery_target_when_the_teacher_solved_nothing_is_not_applicable():
    outs = [rep.Outcome("a", False, 5)]
    scores = [rep.score("teacher:code", "code", outs, 1), rep.score("student", "code", outs, 1)]
    r = rep.build(scores, name="t", models={}, target_teacher_acc=0.5, target_recovery=0.9)
    t = {x["target"]: x for x in r["targets"]}
    assert not t["teacher:code pass@1 on code"]["met"]  # the teacher's own target flags it
    rec = t["student recovery of teacher:code on code"]
    assert rec["met"] is None and rec["value"] is None
    md = rep.to_markdown(r)
    assert (
        "not applicable: the teacher solved nothing" in md
        and "Targets: 0 of 1 met (1 not applicable)" in md
    )


def test_by_kind_counts_passes_per_kind_and_the_report_shows_them(tmp_path):
    assert rep.by_kind(["a", "b", "a", None], [True, False, False, True]) == {
        "a": [1, 2],
        "b": [0, 1],
    }
    assert rep.by_kind([None, None], [True, False]) is None
    scores = _scores()
    scores[0].by_kind = {"addition": [7, 9], "carry": [1, 1]}
    scores[2].by_kind = {"addition": [6, 9], "carry": [1, 1]}
    r = rep.build(scores, name="demo", models={})
    md = rep.write(r, tmp_path)["md"].read_text()
    assert "## Greedy pass@1 by kind of task" in md
    assert "| addition | 7/9 | 6/9 |" in md and "| carry | 1/1 | 1/1 |" in md
    assert "**logic**" not in md  # no kinds named there
    many = {f"k{i}": [0, 1] for i in range(rep.MAX_KINDS + 1)}
    scores[0].by_kind = scores[2].by_kind = many
    assert "by kind" not in rep.to_markdown(rep.build(scores, name="demo", models={}))


def test_time_and_memory_targets_add_up_the_stages_and_say_by_how_much(tmp_path):
    cost = {
        "teachers": {"seconds": 400.0, "peak_rss_mb": 900},
        "generate": {"seconds": 60.0, "peak_rss_mb": 700},
        "train": {"seconds": 280.0, "peak_rss_mb": 1200},
        "eval": {"seconds": 20.0, "peak_rss_mb": 600},
    }
    r = rep.build(_scores(), name="demo", models={}, cost=cost, target_wall_s=600, target_peak_gb=4)
    wall, mem = r["targets"][-2:]
    assert wall["value"] == 760 and wall["met"] is False and wall["gap"] == 160
    assert mem["value"] == pytest.approx(1200 / 1024) and mem["met"] is True
    md = rep.write(r, tmp_path)["md"].read_text()
    assert (
        "| pipeline time (stage seconds added up) | <= 600 s | 760 s | **MISSED** by 160 s |" in md
    )
    assert "| peak memory (largest of any stage) | <= 4.00 GB | 1.17 GB | met |" in md
    assert "| train | 280 | 1.17 GB |" in md and "| all | 760 | |" in md
    cost["generate"] = {"seconds": None, "peak_rss_mb": None}  # a stage run by an older version
    r = rep.build(_scores(), name="demo", models={}, cost=cost, target_wall_s=600)
    assert r["targets"][-1]["met"] is None
    assert "not measured: no figure for generate" in rep.to_markdown(r)
    assert "Targets: 0 of 0 met (1 not applicable)" in rep.to_markdown(r)


def test_token_target_compares_the_student_with_the_supervised_teacher(tmp_path):
    # teacher:math 40 tokens per correct, student 44 (1.1x); teacher:logic 20, student 18
    r = rep.build(_scores(), name="demo", models={}, target_tokens_ratio=0.95)
    t = {x["target"]: x for x in r["targets"]}
    math_t = t["student tokens per correct / supervised teacher:math's on math"]
    assert math_t["value"] == pytest.approx(1.1) and math_t["met"] is False
    assert math_t["gap"] == pytest.approx(0.15)
    assert t["student tokens per correct / supervised teacher:logic's on logic"]["met"] is True
    md = rep.write(r, tmp_path)["md"].read_text()
    assert "| <= 0.95x | 1.10x | **MISSED** by 0.15x |" in md
    # after specialist RL the goal is against the supervised teacher, not the sharpened one
    scores = _scores()
    sup = rep.score("teacher:math:supervised", "math", [rep.Outcome("m", True, 60)], k=1)
    r = rep.build(scores + [sup], name="demo", models={}, target_tokens_ratio=0.8)
    t = {x["target"]: x for x in r["targets"]}
    assert t["student tokens per correct / supervised teacher:math's on math"]["value"] == (
        pytest.approx(44 / 60)
    )
    # a student that solved nothing has no tokens per correct answer: not measured
    none = [rep.score("teacher:code", "code", [rep.Outcome("a", True, 5)], 1)]
    none += [rep.score("student", "code", [rep.Outcome("a", False, 5)], 1)]
    (t,) = rep.build(none, name="t", models={}, target_tokens_ratio=0.8)["targets"]
    assert t["met"] is None and "not measured" in t["note"]


def _bar_labels(ax) -> list[str]:
    return [t.get_text() for t in ax.texts]


def test_the_chart_labels_every_bar_zero_included_and_the_rl_student_has_its_own_bars():
    import matplotlib.pyplot as plt

    def cell(model, domain, acc):
        outs = [rep.Outcome(f"{domain}{i}", i < round(10 * acc), 12) for i in range(10)]
        return rep.score(model, domain, outs, k=1)

    scores = [cell("teacher:math", "math", 0.8), cell("teacher:agents", "agents", 0.0)]
    scores += [cell("student", "math", 0.6), cell("student", "agents", 0.0)]
    r = rep.build(scores, name="demo", models={})
    assert [label for label, _, _ in rep.series(r)] == ["teacher", "student"]
    fig = rep.figure(r)
    acc, tok = fig.axes
    assert sorted(_bar_labels(acc)) == ["0%", "0%", "60%", "80%"]  # 0% is labelled too
    assert sorted(_bar_labels(tok)) == ["12", "12", "n/a", "n/a"]  # nothing correct: n/a
    ticks = [t.get_text() for t in acc.get_xticklabels()]
    assert ticks == ["math\nrecovery 75%", "agents"]  # no recovery of a 0% teacher
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["teacher", "student"]
    plt.close(fig)
    scores += [cell("student:distilled", "math", 0.5), cell("student:distilled", "agents", 0.1)]
    r = rep.build(scores, name="demo", models={})
    labels = [label for label, _, _ in rep.series(r)]
    assert labels == ["teacher", "student (distilled)", "student (+ RL)"]
    fig = rep.figure(r)
    assert sorted(_bar_labels(fig.axes[0])) == ["0%", "0%", "10%", "50%", "60%", "80%"]
    plt.close(fig)


def test_the_one_off_chart_draws_the_evaluated_model_and_nothing_else(tmp_path):
    import matplotlib.pyplot as plt

    outs = [rep.Outcome("a", True, 30), rep.Outcome("b", False, 9)]
    scores = [rep.score("my-model", d, outs, k=1) for d in ("math", "logic")]
    r = rep.build(scores, name="my-model", models={"my-model": {"kind": "hf"}})
    assert [label for label, _, _ in rep.series(r)] == ["my-model"]
    fig = rep.figure(r)
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    texts += [ax.get_title() for ax in fig.axes] + [fig.get_suptitle()]
    assert texts.count("50%") == 2 and not fig.legends  # one model: its name is the title
    assert not any("teacher" in t or "recovery" in t or "specialist" in t for t in texts)
    assert fig.get_suptitle() == "my-model: held-out evaluation"
    plt.close(fig)
    assert rep.write(r, tmp_path)["png"].read_bytes()[:4] == b"\x89PNG"


def test_print_table_goes_to_stderr_and_shows_recovery_only_with_a_teacher(capsys):
    rep.print_table(rep.build(_scores(), name="demo", models={}, target_recovery=0.9))
    out, err = capsys.readouterr()
    assert out == "" and "demo: held-out evaluation" in err and "recovery" in err
    outs = [rep.Outcome("a", True, 30)]
    rep.print_table(rep.build([rep.score("m", "math", outs, k=1)], name="m", models={}))
    err = capsys.readouterr().err
    assert "100.0%" in err and "recovery" not in err


def test_standard_errors_and_what_each_step_bought():
    """Every cell carries one standard error; with specialist RL and mixed RL the report
    has a table of what each step bought, recovery at both points."""
    scores = _scores() + [
        _scores()[0].__class__(**{**rep.asdict(_scores()[0]), "model": "teacher:math:supervised",
                                  "pass1": 0.6, "tokens_per_correct": 50.0}),
        _scores()[2].__class__(**{**rep.asdict(_scores()[2]), "model": "student:distilled",
                                  "pass1": 0.6}),
    ]  # fmt: skip
    r = rep.build(scores, name="t", models={})
    se = {(s["model"], s["domain"]): s["stderr"] for s in r["scores"]}
    assert se[("teacher:math", "math")] == pytest.approx(math.sqrt(0.8 * 0.2 / 10))
    assert r["recovery"]["math"]["teacher_supervised"] == 0.6
    assert r["recovery"]["math"]["distilled_ratio"] == pytest.approx(0.6 / 0.8)
    md = rep.to_markdown(r)
    assert "80.0% ±12.6" in md and "What each step bought" in md
    assert (
        "| math | 60.0% (50.0) | 80.0% (40.0) | 60.0% (44.0) | 70.0% (44.0) | 75.0% → 87.5% |" in md
    )
    assert "What each step bought" not in rep.to_markdown(rep.build(_scores(), name="t", models={}))
