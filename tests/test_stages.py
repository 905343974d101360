"""Stage bookkeeping: layout, fingerprints, skip-if-up-to-date, and the recipe log."""

from __future__ import annotations

import hashlib
from pathlib import Path

from ruamel.yaml import YAML

from distill.messages import Trace
from distill.progress import log_recipe, track
from distill.recipe import load_recipe, validate
from distill.shards import ShardWriter
from distill.stages import (
    DIRS,
    STAGES,
    fingerprint,
    invalidate,
    mark_done,
    record_of,
    stage_dir,
    timed,
    up_to_date,
)

ROOT = Path(__file__).parents[1]


def recipe(tmp_path: Path, *overrides: str):
    return load_recipe(ROOT / "recipes" / "demo.yaml", [f"output_dir={tmp_path}", *overrides])


def test_layout_follows_the_design(tmp_path):
    r = recipe(tmp_path)
    assert STAGES == ["teachers", "generate", "filter", "train", "eval"]
    assert {s: stage_dir(r, s) for s in STAGES} == {s: tmp_path / DIRS[s] for s in STAGES}
    assert [DIRS[s] for s in STAGES] == ["teachers", "raw", "clean", "student", "eval"]


def test_up_to_date_until_its_sections_change(tmp_path):
    r = recipe(tmp_path)
    assert not up_to_date(r, "filter") and record_of(r, "filter") is None
    mark_done(r, "filter", rows=3)
    assert up_to_date(r, "filter") and record_of(r, "filter")["rows"] == 3
    assert up_to_date(recipe(tmp_path, "train.lr=0.1"), "filter")  # filter does not read train
    assert not up_to_date(recipe(tmp_path, "filter.max_per_task=3"), "filter")
    invalidate(r, "filter")
    assert not up_to_date(r, "filter")


def test_student_mixture_weights_change_only_train(tmp_path):
    # tuning the student's mixture must not retrain the teachers or regenerate traces
    r = recipe(tmp_path)
    for stage in STAGES:
        mark_done(r, stage)
    for change in ("domains.logic.sampling_weight=2.5", "domains.math.loss_weight=0.5"):
        tuned = recipe(tmp_path, change)
        stale = [s for s in STAGES if not up_to_date(tuned, s)]
        assert stale == ["train"], change  # eval follows once train has rerun (upstream)
    assert not up_to_date(recipe(tmp_path, "domains.logic.difficulty=2"), "teachers")


def test_upstream_rerun_and_changed_shards_invalidate_downstream(tmp_path):
    r = recipe(tmp_path)
    with ShardWriter(stage_dir(r, "generate") / "math") as w:
        w.write(
            [Trace(id="a", task_id="t", domain="math", messages=[{"role": "user", "content": "q"}])]
        )
    mark_done(r, "generate")
    mark_done(r, "filter")
    assert up_to_date(r, "filter")
    # the raw shards change (a rerun with other samples, or an edit by hand)
    with ShardWriter(stage_dir(r, "generate") / "math") as w:
        w.write(
            [
                Trace(
                    id="b", task_id="t", domain="math", messages=[{"role": "user", "content": "q2"}]
                )
            ]
        )
    assert not up_to_date(r, "filter")
    mark_done(r, "filter")
    before = fingerprint(r, "filter")
    mark_done(recipe(tmp_path, "generate.temperature=0.1"), "generate")  # upstream reran
    assert fingerprint(r, "filter") != before and not up_to_date(r, "filter")


def test_log_recipe_writes_the_resolved_recipe(tmp_path, capsys):
    r = recipe(tmp_path, "train.lr=0.0007")
    log_recipe(r, "train")
    err = capsys.readouterr().err
    assert "train" in err and fingerprint(r, "train") in err and '"lr": 0.0007' in err
    saved = (stage_dir(r, "train") / "_recipe.yaml").read_text()
    assert validate(YAML(typ="safe").load(saved)) == r


def test_track_yields_everything(capsys):
    assert list(track(range(5), "count", unit="rows")) == [0, 1, 2, 3, 4]
    assert "count" in capsys.readouterr().err


def test_mark_done_keeps_the_resolved_recipe(tmp_path):
    r = recipe(tmp_path, "eval.pass_k=3")
    mark_done(r, "eval")
    saved = YAML(typ="safe").load((stage_dir(r, "eval") / "_recipe.yaml").read_text())
    assert validate(saved).eval.pass_k == 3


def test_retrained_weights_rerun_what_reads_them(tmp_path):
    """eval depends on the student's weights, not only on train's recipe sections: the
    same recipe retrained to other bytes makes eval stale; the same bytes do not."""
    r = recipe(tmp_path)
    model = stage_dir(r, "train") / "model.safetensors"
    model.parent.mkdir(parents=True)
    model.write_bytes(b"weights one")
    mark_done(r, "teachers")
    mark_done(r, "train")
    mark_done(r, "eval")
    assert up_to_date(r, "eval")
    mark_done(r, "train")  # retrained, identical weights
    assert up_to_date(r, "eval")
    model.write_bytes(b"weights two")
    mark_done(r, "train")
    assert record_of(r, "train")["weights"] == {
        "model.safetensors": hashlib.sha256(b"weights two").hexdigest()
    }
    assert not up_to_date(r, "eval")


def test_timed_notes_seconds_and_memory_of_a_completed_stage_only(tmp_path):
    r = recipe(tmp_path)

    def completes(recipe):
        mark_done(recipe, "filter", rows=1)
        return "out"

    assert timed(r, "filter", completes, r) == "out"
    rec = record_of(r, "filter")
    assert rec["rows"] == 1 and rec["seconds"] >= 0 and rec["peak_rss_mb"] > 10
    assert up_to_date(r, "filter")  # the figures are not part of the fingerprint
    before = record_of(r, "filter")
    timed(r, "filter", lambda recipe: None, r)  # did not complete now: record untouched
    assert record_of(r, "filter") == before
