"""Recipes: every file in recipes/ loads; errors are one line naming key, type, value."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from distill.recipe.edit import set_keys
from distill.recipe.schema import Recipe, RecipeError, load_recipe
from teachers.base import REGISTRY

ROOT = Path(__file__).parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
BASE = "name: t\ndomains: {math: {}}\nteachers: {math: {kind: bootstrap}}\n"


def test_there_are_recipes():
    assert ROOT / "recipes" / "demo.yaml" in RECIPES


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_loads(path):
    r = load_recipe(path)
    assert r.name and r.active_domains()
    assert all(d in r.teachers for d in r.active_domains())


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_gives_its_agent_tasks_the_turns_they_need(path):
    # an episode cut at generate.max_turns has no answer: a recipe with too few turns
    # caps every model's accuracy (gpu.yaml had 6 for tasks needing up to 8: 37% lost)
    from distill.eval.stage import eval_tasks
    from distill.rollout import turn_budget_warning
    from teachers.base import get_domain

    r = load_recipe(path)
    for d in r.active_domains():
        if r.domains[d].source.kind != "file":
            tasks = eval_tasks(d, r.domains[d], r.seed, n=300)
            assert turn_budget_warning(get_domain(d), tasks, r.generate.max_turns) is None


def recipe_file(tmp_path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(BASE + text)
    return p


@pytest.mark.parametrize(
    "text, message",
    [
        ("train: {learning_rate: fast}", "train.learning_rate: expected a number, got 'fast'"),
        ("trian: {}", "trian: unknown key; did you mean 'train'?"),
        ("train: {learning_rate: true}", "train.learning_rate: expected a number, got True"),
        ("train: {learning_rate: -1}", "train.learning_rate: expected a value > 0.0, got -1"),
        ("train: {max_steps: 1.5}", "train.max_steps: expected an integer, got 1.5"),
        ("train: {adam_beta2: 1}", "train.adam_beta2: expected a value < 1.0, got 1"),
        ("train: {kd: {alpah: 1}}", "train.kd.alpah: unknown key; did you mean 'alpha'?"),
        (
            "train: {lr_scheduler_type: cosin}",
            "train.lr_scheduler_type: expected one of cosine, linear, constant, got 'cosin'; did you mean 'cosine'?",
        ),
        ("generate: 5", "generate: expected a mapping, got 5"),
        ("filter: {near_threshold: 2}", "filter.near_threshold: expected a value <= 1.0, got 2"),
    ],
)
def test_errors_are_one_clear_line(tmp_path, text, message):
    with pytest.raises(RecipeError) as e:
        load_recipe(recipe_file(tmp_path, text))
    assert str(e.value) == f"{tmp_path / 'r.yaml'}: {message}"
    assert "\n" not in str(e.value)


def _renames():
    """(old key path, new key paths) for every renamed key wherever its section appears."""
    from distill.recipe.doc import sections

    for paths, cls in sections():
        for old, new in cls.renamed.items():
            for path in paths:
                prefix = "" if path == "(top level)" else path.replace("<domain>", "math") + "."
                names = [new] if isinstance(new, str) else list(new)
                yield prefix + old, [prefix + n for n in names], cls


RENAMES = list(_renames())


def test_renames_cover_the_trl_names():
    paths = {old: new for old, new, _ in RENAMES}
    assert paths["train.lr"] == ["train.learning_rate"]
    assert paths["teachers.math.train.max_seq_len"] == ["teachers.math.train.max_length"]
    assert paths["rl.group_size"] == ["rl.num_generations"]
    assert paths["teachers.math.rl.trackers"] == ["teachers.math.rl.report_to"]
    assert paths["rl.domains.math.kl_coef"] == ["rl.domains.math.beta"]
    assert paths["train.betas"] == ["train.adam_beta1", "train.adam_beta2"]
    for old, new, cls in RENAMES:  # every new name is a field, no old one still is
        assert all(n.rsplit(".", 1)[1] in cls.model_fields for n in new), new
        assert old.rsplit(".", 1)[1] not in cls.model_fields, old


@pytest.mark.parametrize("old, new", [(o, n) for o, n, _ in RENAMES], ids=lambda x: str(x))
def test_an_old_key_is_an_error_naming_the_new_one(tmp_path, old, new):
    """In the YAML and in --set alike: one line, the new key(s), nothing else."""
    want = f"{old}: renamed to {' and '.join(new)}"
    data = "rl: {domains: {math: {}}}\n" if old.startswith("rl.domains") else ""
    for overrides in ([f"{old}=1"], [f"{old}=[1]"]):
        with pytest.raises(RecipeError) as e:
            load_recipe(recipe_file(tmp_path, data), overrides)
        assert str(e.value) == f"--set {overrides[0]}: {want}"  # blamed on what set it


def test_an_old_recipe_gets_every_rename_in_one_line(tmp_path):
    p = recipe_file(tmp_path, "train: {lr: 0.1, log_every: 5, max_steps: x}\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    assert str(e.value).endswith(
        ": train.lr: renamed to train.learning_rate; "
        "train.log_every: renamed to train.logging_steps (and 1 more)"
    )


def test_recipe_set_refuses_an_old_key_and_leaves_the_file(tmp_path):
    p = recipe_file(tmp_path, "train:\n  learning_rate: 0.1  # peak\n")
    text = p.read_text()
    with pytest.raises(RecipeError, match=r"train\.lr: renamed to train\.learning_rate$"):
        set_keys(p, ["train.lr=0.2"])
    assert p.read_text() == text


def test_a_tracker_that_is_not_installed_is_an_error(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "wandb" else real(n, *a)
    )
    for key in ("train", "teachers.math.rl"):
        with pytest.raises(RecipeError) as e:
            load_recipe(recipe_file(tmp_path, ""), [f"{key}.report_to=[tensorboard, wandb]"])
        assert str(e.value).endswith(f"{key}.report_to: wandb is not installed (pip install wandb)")
    assert load_recipe(recipe_file(tmp_path, ""), ["train.report_to=[tensorboard]"])


def test_unknown_domain_suggests_the_closest(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("name: t\ndomains: {mathh: {}}\nteachers: {math: {}}\n")
    with pytest.raises(
        RecipeError, match=r"domains\.mathh: unknown domain; did you mean 'math'\?$"
    ):
        load_recipe(p)
    p.write_text("name: t\ndomains: {math: {}}\nteachers: {math: {}, cod: {}}\n")
    with pytest.raises(RecipeError, match=r"teachers\.cod: unknown domain; did you mean 'code'\?$"):
        load_recipe(p)


def test_domain_names_come_from_the_registry():
    r = Recipe.model_validate(
        {"name": "x", "domains": {d: {} for d in REGISTRY}, "teachers": {d: {} for d in REGISTRY}}
    )
    assert r.active_domains() == list(REGISTRY)


def test_cross_field_rules(tmp_path):
    with pytest.raises(RecipeError, match=r"teachers\.math\.path: required for kind=hf"):
        load_recipe(recipe_file(tmp_path, ""), ["teachers.math.kind=hf"])
    with pytest.raises(RecipeError, match="teachers: no teacher for domain code"):
        load_recipe(recipe_file(tmp_path, ""), ["domains.code={}"])


def test_bad_files(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    p = tmp_path / "bad.yaml"
    p.write_text("name: t\ntrain: [\n")
    with pytest.raises(RecipeError, match=r"bad.yaml: line \d+ invalid YAML"):
        load_recipe(p)
    p.write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="expected a mapping at the top level"):
        load_recipe(p)
    p.write_text("seed: 1\n")
    with pytest.raises(RecipeError, match="name: required key is missing"):
        load_recipe(p)


def test_overrides_are_coerced_like_yaml_and_win(tmp_path):
    p = recipe_file(tmp_path, "train: {learning_rate: 0.1}\n")
    r = load_recipe(
        p,
        [
            "train.learning_rate=3e-4",
            "train.report_to=[tensorboard]",
            "domains.math.source.kind=file",
            "domains.math.source.path=gsm8k.jsonl",
            "train.max_steps=null",
            "seed=7",
        ],
    )
    assert r.train.learning_rate == 3e-4 and r.train.report_to == ["tensorboard"] and r.seed == 7
    assert r.domains["math"].source.kind == "file" and r.train.max_steps is None
    assert load_recipe(p).train.learning_rate == 0.1  # the file itself is untouched
    with pytest.raises(RecipeError, match="expected key.path=value"):
        load_recipe(p, ["train.learning_rate"])
    with pytest.raises(RecipeError, match="learning_rate is not a section"):
        load_recipe(p, ["train.learning_rate.x=1"])
    with pytest.raises(RecipeError, match="train.learning_rate: expected a number, got 'fast'"):
        load_recipe(p, ["train.learning_rate=fast"])


def test_fingerprint_tracks_sections(tmp_path):
    p = recipe_file(tmp_path, "")
    a, b = load_recipe(p), load_recipe(p, ["train.learning_rate=0.1"])
    assert a.fingerprint("filter") == b.fingerprint("filter")
    assert a.fingerprint("train") != b.fingerprint("train") and a.fingerprint() != b.fingerprint()


def test_set_changes_one_value_and_keeps_comments(tmp_path):
    p = tmp_path / "demo.yaml"
    shutil.copy(ROOT / "recipes" / "demo.yaml", p)
    before = p.read_text().splitlines()
    set_keys(p, ["train.learning_rate=0.0003"])
    after = p.read_text().splitlines()
    changed = [(a, b) for a, b in zip(before, after, strict=True) if a != b]
    assert len(changed) == 1 and "learning_rate:" in changed[0][1] and "0.0003" in changed[0][1]
    assert load_recipe(p).train.learning_rate == 0.0003
    comments = [line for line in before if line.lstrip().startswith("#") or " #" in line]
    assert comments and all(c in after for c in comments if "learning_rate:" not in c)


def test_set_adds_missing_sections_and_refuses_invalid(tmp_path):
    p = recipe_file(tmp_path, "# keep me\ntrain:\n  learning_rate: 0.1  # peak\n")
    set_keys(p, ["train.kd.enabled=true", "generate.samples_per_task=2"])
    text = p.read_text()
    assert "# keep me" in text and "# peak" in text
    r = load_recipe(p)
    assert r.train.kd.enabled and r.generate.samples_per_task == 2
    with pytest.raises(RecipeError, match="train.learning_rate: expected a number"):
        set_keys(p, ["train.learning_rate=fast"])
    assert p.read_text() == text  # untouched


EDGE = """\
# header comment
name: 'edge'   # quoted
domains: {math: {loss_weight: 2.0}}
teachers:
  math: &t
    kind: bootstrap
    arch: &a   # anchored
      hidden_size: 32

  # comment that belongs to code
  code: *t
student:
  arch: *a
"""


def test_set_edits_text_in_place_and_refuses_aliases(tmp_path):
    p = tmp_path / "edge.yaml"
    p.write_text(EDGE.replace("math: {loss_weight: 2.0}", "math: {loss_weight: 2.0}, code: {}"))
    before = p.read_text()
    set_keys(p, ["name=renamed", "domains.math.loss_weight=0.5", "teachers.math.arch.num_layers=2"])
    after = p.read_text()
    assert (
        "name: renamed  # quoted" in after
    )  # comment column kept and "{math: {loss_weight: 0.5}, code: {}}" in after
    assert "      num_layers: 2\n\n  # comment that belongs to code\n" in after
    assert "&a   # anchored" in after and "code: *t" in after and "arch: *a" in after
    assert len(after.splitlines()) == len(before.splitlines()) + 1
    r = load_recipe(p)
    assert r.teachers["code"].arch.num_layers == 2 and r.student.arch.num_layers == 2
    with pytest.raises(RecipeError, match="student.arch is a YAML alias"):
        set_keys(p, ["student.arch.num_layers=3"])
    assert p.read_text() == after
