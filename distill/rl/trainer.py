"""The GRPO loop: rollout, reward, advantage, loss, step — in that order, every step.

``train_rl()`` is self-contained (a policy directory in, an HF model directory out), so
the student's mixed RL, a specialist's RL and ``distill rl --model DIR`` all run it.
Rollouts decode on the live weights in this process (no copy of the model, no offload);
under several processes each rank rolls out its share of the prompts, and gradients are
all-reduced by accelerate. Every loss denominator is global (all micro-batches of an
update on all ranks), so the gradient does not depend on how the batch is split.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from distill import layout
from distill.files import atomic_write_json, atomic_write_text, json_hash
from distill.recipe.base import fingerprint_data
from distill.recipe.rl import RLConfig
from distill.rl.loss import RL_LOSS_VERSION, global_denominator, group_advantages, grpo_loss
from distill.rl.monitor import due, heldout_scores
from distill.rl.policy import AdapterOff, MicroBatch, PolicyLogprobs, make_micro_batch
from distill.rl.rewards import REWARD_VERSION
from distill.rl.rollout import Outcome, Sample, rollout_step, step_prompts
from distill.train.save import rl_card, save_adapter
from distill.train.setup import keeps_threads
from teachers.base import Task

LOG = "rl_log.jsonl"
REPORT = "rl_report.json"


@keeps_threads
def train_rl(
    *,
    init: str | Path,
    tasks: dict[str, list[Task]],
    cfg: RLConfig,
    limits: dict[str, tuple[int, int, int]],
    out_dir: str | Path,
    seed: int = 0,
    desc: str = "rl",
    run_dir: str | Path | None = None,
    heldout: tuple[dict[str, list[Task]], dict[str, tuple[int, int, int]]] | None = None,
) -> dict[str, Any]:
    """GRPO on the policy in ``init`` (an HF causal LM directory with a chat template)
    over ``tasks`` (training prompts per domain); writes the trained model (with its
    model card) to ``out_dir``, and ``rl_log.jsonl`` (one line per step),
    ``rl_report.json``, checkpoints and logs to ``run_dir`` (default
    :func:`distill.layout.run_dir`). ``limits[domain]`` is
    (max_new_tokens, max_turns, max_episode_tokens). Resumes from its checkpoints.

    ``heldout``: (tasks, limits) that ``cfg.eval_steps`` scores greedily before the first
    update, every ``eval_steps`` steps and after the last (:mod:`distill.rl.monitor`);
    their keys join that step's log line (a line of its own, step 0, before the first)."""
    from accelerate.utils import set_seed

    from distill.backends.hf import HFBackend
    from distill.dsa.config import is_dsa
    from distill.models import load_model, load_tokenizer
    from distill.train import checkpoint
    from distill.train.setup import (
        apply_lora,
        end_training,
        make_accelerator,
        make_optimizer,
        set_cpu_threads,
    )

    out = Path(out_dir)
    run = layout.run_dir(out) if run_dir is None else Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    run.mkdir(parents=True, exist_ok=True)
    tcfg = _train_config(cfg)
    acc = make_accelerator(tcfg, run)
    set_seed(seed)
    gpu = acc.device.type == "cuda"
    dtype = torch.bfloat16 if gpu and cfg.precision != "fp32" else torch.float32
    tokenizer = load_tokenizer(init)
    model = load_model(init, dtype=dtype).to(acc.device)
    set_cpu_threads(acc, sum(p.numel() for p in model.parameters()))
    if is_dsa(model):
        # the policy loss never reaches a DSA model's indexer (top-k has no gradient; its
        # KL is the trainer's): it stays as trained, and DDP would wait for its gradients
        for p in model.indexer_parameters():
            p.requires_grad_(False)
    doms = {d: cfg.domain(d) for d in tasks}
    kl = any(c.beta > 0 for c in doms.values())  # β = 0 everywhere: no reference at all
    # LoRA: peft puts the adapters into the model's own modules, so everything below (the
    # update, the decoder, the held-out scores) runs `model` with them; `lora` keeps the
    # switch that turns them off (the reference) and the merge for saving
    lora = apply_lora(model, cfg.lora) if cfg.lora.enabled else None
    ref = None
    if kl and lora is None:
        ref = PolicyLogprobs(load_model(init, dtype=dtype).to(acc.device).eval())
        ref.requires_grad_(False)
    policy = PolicyLogprobs(
        model,
        checkpointing=cfg.gradient_checkpointing,
        # the hand-written head reads the head's weight, not an adapter on it
        fused_head=not _is_fsdp(acc) and not _has_adapter(model.get_output_embeddings()),
        # where transformers' generate decodes through these layers (CPU, a DSA model or
        # adapters on a GPU), compiled ones would recompile at every new cache length: only
        # the static decoder's models, which decode with their own compiled code, get them
        compile_layers=cfg.torch_compile and gpu and not is_dsa(model) and lora is None,
    )
    opt, sched = make_optimizer(model, tcfg, cfg.steps * cfg.steps_per_generation, fused=gpu)
    policy, opt, sched = acc.prepare(policy, opt, sched)
    live = acc.unwrap_model(policy).model
    if kl and lora is not None:
        ref = AdapterOff(lora, acc.unwrap_model(policy))
    # the static GPU decoder reads the weights themselves and would decode without the
    # adapters (llama_decode.supported refuses them): a LoRA policy decodes through its
    # modules' forward
    backend = HFBackend.from_model(live, tokenizer, batch_size=_decode_batch(cfg, gpu))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    fp = json_hash(
        # a resume may also extend the run or change its time guard
        {"init": str(Path(init).resolve()),
         "cfg": fingerprint_data(cfg, ignore=("steps", "max_time_s")),
         "tasks": {d: [t.id for t in ts] for d, ts in tasks.items()}, "limits": limits,
         "seed": seed, "loss": RL_LOSS_VERSION, "reward": REWARD_VERSION}
    )  # fmt: skip
    ckpt_dir = run / "checkpoints"
    start = 0
    if acc.is_main_process:
        checkpoint.drop_incomplete(ckpt_dir)
    acc.wait_for_everyone()
    if found := checkpoint.latest(ckpt_dir, fp):
        acc.load_state(str(found[0]))
        start = found[1]["step"]
    if cfg.report_to:
        acc.init_trackers(desc.replace("/", "-"), config={"rl": json.dumps(cfg.model_dump())})
    log_path = run / LOG
    if acc.is_main_process:
        _truncate_log(log_path, start)

    weights = {d: c.weight for d, c in doms.items()}
    t_start, step, rows = time.time(), start, []
    every = cfg.eval_steps if heldout else 0
    t_eval = 0.0  # the held-out scoring's seconds: kept off the max_time_s guard

    def elapsed() -> float:
        return time.time() - t_start - t_eval

    from distill.progress import progress

    def log(row: dict[str, Any]) -> None:
        if acc.is_main_process:
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        if cfg.report_to:
            acc.log({k: v for k, v in row.items() if isinstance(v, int | float)}, step=row["step"])

    with progress(disable=not acc.is_main_process) as bar:
        task = bar.add_task(desc, total=cfg.steps, completed=start, unit="steps", info="")
        if every and start == 0:  # the starting policy, the baseline of every later score
            t = time.time()
            log({"step": 0, **heldout_scores(acc, backend, *heldout)})
            t_eval += time.time() - t
        out_of_time = False
        for step in range(start, cfg.steps):
            if out_of_time:
                break
            row = _step(acc, policy, ref, opt, sched, backend, tasks, weights, doms, cfg,
                        limits, seed, step, pad)  # fmt: skip
            # one verdict for every rank (any rank out of time stops them all): ranks that
            # disagreed would wait forever in each other's next all-reduce
            if cfg.max_time_s:
                out_of_time = _all_sum(acc, float(elapsed() > cfg.max_time_s)) > 0
            if due(step + 1, every, last=step + 1 == cfg.steps or out_of_time):
                t = time.time()
                row.update(heldout_scores(acc, backend, *heldout))
                row["time_eval_s"] = round(dt := time.time() - t, 3)
                t_eval += dt
            rows.append(row)
            log(row)
            if acc.is_main_process:
                bar.update(task, completed=step + 1, info=_bar_info(row))
            if cfg.save_steps and (step + 1) % cfg.save_steps == 0 and step + 1 < cfg.steps:
                checkpoint.save(acc, ckpt_dir, step + 1, {"fingerprint": fp, "step": step + 1},
                                cfg.save_total_limit)  # fmt: skip
        else:
            step = cfg.steps
    done = step if rows else start
    acc.wait_for_everyone()
    report = {
        "steps": done,
        # out of time is a planned, shorter run (as in the SFT trainer): the model is saved
        "finished": True,
        "stopped_by": "steps" if done >= cfg.steps else "max_time_s",
        "world_size": acc.num_processes,
        "seconds": round(time.time() - t_start, 2),
        "fingerprint": fp,
        "last": rows[-1] if rows else None,
        "heldout": _heldout_curve(log_path) if every and acc.is_main_process else None,
    }
    if acc.is_main_process:
        from distill.models import set_generation_config

        if lora is not None:  # the model directory holds the merged model, as train's
            if not cfg.lora.merge:
                save_adapter(lora, tokenizer, out, init)
            live = lora.merge_and_unload()
        set_generation_config(live, tokenizer)
        live.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        atomic_write_json(run / REPORT, report)
        rl_card(out, run, desc, init, cfg, tasks, report)
    end_training(acc)
    acc.wait_for_everyone()
    return report


