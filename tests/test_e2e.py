"""End to end: a micro recipe through every stage on CPU (tiny real models, real Arrow
shards, the real CLI), then the skip and rerun rules of ``distill run``."""

import json
from pathlib import Path

import pytest
from gen_fixtures import tiny_model_dir
from ruamel.yaml import YAML
from typer.testing import CliRunner

from distill.cli import app
from distill.shards import shard_files
from teachers.base import REGISTRY

pytestmark = pytest.mark.integration
DOMAINS = list(REGISTRY)


CORPUS = ["What is 12 + 30? \\boxed{42}", "def f(x):\n    return x"]


def micro_recipe(
    out: Path,
    *,
    teacher_steps=4,
    oracle=24,
    student_steps=3,
    train_tasks=4,
    eval_tasks=3,
    hidden=32,
    domains=tuple(DOMAINS),
    rl=True,
) -> dict:
    arch = {
        "hidden_size": hidden,
        "num_layers": 1,
        "num_heads": 2,
        "intermediate_size": 2 * hidden,
        "max_position_embeddings": 512,
    }
    train = {
        "max_steps": teacher_steps,
        "warmup_steps": 0,
        "batch_tokens": 2048,
        "micro_batch_tokens": 2048,
        "max_length": 512,
        "logging_steps": 1,
    }
    teacher = {"kind": "bootstrap", "oracle_tasks": oracle, "arch": arch, "train": train}
    teachers = {d: teacher for d in domains}
    if rl and "math" in teachers:  # the math specialist is sharpened by RL on its own domain
        teachers["math"] = {**teacher, "rl": {"enabled": True, **MICRO_RL, "steps": 1}}
    return {
        "name": "micro",
        "output_dir": str(out),
        "tokenizer": {"kind": "train", "vocab_size": 320, "corpus_tasks": 20},
        "domains": {
            d: {"train_tasks": train_tasks, "eval_tasks": eval_tasks, "max_new_tokens": 24}
            for d in domains
        },
        "teachers": teachers,
        "generate": {
            "samples_per_task": 1,
            "temperature": 0.0,
            "max_turns": 4,
            "max_episode_tokens": 400,
        },
        # untrained micro teachers are rarely right or well formed: keep their traces so
        # every domain has clean rows to train on (a pipeline test, not a quality test)
        "filter": {
            "keep_failed": True,
            "drop_malformed": False,
            "dedup_near": False,
            "decontaminate": False,
            "workers": 1,
        },
        "student": {"kind": "scratch", "arch": arch},
        "train": {**train, "max_steps": student_steps},
        "eval": {"pass_k": 2, "batch_size": 16, "target_wall_s": 3600, "target_peak_gb": 24},
        "rl": {"enabled": rl, **MICRO_RL},
    }


# RL steps on the micro models: the wiring, not learning (an overlong buffer as long as the
# limit gives a random model's groups reward variance, so updates really happen)
MICRO_RL = {
    "steps": 2, "prompts_per_step": 4, "num_generations": 2, "max_new_tokens": 12,
    "micro_batch_seqs": 8, "domains": {d: {"reward": {"overlong_buffer": 12, "length_group": 0.5}} for d in DOMAINS},
}  # fmt: skip


def write_recipe(path: Path, data: dict) -> Path:
    yaml = YAML()
    with open(path, "w") as f:
        yaml.dump(json.loads(json.dumps(data)), f)  # copies: no YAML anchors for shared dicts
    return path


def cli(*args: str) -> str:
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def run_stages(path: Path) -> dict[str, dict]:
    from distill.pipeline import run
    from distill.recipe.schema import load_recipe

    return {s["stage"]: s for s in run(load_recipe(path))}


def dataset_of(directory: Path):
    import datasets

    files = [str(p) for p in shard_files(directory)]
    return datasets.load_dataset("arrow", data_files=files, split="train")


