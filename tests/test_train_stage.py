"""`distill train` as a stage and under `accelerate launch` with 2 CPU processes."""

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tiny_artifacts import ARCH, make_tokenizer, math_trace, small_cfg, tool_trace, write_shards
from typer.testing import CliRunner

from distill.chat.template import train_tokenizer
from distill.cli import app
from distill.train.loop import train

TESTS = Path(__file__).parent

DDP_SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from tiny_artifacts import ARCH, small_cfg
from distill.train.loop import train
root = Path({root!r})
report = train(init=ARCH, tokenizer_dir=root / "tok", out_dir=root / "ddp", cfg=small_cfg(max_steps=4), seed=0,
               shards={{"math": root / "clean" / "math", "agents": root / "clean" / "agents"}},
               loss_weights={{"math": 1.0, "agents": 2.0}})
import os
(root / f"ddp-{{os.environ.get('RANK')}}.json").write_text(json.dumps([report["world_size"], report["losses"]]))
"""


def make_run(root: Path, tok_dir: str = "tok") -> None:
    make_tokenizer(root / tok_dir)
    rng = random.Random(0)
    write_shards(root / "clean" / "math", "math", [math_trace(i, rng) for i in range(40)])
    write_shards(root / "clean" / "agents", "agents", [tool_trace()] * 6)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.cpu_ranks
def test_two_cpu_processes_equal_one(tmp_path):
    make_run(tmp_path)
    script = tmp_path / "ddp_train.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT.format(tests=str(TESTS), root=str(tmp_path))))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # accelerate 1.15 runs `--cpu` multi-process only through mpirun; its torchrun path
    # (--multi_gpu) on a host without GPUs gives 2 gloo CPU processes (MULTI_CPU)
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "2",
        "--multi_gpu",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        str(script),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    world, ddp = json.loads((tmp_path / "ddp-0.json").read_text())
    assert world == 2 and json.loads((tmp_path / "ddp-1.json").read_text()) == [2, ddp]
    single = train(
        init=ARCH,
        tokenizer_dir=tmp_path / "tok",
        out_dir=tmp_path / "one",
        cfg=small_cfg(max_steps=4),
        seed=0,
        shards={"math": tmp_path / "clean" / "math", "agents": tmp_path / "clean" / "agents"},
        loss_weights={"math": 1.0, "agents": 2.0},
    )
    assert len(ddp) == 4
    torch.testing.assert_close(
        torch.tensor(ddp), torch.tensor(single["losses"]), rtol=1e-5, atol=1e-6
    )
    a = json.loads((tmp_path / "ddp" / "config.json").read_text())
    assert (
        a["vocab_size"] == json.loads((tmp_path / "one" / "config.json").read_text())["vocab_size"]
    )


RECIPE = """
name: tiny
output_dir: {out}
domains:
  math: {{loss_weight: 1.0}}
  agents: {{loss_weight: 2.0, sampling_weight: 0.5}}
teachers:
  math: {{kind: bootstrap}}
  agents: {{kind: bootstrap}}
student:
  kind: scratch
  arch: {{hidden_size: 32, num_layers: 2, num_heads: 4, num_kv_heads: 2, max_position_embeddings: 512}}
train: {{max_steps: 3, warmup_steps: 1, batch_tokens: 512, micro_batch_tokens: 256, max_length: 128, precision: fp32}}
"""


def test_distill_train_stage(tmp_path):
    out = tmp_path / "run"
    make_run(out, "tokenizer")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(out=out))
    res = CliRunner().invoke(app, ["train", str(recipe), "--set", "train.max_steps=4"])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "runs" / "student" / "train_report.json").read_text())
    assert report["steps"] == 4 and set(report["domains"]) == {"math", "agents"}
    stage = json.loads((out / "runs" / "student" / "_stage.json").read_text())
    assert stage["stage"] == "train" and stage["steps"] == 4
    assert (out / "student" / "model.safetensors").exists()


def test_kd_with_a_teacher_of_another_vocabulary_is_refused(tmp_path):
    out = tmp_path / "run"
    make_run(out, "tokenizer")
    teacher = tmp_path / "teacher"
    train_tokenizer(["completely different corpus text"] * 5, 300, teacher)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        RECIPE.format(out=out).replace(
            "math: {kind: bootstrap}", f"math: {{kind: hf, path: {teacher}}}"
        )
    )
    res = CliRunner().invoke(app, ["train", str(recipe), "--set", "train.kd.enabled=true"])
    assert res.exit_code != 0
    msg = str(res.exception)
    assert (
        "teacher 'math' tokenizer" in msg and str(teacher) in msg and str(out / "tokenizer") in msg
    )


def test_a_domain_with_no_clean_traces_is_left_out(tmp_path):
    out = tmp_path / "run"
    make_run(out, "tokenizer")
    shutil.rmtree(out / "clean" / "agents")
    write_shards(out / "clean" / "agents", "agents", [])  # every agents trace was filtered out
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(out=out))
    res = CliRunner().invoke(app, ["train", str(recipe), "--set", "train.max_steps=2"])
    assert res.exit_code == 0, res.output
    assert "clean/agents has no traces; training without agents" in res.output
    report = json.loads((out / "runs" / "student" / "train_report.json").read_text())
    assert set(report["domains"]) == {"math"}
    assert json.loads((out / "runs" / "student" / "_stage.json").read_text())[
        "skipped_domains"
    ] == ["agents"]


@pytest.mark.cpu_ranks
def test_train_stage_spawns_cpu_ranks_with_the_same_result(tmp_path, monkeypatch):
    """DISTILL_CPU_PROCS=2: the stage starts its own 2 gloo ranks (no launcher), and the
    losses equal those of the same stage in one process."""
    from distill.recipe.schema import load_recipe
    from distill.stages import run_stage

    losses = {}
    for procs in ("1", "2"):
        out = tmp_path / f"run{procs}"
        make_run(out, "tokenizer")
        recipe = tmp_path / f"r{procs}.yaml"
        recipe.write_text(RECIPE.format(out=out))
        monkeypatch.setenv("DISTILL_CPU_PROCS", procs)
        report = run_stage(load_recipe(recipe, ["train.max_steps=4"]), "train")
        losses[procs] = (report["world_size"], report["losses"])
        assert json.loads((out / "runs" / "student" / "_stage.json").read_text())["steps"] == 4
    assert losses["1"][0] == 1 and losses["2"][0] == 2
    torch.testing.assert_close(
        torch.tensor(losses["2"][1]), torch.tensor(losses["1"][1]), rtol=1e-5, atol=1e-6
    )
