"""Stage headers: why a stage runs and which recipe keys changed since its last run (old
-> new), in a few lines; the whole resolved recipe goes to a file, not the screen."""

from __future__ import annotations

from pathlib import Path

import pytest
from ruamel.yaml import YAML

import distill.stages
from distill import pipeline
from distill.pipeline import Why, diff, why_run
from distill.recipe.schema import load_recipe, validate
from distill.stages import STAGES, fingerprint, header, invalidate, mark_done, record_dir, run_stage

ROOT = Path(__file__).parents[1]


def recipe(tmp_path: Path, *overrides: str):
    return load_recipe(ROOT / "recipes" / "demo.yaml", [f"output_dir={tmp_path}", *overrides])


@pytest.fixture
def no_work(monkeypatch):
    """Every stage completes at once (the bookkeeping around it is what is tested)."""
    monkeypatch.setattr(distill.stages, "stage_fn", lambda stage: lambda recipe, **kw: {})


def test_first_run_header_is_short_and_the_whole_recipe_goes_to_a_file(tmp_path, capsys):
    r = recipe(tmp_path, "train.learning_rate=0.0007")
    header(r, "train")
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines[0] == "── train · first run (never completed here)"
    assert len(lines) == 2 and fingerprint(r, "train") in lines[1] and "_recipe.yaml" in err
    assert "learning_rate" not in err and "{" not in err  # no section dumps
    saved = YAML(typ="safe").load((record_dir(r, "train") / "_recipe.yaml").read_text())
    assert validate(saved) == r and validate(saved).train.learning_rate == 0.0007


def test_a_rerun_names_the_changed_keys_with_old_and_new_values(tmp_path, capsys, no_work):
    before = recipe(tmp_path)
    run_stage(before, "train")
    lr = before.train.learning_rate
    after = recipe(tmp_path, "train.learning_rate=0.0007", "domains.math.loss_weight=2.5")
    capsys.readouterr()
    run_stage(after, "train")
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0] == "── train · recipe section domains, train changed"
    assert sorted(lines[1:3]) == [
        f"   domains.math.loss_weight: {before.domains['math'].loss_weight} → 2.5",
        f"   train.learning_rate: {lr} → 0.0007",
    ]
    assert len(lines) == 4  # and where it writes
    # the student-only weight is not part of what generate reads: no change to report
    assert "loss_weight" not in " ".join(k for k, _, _ in why_run(after, "generate").changes)


def test_why_upstream_force_incomplete_and_unchanged(tmp_path, no_work):
    r = recipe(tmp_path)
    for stage in ("generate", "filter"):
        run_stage(r, stage)
    assert why_run(r, "filter").reason == "up to date; run as asked"
    hotter = recipe(tmp_path, "generate.temperature=0.1")
    run_stage(hotter, "generate")
    assert why_run(hotter, "filter").reason == "upstream generate reran"
    assert why_run(hotter, "filter", force=True).reason.startswith("--force")
    invalidate(hotter, "filter")  # e.g. stopped at its time limit
    cooler = recipe(tmp_path, "generate.temperature=0.1", "filter.near_threshold=0.8")
    why = why_run(cooler, "filter")
    assert why.reason.startswith("its last run did not complete; recipe section filter changed")
    assert [(k, new) for k, _, new in why.changes] == [("filter.near_threshold", 0.8)]


def test_diff_gives_dotted_keys_absent_sides_and_lines_are_bounded():
    old = {"train": {"lr": 0.003, "betas": [0.9, 0.95]}, "domains": {"math": {"w": 1}}}
    new = {"train": {"learning_rate": 0.003, "betas": [0.9, 0.99]}, "domains": {"math": {"w": 1}}}
    changes = diff(old, new)
    assert [k for k, _, _ in changes] == ["train.lr", "train.betas", "train.learning_rate"]
    lines = Why("x", changes).lines()
    assert lines[0] == "train.lr: 0.003 → (absent)"
    assert lines[1] == "train.betas: [0.9, 0.95] → [0.9, 0.99]"
    assert lines[2] == "train.learning_rate: (absent) → 0.003"
    many = Why("x", [(f"k{i}", "a" * 200, i) for i in range(20)]).lines()
    assert len(many) == pipeline.MAX_SHOWN + 1 and many[-1] == "… and 12 more changed keys"
    assert all(len(line) < 2 * pipeline.MAX_VALUE for line in many)


def test_distill_run_prints_one_header_per_stage_and_one_line_per_skip(tmp_path, capsys, no_work):
    r = recipe(tmp_path)
    first = pipeline.run(r)
    err = capsys.readouterr().err
    assert [s["status"] for s in first] == ["ran"] * len(STAGES)
    for stage in STAGES:  # train and rl included
        assert err.count(f"── {stage} · first run") == 1, stage
    assert len(err.splitlines()) < 5 * len(STAGES)
    pipeline.run(r)
    err = capsys.readouterr().err
    assert all(f"── {s} · skipped: up to date" in err for s in STAGES)
    third = pipeline.run(recipe(tmp_path, "eval.pass_k=3"))
    err = capsys.readouterr().err
    assert [s["stage"] for s in third if s["status"] == "ran"] == ["eval"]
    assert "── eval · recipe section eval changed\n" in err
    assert f"   eval.pass_k: {r.eval.pass_k} → 3\n" in err
    mark_done(r, "teachers")  # same fingerprint: nothing to rerun
    assert all(s["status"] == "skipped" for s in pipeline.run(recipe(tmp_path, "eval.pass_k=3")))


def test_a_header_prints_paths_and_reasons_as_they_are(tmp_path, capsys):
    r = recipe(tmp_path / "runs[v2]")  # rich would read [v2] as markup
    header(r, "filter")
    assert f"→ {tmp_path / 'runs[v2]' / 'clean'} (" in capsys.readouterr().err
