"""`recipe show` output and the README's generated recipe reference."""

from __future__ import annotations

from pathlib import Path

from ruamel.yaml import YAML

from distill.recipe import Recipe, load_recipe, validate
from distill.recipe_doc import END, START, reference_markdown, sections, show_yaml, sync_readme

ROOT = Path(__file__).parents[1]


def test_show_round_trips_and_comments_every_field():
    r = load_recipe(ROOT / "recipes" / "demo.yaml", ["train.lr=0.0003", "output_dir=/tmp/a b"])
    text = show_yaml(r)
    assert validate(YAML(typ="safe").load(text)) == r  # what is shown is what runs
    assert "# Peak learning rate (AdamW).\n  lr: 0.0003" in text
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
    assert "| `lr` | float | `0.003` |" in md
    assert "| `schedule` | `cosine` / `linear` / `constant` |" in md
    assert "| `name` | str | required |" in md
    assert {c for _, c in sections()} >= {Recipe}


def test_readme_reference_is_up_to_date():
    text = (ROOT / "README.md").read_text()
    assert START in text and END in text
    block = text.split(START, 1)[1].split(END, 1)[0]
    assert block.strip() == reference_markdown().strip(), (
        "README recipe reference is stale: run python -m distill.recipe_doc --write README.md"
    )


def test_sync_readme_rewrites_only_the_block(tmp_path):
    p = tmp_path / "README.md"
    p.write_text(f"# x\nbefore\n{START}\nold table\n{END}\nafter\n")
    assert sync_readme(p, write=False) is False and "old table" in p.read_text()
    assert sync_readme(p, write=True) is False
    text = p.read_text()
    assert text.startswith("# x\nbefore\n") and text.endswith(f"{END}\nafter\n")
    assert "old table" not in text and sync_readme(p, write=False) is True
