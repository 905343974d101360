"""Stage bookkeeping: layout, fingerprints, skip-if-up-to-date, and the recipe log."""

from __future__ import annotations

import hashlib
from pathlib import Path

from ruamel.yaml import YAML

from distill.messages import Trace
from distill.progress import track
from distill.recipe import Recipe
from distill.recipe.schema import load_recipe, validate
from distill.shards import ShardWriter
from distill.stages import (
    BY_NAME,
    STAGES,
    TABLE,
    fingerprint,
    header,
    invalidate,
    mark_done,
    record_dir,
    record_of,
    run_stage,
    stage_dir,
    stage_fn,
    up_to_date,
)

ROOT = Path(__file__).parents[1]


def recipe(tmp_path: Path, *overrides: str):
    return load_recipe(ROOT / "recipes" / "demo.yaml", [f"output_dir={tmp_path}", *overrides])


def test_layout_follows_the_design(tmp_path):
    r = recipe(tmp_path)
    assert STAGES == ["teachers", "generate", "filter", "train", "rl", "eval"]
    assert [stage_dir(r, s) for s in STAGES] == [
        tmp_path / d for d in ("teachers", "raw", "clean", "student", "rl", "eval")
    ]


def test_the_table_of_stages_is_whole():
    """Every row names a module with a run(recipe), recipe sections that exist, upstream
    stages that come before it, and a CLI command of its name."""
    from typer.main import get_command

    from distill.cli import app

    commands = set(get_command(app).commands)
    for i, s in enumerate(TABLE):
        assert callable(stage_fn(s.name)), s.name
        assert set(s.sections) <= set(Recipe.model_fields), s.name
        assert all(STAGES.index(u) < i for u in s.upstream), s.name
        assert s.name in commands, s.name
    assert len({s.out for s in TABLE}) == len(TABLE)  # one writer per directory


def test_up_to_date_until_its_sections_change(tmp_path):
    r = recipe(tmp_path)
    assert not up_to_date(r, "filter") and record_of(r, "filter") is None
    mark_done(r, "filter", rows=3)
    assert up_to_date(r, "filter") and record_of(r, "filter")["rows"] == 3
    assert up_to_date(
        recipe(tmp_path, "train.learning_rate=0.1"), "filter"
    )  # filter does not read train
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


def test_track_yields_everything(capsys):
    assert list(track(range(5), "count", unit="rows")) == [0, 1, 2, 3, 4]
    assert "count" in capsys.readouterr().err


def test_header_keeps_the_resolved_recipe(tmp_path):
    r = recipe(tmp_path, "eval.pass_k=3")
    header(r, "eval")
    saved = YAML(typ="safe").load((record_dir(r, "eval") / "_recipe.yaml").read_text())
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


def test_run_stage_records_a_completed_stage_with_its_seconds_and_memory(tmp_path, monkeypatch):
    import distill.stages

    r = recipe(tmp_path)
    result = {"rows": {"math": 1}, "record": {"rows": 1}}
    monkeypatch.setattr(distill.stages, "stage_fn", lambda stage: lambda recipe: result)
    assert run_stage(r, "filter") is result
    rec = record_of(r, "filter")
    assert rec["rows"] == 1 and rec["seconds"] >= 0 and rec["peak_rss_mb"] > 10
    assert up_to_date(r, "filter")  # the figures are not part of the fingerprint
    assert (record_dir(r, "filter") / "_recipe.yaml").exists()
    before = record_of(r, "filter")
    for stopped in (None, {"complete": False, "record": {"rows": 2}}):
        monkeypatch.setattr(distill.stages, "stage_fn", lambda stage, s=stopped: lambda r: s)
        run_stage(r, "filter")  # did not complete now: record untouched
        assert record_of(r, "filter") == before
    assert BY_NAME["teachers"].force_arg and not BY_NAME["filter"].force_arg


def test_run_only_fields_rerun_nothing(tmp_path):
    """Logging, checkpoint and memory settings change how a stage runs, not what it
    writes: setting them leaves every stage up to date; a real setting of the same section
    still reruns."""
    r = recipe(tmp_path)
    for stage in STAGES:
        mark_done(r, stage)
    for change in ("train.logging_steps=7", "train.save_steps=50", "train.gradient_checkpointing=true",
                   "rl.release_decoder_memory=false", "rl.logging_steps=3",
                   "teachers.math.train.save_total_limit=5"):  # fmt: skip
        tuned = recipe(tmp_path, change)
        assert [s for s in STAGES if not up_to_date(tuned, s)] == [], change
    assert not up_to_date(recipe(tmp_path, "train.learning_rate=0.1"), "train")
    assert not up_to_date(recipe(tmp_path, "rl.learning_rate=0.001"), "rl")


def test_resume_fingerprints_leave_out_the_same_run_only_fields():
    """The trainers' checkpoint fingerprints read the same marks as the stages'."""
    from distill.recipe.base import fingerprint_data
    from distill.recipe.rl import RLConfig
    from distill.recipe.schema import TrainConfig

    base = fingerprint_data(TrainConfig(), ignore=("max_time_s",))
    for change in ({"logging_steps": 3}, {"report_to": []}, {"save_steps": 7},
                   {"gradient_checkpointing": True}, {"max_time_s": 60}):  # fmt: skip
        assert fingerprint_data(TrainConfig(**change), ignore=("max_time_s",)) == base, change
    assert fingerprint_data(TrainConfig(learning_rate=0.1), ignore=("max_time_s",)) != base
    rl = fingerprint_data(RLConfig())
    assert fingerprint_data(RLConfig(release_decoder_memory=False)) == rl
    assert fingerprint_data(RLConfig(temperature=0.3)) != rl
