"""What the command line prints: --version, help that reads well at 80 and 120 columns,
and `shards inspect` on a whole run directory."""

from __future__ import annotations

import re

import pytest
from test_cli_basic import cli, stage_dir
from typer.testing import CliRunner

from distill.cli import PIPELINE, app, recipe_app, shards_app


def _commands() -> list[list[str]]:
    out = [[c.name] for c in app.registered_commands]
    for name, group in (("recipe", recipe_app), ("shards", shards_app)):
        out += [[name]] + [[name, c.name] for c in group.registered_commands]
    return out


def test_version(capsys):
    from importlib.metadata import PackageNotFoundError, version

    try:
        want = version("distill")
    except PackageNotFoundError:  # a source tree on PYTHONPATH, never installed
        want = "(not installed)"
    code, out, _ = cli(["--version"], capsys)
    assert code == 0 and out == f"distill {want}\n"


@pytest.mark.parametrize("width", [80, 120])
def test_every_help_fills_its_lines_at_80_and_120_columns(width, monkeypatch):
    """No line of a command's description ends where the next word would still have fit
    (the docstring's own line breaks are not kept), and nothing is wider than the
    terminal."""
    monkeypatch.setenv("COLUMNS", str(width))
    for args in [[], *_commands()]:
        result = CliRunner().invoke(app, [*args, "--help"])
        assert result.exit_code == 0, (args, result.output)
        lines = result.output.splitlines()
        assert all(len(line) <= width for line in lines), args
        # the description: the lines between "Usage:" and the first box
        start = next(i for i, line in enumerate(lines) if "Usage:" in line) + 1
        end = next(i for i, line in enumerate(lines) if line.startswith("╭"))
        text = [line.strip() for line in lines[start:end]]
        for this, nxt in zip(text, text[1:], strict=False):
            if this and nxt:  # a line followed by more of the same paragraph
                room = width - 2 - len(this)  # one space of margin each side
                assert len(nxt.split()[0]) + 1 > room, (args, this, nxt)


def test_the_command_list_follows_the_pipeline(monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")
    out = CliRunner().invoke(app, ["--help"]).output
    listed = re.findall(r"^│ (\w+) ", out, flags=re.M)
    assert listed[: len(PIPELINE)] == list(PIPELINE)
    assert set(listed[len(PIPELINE) :]) == {"verify", "serve", "recipe", "shards"}
    assert "─ Pipeline ─" in out and "─ Tools ─" in out


def test_inspect_finds_the_manifests_below_a_run_directory(tmp_path, capsys):
    raw = stage_dir(tmp_path)  # tmp_path/raw/{math,code}
    (raw.parent / "clean").mkdir()
    (raw / "math").rename(raw.parent / "clean" / "math")
    code, out, err = cli(["shards", "inspect", tmp_path, "--rows", "0"], capsys)
    assert code == 0, err
    dirs = [line.split("│")[1].strip() for line in out.splitlines() if line.count("│") > 5]
    assert dirs == ["clean/math", "raw/code"]
    code, out, _ = cli(["shards", "inspect", tmp_path / "clean"], capsys)
    assert code == 0 and "math=5" in out  # a stage directory, as before
    code, _, err = cli(["shards", "inspect", tmp_path / "clean" / "math" / ".."], capsys)
    assert code == 0
    (tmp_path / "empty").mkdir()
    code, _, err = cli(["shards", "inspect", tmp_path / "empty"], capsys)
    assert code == 2 and "no _manifest.json here or below" in err
