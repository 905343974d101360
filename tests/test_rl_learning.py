"""RL learns (slow): a tiny model that imitated noisy demonstrations of "repeat the word",
sharpened by GRPO on its own rollouts, repeats more held-out words right; judged paired,
task by task, on the sampled pass@1 (the mean verdict of 8 samples at temperature 1).

The policy: a 2-layer model trained on the word-copying domain of docs/adding-a-domain.md,
its oracle changed so that 30% of the demonstrations miscopy one letter: its room to learn
is set by that share, not by how far training got. With the domain's clean oracle, 450
steps gave 77.5% greedy on 200 held-out words where this test was calibrated (2026-12-05)
and passed (last on 2026-12-07), but 92.5-97.5% over seeds 0-3 on a later machine with the
same code and releases (0.5-97% at 300 steps: copying is learned at a step that moves
with the seed and the machine), which left GRPO nothing to fix. With the noisy oracle, on
that later machine, seeds 0-2: sampled pass@1 15.5 -> 44.3%, 51.2 -> 81.8%, 57.8 -> 90.1%
(greedy 69.5 -> 77.5%, 93.5 -> 94.0%, 95.0 -> 95.5%) after 120 GRPO steps (64 prompts x 8
at temperature 1, lr 3e-4, a pool of 400 prompts). Seeds 3 and 4 gave supervised policies
whose samples nearly all failed (sampled 0.6% and 3.7%; greedy 11.5% and 85.5%), and GRPO
from them lowered greedy pass@1 (to 4.5% and 38.5%): the test takes the first of seeds 0-2
whose policy is partly working. Seeds are fixed, so the run is the same each time on one
machine.
"""

from __future__ import annotations

import json
import sys

import pytest
from test_domains import ECHO

from teachers.base import ENV, REGISTRY, register

pytestmark = pytest.mark.slow

# The toy domain's oracle with one letter miscopied in NOISE of its demonstrations (a
# task's own hash decides whether and where, so the oracle stays deterministic).
NOISY_ORACLE = """    def oracle(self, task):
        import hashlib

        word = task.reference["answer"]
        h = hashlib.sha256(task.id.encode()).digest()
        if h[0] < 256 * NOISE:
            i, shift = h[1] % len(word), 1 + h[2] % 25
            wrong = chr(97 + (ord(word[i]) - 97 + shift) % 26)
            word = word[:i] + wrong + word[i + 1 :]
"""
CLEAN_ORACLE = """    def oracle(self, task):
        word = task.reference["answer"]
"""
NOISE = 0.3

RECIPE = """name: learn
seed: {seed}
output_dir: {out}
tokenizer: {{kind: train, vocab_size: 300, corpus_tasks: 200}}
domains: {{echo: {{train_tasks: 400, eval_tasks: 200, max_new_tokens: 24}}}}
teachers:
  echo:
    kind: bootstrap
    oracle_tasks: 4000
    arch: {{hidden_size: 64, num_layers: 2, num_heads: 2, intermediate_size: 128, max_position_embeddings: 256}}
    train: {{learning_rate: 0.004, warmup_steps: 10, max_steps: 450, batch_tokens: 1024,
            micro_batch_tokens: 1024, max_length: 256, logging_steps: 50}}
    rl: {{enabled: {rl}, steps: 120, prompts_per_step: 64, num_generations: 8, temperature: 1.0,
         learning_rate: 3.0e-4, max_new_tokens: 24, eval_steps: 40, eval_tasks: 200,
         domains: {{echo: {{tasks: 400}}}}}}
eval: {{pass_k: 8, temperature: 1.0, teachers_on_all_domains: false}}
"""


