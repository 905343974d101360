"""`recipe show` output and the README's generated recipe reference."""

from __future__ import annotations

from pathlib import Path

from ruamel.yaml import YAML

from distill.recipe.doc import END, START, reference_markdown, sections, show_yaml, sync_reference
from distill.recipe.schema import Recipe, load_recipe, validate

ROOT = Path(__file__).parents[1]


def test_show_round_trips_and_comments_every_field():
    r = load_recipe(
        ROOT / "recipes" / "demo.yaml",
        ["train.learning_rate=0.0003", "output_dir=/tmp/a b", "rl.domains.math.beta=0.1"],
    )
    text = show_yaml(r)
    assert validate(YAML(typ="safe").load(text)) == r  # what is shown is what runs
    assert "# Peak learning rate (AdamW).\n  learning_rate: 0.0003" in text
    for cls in [c for _, c in sections()]:
        for info in cls.model_fields.values():
            assert info.description, f"{cls.__name__} field without description"
            assert f"# {info.description.split()[0]}" in text


def test_reference_covers_every_section_and_field():
    md = reference_markdown()
    for paths, cls in sections():
        assert "#### " + ", ".join(f"`{p}`" for p in paths) in md
        for name in cls.model_fields:
            assert f"| `{name}` |" in md
    assert "`train`, `teachers.<domain>.train`" in md  # a shared section is listed once
    assert "| `learning_rate` | float | `0.003` |" in md
    assert "| `lr_scheduler_type` | `cosine` / `linear` / `constant` |" in md
    assert "| `name` | str | required |" in md
    assert {c for _, c in sections()} >= {Recipe}


def test_readme_reference_is_up_to_date():
    text = (ROOT / "docs" / "recipes.md").read_text()
    assert START in text and END in text
    block = text.split(START, 1)[1].split(END, 1)[0]
    assert block.strip() == reference_markdown().strip(), (
        "README recipe reference is stale: run distill recipe reference --write docs/recipes.md"
    )


def test_sync_reference_rewrites_only_the_block(tmp_path):
    p = tmp_path / "README.md"
    p.write_text(f"# x\nbefore\n{START}\nold table\n{END}\nafter\n")
    assert sync_reference(p, write=False) is False and "old table" in p.read_text()
    assert sync_reference(p, write=True) is False
    text = p.read_text()
    assert text.startswith("# x\nbefore\n") and text.endswith(f"{END}\nafter\n")
    assert "old table" not in text and sync_reference(p, write=False) is True


def test_one_scalar_formatter_round_trips_through_yaml():
    """`recipe show` and `recipe set` write values with one function: what it writes
    reads back as the same value, YAML 1.1 words and exact floats included."""
    from distill.recipe.yaml import scalar

    values = [0.0003, 1e-05, 3.0, 2, True, None, "yes", "on", "No", "~", "a b", "x: y",
              "plain_word", "path/to/x.yaml", "", "1.5", [1, "two", None], {"a": 1}, "ünï"]  # fmt: skip
    for v in values:
        assert YAML(typ="safe").load(f"k: {scalar(v)}")["k"] == v, v
    assert YAML(typ="safe").load(f"k: {scalar((1, 2))}")["k"] == [1, 2]
    assert scalar(0.0003) == "0.0003" and scalar("plain_word") == "plain_word"
