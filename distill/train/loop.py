"""The trainer: one Accelerate loop for bootstrap teachers and the student.

``train()`` is self-contained (one domain or many; from scratch or from an HF directory)
and ``run(recipe)`` is the ``distill train`` stage. Under ``accelerate launch`` every rank
takes its share of each step's rows; the loss is normalised by the global weight sum
(see distill/train/loss.py), so any split of the batch gives the same update.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from distill import layout
from distill.errors import UserError
from distill.files import short_hash
from distill.models import (
    VARLEN,
    build_model,
    enable_checkpointing,
    load_model,
    load_tokenizer,
    pad_token_id,
    set_generation_config,
    use_varlen_attention,
    varlen_supported,
)
from distill.progress import console
from distill.recipe.base import fingerprint_data
from distill.recipe.schema import ModelArch, Recipe, TrainConfig
from distill.train import checkpoint
from distill.train.data import RowStream, cache_key, collate, tokenize_domain
from distill.train.metrics import StepStats, build_report, progress
from distill.train.save import save_model, train_card
from distill.train.setup import (
    apply_lora,
    compile_model,
    end_training,
    keeps_threads,
    make_accelerator,
    make_optimizer,
    set_cpu_threads,
)

# book each step's losses one step late (see _Loop.run); None: on a GPU only. Tests set it.
DEFER: bool | None = None

# besides the run-only fields (distill.recipe.base.RUN_ONLY), a resume may change the time
# guard: the weights so far do not depend on it
_RESUMABLE = ("max_time_s",)


@keeps_threads
def train(
    *,
    init: str | Path | ModelArch,
    tokenizer_dir: str | Path,
    shards: dict[str, Path],
    out_dir: str | Path,
    cfg: TrainConfig,
    seed: int = 0,
    sampling_weights: dict[str, float] | None = None,
    loss_weights: dict[str, float] | None = None,
    desc: str = "train",
    stop_after_steps: int | None = None,
    run_dir: str | Path | None = None,
    short_prompt_shares: dict[str, float] | None = None,
    until: Callable[[StepStats], str | None] | None = None,
) -> dict:
    """Train from ``init`` (an arch for a scratch model or an HF directory) on the clean
    shards of each domain; write an HF model directory (with its model card) to
    ``out_dir``, and ``train_report.json``, checkpoints, caches and logs to ``run_dir``
    (default :func:`distill.layout.run_dir`). Resumes from the newest matching checkpoint
    in ``run_dir/checkpoints``.
    ``stop_after_steps`` checkpoints and returns early (a planned preemption). ``until``
    ends the run early, finished, when it returns a reason (read after each booked step:
    every rank books the same summed losses, so all stop together)."""
    return _train(
        init,
        tokenizer_dir,
        shards,
        Path(out_dir),
        layout.run_dir(out_dir) if run_dir is None else Path(run_dir),
        cfg,
        seed,
        sampling_weights,
        loss_weights,
        desc,
        stop_after_steps,
        short_prompt_shares or {},
        until,
    )


def _train(
    init,
    tokenizer_dir,
    shards,
    out: Path,
    run: Path,
    cfg: TrainConfig,
    seed,
    sampling_weights,
    loss_weights,
    desc,
    stop_after_steps,
    short_prompt_shares,
    until,
) -> dict:
    acc = make_accelerator(cfg, run)
    tokenizer = load_tokenizer(tokenizer_dir)
    sw = {d: (sampling_weights or {}).get(d, 1.0) for d in shards}
    lw = {d: (loss_weights or {}).get(d, 1.0) for d in shards}
    with acc.main_process_first():  # rank 0 tokenizes, the others read its cache
        domains = {
            d: tokenize_domain(
                d,
                p,
                tokenizer,
                cfg.max_length,
                run / "cache",
                cfg.kd.enabled,
                short_prompt_shares.get(d, 0.0),
            )  # fmt: skip
            for d, p in sorted(shards.items())
        }
    short = {d: s for d, s in short_prompt_shares.items() if s}
    fp = _fingerprint(init, tokenizer_dir, tokenizer, shards, cfg, seed, sw, lw, short)
    model = _init_model(init, tokenizer, seed, cfg, acc.device)
    set_cpu_threads(acc, sum(p.numel() for p in model.parameters()))
    from distill.dsa.train import objective_class  # a DSA model adds its indexer's loss

    objective = objective_class(model)(
        model,
        cfg.kd.alpha if cfg.kd.enabled else 0.0,
        cfg.kd.temperature,
        max_seqlen=cfg.max_length,
    )
    stream = RowStream(domains, sw, cfg.mixture, cfg.max_length, cfg.packing, seed)
    plan = _plan(cfg, acc.num_processes, stream, acc.device.type == "cuda")
    opt, sched = make_optimizer(objective, cfg, plan["max_steps"], fused=acc.device.type == "cuda")
    if cfg.torch_compile:
        objective = compile_model(objective)
    # the scheduler stays unprepared: accelerate would step it once per rank per step
    objective, opt = acc.prepare(objective, opt)
    acc.register_for_checkpointing(sched)
    start, prior = _resume(acc, run / "checkpoints", fp, stream)
    loop = _Loop(
        acc, objective, opt, sched, stream, domains, lw, cfg, plan, pad_token_id(tokenizer)
    )
    if cfg.report_to:
        flat = {"seed": seed, "init": str(init if not isinstance(init, ModelArch) else "scratch")}
        for k, v in cfg.model_dump(mode="json").items():  # tensorboard takes scalars only
            items = v.items() if isinstance(v, dict) else [("", v)]
            flat.update(
                {
                    f"{k}.{a}".rstrip("."): x
                    for a, x in items
                    if isinstance(x, int | float | str | bool)
                }
            )
        acc.init_trackers(desc.replace("/", "-"), config=flat)
    stats = loop.run(start, desc, run / "checkpoints", fp, stop_after_steps, prior, until)
    report = build_report(acc, model, domains, stats, plan, out)
    for d, r in report["domains"].items():
        loss = "n/a" if r["mean_loss"] is None else f"{r['mean_loss']:.4f}"
        if acc.is_main_process:  # human output: stderr, like the bar
            console.print(f"{desc} {d}: mean loss {loss} over {r['loss_tokens']} loss tokens")
    if stats.finished:
        save_model(acc, objective, tokenizer, cfg, out, init)
        if acc.is_main_process:
            (run / "train_report.json").write_text(json.dumps(report, indent=1))
            train_card(out, run, desc, init, cfg, shards, report, sw, lw)
    end_training(acc)
    return report


def _fingerprint(
    init, tokenizer_dir, tok, shards, cfg: TrainConfig, seed, sw, lw, short=None
) -> str:
    init_s = (
        init.model_dump(mode="json") if isinstance(init, ModelArch) else str(Path(init).resolve())
    )
    blob = json.dumps(
        {
            "init": init_s,
            "tok": str(Path(tokenizer_dir).resolve()),
            # the shards' checksums, through the tokenize cache key: new data, new run
            "shards": {
                d: cache_key(Path(p), tok, cfg.max_length, cfg.kd.enabled)
                for d, p in shards.items()
            },
            "cfg": fingerprint_data(cfg, ignore=_RESUMABLE),
            "seed": seed,
            "sw": sw,
            "lw": lw,
            **({"short": short} if short else {}),  # absent when off: old checkpoints resume
        },
        sort_keys=True,
    )
    return short_hash(blob)


def _init_model(init, tokenizer, seed: int, cfg: TrainConfig, device: torch.device):
    attn = _attn_implementation(device, cfg.precision)
    load_attn = "sdpa" if attn == VARLEN else attn  # transformers loads with one it knows
    if isinstance(init, ModelArch):
        model = build_model(init, tokenizer, seed, attn_implementation=load_attn)
    else:
        model = load_model(init, attn_implementation=load_attn)
        if model.get_input_embeddings().num_embeddings < len(tokenizer):
            raise UserError(
                f"{init}: model vocabulary is smaller than its tokenizer's ({len(tokenizer)})"
            )
        set_generation_config(model, tokenizer)
    if attn == VARLEN:
        use_varlen_attention(model)
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora)
    model.train()
    return model


def _attn_implementation(device: torch.device, precision: str = "auto") -> str:
    """Packed traces need attention that respects their boundaries. On CPU: one flattened
    row per micro-batch, each trace its own causal SDPA (distill.models._segment_sdpa). On GPU in bf16:
    PyTorch's varlen flash attention over one flattened row per micro-batch (no padding
    between rows), else flash-attention 2 when installed; else SDPA with the
    block-diagonal mask transformers derives from position_ids (exact on CPU and GPU).
    DISTILL_ATTN overrides (e.g. flex_attention, sdpa)."""
    if os.environ.get("DISTILL_ATTN"):
        return os.environ["DISTILL_ATTN"]
    if device.type == "cpu":
        return VARLEN  # segments one by one through SDPA: no mask, no cross-trace work
    if device.type == "cuda":
        import importlib.util

        if varlen_supported() and precision != "fp32":  # flash kernels: fp16/bf16 only
            return VARLEN
        if importlib.util.find_spec("flash_attn") is not None:
            return "flash_attention_2"
    return "sdpa"


def _plan(cfg: TrainConfig, world: int, stream: RowStream, gpu: bool) -> dict[str, int]:
    """Rows per step and per micro-batch from the packed rows' real sizes: batch_tokens
    means tokens, also when traces longer than half a row leave rows part empty."""
    rows = stream.epoch_rows(0)
    lens = [sum(int(stream.lengths[d][i]) for d, i in r) for r in rows]
    rows_step = _even_split(cfg.batch_tokens / (sum(lens) / len(lens)))
    rows_step = math.ceil(rows_step / world) * world  # every rank gets the same number of rows
    # GPU rows are padded to max_length (static shapes); CPU rows to the longest present
    rows_micro = max(1, cfg.micro_batch_tokens // (cfg.max_length if gpu else max(lens)))
    per_rank = rows_step // world
    max_steps = cfg.max_steps or max(1, math.ceil(len(rows) * cfg.num_train_epochs / rows_step))
    return {
        "rows_micro": rows_micro,
        "rows_step": rows_step,
        "per_rank": per_rank,
        "accum": math.ceil(per_rank / rows_micro),
        "max_steps": max_steps,
        "epoch_rows": len(rows),
    }


def _even_split(rows: float) -> int:
    """A row count that 1, 2, 4 and 8 processes split evenly (a power of two below 8, a
    multiple of 8 above), so the run is the same whatever the world size."""
    if rows < 6:
        return 2 ** max(0, round(math.log2(max(rows, 1.0))))
    return 8 * max(1, round(rows / 8))


def _resume(acc, ckpt_dir: Path, fp: str, stream: RowStream) -> tuple[int, dict | None]:
    """The step to go on from and the statistics of the steps before it (none: 0)."""
    if acc.is_main_process:
        checkpoint.drop_incomplete(ckpt_dir)
    acc.wait_for_everyone()
    found = checkpoint.latest(ckpt_dir, fp)
    if found is None:
        return 0, None
    path, state = found
    acc.load_state(str(path))
    stream.load_state_dict(state["data"])
    if acc.is_main_process:
        console.print(f"resumed from {path} (step {state['step']})")
    return int(state["step"]), state.get("stats")


class _Loop:
    """The optimizer-step loop (a class only to keep its many collaborators together)."""

    def __init__(self, acc, objective, opt, sched, stream, domains, lw, cfg, plan, pad_id):
        self.acc, self.objective, self.opt, self.sched = acc, objective, opt, sched
        self.stream, self.domains, self.lw, self.cfg, self.plan = stream, domains, lw, cfg, plan
        self.names = sorted(domains)
        self.index = {d: i for i, d in enumerate(self.names)}
        self.pad_id = pad_id
        model = acc.unwrap_model(objective).model
        self.flat = model.config._attn_implementation == VARLEN
        self.defer = DEFER if DEFER is not None else acc.device.type == "cuda"
        self.until: Callable[[StepStats], str | None] | None = None  # run()'s

    def batches(self) -> tuple[list[dict[str, torch.Tensor]], int, float]:
        """This rank's micro-batches of the next step, its real tokens and Σ attention
        work (Σ len² per trace, for the FLOP count)."""
        acc, plan = self.acc, self.plan
        rows = self.stream.take(plan["rows_step"])[acc.process_index :: acc.num_processes]
        out, tokens, sq = [], 0, 0.0
        cfg = self.cfg
        if self.flat:  # one row of the real tokens; a static width only for compiled layers
            width = plan["rows_micro"] * cfg.max_length if cfg.torch_compile else None
        else:  # static row width on GPU: compiled kernels (flex attention, torch.compile) never recompile
            width = cfg.max_length if acc.device.type == "cuda" else None
        for s in range(0, len(rows), plan["rows_micro"]):
            mb = rows[s : s + plan["rows_micro"]]
            arrs = collate(
                mb,
                self.domains,
                self.index,
                self.lw,
                self.pad_id,
                cfg.kd.enabled,
                width,
                flat=self.flat,
                max_segment=cfg.max_length,
            )
            out.append({k: _to_device(v, acc.device) for k, v in arrs.items()})
            lens = [
                int(self.domains[d].offsets[i + 1] - self.domains[d].offsets[i])
                for r in mb
                for d, i in r
            ]
            tokens += sum(lens)
            sq += float(sum(n * n for n in lens))
        return out, tokens, sq

    def step(self) -> torch.Tensor:
        """One optimizer step; returns this rank's [loss, tokens, loss tokens, Σlen², per-domain ...]."""
        acc = self.acc
        batches, tokens, sq = self.batches()
        local_w = sum(b["weights"].sum() for b in batches).reshape(1).float()
        # DDP averages gradients over ranks: scale the global sum down by the world size
        norm = (acc.reduce(local_w, "sum") / acc.num_processes).clamp(min=1e-8).reshape(())
        loss = torch.zeros((), device=acc.device)
        dom = torch.zeros(2 * len(self.names), device=acc.device)
        for j, b in enumerate(batches):
            sync = j == len(batches) - 1
            with nullcontext() if sync else acc.no_sync(self.objective), acc.autocast():
                total, dl, dt = self.objective(n_domains=len(self.names), norm=norm, **b)
            acc.backward(total)
            loss += total.detach()
            dom += torch.cat([dl, dt])
        if self.cfg.max_grad_norm:
            acc.clip_grad_norm_(self.objective.parameters(), self.cfg.max_grad_norm)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        n_loss = sum(len(b["targets"]) for b in batches)
        counts = _to_device(np.array([tokens, n_loss, sq], dtype=np.float32), acc.device)
        return torch.cat([(loss / acc.num_processes).reshape(1), counts, dom])

    def run(
        self,
        start: int,
        desc: str,
        ckpt_dir: Path,
        fp: str,
        stop_after: int | None,
        prior: dict | None = None,
        until: Callable[[StepStats], str | None] | None = None,
    ) -> StepStats:
        """The steps from ``start + 1``. On a GPU the loop runs one step ahead of its
        bookkeeping: step k's losses are read (a device sync) only after step k+1 has been
        queued, so the GPU never idles while the host logs, collates and launches. Steps
        that checkpoint or may end the run are read at once; a time limit seen on several
        ranks (their all-reduced flag) ends the run one step later than on one."""
        acc, cfg = self.acc, self.cfg
        stats = StepStats(self.names, start)
        if prior:  # resumed: the report covers the steps before too
            stats.load_state_dict(prior)
            if until is not None and (why := until(stats)):  # it ended there: no step more
                stats.finished, stats.stopped_by = True, why
                return stats
        self.until = until
        last = self.plan["max_steps"]
        t0 = time.perf_counter()
        with progress(acc, desc, last, start) as bar:
            pending, why = None, None
            for step in range(start + 1, last + 1):
                elapsed = time.perf_counter() - t0
                timed_out = cfg.max_time_s is not None and elapsed > cfg.max_time_s
                row = self.step()
                flags = _to_device(np.array([float(timed_out), elapsed], np.float32), acc.device)
                row = acc.reduce(torch.cat([row, flags]), "sum")
                if pending is not None:
                    why = self._record(*pending, stats, bar, t0)
                pending = (step, row)
                saves = bool(cfg.save_steps) and (step % cfg.save_steps == 0 or step == last)
                alone = timed_out and acc.num_processes == 1  # its own clock decides
                if self.defer and not (why or alone or saves or step in (stop_after, last)):
                    continue
                why = self._record(step, row, stats, bar, t0) or why
                stop = bool(why) or step == stop_after
                pending = None
                if saves or stop:
                    state = {
                        "step": step,
                        "data": self.stream.state_dict(),
                        "fingerprint": fp,
                        "stats": stats.state_dict(),
                    }
                    checkpoint.save(acc, ckpt_dir, step, state, cfg.save_total_limit)
                if stop:
                    # out of time or ended by `until`: a finished (shorter) run; stop_after:
                    # a preemption
                    stats.finished = step != stop_after
                    stats.stopped_by = "stop_after_steps" if step == stop_after else why
                    return stats
        stats.finished = True
        return stats

    def _record(self, step: int, row: torch.Tensor, stats: StepStats, bar, t0: float) -> str | None:
        """Book one finished step (waits for it on a GPU); why the run ends there, if it
        does: "max_time_s" when the ranks ran out of time, else what ``until`` says."""
        cfg = self.cfg
        row = row.cpu()
        if cfg.max_time_s is not None:  # the mean over ranks: every rank sets the same lr
            frac = float(row[-1]) / self.acc.num_processes / cfg.max_time_s
            for f in self.sched.lr_lambdas:
                f.time_frac = frac
        stats.add(step, row[:-2], time.perf_counter() - t0)
        bar(step, stats)
        if step % cfg.logging_steps == 0 and cfg.report_to:
            self.acc.log(stats.log_row(), step=step)
        if float(row[-2]) > 0:
            return "max_time_s"
        return self.until(stats) if self.until is not None else None