def test_micro_pipeline_runs_every_stage_then_skips_and_reruns_only_what_changed(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "micro.yaml", micro_recipe(out))
    first = run_stages(recipe)
    assert [s["status"] for s in first.values()] == ["ran"] * 6
    assert (out / "teachers" / "math-rl" / "config.json").exists()  # specialist RL
    assert not (out / "teachers" / "logic-rl").exists()
    rl_log = (out / "runs" / "rl" / "rl_log.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rl_log] == [1, 2]  # mixed RL on the student
    # a model directory holds an HF model repo and its card; what runs leave is in runs/
    repo = {"config.json", "generation_config.json", "model.safetensors", "README.md",
            "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}  # fmt: skip
    for m in ("teachers/math", "teachers/math-rl", "teachers/logic", "student", "rl"):
        assert {p.name for p in (out / m).iterdir()} == repo, m
    assert (out / "runs" / "teachers" / "math" / "oracle" / "_manifest.json").exists()
    assert (out / "runs" / "student" / "train_report.json").exists()
    for m in ("student", "rl", "teachers/math-rl"):  # eval put each model's scores in its card
        card = (out / m / "README.md").read_text()
        assert "## Evaluation" in card and "| math | " in card, m

    for d in DOMAINS:
        assert (out / "teachers" / d / "config.json").exists()
        for stage in ("raw", "clean"):
            ds = dataset_of(out / stage / d)
            assert len(ds) > 0 and set(ds["domain"]) == {d}, (stage, d)
            assert all(m[0]["role"] in ("system", "user") for m in ds["messages"])
        clean = dataset_of(out / "clean" / d)
        assert all(v is not None for v in clean["verdict"])  # the filter judged every row

    tok = AutoTokenizer.from_pretrained(out / "rl")
    model = AutoModelForCausalLM.from_pretrained(out / "rl")
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=False,
    )
    gen = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] > ids.shape[1]

    report = json.loads((out / "eval" / "report.json").read_text())
    models = {s["model"] for s in report["scores"]}
    assert models == {f"teacher:{d}" for d in DOMAINS} | {
        "teacher:math:supervised",
        "student",
        "student:distilled",
    }
    assert report["models"]["student"]["path"] == str(out / "rl")
    cells = {(s["model"], s["domain"]) for s in report["scores"]}
    for d in DOMAINS:
        assert (f"teacher:{d}", d) in cells and ("student", d) in cells
        assert 0.0 <= report["scores"][0]["pass1"] <= 1.0
    assert set(report["recovery"]) == set(DOMAINS)
    _check_time_summary(out)
    _check_dsa_vs_dense(out)
    for d in DOMAINS:  # recovery before and after mixed RL
        assert {"ratio", "distilled_ratio"} <= set(report["recovery"][d])
    assert "teacher_supervised" in report["recovery"]["math"]
    # what each stage took, added up against the recipe's time and memory targets
    assert list(report["cost"]) == ["teachers", "generate", "filter", "train", "rl", "eval"]
    ran = {s: v["seconds"] for s, v in first.items()}
    for stage, c in report["cost"].items():
        assert c["peak_rss_mb"] > 50 and 0 <= c["seconds"]
        assert stage == "eval" or abs(c["seconds"] - ran[stage]) < 1.0
    wall, mem = report["targets"][-2:]
    assert wall["value"] == pytest.approx(sum(c["seconds"] for c in report["cost"].values()))
    assert wall["met"] and mem["met"] and mem["value"] < 24
    for s in report["scores"]:  # every greedy rollout is kept, with its verdict
        rows = [
            json.loads(line)
            for line in (
                out / "eval" / "samples" / f"{s['model'].replace(':', '_')}.{s['domain']}.jsonl"
            )
            .read_text()
            .splitlines()
        ]
        assert len(rows) == s["tasks"] and sum(r["passed"] for r in rows) == round(
            s["pass1"] * s["tasks"]
        )
        assert all(r["reason"] and r["messages"][-1]["role"] in ("assistant", "tool") for r in rows)
        # and each task's sampled verdicts, whose mean is the report's sampled pass@1
        assert all(len(r["sampled_passed"]) == s["k"] == 2 for r in rows)
        rates = [sum(r["sampled_passed"]) / s["k"] for r in rows]
        assert sum(rates) / len(rows) == pytest.approx(s["sampled_pass1"])
        assert sum(n for _, n in s["by_kind"].values()) == s["tasks"]
    md = (out / "eval" / "report.md").read_text()
    assert all(f"| {d} |" in md for d in DOMAINS) and "Targets:" in md
    assert (out / "eval" / "report.png").read_bytes()[:4] == b"\x89PNG"

    # a second run skips every stage
    teacher_w = out / "teachers" / "math" / "model.safetensors"
    stamps = {p: p.stat().st_mtime_ns for p in [teacher_w, *shard_files(out / "clean" / "math")]}
    second = run_stages(recipe)
    assert [s["status"] for s in second.values()] == ["skipped"] * 6

    # a changed train section (through `distill recipe set`) reruns only train and eval
    cli("recipe", "set", str(recipe), "train.learning_rate=0.001")
    third = run_stages(recipe)
    assert {s: v["status"] for s, v in third.items()} == {
        "teachers": "skipped",
        "generate": "skipped",
        "filter": "skipped",
        "train": "ran",
        "rl": "ran",
        "eval": "ran",
    }
    assert (
        "train changed" in third["train"]["why"]
        and "upstream train, rl reran" in third["eval"]["why"]
    )
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())

    # the student's RL section alone reruns only the RL stage and eval
    cli("recipe", "set", str(recipe), "rl.learning_rate=0.0002")
    fourth = run_stages(recipe)
    assert [s for s, v in fourth.items() if v["status"] == "ran"] == ["rl", "eval"]
    assert "recipe section rl changed" in fourth["rl"]["why"]

    # one teacher's RL section reruns that teacher's RL (not its supervised phase, not the
    # other teachers), then everything downstream
    math_rl = out / "teachers" / "math-rl" / "model.safetensors"
    logic_w = out / "teachers" / "logic" / "model.safetensors"
    before = {p: p.stat().st_mtime_ns for p in (teacher_w, math_rl, logic_w)}
    cli("recipe", "set", str(recipe), "teachers.math.rl.learning_rate=0.0002")
    fifth = run_stages(recipe)
    assert [s for s, v in fifth.items() if v["status"] == "ran"] == [
        "teachers", "generate", "filter", "train", "rl", "eval"
    ]  # fmt: skip
    assert teacher_w.stat().st_mtime_ns == before[teacher_w]
    assert logic_w.stat().st_mtime_ns == before[logic_w]
    assert math_rl.stat().st_mtime_ns != before[math_rl]

    # a run-only field of it (held-out scoring) changes no weight: that teacher's RL is
    # not rerun for it, even where the teachers stage runs for another reason
    from distill.recipe.schema import load_recipe
    from distill.rl.specialist import sharpen

    cli("recipe", "set", str(recipe), "teachers.math.rl.eval_steps=1")
    stamp = math_rl.stat().st_mtime_ns
    assert sharpen(load_recipe(recipe), "math")["steps"] > 0
    assert math_rl.stat().st_mtime_ns == stamp


