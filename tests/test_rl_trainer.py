"""The GRPO loop on a tiny random Llama: rollouts from the live weights, the sampler's
log-probabilities equal to the trainer's, logs with every metric, the model out, the
stage under two CPU ranks equal to one, and resume after a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from gen_fixtures import tiny_model_dir

from distill.layout import run_dir
from distill.recipe.rl import RewardConfig, RLConfig
from distill.rl.rewards import group_length_rewards, overlong_penalty, shaped_reward
from distill.rl.rollout import Outcome, _add_length_rewards, step_prompts
from distill.rl.trainer import LOG, REPORT, train_rl
from teachers.base import get_domain

pytestmark = pytest.mark.integration

# an overlong buffer as long as the limit: rewards differ with length, so a random
# model's groups have variance and the loop does real updates
CFG = dict(
    steps=2, prompts_per_step=3, num_generations=4, temperature=0.7, top_p=0.9, max_new_tokens=10, learning_rate=1e-3, micro_batch_seqs=5,
    domains={"math": {"reward": {"overlong_buffer": 10, "overlong_penalty": 0.5}}},
)  # fmt: skip
LIMITS = {"math": (10, 1, 256)}


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("policy"))


def tasks(n=6):
    return {"math": list(get_domain("math").tasks("train", n, 0, 1))}


def run(out: Path, policy: Path, **kw) -> dict:
    cfg = RLConfig.model_validate({**CFG, **kw})
    return train_rl(init=policy, tasks=tasks(), cfg=cfg, limits=LIMITS, out_dir=out, seed=0)


def log_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir(out) / LOG).read_text().splitlines()]


def test_steps_log_every_metric_and_save_the_model(tmp_path, policy_dir):
    from transformers import AutoModelForCausalLM

    # fp32 on a GPU host too (its default there is bf16): the ratios below are exact
    report = run(tmp_path / "rl", policy_dir, precision="fp32")
    assert report["finished"] and report["steps"] == 2
    rows = log_rows(tmp_path / "rl")
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("reward/math", "pass/math", "len_correct", "len_incorrect", "truncated_frac",
                "entropy", "kl", "clip_frac", "masked_seq_frac", "ratio_p95",
                "ratio_outside_0.9_1.1", "zero_var_frac", "time_generate_s", "time_score_s",
                "time_logprobs_s", "time_update_s", "completion_tokens_per_s"):  # fmt: skip
        assert key in rows[0], key
    assert rows[0]["episodes"] == 3 * 4 and rows[0]["loss_tokens"] > 0
    # one update per rollout batch is on-policy: the trainer's log-probabilities equal the
    # sampler's, so every importance ratio is 1 (fp32)
    assert rows[0]["ratio_outside_0.9_1.1"] == 0.0
    assert abs(rows[0]["ratio_p95"] - 1.0) < 1e-4 and rows[0]["clip_frac"] == 0.0
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "rl")
    before = AutoModelForCausalLM.from_pretrained(policy_dir)
    assert any(
        not torch.equal(a, b) for a, b in zip(saved.parameters(), before.parameters(), strict=True)
    ), "the policy never changed"
    assert json.loads((run_dir(tmp_path / "rl") / REPORT).read_text())["steps"] == 2
    card = (tmp_path / "rl" / "README.md").read_text()  # the model card, beside the weights
    assert "GRPO" in card and "| math | " in card and "num_generations: 4" in card


def test_later_updates_are_off_policy_and_kl_needs_a_reference(tmp_path, policy_dir):
    run(tmp_path / "rl", policy_dir, steps=1, steps_per_generation=2, learning_rate=0.05,
        domains={"math": {"beta": 0.1, "reward": {"overlong_buffer": 10}}})  # fmt: skip
    (row,) = log_rows(tmp_path / "rl")
    # the second mini-batch is sampled by the weights before the first update: ratios move
    assert row["ratio_outside_0.9_1.1"] > 0 or abs(row["ratio_p95"] - 1) > 1e-3
    assert row["kl"] >= 0 and row["time_logprobs_s"] > 0  # the reference model ran


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_resume_from_a_checkpoint_gives_the_same_weights(tmp_path, policy_dir, lora):
    from safetensors.torch import load_file

    kw = {"lora": {"enabled": lora, "r": 4}}
    run(tmp_path / "a", policy_dir, steps=3, **kw)
    run(tmp_path / "b", policy_dir, steps=2, save_steps=1, **kw)  # checkpoint after step 1
    assert (run_dir(tmp_path / "b") / "checkpoints" / "step-000001").is_dir()
    report = run(tmp_path / "b", policy_dir, steps=3, save_steps=1, **kw)  # resumes at step 1
    assert report["steps"] == 3
    assert [r["step"] for r in log_rows(tmp_path / "b")] == [1, 2, 3]  # step 2 once
    a = load_file(tmp_path / "a" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_heldout_scores_are_logged_and_change_no_weight(tmp_path, policy_dir):
    """rl.eval_steps: greedy pass@1 on held-out tasks before the first update, every N
    steps and after the last, decoded as the eval stage decodes (its limits, not the
    rollouts'); the weights are those of the same run without it."""
    from safetensors.torch import load_file

    from distill.eval.stage import ModelSpec, evaluate_model
    from distill.recipe import DomainConfig, EvalConfig, GenerateConfig

    held = {"math": list(get_domain("math").tasks("eval", 5, 0, 1))}
    gen = GenerateConfig(max_new_tokens=16)  # the rollouts stop at 10: these must not
    heldout = (held, {"math": (16, gen.max_turns, gen.max_episode_tokens)})
    cfg = RLConfig.model_validate({**CFG, "steps": 3, "eval_steps": 2})
    report = train_rl(init=policy_dir, tasks=tasks(), cfg=cfg, limits=LIMITS,
                      out_dir=tmp_path / "on", seed=0, heldout=heldout)  # fmt: skip
    run(tmp_path / "off", policy_dir, steps=3)
    on, off = (load_file(tmp_path / k / "model.safetensors") for k in ("on", "off"))
    assert all(torch.equal(on[k], off[k]) for k in off)
    rows = log_rows(tmp_path / "on")
    scored = [(r["step"], "eval/pass1" in r) for r in rows]
    assert scored == [(0, True), (1, False), (2, True), (3, True)]
    assert rows[0].keys() == {"step", "eval/pass1", "eval/pass1/math", "eval/tokens/math"}
    assert [c["step"] for c in report["heldout"]] == [0, 2, 3]

    # step 1's rollouts come after the step-0 scoring, and its update is in the weights
    # above; the later steps' statistics (all but timings) match too, though this random
    # model's rollouts all run to the limit there, so they say little
    def stats(r, *drop):
        return {k: v for k, v in r.items() if not any(w in k for w in ("time", "_per_s", *drop))}

    assert [stats(r, "eval") for r in rows[1:]] == list(map(stats, log_rows(tmp_path / "off")))
    (start,) = evaluate_model(ModelSpec("m", path=policy_dir), {"math": DomainConfig()},
                              gen=gen, ev=EvalConfig(pass_k=1), tasks=held)  # fmt: skip
    # a random model passes nothing: what can differ here is the token count, i.e. the
    # limits (test_rl_learning checks pass@1 against the eval's on a model that passes)
    assert rows[0]["eval/pass1/math"] == start.pass1
    assert rows[0]["eval/tokens/math"] == start.mean_tokens
    assert "Held-out greedy pass@1" in (tmp_path / "on" / "README.md").read_text()


def test_time_guard_ends_the_run_after_a_step_scored_and_saved(tmp_path, policy_dir):
    """max_time_s: the step that runs out of time is the last; with eval_steps it is
    scored, and the model is saved as a finished, shorter run."""
    held = {"math": list(get_domain("math").tasks("eval", 2, 0, 1))}
    cfg = RLConfig.model_validate({**CFG, "steps": 5, "max_time_s": 1e-6, "eval_steps": 3})
    report = train_rl(init=policy_dir, tasks=tasks(), cfg=cfg, limits=LIMITS,
                      out_dir=tmp_path / "rl", seed=0, heldout=(held, LIMITS))  # fmt: skip
    assert report["steps"] == 1 and report["stopped_by"] == "max_time_s"
    assert [c["step"] for c in report["heldout"]] == [0, 1]
    assert (tmp_path / "rl" / "model.safetensors").exists()


def test_heldout_summary_and_schedule():
    from distill.rl.monitor import due, summarize

    rows = [("math", True, 10), ("math", False, 30), ("logic", True, 5)]
    assert summarize(rows) == {
        "eval/pass1/logic": 1.0, "eval/tokens/logic": 5.0,
        "eval/pass1/math": 0.5, "eval/tokens/math": 20.0,
        "eval/pass1": 0.75,  # each domain counts once, however many tasks it has
    }  # fmt: skip
    assert summarize([]) == {}
    assert [s for s in range(8) if due(s, 3, last=s == 7)] == [0, 3, 6, 7]
    assert not any(due(s, 0, last=True) for s in range(4))


def test_lora_trains_only_its_adapters_and_saves_merged_and_apart(tmp_path, policy_dir):
    """rl.lora: the update moves only the adapted projections; the reference (beta > 0)
    is the policy with its adapters off, which is where it started, so the first update's
    KL is exactly 0 and a later one is not; the model directory holds the merged model
    and merge: false also writes the adapter, which on its base gives the same logits."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    lora = {"enabled": True, "r": 4, "merge": False, "target_modules": ["q_proj", "v_proj"]}
    # every group trains, truncated or not: the second step has loss tokens for its KL
    math = {"beta": 0.1, "reward": {"overlong_buffer": 10, "truncated": "zero"}}
    run(tmp_path / "rl", policy_dir, steps=2, learning_rate=0.05, precision="fp32", lora=lora,
        skip_zero_variance=False, domains={"math": math})  # fmt: skip
    rows = log_rows(tmp_path / "rl")
    assert rows[0]["kl"] == 0.0 and rows[1]["kl"] > 0, [r["kl"] for r in rows]
    start, end = (load_file(d / "model.safetensors") for d in (policy_dir, tmp_path / "rl"))
    assert start.keys() == end.keys()  # plain weights, no adapter keys
    moved = {k for k in start if not torch.equal(start[k], end[k])}
    assert moved and all(".q_proj." in k or ".v_proj." in k for k in moved), moved
    adapter = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(policy_dir), tmp_path / "rl-adapter"
    )
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "rl")
    ids = torch.tensor([[5, 9, 14, 3, 27, 8]])
    with torch.no_grad():
        torch.testing.assert_close(adapter(ids).logits, merged(ids).logits, rtol=1e-5, atol=1e-5)


def test_adapters_off_is_the_starting_model_and_no_static_decode_of_adapters(policy_dir):
    from distill.backends.llama_decode import supported
    from distill.models import load_model
    from distill.recipe.lora import LoraConfig
    from distill.rl.policy import AdapterOff, PolicyLogprobs, make_micro_batch
    from distill.rl.rollout import Sample
    from distill.train.setup import apply_lora

    base = load_model(policy_dir, dtype=torch.float32)
    assert supported(base)
    model = load_model(policy_dir, dtype=torch.float32)
    peft = apply_lora(model, LoraConfig(enabled=True, r=4))
    assert not supported(model)  # the static decoder reads weights: it would skip them
    with torch.no_grad():  # trained adapters: B away from its zero start
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    g = torch.Generator().manual_seed(0)
    samples = [
        Sample(torch.randint(3, 60, (5 + i,), generator=g).tolist(),
               torch.randint(3, 60, (4,), generator=g).tolist(), [0.0] * 4, None, "math", i)
        for i in range(2)
    ]  # fmt: skip
    mb = make_micro_batch(samples, 0, torch.device("cpu"))
    policy = PolicyLogprobs(model)
    with torch.no_grad():
        on, off = policy(mb, 0.7)[0], AdapterOff(peft, policy)(mb, 0.7)[0]
        start = PolicyLogprobs(base)(mb, 0.7)[0]
    m = mb.mask
    torch.testing.assert_close(off[m], start[m], rtol=1e-5, atol=1e-5)
    assert (on[m] - start[m]).abs().max() > 1e-3
    torch.testing.assert_close(policy(mb, 0.7)[0][m], on[m])  # switched back on after


def test_step_prompts_follow_weights_and_are_deterministic():
    pools = {"math": list(range(10)), "logic": list(range(5))}
    p = step_prompts(pools, {"math": 3.0, "logic": 1.0}, 8, step=0, seed=0)
    assert [d for d, _ in p].count("math") == 6 and len(p) == 8
    assert p == step_prompts(pools, {"math": 3.0, "logic": 1.0}, 8, step=0, seed=0)
    assert p != step_prompts(pools, {"math": 3.0, "logic": 1.0}, 8, step=1, seed=0)
    with pytest.raises(ValueError):
        step_prompts(pools, {"math": 0.0, "logic": 0.0}, 8, step=0, seed=0)


def test_reward_shaping():
    assert overlong_penalty(80, 100, 20, 1.0) == 0.0
    assert overlong_penalty(90, 100, 20, 1.0) == pytest.approx(0.5)
    assert overlong_penalty(130, 100, 20, 1.0) == 1.0
    eff = RewardConfig(efficiency=0.2)
    short, long_ = (shaped_reward(1.0, True, n, 100, False, eff).value for n in (20, 80))
    assert short > long_ and short == pytest.approx(0.96)
    assert shaped_reward(0.0, False, 20, 100, False, eff).value == 0.0  # no pay for brevity
    cut = shaped_reward(1.0, True, 100, 100, True, RewardConfig(truncated="mask"))
    assert not cut.loss and shaped_reward(1.0, True, 100, 100, True, eff).value == 0.0


def test_group_length_reward_is_kimis_and_never_pays_a_wrong_answer_for_brevity():
    # λ = 0.5 − (len − min)/(max − min): 10 → 0.5, 20 → 0, 30 → −0.5, 15 → 0.25
    got = group_length_rewards([10, 20, 30, 15], [True, True, True, False], 0.4)
    assert got == pytest.approx([0.2, 0.0, -0.2, 0.0])  # the short wrong one gets min(0, λ)=0
    assert group_length_rewards([10, 30], [False, False], 1.0) == pytest.approx([0.0, -0.5])
    assert group_length_rewards([12, 12, 12], [True] * 3, 1.0) == [0.0] * 3  # no spread
    assert group_length_rewards([10, 30], [True, True], 0.0) == [0.0, 0.0]  # off


def test_length_rewards_are_added_per_group_and_spare_zeroed_truncations():
    def outcome(tokens, passed, truncated=False):
        return Outcome("math", passed, float(passed), tokens, truncated, True)

    two_groups = [outcome(10, True), outcome(30, True), outcome(50, False, True), outcome(5, True),
                  outcome(40, True), outcome(40, True)]  # fmt: skip
    cfg = RewardConfig(length_group=1.0)
    _add_length_rewards(two_groups, 0, 3, cfg)
    _add_length_rewards(two_groups, 3, 3, cfg)
    rewards = [o.reward for o in two_groups]
    # group 1: lengths 10..50; the truncated one keeps its 0 (truncated: zero)
    assert rewards[:3] == pytest.approx([1.5, 1.0, 0.0])
    assert rewards[3:] == pytest.approx([1.5, 0.5, 0.5])  # group 2 by its own min and max
    # the advantage it makes: the short correct answer above the long one by the weight
    mask = RewardConfig(length_group=1.0, truncated="mask")
    cut = [outcome(10, True), outcome(50, False, True)]
    _add_length_rewards(cut, 0, 2, mask)
    assert [o.reward for o in cut] == pytest.approx([1.5, -0.5])


@pytest.mark.cpu_ranks
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_rl_stage_on_two_cpu_ranks_equals_one(tmp_path, monkeypatch, lora):
    """DISTILL_CPU_PROCS=2: the stage starts 2 gloo ranks, each rolls out its share of the
    prompts, and the gradients (global denominators, summed over ranks) give the weights
    one process gives; with LoRA adapters too."""
    from safetensors.torch import load_file

    from distill.recipe import load_recipe
    from distill.stages import run_stage

    weights, heldout = {}, {}
    for procs in ("1", "2"):
        out = tmp_path / f"run{procs}"
        tiny_model_dir(out / "student")
        recipe = tmp_path / f"r{procs}.yaml"
        recipe.write_text(
            f"name: r\noutput_dir: '{out}'\ndomains: {{math: {{max_new_tokens: 12}}}}\n"
            "teachers: {math: {kind: bootstrap}}\n"
            "rl: {enabled: true, steps: 2, prompts_per_step: 4, num_generations: 3,\n"
            "     learning_rate: 0.01, max_new_tokens: 10, micro_batch_seqs: 5,\n"
            "     eval_steps: 1, eval_tasks: 3, max_time_s: 3600,\n"
            f"     lora: {{enabled: {str(lora).lower()}, r: 4}},\n"
            "     domains: {math: {tasks: 8, reward: {overlong_buffer: 10}}}}\n"
        )
        monkeypatch.setenv("DISTILL_CPU_PROCS", procs)
        report = run_stage(load_recipe(recipe), "rl")
        assert report["world_size"] == int(procs) and report["steps"] == 2
        weights[procs] = load_file(out / "rl" / "model.safetensors")
        assert json.loads((out / "runs" / "rl" / "_stage.json").read_text())["steps"] == 2
        # the held-out tasks (3: split 2 + 1 over two ranks), at the eval stage's limit
        # (not the rollouts' 10); a random model fails them all, so the curves' equality
        # checks their steps and keys more than the gathering of verdicts
        heldout[procs] = report["heldout"]
    assert heldout["1"] == heldout["2"] and [c["step"] for c in heldout["1"]] == [0, 1, 2]
    assert heldout["1"][0]["eval/tokens/math"] == 12  # a random model runs to the limit
    changed = False
    for k, w in weights["1"].items():
        torch.testing.assert_close(weights["2"][k], w, rtol=1e-4, atol=1e-5)
        changed |= not torch.equal(
            w, load_file(tmp_path / "run1" / "student" / "model.safetensors")[k]
        )
    assert changed


@pytest.mark.cpu_ranks
def test_rl_stage_trains_a_dsa_student_on_two_ranks_and_leaves_its_indexer(tmp_path, monkeypatch):
    """A DSA student (the train stage's output with attention: dsa) through the RL stage
    on 2 gloo ranks: the policy loss never reaches the indexer, which DDP would wait for;
    the indexer stays as trained and the rest learns."""
    from safetensors.torch import load_file

    from distill.dsa import register
    from distill.dsa.model import from_dense
    from distill.models import load_model, load_tokenizer
    from distill.recipe import load_recipe
    from distill.stages import run_stage

    register()
    tiny_model_dir(tmp_path / "dense")
    dense = load_model(tmp_path / "dense", dtype=torch.float32)
    dsa = from_dense(dense, index_n_heads=2, index_head_dim=8, index_top_k=4, warmup=False)
    dsa.save_pretrained(tmp_path / "student")
    load_tokenizer(tmp_path / "dense").save_pretrained(tmp_path / "student")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"name: r\noutput_dir: '{tmp_path}'\ndomains: {{math: {{}}}}\n"
        "teachers: {math: {kind: bootstrap}}\n"
        # two updates a step: DDP's missing-gradient error shows at the second backward
        "rl: {enabled: true, steps: 2, prompts_per_step: 4, num_generations: 3, learning_rate: 0.01,\n"
        "     max_new_tokens: 10, micro_batch_seqs: 2, steps_per_generation: 2,\n"
        "     domains: {math: {tasks: 8, reward: {overlong_buffer: 10}}}}\n"
    )
    monkeypatch.setenv("DISTILL_CPU_PROCS", "2")
    report = run_stage(load_recipe(recipe), "rl")
    assert report["world_size"] == 2 and report["steps"] == 2
    before = load_file(tmp_path / "student" / "model.safetensors")
    after = load_file(tmp_path / "rl" / "model.safetensors")
    index = [k for k in before if ".indexer." in k]
    assert index and all(torch.equal(after[k], before[k]) for k in index)
    assert any(not torch.equal(after[k], before[k]) for k in before if k not in index)


def test_one_off_cli_on_any_model_directory(tmp_path, policy_dir):
    """`distill rl --model DIR`: no recipe, --set for the rl section, a model dir out."""
    from typer.testing import CliRunner

    from distill.cli import app

    out = tmp_path / "out"
    args = ["rl", "--model", str(policy_dir), "--domains", "logic", "--steps", "1",
            "--out", str(out), "--set", "rl.prompts_per_step=2", "--set", "rl.num_generations=2",
            "--set", "rl.max_new_tokens=8"]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert (out / "config.json").exists() and len(log_rows(out)) == 1
    assert log_rows(out)[0]["episodes"] == 4
    # with a recipe, its rl section applies, steps included, unless --steps says otherwise
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: r\nrl: {steps: 2, prompts_per_step: 2, num_generations: 2, max_new_tokens: 8}\n"
    )
    res = CliRunner().invoke(app, ["rl", str(recipe), "--model", str(policy_dir), "--domains",
                                   "logic", "--out", str(tmp_path / "out2")])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert [r["step"] for r in log_rows(tmp_path / "out2")] == [1, 2]
    bad = CliRunner().invoke(app, ["rl", "--model", str(policy_dir), "--domains", "nope"])
    assert "unknown domain nope" in str(bad.exception)  # a UserError: main() exits 2 with it


def test_gradient_checkpointing_recomputes_layers_and_gives_the_same_gradients(
    tmp_path, policy_dir
):
    """rl.gradient_checkpointing: each decoder layer runs again in backward (so its
    activations were not kept), the gradients are the same, and the model stays in eval
    mode outside the policy's forward (generate keeps its KV cache)."""
    from distill.models import load_model
    from distill.rl.policy import PolicyLogprobs, make_micro_batch
    from distill.rl.rollout import Sample

    g = torch.Generator().manual_seed(0)
    samples = [
        Sample(torch.randint(3, 60, (5 + i,), generator=g).tolist(),
               torch.randint(3, 60, (4 + i,), generator=g).tolist(), [0.0] * (4 + i), None,
               "math", i, advantage=1.0 - i)
        for i in range(3)
    ]  # fmt: skip
    mb = make_micro_batch(samples, 0, torch.device("cpu"))
    grads, calls = [], []
    for on in (False, True):
        model = load_model(policy_dir, dtype=torch.float32)
        count = [0]
        # counted inside the layer's forward (the recompute in backward runs no module hooks)
        mlp = model.get_decoder().layers[0].mlp
        modes = []
        mlp.forward = lambda *a, f=mlp.forward, c=count, m=mlp, ms=modes, **k: (
            c.__setitem__(0, c[0] + 1),
            ms.append(m.training),
            f(*a, **k),
        )[2]
        policy = PolicyLogprobs(model, checkpointing=on)
        logp, _ = policy(mb, 0.7)
        (logp * mb.mask).sum().backward()
        assert not model.training
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        calls.append(count[0])
        with torch.no_grad():  # no backward: no recompute, and no training mode
            policy(mb, 0.7)
        assert count[0] == calls[-1] + 1 and modes[-1] is False
        assert modes[0] is on  # training mode (for the recompute) only when checkpointing
    assert calls == [1, 2]  # with: once more in backward
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 3
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], msg=n)
    assert run(tmp_path / "ckpt", policy_dir, gradient_checkpointing=True)["steps"] == 2