def _to_device(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on ``device``. To a GPU through pinned memory without blocking: a plain
    copy from pageable memory waits for every kernel queued before it."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def run(recipe: Recipe) -> dict:
    """The ``distill train`` stage: the student on every enabled domain's clean shards.
    On a multi-core CPU it runs data-parallel in one process per core (distill/launch.py)."""
    from distill import launch

    if (procs := launch.cpu_procs()) > 1:
        return launch.spawn(run, recipe, procs=procs, what="train")

    out = recipe.out
    st = recipe.student
    if st.kind == "scratch":
        tok_dir = (
            Path(recipe.tokenizer.path)
            if recipe.tokenizer.kind == "pretrained"
            else out / "tokenizer"
        )
        init: str | Path | ModelArch = st.arch
    else:
        tok_dir = init = Path(st.path)
    domains = recipe.active_domains()
    if not domains:
        raise UserError(f"{recipe.name}: no enabled domain to train on")
    shards = {d: out / "clean" / d for d in domains}
    # A domain whose teacher produced no verified trace is left out with a warning rather
    # than failing the run: the student is still distilled on the rest, and the eval
    # report shows the missing domain plainly.
    from distill.shards import read_manifest

    empty = [d for d, p in shards.items() if read_manifest(p)["rows"] == 0]
    for d in empty:
        if os.environ.get("RANK", "0") == "0":  # once, not once per rank
            console.print(f"[yellow]warning[/]: clean/{d} has no traces; training without {d}")
        del shards[d]
    if not shards:
        raise UserError(
            f"{out / 'clean'}: every domain's clean shards are empty; nothing to train on"
        )
    domains = list(shards)
    if recipe.train.kd.enabled:
        _check_kd_tokenizers(recipe, tok_dir)
    fit = train
    if st.arch.attention == "dsa":  # the dense student, then its DSA phases (distill/dsa/)
        from distill.dsa.train import phases

        fit = phases(st.arch)
    report = fit(
        init=init,
        tokenizer_dir=tok_dir,
        shards=shards,
        out_dir=out / "student",
        run_dir=layout.run_dir(out / "student", out),
        cfg=recipe.train,
        seed=recipe.seed,
        desc="student",
        sampling_weights={d: recipe.domains[d].sampling_weight for d in domains},
        loss_weights={d: recipe.domains[d].loss_weight for d in domains},
        short_prompt_shares={d: recipe.domains[d].short_prompt_share for d in domains},
    )
    record = {
        "steps": report["steps"],
        "final_loss": report["final_loss"],
        "skipped_domains": empty,
    }
    return {**report, "complete": report["finished"], "record": record}


def _check_kd_tokenizers(recipe: Recipe, student_tok: Path) -> None:
    """Logit KD compares token distributions: every teacher must share the student's vocabulary."""
    from distill.models import describe_vocab, tokenizer_fingerprint

    student = load_tokenizer(student_tok)
    for d in recipe.active_domains():
        t = recipe.teachers[d]
        path = (
            Path(t.path)
            if t.kind == "hf"
            else recipe.out / "teachers" / d
            if t.kind == "bootstrap"
            else None
        )
        if path is None or not (path / "tokenizer_config.json").exists():
            continue  # an endpoint's tokenizer is unknown here; ids are range-checked per trace
        teacher = load_tokenizer(path)
        if tokenizer_fingerprint(teacher) != tokenizer_fingerprint(student):
            raise UserError(
                f"train.kd: teacher '{d}' tokenizer {describe_vocab(teacher, path)} differs from the "
                f"student's {describe_vocab(student, student_tok)}; logit KD needs one shared tokenizer"
            )