def _heldout_curve(path: Path) -> list[dict[str, Any]]:
    """The held-out scores of the whole run (a resumed one's earlier lines too), by step."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [
        {"step": r["step"], **{k: v for k, v in r.items() if k.startswith("eval/")}}
        for r in rows
        if "eval/pass1" in r
    ]


def _truncate_log(path: Path, steps: int) -> None:
    """Keep the log lines of the first ``steps`` steps: a resumed run repeats the steps
    after its checkpoint, and their lines must not stand twice."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= steps]
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def _step(acc, policy, ref, opt, sched, backend, tasks, weights, doms, cfg: RLConfig,
          limits, seed: int, step: int, pad: int) -> dict[str, Any]:  # fmt: skip
    """One RL step: rollout, reward, advantage, loss, update(s). Returns its log row."""
    t0 = time.perf_counter()
    prompts = step_prompts(tasks, weights, cfg.prompts_per_step, step, seed)
    mine = prompts[acc.process_index :: acc.num_processes]  # each rank its share of groups
    samples, outcomes, times = rollout_step(backend, mine, cfg, limits=limits, seed=seed, step=step)
    if cfg.release_decoder_memory:
        backend.release_cache()  # the update reuses the KV cache's memory
    # advantage: reward − group mean, per prompt (a group never spans ranks)
    rewards = torch.tensor([o.reward for o in outcomes], dtype=torch.float64)
    scale = cfg.scale_rewards
    adv, zero_var = group_advantages(
        rewards, cfg.num_generations, "none" if scale == "batch" else scale
    )
    if scale == "batch":
        adv = adv / (_global_std(acc, rewards) + 1e-4)
    skip = {g for g, z in enumerate(zero_var.tolist()) if z and cfg.skip_zero_variance}
    for s in samples:
        s.advantage = float(adv[s.episode])
    train = [s for s in samples if s.episode // cfg.num_generations not in skip]
    t1 = time.perf_counter()
    stats, t_ref, t_upd = _update(acc, policy, ref, opt, sched, train, doms, cfg, limits, pad)
    acc.wait_for_everyone()
    row = {
        "step": step + 1,
        "lr": sched.get_last_lr()[0],
        **_outcome_stats(acc, outcomes, zero_var, cfg),
        **stats,
        "time_generate_s": round(times["generate"], 3),
        "time_score_s": round(times["score"], 3),
        "time_logprobs_s": round(t_ref, 3),
        "time_update_s": round(t_upd, 3),
        "time_step_s": round(time.perf_counter() - t0, 3),
        "time_advantage_s": round(t1 - t0 - times["generate"] - times["score"], 3),
    }
    row["completion_tokens_per_s"] = round(row["completion_tokens"] / max(row["time_step_s"], 1e-9))
    return row


def _update(acc, policy, ref, opt, sched, samples: list[Sample], doms, cfg: RLConfig,
            limits, pad: int) -> tuple[dict[str, Any], float, float]:  # fmt: skip
    """``steps_per_generation`` optimizer updates over ``samples`` (this rank's), each over
    its share of the batch with a global denominator. Returns summed stats, the seconds
    spent on reference log-probs and on the updates."""
    # stats stay on the device until the end: a float() per micro-batch would wait for the
    # GPU each time and leave it idle while the next micro-batch's kernels are launched
    sums: dict[str, Any] = {}
    ratios: list[torch.Tensor] = []
    t_ref = t_upd = 0.0
    samples = sorted(samples, key=lambda s: len(s.prompt_ids) + len(s.token_ids))
    max_len = max(lim[0] for lim in limits.values())
    n_upd = cfg.steps_per_generation
    for u in range(n_upd):
        part = samples[u::n_upd]
        chunks = [
            part[i : i + cfg.micro_batch_seqs] for i in range(0, len(part), cfg.micro_batch_seqs)
        ]
        mbs = [make_micro_batch(c, pad, acc.device) for c in chunks]
        denom = _all_sum(acc, global_denominator([mb.mask for mb in mbs], cfg.loss_agg, max_len))
        # accelerate's DDP averages gradients over ranks; each rank's share of the global
        # sum is scaled up by the world size so the average is the sum
        world = acc.num_processes
        if denom == 0:  # no rank has a loss token (every group skipped): no update at all
            continue
        if not mbs:  # others have work: join their gradient all-reduce with a zero loss
            dummy = Sample([pad], [pad], [0.0], None, next(iter(doms)), 0, loss=False)
            mbs = [make_micro_batch([dummy], pad, acc.device)]
        t = time.perf_counter()
        refs = [_ref_logp(ref, mb, cfg.temperature) for mb in mbs] if ref is not None else None
        t_ref += time.perf_counter() - t
        # built before the loop: a host-to-device copy waits for the GPU
        betas = [torch.tensor([doms[d].beta for d in mb.domains], device=acc.device) for mb in mbs]
        t = time.perf_counter()
        for k, mb in enumerate(mbs):
            # gradients all-reduce once, on each rank's last micro-batch (ranks hold
            # different numbers of micro-batches; one all-reduce each keeps them in step)
            sync = k == len(mbs) - 1
            with contextlib.nullcontext() if sync else acc.no_sync(policy):
                logp, ent = policy(mb, cfg.temperature)
                loss, st = grpo_loss(
                    logp, mb.old_logp, mb.adv, mb.mask, ref_logp=refs[k] if refs else None,
                    kl_coef=betas[k] if refs else 0.0, clip_low=cfg.epsilon,
                    clip_high=cfg.epsilon_high, offpolicy_delta=cfg.off_policy_mask_threshold,
                    agg=cfg.loss_agg, denom=denom / world,
                )  # fmt: skip
                acc.backward(loss)
            ratios.append(st.pop("ratios").float())
            st["entropy_sum"] = torch.where(mb.mask, ent, 0.0).sum()
            st["loss_sum"] = loss.detach() / world
            for key, v in st.items():
                sums[key] = sums.get(key, 0.0) + v.detach().double()
        if cfg.max_grad_norm:
            sums["grad_norm"] = float(acc.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if acc.device.type == "cuda":  # the time split counts the kernels, not their launch
            torch.cuda.synchronize(acc.device)
        t_upd += time.perf_counter() - t
    sums = {k: float(v) for k, v in sums.items()}
    return _loss_stats(acc, sums, [r.cpu() for r in ratios]), t_ref, t_upd


@torch.no_grad()
def _ref_logp(ref, mb: MicroBatch, temperature: float) -> torch.Tensor:
    return ref(mb, temperature)[0]


def _loss_stats(acc, sums: dict[str, float], ratios: list[torch.Tensor]) -> dict[str, Any]:
    keys = ["tokens", "seqs", "masked_seqs", "clipped_tokens", "ratio_outside_0.9_1.1",
            "pg_loss_sum", "entropy_sum", "loss_sum", "kl_sum"]  # fmt: skip
    tot = dict(zip(keys, _all_sum(acc, [sums.get(k, 0.0) for k in keys]), strict=True))
    tok = max(tot["tokens"], 1.0)
    r = torch.cat(ratios) if ratios else torch.ones(1)
    return {
        "loss": tot["loss_sum"],
        "loss_tokens": int(tot["tokens"]),
        "entropy": tot["entropy_sum"] / tok,
        "kl": tot["kl_sum"] / tok,
        "clip_frac": tot["clipped_tokens"] / tok,
        "masked_seq_frac": tot["masked_seqs"] / max(tot["seqs"], 1.0),
        "ratio_p95": float(torch.quantile(r, 0.95)) if r.numel() else 1.0,  # this rank's tokens
        "ratio_outside_0.9_1.1": tot["ratio_outside_0.9_1.1"] / tok,
        "grad_norm": sums.get("grad_norm"),
    }


def _outcome_stats(acc, outcomes: list[Outcome], zero_var, cfg: RLConfig) -> dict[str, Any]:
    """Reward and pass rate per domain, lengths of correct and incorrect answers,
    truncation and zero-variance shares, over every rank's episodes."""
    rows = [(o.domain, o.reward, o.passed, o.tokens, o.truncated) for o in outcomes]
    groups = [bool(z) for z in zero_var.tolist()]
    if acc.num_processes > 1:
        import torch.distributed as dist

        got: list[Any] = [None] * acc.num_processes
        dist.all_gather_object(got, (rows, groups))
        rows = [r for g in got for r in g[0]]
        groups = [z for g in got for z in g[1]]
    out: dict[str, Any] = {}
    for d in sorted({r[0] for r in rows}):
        mine = [r for r in rows if r[0] == d]
        out[f"reward/{d}"] = sum(r[1] for r in mine) / len(mine)
        out[f"pass/{d}"] = sum(r[2] for r in mine) / len(mine)
    good = [r[3] for r in rows if r[2]]
    bad = [r[3] for r in rows if not r[2]]
    out["reward"] = sum(r[1] for r in rows) / max(len(rows), 1)
    out["pass"] = sum(r[2] for r in rows) / max(len(rows), 1)
    out["len_correct"] = sum(good) / len(good) if good else None
    out["len_incorrect"] = sum(bad) / len(bad) if bad else None
    out["truncated_frac"] = sum(r[4] for r in rows) / max(len(rows), 1)
    out["zero_var_frac"] = sum(groups) / max(len(groups), 1)
    out["completion_tokens"] = sum(r[3] for r in rows)
    out["episodes"] = len(rows)
    return out


def _has_adapter(module) -> bool:
    return module is not None and hasattr(module, "lora_A")


def _is_fsdp(acc) -> bool:
    from accelerate.utils import DistributedType

    return acc.distributed_type == DistributedType.FSDP


def _all_sum(acc, x):
    """Sum a float (or a list of floats) over ranks."""
    if acc.num_processes == 1:
        return x
    import torch.distributed as dist

    t = torch.tensor(x if isinstance(x, list) else [x], dtype=torch.float64, device=acc.device)
    dist.all_reduce(t)
    return t.tolist() if isinstance(x, list) else float(t[0])


def _global_std(acc, rewards: torch.Tensor) -> float:
    n, s, ss = _all_sum(acc, [rewards.numel(), float(rewards.sum()), float((rewards**2).sum())])
    var = (ss - s * s / n) / max(n - 1, 1)
    return math.sqrt(max(var, 0.0))


def _bar_info(row: dict[str, Any]) -> str:
    held = f"  held-out {row['eval/pass1']:.2f}" if "eval/pass1" in row else ""
    return (
        f"reward {row['reward']:.3f}  pass {row['pass']:.2f}{held}  "
        f"{row['completion_tokens_per_s']:,} tok/s"
    )


def _decode_batch(cfg: RLConfig, gpu: bool) -> int:
    """Rows decoded together: every rollout of a step at once on a GPU (a decode step costs
    about the same for 1 row or 512), or ``rl.decode_rows`` of them (a smaller KV cache);
    64 on CPU, where cost grows with the rows."""
    rows = cfg.prompts_per_step * cfg.num_generations
    return min(rows, cfg.decode_rows or rows) if gpu else 64


def _train_config(cfg: RLConfig):
    """The optimizer and accelerator settings, in the SFT trainer's terms (its setup code
    builds both): constant lr after warmup, no decay."""
    from distill.recipe.schema import TrainConfig

    return TrainConfig(
        learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_steps, lr_scheduler_type="constant",
        max_steps=cfg.steps * cfg.steps_per_generation, max_grad_norm=cfg.max_grad_norm,
        precision=cfg.precision, report_to=cfg.report_to, adam_beta2=cfg.adam_beta2,
    )  # fmt: skip