def test_eval_one_off_on_any_model_directory(tmp_path):
    """`distill eval --model DIR` on a directory we did not train (no recipe)."""
    d = tiny_model_dir(tmp_path / "any-model", corpus=["Evaluate: T and F. Answer: F"])
    # a recipe is optional; here it only bounds decoding so the untrained model stops soon
    settings = write_recipe(
        tmp_path / "s.yaml",
        {"name": "s", "generate": {"max_new_tokens": 12}, "eval": {"pass_k": 2}},
    )
    cli(
        "eval",
        str(settings),
        "--model",
        str(d),
        "--domains",
        "logic,math",
        "--tasks",
        "3",
        "--out",
        str(tmp_path / "rep"),
    )
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert {(s["model"], s["domain"], s["tasks"]) for s in report["scores"]} == {
        ("any-model", "logic", 3),
        ("any-model", "math", 3),
    }
    assert report["recovery"] == {} and report["targets"] == []
    result = CliRunner().invoke(app, ["eval", "--model", str(d), "--domains", "poetry"])
    assert result.exit_code != 0 and "unknown domain 'poetry'" in str(result.exception)


@pytest.mark.slow
def test_fuller_pipeline_learns_and_the_report_says_so(tmp_path):
    """More steps on math and logic with the default filter: the teachers learn, only
    verified traces reach the student, and the student learns from them."""
    out = tmp_path / "run"
    data = micro_recipe(
        out,
        teacher_steps=400,
        oracle=2000,
        student_steps=400,
        train_tasks=200,
        eval_tasks=40,
        hidden=64,
    )
    for d in ("code", "agents"):
        data["domains"][d]["enabled"] = False
    for t in data["teachers"].values():
        t["arch"]["num_layers"] = 2
        t["train"]["learning_rate"] = 0.005
    # column addition needs the demo's math teacher (4 layers of 128, lr 0.002: 88% there
    # at 600 steps); at 2 layers of 64 it ends at loss 0.41 and solves no task, so no
    # math trace would pass the filter
    data["teachers"]["math"]["arch"] = {
        "hidden_size": 128,
        "num_layers": 4,
        "num_heads": 4,
        "intermediate_size": 320,
        "max_position_embeddings": 512,
    }
    data["teachers"]["math"]["train"].update(
        learning_rate=0.002,
        warmup_steps=20,
        max_steps=500,
        batch_tokens=1024,
        micro_batch_tokens=1024,
    )
    data["student"]["arch"]["num_layers"] = 2
    data["train"]["learning_rate"] = 0.005
    data["domains"]["math"]["max_new_tokens"] = 96
    data["domains"]["logic"]["max_new_tokens"] = 96
    data["generate"]["temperature"] = 0.3
    data.pop("filter")
    recipe = write_recipe(tmp_path / "fuller.yaml", data)
    run_stages(recipe)
    for d in ("math", "logic"):
        clean = dataset_of(out / "clean" / d)
        assert len(clean) > 0 and all(v["passed"] for v in clean["verdict"])
    report = json.loads((out / "eval" / "report.json").read_text())
    logic = report["recovery"]["logic"]
    # an untrained model scores 0 (no parsable answer); these learned the task's form
    # and solve some held-out tasks, and the student learned from verified traces alone
    assert logic["teacher"] >= 0.1 and logic["student"] > 0.0


