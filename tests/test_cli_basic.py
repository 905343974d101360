"""The `recipe` and `shards` command groups, through the real entry point."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from distill.cli import main
from distill.messages import Trace, Verdict
from distill.recipe.schema import load_recipe
from distill.shards import ShardWriter

ROOT = Path(__file__).parents[1]


def cli(args: list[str], capsys) -> tuple[int, str, str]:
    """Run `distill ARGS` in-process through main() (exit status, stdout, stderr)."""
    old = sys.argv
    sys.argv = ["distill", *map(str, args)]
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = old
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def demo(tmp_path) -> Path:
    p = tmp_path / "demo.yaml"
    shutil.copy(ROOT / "recipes" / "demo.yaml", p)
    return p


def test_an_old_key_exits_2_naming_the_new_one(demo, capsys):
    text = demo.read_text()
    for args in (["recipe", "validate", demo, "--set", "train.lr=0.1"],
                 ["recipe", "set", demo, "train.lr=0.1"]):  # fmt: skip
        code, _, err = cli(args, capsys)
        where = "--set train.lr=0.1" if "--set" in args else demo  # blamed on what set it
        assert code == 2 and err == f"error: {where}: train.lr: renamed to train.learning_rate\n"
    assert demo.read_text() == text


def test_validate_ok_and_errors_exit_2_with_one_line(demo, capsys):
    code, out, _ = cli(["recipe", "validate", demo], capsys)
    assert code == 0 and out.startswith("ok:")
    code, out, err = cli(["recipe", "validate", demo, "--set", "train.learning_rate=fast"], capsys)
    assert (
        code == 2
        and err
        == "error: --set train.learning_rate=fast: train.learning_rate: expected a number, got 'fast'\n"
    )
    demo.write_text(demo.read_text().replace("\ntrain:", "\ntrian:"))
    code, _, err = cli(["recipe", "validate", demo], capsys)
    assert code == 2 and "trian: unknown key; did you mean 'train'?" in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_console_script_exit_status_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntrain: {learning_rate: fast}\n")
    p = subprocess.run(
        [sys.executable, "-m", "distill", "recipe", "validate", str(bad)],
        capture_output=True,
        text=True,
    )
    assert (
        p.returncode == 2
        and p.stderr.strip() == f"error: {bad}: train.learning_rate: expected a number, got 'fast'"
    )


def test_show_applies_overrides(demo, capsys):
    code, out, _ = cli(
        ["recipe", "show", demo, "--set", "train.max_steps=7", "--set", "seed=3"], capsys
    )
    assert code == 0 and "  max_steps: 7\n" in out and "\nseed: 3\n" in out
    assert "# Peak learning rate (AdamW)." in out


def test_set_edits_in_place_or_leaves_the_file(demo, capsys):
    before = demo.read_text()
    code, out, _ = cli(["recipe", "set", demo, "train.learning_rate=0.0003"], capsys)
    assert code == 0 and load_recipe(demo).train.learning_rate == 0.0003
    assert (
        sum(a != b for a, b in zip(before.splitlines(), demo.read_text().splitlines(), strict=True))
        == 1
    )
    edited = demo.read_text()
    code, _, err = cli(["recipe", "set", demo, "train.warmup_steps=-5"], capsys)
    assert code == 2 and "train.warmup_steps: expected a value >= 0" in err
    assert demo.read_text() == edited


def test_reference_write(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(
        (ROOT / "docs" / "recipes.md").read_text().replace("| `learning_rate` |", "| `LR` |")
    )
    code, out, err = cli(["recipe", "reference", "--write", readme], capsys)
    assert code == 0 and "updated" in err and "| `learning_rate` |" in readme.read_text()
    code, out, _ = cli(["recipe", "reference"], capsys)
    assert code == 0 and out.startswith("#### `(top level)`")


def stage_dir(tmp_path: Path) -> Path:
    for d, n in (("math", 5), ("code", 3)):
        with ShardWriter(tmp_path / "raw" / d, max_rows=2) as w:
            for i in range(n):
                w.write(
                    [
                        Trace(
                            id=f"{d}{i}",
                            task_id=f"{d}-task{i}",
                            domain=d,
                            messages=[
                                {"role": "user", "content": f"{d} question {i}"},
                                {
                                    "role": "assistant",
                                    "reasoning_content": "let me think",
                                    "content": f"answer {i}",
                                },
                            ],
                            verdict=None if i == 0 else Verdict(i % 2 == 1, 1.0, "checked"),
                        )
                    ]
                )
    return tmp_path / "raw"


def test_inspect_stage_dir_and_one_domain(tmp_path, capsys):
    raw = stage_dir(tmp_path)
    code, out, _ = cli(["shards", "inspect", raw, "--rows", "1", "--verify"], capsys)
    assert code == 0
    lines = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") > 5}
    math_cells = [c.strip() for c in lines["math"].split("│")]
    assert math_cells[2:4] == ["5", "3"] and "math=5" in math_cells[5]
    assert math_cells[6:9] == ["2", "2", "1"]  # passed, failed, unverified
    assert "verdict: struct<passed: bool, score: float, reason: string>" in out
    assert "math question 0" in out and "let me think" in out
    code, out, _ = cli(["shards", "inspect", raw / "code"], capsys)
    assert code == 0 and "code=3" in out


def test_inspect_errors(tmp_path, capsys):
    code, _, err = cli(["shards", "inspect", tmp_path / "nope"], capsys)
    assert code == 2 and "nope: no such file or directory" in err
    code, _, err = cli(["shards", "inspect", tmp_path], capsys)
    assert code == 2 and "no _manifest.json" in err


def test_export_jsonl_and_parquet(tmp_path, capsys):
    raw = stage_dir(tmp_path)
    code, out, err = cli(
        ["shards", "export", raw, "--format", "jsonl", "--out", tmp_path / "all.jsonl"], capsys
    )
    assert code == 0 and "wrote 8 rows" in err and out == ""  # a status line: stderr
    rows = [json.loads(line) for line in (tmp_path / "all.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == sorted(
        [f"math{i}" for i in range(5)] + [f"code{i}" for i in range(3)]
    )
    assert Trace.from_row(rows[0]).messages[1]["reasoning_content"] == "let me think"
    code, _, _ = cli(
        ["shards", "export", raw / "math", "--format", "parquet", "--out", tmp_path / "m.parquet"],
        capsys,
    )
    table = pq.read_table(tmp_path / "m.parquet")
    assert code == 0 and table.column("id").to_pylist() == [f"math{i}" for i in range(5)]
    code, _, err = cli(
        ["shards", "export", raw, "--format", "csv", "--out", tmp_path / "x"], capsys
    )
    assert code == 2 and "expected one of jsonl, parquet" in err


@pytest.mark.parametrize("group", ["recipe", "shards"])
def test_every_command_has_help(group, capsys):
    from distill.cli import recipe_app, shards_app

    app = {"recipe": recipe_app, "shards": shards_app}[group]
    for cmd in app.registered_commands:
        code, out, _ = cli([group, cmd.name, "--help"], capsys)
        assert code == 0 and "Usage:" in out and len(out) > 200
