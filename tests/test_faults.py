"""Fault injection (issue #16): a second writer, deleted and corrupted files, a full or
read-only disk, bad input to every command and endpoint, and kills at any point of every
stage. Each fault ends in a clean one-line error (exit 2) or a recovery that loses and
duplicates nothing. docs/reliability.md says what this covers and what it does not; the
whole-pipeline kills are marked slow."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_artifacts import child_env

from distill.errors import UserError
from distill.messages import Trace
from distill.recipe.schema import validate
from distill.shards import ShardError, ShardWriter, read_manifest, shard_files
from distill.stages import mark_done, record_dir, run_stage, stage_dir, up_to_date
from teachers.base import get_domain

ROOT = Path(__file__).parents[1]
MATH = get_domain("math")


def recipe(out: Path, **sections):
    data = {
        "name": "faults",
        "output_dir": str(out),
        "domains": {"math": {"train_tasks": 6, "eval_tasks": 4}},
        "teachers": {"math": {"kind": "bootstrap"}},
        "filter": {"workers": 1, "dedup_near": False, "decontaminate": False},
    }
    for k, v in sections.items():
        data[k] = {**data.get(k, {}), **v}
    return validate(data)


def raw_math(r, n: int = 6) -> Path:
    """Raw shards of oracle math traces, and generate recorded as complete."""
    d = stage_dir(r, "generate") / "math"
    with ShardWriter(d, max_rows=4) as w:
        for i, task in enumerate(MATH.tasks("train", n, 0)):
            w.write(
                [
                    Trace(
                        id=f"r{i}", task_id=task.id, domain="math", teacher="math",
                        messages=MATH.oracle(task), reference=task.reference,
                        finish_reason="stop", completion_tokens=20,
                    )
                ]
            )  # fmt: skip
    mark_done(r, "generate")
    return d


def change_in_place(path: Path, old: bytes, new: bytes) -> None:
    """Replace the first ``old`` in ``path`` by ``new`` of the same length (the file's size
    and its manifest entry stay as they were)."""
    assert len(old) == len(new)
    data = path.read_bytes()
    assert old in data, old
    path.write_bytes(data.replace(old, new, 1))


# --- one writer per stage (item 3) -----------------------------------------------------

HOLD = """
import sys, time
from distill.recipe.schema import validate
from distill.stages import stage_lock
r = validate({"name": "faults", "output_dir": sys.argv[1]})
with stage_lock(r, "filter"):
    print("held", flush=True)
    time.sleep(120)