def _serve(model_dir: Path, port: int):
    import subprocess
    import sys
    import time

    import httpx

    proc = subprocess.Popen(
        [sys.executable, "-m", "distill", "serve", str(model_dir), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("distill serve did not come up")


def test_hf_teachers_recipe_with_a_model_dir_and_distill_serve(tmp_path):
    """recipes/hf-teachers.yaml as shipped, pointed at tiny real models: one loaded from
    a directory, one behind `distill serve` on loopback."""
    import socket

    from distill.errors import UserError

    math_dir = tiny_model_dir(tmp_path / "math-teacher", corpus=CORPUS)
    code_dir = tiny_model_dir(tmp_path / "code-teacher", corpus=CORPUS)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = _serve(code_dir, port)
    try:
        sets = [
            f"output_dir={tmp_path / 'run'}",
            f"teachers.math.path={math_dir}",
            f"teachers.code.base_url=http://127.0.0.1:{port}/v1",
            "teachers.code.model=code-teacher",
            "tokenizer.corpus_tasks=20",
            "tokenizer.vocab_size=320",
            "domains.math.train_tasks=2",
            "domains.code.train_tasks=2",
            "generate.samples_per_task=1",
            "generate.max_new_tokens=8",
        ]
        args = [a for s in sets for a in ("--set", s)]
        cli("teachers", "recipes/hf-teachers.yaml", *args)
        record = json.loads((tmp_path / "run" / "runs" / "teachers" / "_stage.json").read_text())
        assert (
            record["teachers"]["math"]["kind"] == "hf" and record["teachers"]["math"]["params"] > 0
        )
        assert record["teachers"]["code"] == {
            "kind": "openai",
            "base_url": f"http://127.0.0.1:{port}/v1",
            "model": "code-teacher",
        }
        cli("generate", "recipes/hf-teachers.yaml", *args)
        for d, teacher in (("math", str(math_dir)), ("code", "code-teacher")):
            ds = dataset_of(tmp_path / "run" / "raw" / d)
            assert len(ds) == 2 and {lin["teacher_model"] for lin in ds["lineage"]} == {teacher}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    down = CliRunner().invoke(app, ["teachers", "recipes/hf-teachers.yaml", *args])
    assert isinstance(down.exception, UserError) and "does not answer" in str(down.exception)
    broken = [
        a if "teachers.math.path" not in a else f"teachers.math.path={tmp_path}" for a in args
    ]
    bad = CliRunner().invoke(app, ["teachers", "recipes/hf-teachers.yaml", *broken])
    assert isinstance(bad.exception, UserError) and "teachers.math.path" in str(bad.exception)


def _bench_module(name):
    import importlib.util

    path = Path(__file__).parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _check_dsa_vs_dense(out):
    """bench/dsa_vs_dense.py (issue #19's quality check) reads two real reports: a report
    against itself is within 1 point everywhere; a student 2 points lower on one domain
    misses there, and only there."""
    import copy

    rows = _bench_module("dsa_vs_dense").rows
    report = json.loads((out / "eval" / "report.json").read_text())
    same = rows(report, report, 1.0)
    assert same and all(r["met"] and r["gap"] == 0 for r in same)
    base, worse = copy.deepcopy(report), copy.deepcopy(report)
    d = report["domains"][0]
    base["recovery"][d]["student"], worse["recovery"][d]["student"] = 0.5, 0.48
    missed = [(r["domain"], r["stage"]) for r in rows(base, worse, 1.0) if not r["met"]]
    assert missed == [(d, "final")]
    # a DSA run without mixed RL: its student is the distilled one, read against the
    # dense run's distilled student; 2 points under it misses there alone
    no_rl = copy.deepcopy(report)
    for rec in no_rl["recovery"].values():
        rec["student"] = rec.pop("distilled")
    assert [(r["stage"], r["gap"]) for r in rows(report, no_rl, 1.0)][:1] == [("distilled", 0)]
    base["recovery"][d]["distilled"], no_rl["recovery"][d]["student"] = 0.5, 0.48
    got = rows(base, no_rl, 1.0)
    assert {r["stage"] for r in got} == {"distilled"}
    assert [r["domain"] for r in got if not r["met"]] == [d]


def _check_time_summary(out):
    """bench/gpu_summary.py (printed after each GPU recipe run) reads every stage's
    records of a finished run: each stage's line, each teacher's oracle and train time."""
    text = _bench_module("gpu_summary").summary(out)
    assert "targets" in text.splitlines()[0]
    for stage in ("teachers", "generate", "filter", "train", "rl", "eval"):
        assert any(line.strip().startswith(stage + " ") for line in text.splitlines()), stage
    assert "oracle" in text and "train call" in text and "steps in" in text