@pytest.mark.slow
def test_compiled_decoder_layers_give_the_eager_logprobs_and_gradients(policy_dir):
    """rl.torch_compile (the decoder layers compiled, as train.torch_compile does), with and
    without checkpointing: the policy's log-probabilities and gradients equal eager ones
    on micro-batches of two shapes."""
    from distill.models import load_model
    from distill.rl.policy import PolicyLogprobs, make_micro_batch
    from distill.rl.rollout import Sample

    g = torch.Generator().manual_seed(1)

    def batch(n):
        return make_micro_batch(
            [Sample(torch.randint(3, 60, (5 + i,), generator=g).tolist(),
                    torch.randint(3, 60, (4 + i,), generator=g).tolist(), [0.0] * (4 + i),
                    None, "math", i, advantage=1.0 - i) for i in range(n)],
            0, torch.device("cpu"),
        )  # fmt: skip

    batches = [batch(3), batch(2)]
    kept = {}
    for ckpt in (False, True):
        out = {}
        for compiled in (False, True):
            torch._dynamo.reset()
            torch._dynamo.utils.counters.clear()
            model = load_model(policy_dir, dtype=torch.float32)
            policy = PolicyLogprobs(model, checkpointing=ckpt, compile_layers=compiled)
            logps, saved = [], []
            for mb in batches:
                with torch.autograd.graph.saved_tensors_hooks(
                    lambda t, s=saved: s.append(t.numel()) or t, lambda t: t
                ):
                    logp, _ = policy(mb, 0.7)
                (logp * mb.mask).sum().backward()
                logps.append(logp.detach())
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            out[compiled] = logps, grads
            kept[ckpt, compiled] = sum(saved)  # what the forward keeps for backward
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            assert (graphs > 0) is compiled  # the layers really ran compiled (or not at all)
            assert not torch._dynamo.utils.counters["graph_break"]  # whole layers, no breaks
        for a, b in zip(out[False][0], out[True][0], strict=True):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
        assert out[False][1].keys() == out[True][1].keys()
        for n in out[False][1]:
            torch.testing.assert_close(
                out[True][1][n], out[False][1][n], rtol=1e-3, atol=1e-5, msg=n
            )
    # checkpointed layers keep their inputs only, compiled or not
    assert kept[True, True] < 0.6 * kept[False, True]
    assert kept[True, False] < 0.6 * kept[False, False]