"""


def test_one_writer_per_stage_and_a_killed_holder_leaves_no_lock(tmp_path):
    from distill.stages import stage_lock

    r = recipe(tmp_path / "run")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(r.out)], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=rf"being written by pid {holder.pid}"):
            run_stage(r, "filter")
        assert not (record_dir(r, "filter") / "_stage.json").exists()  # nothing ran
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with stage_lock(r, "filter"):  # the kernel dropped the dead holder's lock
        pass


# --- incomplete outputs are not up to date (item 6) ----------------------------------


def test_a_deleted_output_manifest_makes_its_stage_run_again(tmp_path):
    from distill.pipeline import why_run

    r = recipe(tmp_path / "run")
    raw_math(r)
    run_stage(r, "filter")
    clean = stage_dir(r, "filter") / "math"
    rows = read_manifest(clean)["rows"]
    assert rows > 0 and up_to_date(r, "filter")
    (clean / "_manifest.json").unlink()
    assert not up_to_date(r, "filter")
    assert "its outputs are incomplete" in why_run(r, "filter").reason
    run_stage(r, "filter")  # repaired: the domain is filtered again
    assert read_manifest(clean)["rows"] == rows and up_to_date(r, "filter")


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m.pop("rows"), "no 'rows' count"),
        (lambda m: m.pop("bytes"), "no 'bytes' count"),
        (lambda m: m["shards"][0].update(file="../../outside.arrow"), "is not a file name"),
        (lambda m: m["shards"][0].update(file="/etc/passwd"), "is not a file name"),
        (lambda m: m["shards"][0].update(rows="many"), "bad shard entry"),
    ],
)
def test_a_damaged_manifest_is_a_clear_error(tmp_path, edit, message):
    r = recipe(tmp_path / "run")
    d = raw_math(r)
    m = json.loads((d / "_manifest.json").read_text())
    edit(m)
    (d / "_manifest.json").write_text(json.dumps(m))
    with pytest.raises(ShardError, match=message):
        shard_files(d)


def test_export_names_a_directory_without_manifest_and_leaves_no_tmp(tmp_path):
    import shutil

    from distill.shards.view import export

    r = recipe(tmp_path / "run")
    raw = raw_math(r)
    shutil.copytree(raw, raw.parent / "logic")
    (raw.parent / "logic" / "_manifest.json").unlink()
    out = tmp_path / "x.jsonl"
    with pytest.raises(ShardError, match=rf"{raw.parent / 'logic'}: shards without a"):
        export(raw.parent, "jsonl", out)
    # a shard cut short in the middle of an export (11): no output, no .tmp
    shutil.rmtree(raw.parent / "logic")
    last = shard_files(raw)[-1]
    last.write_bytes(last.read_bytes()[:-7] + b"\0" * 7)  # same size: read fails later
    for fmt in ("jsonl", "parquet"):
        with pytest.raises(ShardError):
            export(raw.parent, fmt, out)
        assert not out.exists() and not list(tmp_path.glob("*.tmp"))


# --- a shard changed without changing its size (item 4) -------------------------------


def test_filter_refuses_a_raw_shard_changed_in_place(tmp_path):
    r = recipe(tmp_path / "run")
    d = raw_math(r)
    first = shard_files(d)[0]
    change_in_place(first, b"r0", b"r9")  # a row id, same length
    with pytest.raises(ShardError, match=rf"{first}: checksum mismatch"):
        run_stage(r, "filter")
    assert not (stage_dir(r, "filter") / "math" / "_manifest.json").exists()


def test_training_refuses_a_clean_shard_changed_in_place(tmp_path):
    from tiny_artifacts import corpus, make_tokenizer, write_shards

    from distill.train.data import tokenize_domain

    tok = make_tokenizer(tmp_path / "tok")
    shards = write_shards(tmp_path / "clean", "math", corpus(8))
    first = shard_files(shards)[0]
    change_in_place(first, b"Problem 1:", b"Problem 7:")
    with pytest.raises(ShardError, match=rf"{first}: checksum mismatch"):
        tokenize_domain("math", shards, tok, 512, tmp_path / "cache")


# --- same-size corruption of every other file kind a stage reads ----------------------


def _flip(path: Path, at: int | None = None) -> None:
    """One byte changed in place (the middle byte unless ``at``): same size, new bytes."""
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if at is None else at
    data[i] = ord("#") if data[i] != ord("#") else ord("%")
    path.write_bytes(bytes(data))


def test_a_corrupt_stage_record_or_output_manifest_reruns_the_stage(tmp_path):
    r = recipe(tmp_path / "run")
    raw_math(r)
    run_stage(r, "filter")
    clean = stage_dir(r, "filter") / "math"
    rows = read_manifest(clean)["rows"]
    _flip(clean / "_manifest.json", at=0)  # no longer JSON
    assert not up_to_date(r, "filter")
    with pytest.raises(ShardError, match="corrupt manifest"):
        shard_files(clean)  # a reader names it
    run_stage(r, "filter")  # the stage rewrites the domain
    assert read_manifest(clean)["rows"] == rows and up_to_date(r, "filter")
    _flip(record_dir(r, "filter") / "_stage.json", at=0)
    assert not up_to_date(r, "filter")  # an unreadable record is no record: it runs again
    run_stage(r, "filter")
    assert up_to_date(r, "filter")


def test_a_corrupt_journal_is_named_when_a_writer_resumes(tmp_path):
    d = tmp_path / "raw"
    with ShardWriter(d, max_rows=2) as w:
        w.write({"id": f"r{i}", "task_id": "t", "domain": "math", "messages": []} for i in range(5))
    (d / "_manifest.json").unlink()  # as if the writer had been killed before its manifest
    _flip(d / "_journal-part.json", at=0)
    with pytest.raises(ShardError, match=r"_journal-part.json: corrupt journal"):
        ShardWriter(d, max_rows=2)


def test_weights_changed_in_place_are_refused_by_the_stages_that_read_them(tmp_path):
    r = recipe(tmp_path / "run")
    teacher = stage_dir(r, "teachers") / "math"
    teacher.mkdir(parents=True)
    (teacher / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    mark_done(r, "teachers")
    _flip(teacher / "model.safetensors")
    with pytest.raises(UserError, match=rf"{teacher / 'model.safetensors'}: changed since stage"):
        run_stage(r, "generate")
    assert not (record_dir(r, "generate") / "_stage.json").exists()


# --- a full disk, a read-only output (item 5) ------------------------------------------


@pytest.fixture
def disk(tmp_path):
    """A small tmpfs of its own (``disk(size)`` mounts it, ``disk.read_only()`` remounts it
    read-only); skipped where this process may not mount (CI runs as root)."""
    d = tmp_path / "disk"
    d.mkdir()

    class Disk:
        path = d

        def __call__(self, size: str = "4m") -> Path:
            r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)],
                               capture_output=True)  # fmt: skip
            if r.returncode:
                pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
            return d

        def read_only(self) -> None:
            subprocess.run(["mount", "-o", "remount,ro", str(d)], check=True)

        def fill(self, leave: int = 0) -> None:
            """Fill the disk, leaving ``leave`` bytes free."""
            st = os.statvfs(d)
            free = st.f_bavail * st.f_frsize - leave
            with open(d / "filler", "wb") as f:
                f.write(b"x" * max(0, free))

    yield Disk()
    # lazily: a file a failed writer left open (torch's, until collected) keeps it busy
    subprocess.run(["umount", "--lazy", str(d)], capture_output=True)


def distill(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """The real command line, in a process of its own."""
    return subprocess.run([sys.executable, "-m", "distill", *args], capture_output=True,
                          text=True, cwd=cwd, env=child_env(), timeout=300)  # fmt: skip


def write_recipe(path: Path, r) -> Path:
    path.write_text(json.dumps(r.model_dump(mode="json")))  # JSON is YAML
    return path


def test_filter_on_a_full_disk_says_so_and_keeps_the_raw_shards(disk, tmp_path):
    r = recipe(disk() / "run")
    raw = raw_math(r, n=40)
    before = {p.name: p.read_bytes() for p in raw.iterdir()}
    disk.fill(leave=0)
    with pytest.raises(UserError, match=rf"^no space left on {disk.path}"):
        run_stage(r, "filter")
    assert {p.name: p.read_bytes() for p in raw.iterdir()} == before  # nothing committed lost
    (disk.path / "filler").unlink()
    run_stage(r, "filter")  # space again: the stage completes
    assert up_to_date(r, "filter")


def test_a_read_only_output_is_one_line_exit_2(disk, tmp_path):
    r = recipe(disk() / "run")
    raw_math(r)
    disk.read_only()
    recipe_file = write_recipe(tmp_path / "r.yaml", r)
    for args in (["run", str(recipe_file)], ["filter", str(recipe_file)]):
        p = distill(*args)
        assert p.returncode == 2, p.stderr
        assert p.stderr.strip().splitlines()[-1].startswith(f"error: {disk.path}"), p.stderr
        assert "is read-only" in p.stderr and "Traceback" not in p.stderr


def _write_big(path: str) -> None:
    Path(path).write_bytes(b"x" * (8 << 20))


def test_a_rank_that_fills_the_disk_is_a_user_error_not_a_crash(disk):
    from distill import launch
    from distill.errors import storage_errors

    d = disk("1m")
    with pytest.raises(UserError, match=rf"^no space left on {d}"):
        with storage_errors(d):  # as run_stage runs a stage, knowing its directory
            launch.spawn(_write_big, str(d / "big"), procs=2, what="test")


def test_training_on_a_full_disk_is_named(disk, tmp_path):
    from tiny_artifacts import ARCH, corpus, make_tokenizer, small_cfg, write_shards

    from distill.errors import storage_errors
    from distill.train.loop import train

    make_tokenizer(tmp_path / "tok")
    shards = {"math": write_shards(tmp_path / "clean", "math", corpus(8))}
    d = disk("256k")
    with pytest.raises(UserError, match=rf"^no space left on {d}"):
        with storage_errors(d):  # as run_stage runs the train stage
            train(init=ARCH, tokenizer_dir=tmp_path / "tok", shards=shards,
                  out_dir=d / "student", cfg=small_cfg(max_steps=2, save_steps=1))  # fmt: skip


def test_torch_checkpoint_writer_on_a_full_disk_is_named(disk):
    import torch

    from distill.errors import storage_error

    d = disk("1m")
    try:
        torch.save({"w": torch.zeros(1 << 20)}, d / "ckpt.pt")
    except RuntimeError as e:  # [enforce fail at inline_container.cc] ... file write failed
        err = storage_error(e, d)
        assert err is not None and str(err).startswith(f"no space left on {d}")
    else:
        pytest.fail("torch.save fit in 1 MB")


# --- bad input to every command (items 9, 10, and the suite's table) -------------------

BASE = {
    "name": "bad",
    "domains": {"math": {"train_tasks": 2}},
    "teachers": {"math": {"kind": "bootstrap"}},
}


def cli_error(*args: str, stdin: str | None = None) -> str:
    """The one-line error a command gives (a UserError: the console script prints it and
    exits 2)."""
    from typer.testing import CliRunner

    from distill.cli import app

    r = CliRunner().invoke(app, list(args), input=stdin)
    assert isinstance(r.exception, UserError), (r.exception, r.output)
    message = str(r.exception)
    assert message and "\n" not in message, message
    return message


def _recipe(tmp_path: Path, data: dict | str | bytes, name: str = "r.yaml") -> str:
    p = tmp_path / name
    if isinstance(data, bytes):
        p.write_bytes(data)
    elif isinstance(data, str):
        p.write_text(data)
    else:  # outputs, if any, under tmp_path/out
        p.write_text(json.dumps({"output_dir": str(tmp_path / "out"), **data}))
    return str(p)


def _with(**sections) -> dict:
    out = json.loads(json.dumps(BASE))
    for k, v in sections.items():
        out[k] = {**out.get(k, {}), **v} if isinstance(v, dict) else v
    return out


# (case, recipe data, extra arguments, what the one line must say); the first eight were
# found too late or said the wrong thing before issue #16
RECIPE_CASES = [
    ("no domains", {**BASE, "domains": {}, "teachers": {}}, [], "domains: no enabled domain"),
    ("pass-rate window empty", _with(filter={"pass_rate_min": 0.8, "pass_rate_max": 0.2}), [],
     "filter.pass_rate_min: 0.8 is above pass_rate_max (0.2)"),
    ("heads do not divide", _with(student={"arch": {"hidden_size": 64, "num_heads": 5}}), [],
     "student.arch.hidden_size: 64 is not a multiple of num_heads (5)"),
    ("file source without path", _with(domains={"math": {"source": {"kind": "file"}}}), [],
     "domains.math.source.path: required for kind=file"),
    ("bad --set blamed on --set", BASE, ["--set", "train.learning_rate=fast"],
     "--set train.learning_rate=fast: train.learning_rate: expected a number, got 'fast'"),
    ("abbreviated key", _with(train={"lrate": 0.1}), [], "did you mean 'learning_rate'?"),
    ("unreadable record format", BASE, ["--set", "domains.math.source.path=gsm.csv"],
     "'gsm.csv' is not a format distill reads"),
    ("decontam n-grams crossed", _with(filter={"decontam_short_ngram": 20}), [],
     "filter.decontam_short_ngram: 20 must not exceed decontam_ngram (13)"),
    ("unknown section", _with(trian={}), [], "trian: unknown key; did you mean 'train'?"),
    ("not a mapping", "[1, 2]", [], "expected a mapping at the top level"),
    ("invalid YAML", "name: [", [], "invalid YAML"),
    ("unknown domain", _with(domains={"maths": {}}), [], "did you mean 'math'?"),
    ("bad --set syntax", BASE, ["--set", "train"], "expected key.path=value"),
]  # fmt: skip


@pytest.mark.parametrize(
    "data, args, message", [c[1:] for c in RECIPE_CASES], ids=[c[0] for c in RECIPE_CASES]
)
def test_bad_recipes_are_one_line_before_any_stage_runs(tmp_path, data, args, message):
    path = _recipe(tmp_path, data)
    for command in (["recipe", "validate"], ["run"]):
        assert message in cli_error(*command, path, *args)
    assert not (tmp_path / "out").exists()  # nothing ran, nothing was written


def test_a_recipe_that_is_not_utf8_is_one_line(tmp_path):
    path = _recipe(tmp_path, b"name: caf\xe9\n")
    assert "not UTF-8 text" in cli_error("recipe", "validate", path)


def test_commands_on_missing_paths_and_wrong_values(tmp_path):
    r = _recipe(tmp_path, BASE)
    nowhere = str(tmp_path / "nonexistent")
    assert cli_error("eval", "--model", nowhere) == f"--model {nowhere}: no such directory"
    assert "recipe file not found" in cli_error("run", nowhere)
    assert "no such file or directory" in cli_error("shards", "inspect", nowhere)
    assert "expected one of jsonl, parquet" in cli_error(
        "shards", "export", str(tmp_path), "--out", str(tmp_path / "x"), "--format", "csv"
    )
    assert "expected key.path=value" in cli_error("recipe", "set", r, "train")
    assert "give a RECIPE" in cli_error("rl") and "give a RECIPE" in cli_error("eval")
    assert "unknown domain" in cli_error("verify", "poetry", r)
    assert "no config.json" in cli_error("serve", str(tmp_path))
    # stages run out of order: each names what is missing
    for stage in ("generate", "filter", "train", "eval"):
        msg = cli_error(stage, r, "--set", f"output_dir={tmp_path / 'out'}")
        assert str(tmp_path / "out") in msg, (stage, msg)


def test_a_missing_hf_teacher_fails_at_once_without_the_hub(tmp_path):
    data = _with(
        teachers={"math": {"kind": "hf", "path": str(tmp_path / "no-model")}},
        tokenizer={"corpus_tasks": 10, "vocab_size": 300},
        output_dir=str(tmp_path / "out"),
    )
    t0 = time.time()
    msg = cli_error("teachers", _recipe(tmp_path, data))
    assert msg.startswith(f"teachers.math.path: {tmp_path / 'no-model'}: no such directory")
    assert time.time() - t0 < 20


def test_verify_bad_inputs(tmp_path, capsys):
    from distill.verify import run

    good = json.dumps({"problem": "What is 2 + 2?", "answer": "4", "completion": "\\boxed{4}"})
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(good.encode() + b"\n" + '{"problem": "caf\u00e9"}'.encode("latin-1"))
    assert "latin1.jsonl:2: not UTF-8 text" in cli_error("verify", "math", str(latin1))
    src = tmp_path / "in.jsonl"
    src.write_text(good + "\n")
    out = tmp_path / "nowhere" / "v.jsonl"
    msg = cli_error("verify", "math", str(src), "--out", str(out))
    assert msg == f"--out {out}: no such directory {out.parent}"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    capsys.readouterr()
    assert run("math", empty) == (0, 0)
    assert "holds no records" in capsys.readouterr().err
    assert run("math", src, out=tmp_path / "v.jsonl") == (1, 0)
    assert not list(tmp_path.glob("*.tmp"))


# --- kills at any point of every stage, then resume (slow) -----------------------------

STAGE_LINE = "── {} ·"  # a stage header's first line (distill.stages.header)


def _micro(out: Path, path: Path) -> Path:
    """The end-to-end micro recipe on math and logic, every stage (RL included), a
    checkpoint at every step so that a resume has something to resume from."""
    from test_e2e import micro_recipe
    from test_e2e import write_recipe as write_yaml

    data = micro_recipe(out, domains=("math", "logic"), oracle=16, student_steps=4,
                        train_tasks=4, eval_tasks=2)  # fmt: skip
    data["train"]["save_steps"] = 1
    for t in data["teachers"].values():
        t["train"]["save_steps"] = 1
    return write_yaml(path, data)


def _run(recipe_path: Path, **kw) -> subprocess.Popen:
    env = child_env(DISTILL_CPU_PROCS="2")
    return subprocess.Popen([sys.executable, "-m", "distill", "run", str(recipe_path)],
                            cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kw)  # fmt: skip


def _outcome(out: Path) -> dict:
    """What a run produced, to compare runs: rows of every shard directory, sha256 of
    every weights file, the eval scores."""
    from distill.shards import read_table
    from distill.stages import weights_digest

    got: dict = {}
    for stage in ("raw", "clean"):
        for d in sorted((out / stage).iterdir()):
            if (d / "_manifest.json").exists():
                rows = read_table(d, verify=True).to_pylist()
                ids = [r["id"] for r in rows]
                assert len(ids) == len(set(ids)), f"{d}: duplicated rows"
                got[f"{stage}/{d.name}"] = sorted(
                    (r["id"], json.dumps(r["messages"], sort_keys=True)) for r in rows
                )
    for stage in ("teachers", "student", "rl"):
        got[stage] = weights_digest(out / stage)
    got["scores"] = json.loads((out / "eval" / "report.json").read_text())["scores"]
    return got


def _watch(p: subprocess.Popen, text: str):
    """An event set once ``text`` appears in ``p``'s stderr, and the lines so far (drained
    all along, so the process never blocks on a full pipe)."""
    import threading

    seen, log = threading.Event(), []

    def drain() -> None:
        for line in p.stderr:
            log.append(line)
            if text in line:
                seen.set()

    threading.Thread(target=drain, daemon=True).start()
    return seen, log


@pytest.mark.slow
@pytest.mark.cpu_ranks
def test_kills_in_every_stage_then_resume_give_the_uninterrupted_result(tmp_path):
    """distill run on 2 CPU ranks, killed once inside every stage (SIGKILL of the process
    group, SIGKILL of the main process alone, SIGTERM of the main process alone, in
    turn, after a random part of the stage's time), rerun after each kill, finishes with
    exactly the rows, weights and scores of an uninterrupted run."""
    import random

    import psutil

    from distill.stages import STAGES

    ref_recipe = _micro(tmp_path / "ref", tmp_path / "ref.yaml")
    p = _run(ref_recipe)
    _, err = p.communicate(timeout=1200)
    assert p.returncode == 0, err[-3000:]
    seconds = {s: json.loads((tmp_path / "ref" / "runs" / s2 / "_stage.json").read_text())["seconds"]
               for s, s2 in zip(STAGES, ("teachers", "raw", "clean", "student", "rl", "eval"),
                                strict=True)}  # fmt: skip
    want = _outcome(tmp_path / "ref")

    killed = _micro(tmp_path / "run", tmp_path / "run.yaml")
    rng = random.Random(16)
    modes = [("group", signal.SIGKILL), ("main", signal.SIGKILL), ("main", signal.SIGTERM)]
    for i, stage in enumerate(STAGES):
        who, sig = modes[i % len(modes)]
        p = _run(killed)
        started, log = _watch(p, STAGE_LINE.format(stage))
        while not started.wait(0.2):
            assert p.poll() is None, f"{stage} never started: {''.join(log)[-3000:]}"
        time.sleep(rng.uniform(0.1, 0.8) * max(seconds[stage], 0.5))
        family = psutil.Process(p.pid).children(recursive=True)
        if who == "group":
            os.killpg(p.pid, sig)
        else:
            p.send_signal(sig)
        p.wait(timeout=60)
        _gone, alive = psutil.wait_procs(family, timeout=20)  # ranks die with their parent
        assert not [c for c in alive if c.status() != psutil.STATUS_ZOMBIE], (stage, who)
    p = _run(killed)
    _, err = p.communicate(timeout=1200)
    assert p.returncode == 0, err[-3000:]
    assert _outcome(tmp_path / "run") == want
    # a teacher's weights deleted: the teachers stage rebuilds that teacher (and only it)
    (tmp_path / "run" / "teachers" / "math" / "model.safetensors").unlink()
    p = _run(killed)
    _, err = p.communicate(timeout=1200)
    assert p.returncode == 0, err[-3000:]
    assert f"its outputs are incomplete ({tmp_path / 'run' / 'teachers' / 'math'}" in err
    assert _outcome(tmp_path / "run") == want  # the same weights again: nothing else reran
