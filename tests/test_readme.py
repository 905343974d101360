"""Every code block of README.md runs here (or, where running it costs minutes or changes
the machine, is checked to exist and parse). The convention, by the block's tag:

- ```bash: every command runs in a scratch directory holding a copy of recipes/ and the
  README's records (see jsonl), except:
  - ``make T`` runs as ``make -n T`` in the repository (the target exists; nothing runs);
  - ``distill STAGE RECIPE ...`` and ``distill serve|eval ...`` (minutes each) run as
    ``distill STAGE --help``, every ``--option`` of the line must appear in that help,
    and RECIPE with its ``--set`` overrides must validate; a file-sourced domain must
    load its records;
  - ``pip install`` and ``python3 -m venv`` change the machine: the extras and packages
    they name must exist in pyproject.toml, the module must answer ``--help``;
  - ``source FILE`` must name a file that exists in the repository.
- ```jsonl DOMAIN: each line is a real record of DOMAIN, written to ``my/DOMAIN.jsonl``
  and loaded by the domain's own loader (what a file-sourced recipe does); where the
  record has a reference solution, it passes the domain's verifier.
- ```python: runs as written.
- ```text (logs, trees): output, not code; not run.
A block with any other tag fails this test: a new kind of block needs a rule here.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from distill.cli import app
from distill.errors import UserError

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"
SLOW_COMMANDS = {"run", "teachers", "generate", "filter", "train", "rl", "eval", "serve"}
FENCE = re.compile(r"^```(\S*)[ \t]*(\S*)\n(.*?)^```$", re.M | re.S)


def blocks() -> list[tuple[str, str, str]]:
    """(tag, argument, body) of every fenced block of the README, in order."""
    return [(m[1], m[2], m[3]) for m in FENCE.finditer(README.read_text())]


def commands(body: str) -> list[str]:
    """The commands of a bash block: comments dropped, ``&&`` chains split."""
    out = []
    for line in body.replace("\\\n", " ").splitlines():
        line = re.sub(r"\s+#.*$", "", line).strip()
        if line and not line.startswith("#"):
            out += [c.strip() for c in line.split("&&")]
    return out


def test_the_readme_is_a_front_door_with_room_to_grow():
    assert len(README.read_bytes()) < 15_000  # `wc -c`: a front door, depth lives in docs/
    tags = {tag for tag, _, _ in blocks()}
    assert tags <= {"bash", "jsonl", "python", "text"}, tags
    assert {"bash", "jsonl"} <= tags


def _distill(args: list[str]) -> str:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, (args, result.output)
    return result.output


def _check_slow_distill(args: list[str]) -> None:
    """A stage (or serve/eval) command: its help, its options, its recipe and records."""
    from distill.recipe.schema import load_recipe
    from teachers.base import get_domain

    cmd, rest = args[0], args[1:]
    help_text = _distill([cmd, "--help"])
    for opt in (a.split("=")[0] for a in rest if a.startswith("--")):
        assert opt in help_text, (cmd, opt)
    sets = [rest[i + 1] for i, a in enumerate(rest) if a == "--set"]
    positional = [a for i, a in enumerate(rest) if not a.startswith("-") and a not in sets]
    if cmd in SLOW_COMMANDS - {"serve"} and positional and positional[0].endswith(".yaml"):
        recipe = load_recipe(Path(positional[0]), sets)
        for name in recipe.active_domains():
            src = recipe.domains[name].source
            if src.kind == "file":
                tasks = list(get_domain(name).load_records(src.path, split="all"))
                assert tasks, (name, src.path)


def _check_pip(args: list[str]) -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = {re.split(r"[<>=\[ ]", d)[0] for d in meta["dependencies"]}
    for a in args[2:]:
        if a.startswith("-") or a.startswith("http"):
            continue
        if m := re.fullmatch(r"\.(?:\[([\w,]+)\])?", a):  # the project, with extras
            assert set((m[1] or "").split(",") if m[1] else []) <= set(
                meta["optional-dependencies"]
            )
        else:
            assert a in deps, f"pip install {a}: not a dependency in pyproject.toml"


def run_bash(command: str, cwd: Path) -> None:
    args = shlex.split(command)
    head = args[0]
    if head == "make":
        subprocess.run(["make", "-n", *args[1:]], cwd=ROOT, check=True, capture_output=True)
    elif head == "source":
        assert (ROOT / args[1]).exists() or Path(sys.prefix, "bin", "activate").exists()
    elif head == "pip":
        _check_pip(args)
    elif head.startswith("python") and args[1:2] == ["-m"]:
        subprocess.run([sys.executable, "-m", args[2], "--help"], check=True, capture_output=True)
    elif head == "distill" and len(args) > 1 and args[1] in SLOW_COMMANDS:
        _check_slow_distill(args[1:])
    elif head == "distill":
        _distill(args[1:])
    else:
        subprocess.run(args, cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """A working directory like a clone's: recipes/ and the README's records in my/."""
    shutil.copytree(ROOT / "recipes", tmp_path / "recipes")
    (tmp_path / "my").mkdir()
    for tag, domain, body in blocks():
        if tag == "jsonl":
            (tmp_path / "my" / f"{domain}.jsonl").write_text(body)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_every_jsonl_block_is_a_record_its_domain_loads(scratch):
    from teachers.base import REGISTRY, get_domain

    seen = []
    for tag, domain, body in blocks():
        if tag != "jsonl":
            continue
        assert domain in REGISTRY, f"```jsonl {domain}: not a domain"
        records = [json.loads(line) for line in body.splitlines()]
        dom = get_domain(domain)
        tasks = list(dom.load_records(f"my/{domain}.jsonl", split="all"))
        assert len(tasks) == len(records) >= 1
        for task in tasks:  # the record's own answer passes its verifier
            try:
                answer = dom.oracle(task)
            except UserError:  # a record without a reference solution (agents)
                continue
            assert dom.verify(task, answer).passed, (domain, task.id)
        seen.append(domain)
    assert sorted(seen) == sorted(REGISTRY)  # one example per domain


def test_every_bash_and_python_block_runs(scratch):
    demo_before = (ROOT / "recipes" / "demo.yaml").read_text()
    ran = 0
    for tag, _, body in blocks():
        if tag == "bash":
            for command in commands(body):
                run_bash(command, scratch)
                ran += 1
        elif tag == "python":
            subprocess.run([sys.executable, "-c", body], cwd=scratch, check=True)
            ran += 1
    assert ran >= 10
    # `distill recipe set` ran for real, on the scratch copies only, and changed a value
    # (a rerun of the demo reruns what reads it)
    assert "source" in (scratch / "mine.yaml").read_text()
    assert (ROOT / "recipes" / "demo.yaml").read_text() == demo_before
    assert (scratch / "recipes" / "demo.yaml").read_text() != demo_before
