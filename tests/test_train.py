"""The trainer end to end on tiny real models: output directory, exact resume,
interrupted checkpoints, KD, LoRA, and the `distill train` stage."""

import json
import random
import time

import pytest
import torch
from tiny_artifacts import ARCH, make_tokenizer, math_trace, small_cfg, tool_trace, write_shards
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.chat.render import render_trace
from distill.errors import UserError
from distill.layout import run_dir
from distill.train.loop import train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    tok = make_tokenizer(root / "tok")
    rng = random.Random(0)
    shards = {
        "math": write_shards(
            root / "clean" / "math", "math", [math_trace(i, rng) for i in range(40)]
        ),
        "agents": write_shards(root / "clean" / "agents", "agents", [tool_trace()] * 6),
    }
    return root, tok, shards


def run_train(data, out, **kw):
    root, _, shards = data
    args = dict(
        init=ARCH,
        tokenizer_dir=root / "tok",
        shards=shards,
        out_dir=out,
        cfg=small_cfg(),
        seed=0,
        loss_weights={"math": 1.0, "agents": 2.0},
    )
    args.update(kw)
    return train(**args)


def test_report_to_wandb_logs_offline(data, tmp_path, monkeypatch):
    """`report_to: [wandb]` logs through accelerate's tracker; offline, into WANDB_DIR."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_train(data, tmp_path / "out", cfg=small_cfg(max_steps=2, report_to=["wandb"]))
    (records,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")  # for `wandb sync`
    # wandb's service process writes this file: once (2026-12-08, CI on a 2-core CPU under
    # load) it held only its 7-byte header when read just after finish() returned, so it
    # gets 30 s to reach the step metrics
    deadline = time.monotonic() + 30
    while b"tokens_per_s" not in (data := records.read_bytes()) and time.monotonic() < deadline:
        time.sleep(0.2)  # protobuf records: the keys stand in them as text
    assert b"loss/math" in data and b"tokens_per_s" in data  # the step metrics
    assert b"learning_rate" in data  # the recipe section, as the run's config


def test_train_writes_a_loadable_hf_model(data, tmp_path):
    _, tok, _ = data
    report = run_train(
        data, tmp_path / "out", cfg=small_cfg(max_steps=8, report_to=["tensorboard"])
    )
    assert report["finished"] and report["steps"] == 8
    assert report["losses"][-1] < report["losses"][0] - 0.3
    assert (
        set(report["domains"]) == {"math", "agents"}
        and report["domains"]["agents"]["loss_tokens"] > 0
    )
    assert report["tokens_per_s"] > 0 and report["peak_memory_bytes"] > 0
    run = run_dir(tmp_path / "out")  # the run's files, beside the model: runs/out/
    saved = json.loads((run / "train_report.json").read_text())
    assert list((run / "logs").rglob("events.out.tfevents*"))  # per-domain curves
    # the model directory holds what an HF model repo holds, and a model card
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert files == {"config.json", "generation_config.json", "model.safetensors", "README.md",
                     "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}  # fmt: skip
    card = (tmp_path / "out" / "README.md").read_text()
    assert "library_name: transformers" in card and "| math | `" in card
    assert "learning_rate: 0.003" in card and "8 optimizer steps" in card
    assert saved["losses"] == report["losses"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    end = tok.convert_tokens_to_ids("<|end|>")
    assert (
        model.generation_config.eos_token_id == end
        and model.generation_config.pad_token_id == tok.pad_token_id
    )
    student_tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    text = student_tok.apply_chat_template(tool_trace(), tokenize=False)
    assert (
        "I should call" not in text
        and "<think>84 + 1 = 85.</think>" in text
        and "<|tool|>84<|end|>" in text
    )
    out = model.generate(
        torch.tensor(
            [
                student_tok.apply_chat_template(
                    tool_trace()[:2], add_generation_prompt=True, return_dict=False
                )
            ]
        ),
        max_new_tokens=3,
    )
    assert out.shape[1] > 0


def test_resume_reproduces_the_uninterrupted_losses(data, tmp_path):
    full = run_train(data, tmp_path / "a")
    first = run_train(data, tmp_path / "b", stop_after_steps=3)
    assert not first["finished"] and first["losses"] == pytest.approx(full["losses"][:3], abs=1e-6)
    ckpts = run_dir(tmp_path / "b") / "checkpoints"
    assert [p.name for p in ckpts.iterdir()] == ["step-000003"]
    # a later checkpoint whose writing was killed: never renamed, so never trusted
    (ckpts / "step-000005.tmp").mkdir()
    (ckpts / "step-000005.tmp" / "model.safetensors").write_bytes(b"trunc")
    rest = run_train(data, tmp_path / "b")
    assert rest["finished"]
    # the report covers the whole run, the steps before the resume included (#16 item 11)
    torch.testing.assert_close(
        torch.tensor(rest["losses"]), torch.tensor(full["losses"]), rtol=0, atol=1e-6
    )
    saved = json.loads((run_dir(tmp_path / "b") / "train_report.json").read_text())
    assert len(saved["losses"]) == saved["steps"]  # the file too: the run before the resume
    torch.testing.assert_close(
        torch.tensor(saved["losses"]), torch.tensor(full["losses"]), rtol=0, atol=1e-6
    )
    assert saved["tokens"] == full["tokens"]
    for d, r in full["domains"].items():
        assert saved["domains"][d]["loss_tokens"] == r["loss_tokens"]
        assert saved["domains"][d]["mean_loss"] == pytest.approx(r["mean_loss"], abs=1e-6)
    assert saved["step_elapsed_s"] == sorted(saved["step_elapsed_s"])
    assert not (ckpts / "step-000005.tmp").exists()


def test_kd_and_its_errors(data, tmp_path):
    root, tok, _ = data
    traces = [tool_trace()] * 4
    topk = []
    for t in traces:
        n = sum(sum(ex.loss_mask) for ex in render_trace(tok, t))
        topk.append([{"ids": [5, 7, 9], "logprobs": [-0.5, -1.5, -2.5]}] * n)
    kd_shards = {"agents": write_shards(tmp_path / "kd", "agents", traces, topk=topk)}
    cfg = small_cfg(max_steps=3)
    cfg.kd.enabled = True
    report = run_train(data, tmp_path / "out", shards=kd_shards, cfg=cfg)
    assert report["finished"] and all(x == x for x in report["losses"])
    plain = run_train(data, tmp_path / "plain", shards=kd_shards, cfg=small_cfg(max_steps=3))
    assert abs(plain["losses"][0] - report["losses"][0]) > 1e-3  # the KL term is in the loss
    bad = {
        "agents": write_shards(
            tmp_path / "bad",
            "agents",
            traces[:1],
            topk=[[{"ids": [10**6], "logprobs": [-1.0]}] * len(topk[0])],
        )
    }
    with pytest.raises(UserError, match="outside the student vocabulary"):
        run_train(data, tmp_path / "bad_out", shards=bad, cfg=cfg)


def test_lora_trains_adapters_and_merges(data, tmp_path):
    """merge: false also writes the adapter as its own repo, naming a base that exists."""
    from peft import PeftModel

    _, tok, _ = data
    cfg = small_cfg(max_steps=2)
    cfg.lora.enabled = True
    cfg.lora.merge = False
    run_train(data, tmp_path / "out", cfg=cfg)
    from distill.models import build_model

    base = build_model(ARCH, tok, 0).state_dict()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(merged[q], base[q])  # adapters merged in
    up = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(merged[up], base[up])  # not a target module: frozen
    adapter, base_dir = tmp_path / "out-adapter", tmp_path / "out-base"
    named = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert named == str(base_dir.resolve())
    saved_base = AutoModelForCausalLM.from_pretrained(named)
    assert torch.equal(saved_base.state_dict()[q], base[q])  # the untrained scratch base
    with_adapter = PeftModel.from_pretrained(saved_base, adapter).merge_and_unload()
    assert torch.allclose(with_adapter.state_dict()[q], merged[q], atol=1e-6)


def test_max_time_stops_early_with_a_saved_model_and_checkpoint(data, tmp_path):
    report = run_train(data, tmp_path / "out", cfg=small_cfg(max_steps=6, max_time_s=1e-6))
    assert report["finished"] and report["stopped_by"] == "max_time_s" and report["steps"] == 1
    assert (tmp_path / "out" / "model.safetensors").exists()
    ckpt = run_dir(tmp_path / "out") / "checkpoints" / "step-000001"
    assert (ckpt / "trainer_state.json").exists()


def test_time_limit_moves_the_lr_schedule_ahead(tmp_path):
    """Under max_time_s the decay follows the elapsed share of the time limit when that is
    ahead of the steps, and the scheduler (with that state) still checkpoints."""
    from distill.train.setup import make_optimizer

    cfg = small_cfg(max_steps=100, warmup_steps=10, max_time_s=60.0, min_lr_ratio=0.1)
    opt, sched = make_optimizer(torch.nn.Linear(2, 2), cfg, 100)
    f = sched.lr_lambdas[0]
    by_steps = [f(s) for s in (0, 20, 50, 99)]
    f.time_frac = 0.5  # half the time gone
    assert f(0) == by_steps[0]  # warmup stays in steps
    assert f(20) == pytest.approx(by_steps[2]) and by_steps[2] < by_steps[1]  # as step 50
    assert f(99) == by_steps[3]  # steps ahead of time: steps rule
    f.time_frac = 2.0
    assert f(20) == pytest.approx(0.1)  # out of time: the floor
    torch.save(sched.state_dict(), tmp_path / "sched.pt")
    _, again = make_optimizer(torch.nn.Linear(2, 2), cfg, 100)
    again.load_state_dict(torch.load(tmp_path / "sched.pt", weights_only=False))
    assert again.lr_lambdas[0].time_frac == 2.0


def test_deferred_bookkeeping_changes_no_loss_checkpoint_or_resume(data, tmp_path, monkeypatch):
    """On a GPU the loop books step k only after queueing step k+1 (distill.train.loop.DEFER);
    forced here on CPU, it must give the same losses, the same checkpoints, the same exact
    resume and the same stop on a time limit as booking every step at once."""
    import distill.train.loop

    cfg = small_cfg(save_steps=2, save_total_limit=5)
    sync = run_train(data, tmp_path / "sync", cfg=cfg)
    monkeypatch.setattr(distill.train.loop, "DEFER", True)
    late = run_train(data, tmp_path / "late", cfg=cfg)
    assert late["finished"] and late["losses"] == sync["losses"] and late["steps"] == 6
    assert len(late["step_elapsed_s"]) == 6
    names = sorted(p.name for p in (run_dir(tmp_path / "late") / "checkpoints").iterdir())
    assert names == ["step-000002", "step-000004", "step-000006"]
    first = run_train(data, tmp_path / "b", stop_after_steps=3)
    assert not first["finished"] and first["losses"] == sync["losses"][:3]
    assert [p.name for p in (run_dir(tmp_path / "b") / "checkpoints").iterdir()] == ["step-000003"]
    rest = run_train(data, tmp_path / "b")
    assert rest["finished"] and rest["losses"] == sync["losses"]  # the whole run's steps
    timed = run_train(data, tmp_path / "t", cfg=small_cfg(max_steps=6, max_time_s=1e-6))
    assert timed["stopped_by"] == "max_time_s" and timed["steps"] == 1


@pytest.mark.parametrize("defer", [False, True])
def test_until_ends_a_finished_run_and_its_resume_takes_no_step(data, tmp_path, defer, monkeypatch):
    """``until`` (the DSA warm-up's plateau test) ends the run at the step it names, with a
    model and a checkpoint, booked the same deferred or not (deferred: one step later, as
    a time limit); rerunning it resumes there and trains no further."""
    import distill.train.loop

    monkeypatch.setattr(distill.train.loop, "DEFER", defer)
    seen = []

    def until(stats):
        seen.append(len(stats.losses))
        return "enough" if len(stats.losses) >= 2 else None

    out = tmp_path / "out"
    first = run_train(data, out, cfg=small_cfg(max_steps=6), until=until)
    stop_at = 3 if defer else 2
    assert first["finished"] and first["stopped_by"] == "enough" and first["steps"] == stop_at
    assert (out / "model.safetensors").exists()
    ckpts = [p.name for p in (run_dir(out) / "checkpoints").iterdir()]
    assert ckpts == [f"step-{stop_at:06d}"]
    again = run_train(data, out, cfg=small_cfg(max_steps=6), until=until)
    assert again["finished"] and again["steps"] == stop_at and again["losses"] == first["losses"]
    plain = run_train(data, tmp_path / "plain", cfg=small_cfg(max_steps=6))
    assert plain["steps"] == 6 and plain["losses"][:stop_at] == first["losses"]


def test_runs_at_other_precisions_train_in_one_process(data, tmp_path, monkeypatch):
    """One `distill run` trains its train and rl stages in one process (on a GPU host, or
    with DISTILL_CPU_PROCS=1), each at its own precision: a bf16 run, then an fp32 one,
    then bf16 again each get theirs, not Accelerate's refusal to change a process's
    initialized state."""
    import distill.train.loop as loop

    seen = []

    def recording(cfg, out):
        acc = make(cfg, out)
        seen.append(acc.mixed_precision)
        return acc

    make = loop.make_accelerator
    monkeypatch.setattr(loop, "make_accelerator", recording)
    for i, precision in enumerate(("bf16", "fp32", "bf16")):
        cfg = small_cfg(max_steps=1, precision=precision)
        assert run_train(data, tmp_path / f"run{i}", cfg=cfg)["finished"]
    assert seen == ["bf16", "no", "bf16"]