@pytest.fixture
def noisy_echo(tmp_path, monkeypatch):
    """The toy domain with its noisy oracle, in its own module on sys.path, registered."""
    assert CLEAN_ORACLE in ECHO  # else the replacement below would leave the oracle clean
    source = ECHO.replace(CLEAN_ORACLE, NOISY_ORACLE).replace(
        "class EchoDomain:", f"NOISE = {NOISE}\n\n\nclass EchoDomain:"
    )
    (tmp_path / "noisy_echo.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(ENV, raising=False)
    saved = dict(REGISTRY)
    yield register("echo", "noisy_echo:DOMAIN")
    REGISTRY.clear()
    REGISTRY.update(saved)
    sys.modules.pop("noisy_echo", None)


def test_grpo_raises_held_out_pass_at_1_paired(noisy_echo, tmp_path, monkeypatch):
    from distill import layout
    from distill.eval.stage import ModelSpec, eval_tasks, evaluate_model
    from distill.recipe import load_recipe
    from distill.rl.specialist import base_dir, teacher_dir
    from distill.stages import run_stage

    monkeypatch.setenv("DISTILL_CPU_PROCS", "1")
    rates = {}

    def evaluate(name, r, path):
        tasks = {"echo": eval_tasks("echo", r.domains["echo"], r.seed)}
        (score,) = evaluate_model(ModelSpec(name, path=path), {"echo": r.domains["echo"]},
                                  gen=r.generate, ev=r.eval, seed=r.seed, tasks=tasks,
                                  samples_dir=tmp_path / "samples")  # fmt: skip
        rows = (tmp_path / "samples" / f"{name}.echo.jsonl").read_text().splitlines()
        rates[name] = {
            row["task_id"]: sum(row["sampled_passed"]) / len(row["sampled_passed"])
            for row in map(json.loads, rows)
        }
        return score

    def recipe(seed, rl):
        (tmp_path / "r.yaml").write_text(
            RECIPE.format(out=tmp_path / f"out{seed}", seed=seed, rl=str(rl).lower())
        )
        return load_recipe(tmp_path / "r.yaml")

    # A partly working policy, room to learn, is established, not assumed (the docstring's
    # seeds 3 and 4): the first of three seeds that gives one is taken.
    tried = []
    for seed in range(3):
        r = recipe(seed, rl=False)
        run_stage(r, "teachers")  # the supervised teacher alone
        before = evaluate("before", r, base_dir(r, "echo"))
        tried.append(before.sampled_pass1)
        if 0.05 < before.sampled_pass1 < 0.8:
            break
    else:
        pytest.fail(f"no partly working policy at seeds 0-2 (sampled pass@1 {tried})")
    r = recipe(seed, rl=True)
    run_stage(r, "teachers")  # the same supervised teacher (RL is not in its fingerprint), RL
    after = evaluate("after", r, teacher_dir(r, "echo"))
    rose = sum(rates["after"][t] > rates["before"][t] for t in rates["before"])
    fell = sum(rates["after"][t] < rates["before"][t] for t in rates["before"])
    gain, greedy = after.sampled_pass1 - before.sampled_pass1, (before.pass1, after.pass1)
    # Calibrated gains were 29-32 points (seeds 0-2). One standard error of a sampled rate
    # near 0.5 over 200 tasks is at most 3.5 points (each task's 8 samples as one); paired,
    # the tasks whose rate changed must split rose-to-fell with a two-sided sign-test
    # p < 0.001. Greedy pass@1 may not fall more than 3 points.
    assert gain >= 0.1 and _sign_test(rose, fell) < 0.001, (seed, gain, rose, fell)
    assert greedy[1] >= greedy[0] - 0.03, greedy
    # rl.eval_steps scored the same 200 held-out tasks greedily during the run: its first
    # and last figures are the eval's (equal at seeds 0 and 4; one task of slack for a
    # tie that another decode batch could break the other way)
    run = json.loads((layout.run_dir(teacher_dir(r, "echo"), r.out) / "rl_report.json").read_text())
    curve = [(c["step"], c["eval/pass1"]) for c in run["heldout"]]
    assert [s for s, _ in curve] == [0, 40, 80, 120], curve
    assert abs(curve[0][1] - greedy[0]) <= 0.005 and abs(curve[-1][1] - greedy[1]) <= 0.005, curve


def _sign_test(a: int, b: int) -> float:
    """Two-sided sign-test p-value of an a-to-b split (exact binomial, p = 1/2)."""
    from math import comb

    n = a + b
    return min(1.0, 2 * sum(comb(n, i) for i in range(min(a, b) + 1)) / 2**n)