def test_decode_rows_caps_the_gpu_decode_batch():
    from distill.rl.trainer import _decode_batch

    cfg = RLConfig(prompts_per_step=64, num_generations=8)
    assert _decode_batch(cfg, gpu=True) == 512  # a step's rollouts at once
    assert _decode_batch(cfg.model_copy(update={"decode_rows": 256}), gpu=True) == 256
    assert _decode_batch(cfg.model_copy(update={"decode_rows": 4096}), gpu=True) == 512
    assert _decode_batch(cfg.model_copy(update={"decode_rows": 256}), gpu=False) == 64


@pytest.mark.skipif(torch.cuda.is_available(), reason="the trainers set threads on a CPU only")
def test_trainers_hand_the_callers_threads_back(tmp_path, policy_dir, monkeypatch):
    """One `distill run` runs stage after stage in its process: the RL and SFT trainers
    set a tiny model's one thread for themselves and restore the caller's setting."""
    import random

    from tiny_artifacts import ARCH, make_tokenizer, math_trace, small_cfg, write_shards

    from distill.train.loop import train

    make_tokenizer(tmp_path / "tok")
    rng = random.Random(0)
    shards = {"math": write_shards(tmp_path / "m", "math", [math_trace(i, rng) for i in range(8)])}
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # else the trainers keep any setting
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        assert run(tmp_path / "rl", policy_dir, steps=1)["steps"] == 1
        assert torch.get_num_threads() == 3
        train(init=ARCH, tokenizer_dir=tmp_path / "tok", shards=shards, out_dir=tmp_path / "sft",
              cfg=small_cfg(max_steps=1))  # fmt: skip
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
