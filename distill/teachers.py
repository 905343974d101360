"""The teachers stage: the shared tokenizer, bootstrap specialists trained on their
domain's oracle traces, and a one-request check of reference (hf / openai) teachers.

Writes ``<out>/tokenizer/`` (when the recipe trains one) and, per bootstrap teacher,
``<out>/teachers/<domain>/`` (an HF model directory) with its oracle shards in
``oracle/``. A teacher already trained with the same fingerprint is skipped.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distill import layout
from distill.errors import UserError
from distill.files import atomic_write_json, json_hash
from distill.messages import Lineage, Trace, Verdict
from distill.progress import console
from distill.recipe.schema import Recipe, TeacherConfig
from teachers.base import (
    check_at,
    get_domain,
    oracle_messages,
    short_prompt_at,
    shorten_prompt,
    trace_from_task,
)

TOKENIZER_RECORD = "_tokenizer.json"
TEACHER_RECORD = "_teacher.json"


def _hash(data: Any) -> str:
    return json_hash(data, default=str)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_json(path, data, default=str)


def render_text(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str:
    """A conversation as the model sees it (our chat template, tool schemas included), so
    the tokenizer learns merges for exactly that text. The plain-Python render where it
    is exact (the GPU recipe's 8,000 conversations: 2.8 -> 1.8 s for the whole tokenizer
    on a 2-core CPU)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    from distill.chat.render_python import render_spans
    from distill.chat.template import CHAT_TEMPLATE

    if (fast := render_spans(messages, tools)) is not None:
        return fast[0]
    rendered, _ = render_jinja_template([messages], tools=tools, chat_template=CHAT_TEMPLATE)
    return rendered[0]


def tokenizer_dir(recipe: Recipe) -> Path:
    """The run's tokenizer: trained under ``<out>/tokenizer`` or the pretrained path."""
    if recipe.tokenizer.kind == "pretrained":
        if not recipe.tokenizer.path:
            raise UserError("tokenizer.path: required for tokenizer.kind=pretrained")
        return Path(recipe.tokenizer.path)
    return recipe.out / "tokenizer"


def _corpus_fingerprint(recipe: Recipe) -> str:
    domains = {d: recipe.domains[d].difficulty for d in recipe.active_domains()}
    versions = {d: get_domain(d).verifier_version for d in domains}
    data = {
        "seed": recipe.seed,
        "tokenizer": recipe.tokenizer.model_dump(),
        "domains": domains,
        "v": versions,
    }
    checks = {d: t.oracle_check_share for d, t in recipe.teachers.items() if t.oracle_check_share}
    if checks:  # only when set: the corpora (and fingerprints) of other recipes stay as they were
        data["checks"] = checks
    return _hash(data)


def build_tokenizer(recipe: Recipe, force: bool = False) -> Path:
    """Train the shared BPE on oracle conversations of every enabled domain (skipped when
    the tokenizer on disk was trained from the same inputs)."""
    from distill.chat.template import train_tokenizer

    out = tokenizer_dir(recipe)
    if recipe.tokenizer.kind == "pretrained":
        if not (out / "tokenizer_config.json").exists() and not (out / "tokenizer.json").exists():
            raise UserError(f"tokenizer.path: {out} is not a tokenizer directory")
        return out
    fp = _corpus_fingerprint(recipe)
    rec = _read_json(layout.run_dir(out, recipe.out) / TOKENIZER_RECORD)
    if rec and rec.get("fingerprint") == fp and not force:
        console.print(f"tokenizer: up to date in {out}")
        return out
    t0 = time.time()
    texts = []
    for d in recipe.active_domains():
        dom = get_domain(d)
        n = recipe.tokenizer.corpus_tasks
        share = recipe.teachers[d].oracle_check_share  # every active domain has a teacher
        for task in dom.tasks("train", n, recipe.seed, recipe.domains[d].difficulty):
            msgs = oracle_messages(dom, task, check_at(task.id, share))
            texts.append(render_text(msgs, task.tools))
    tok = train_tokenizer(texts, recipe.tokenizer.vocab_size, out)
    record = {"fingerprint": fp, "texts": len(texts), "vocab": len(tok)}
    _write_json(layout.run_dir(out, recipe.out) / TOKENIZER_RECORD, record)
    console.print(
        f"tokenizer: {len(tok)} tokens from {len(texts)} oracle conversations in {time.time() - t0:.0f} s → {out}"
    )
    return out


def oracle_trace(
    domain: Any, task: Any, fingerprint: str, short_prompt: bool = False, check: bool = False
) -> Trace:
    """The oracle's conversation of ``task`` as a shard row (verdict: correct by
    construction, so the trainer can treat it like clean data). ``short_prompt`` leaves
    out the system messages and the tool list (``teachers.<d>.oracle_short_prompt_share``;
    the cut is :func:`teachers.base.shorten_prompt`, the student's too); ``check`` adds the
    oracle's self-check (``teachers.<d>.oracle_check_share``)."""
    conversation = {"messages": oracle_messages(domain, task, check), "tools": task.tools}
    if short_prompt:
        conversation = shorten_prompt(conversation)
    return trace_from_task(
        task,
        f"{task.id}-oracle",
        **conversation,
        split="train",
        teacher="oracle",
        finish_reason="stop",
        verdict=Verdict.ok("oracle"),
        lineage=Lineage(
            teacher_model="oracle",
            verifier=domain.verifier_name,
            verifier_version=domain.verifier_version,
            recipe_fingerprint=fingerprint,
        ),
    )


def write_oracle_shards(recipe: Recipe, d: str, out: Path, fingerprint: str) -> int:
    """Oracle traces of ``teachers[d].oracle_tasks`` train tasks into ``out`` (resumable:
    rows already committed are not written again); ``oracle_short_prompt_share`` of them
    without system prompt and tool list.

    Why the short ones: the agents teacher's prompt opens with ~60 tokens that are the same
    in every task (tool list, system prompt). A ~1M-parameter model trained on whole
    prompts parks its attention there and learns to copy an account name from the user
    turn only after ~1,000 steps (0% held-out at 600, 30% at 1,500); on short prompts it
    learns that within ~200 steps, and then does it under the whole prompt too
    (docs/teachers.md)."""
    from distill.shards import ShardWriter

    dom = get_domain(d)
    t = recipe.teachers[d]
    writer = ShardWriter(out, max_rows=recipe.generate.shard_rows, fingerprint=fingerprint)
    done = writer.committed_ids()
    with writer:
        tasks = dom.tasks("train", t.oracle_tasks, recipe.seed, recipe.domains[d].difficulty)
        for i, task in enumerate(tasks):
            if f"{task.id}-oracle" not in done:
                short = short_prompt_at(i, t.oracle_short_prompt_share)
                check = check_at(task.id, t.oracle_check_share)
                writer.write([oracle_trace(dom, task, fingerprint, short, check)])
    return writer.committed_rows


def teacher_fingerprint(recipe: Recipe, d: str, tok_fp: str) -> str:
    t = recipe.teachers[d]
    return _hash(
        {
            "seed": recipe.seed,
            # its RL section is not part of it: RL reruns on its own (distill/rl/specialist.py)
            "teacher": t.model_dump(mode="json", exclude={"rl"}),
            "difficulty": recipe.domains[d].difficulty,
            "verifier": get_domain(d).verifier_version,
            "tokenizer": tok_fp,
        }
    )


def _tokenizer_key(recipe: Recipe, tok_dir: Path) -> str:
    """What a teacher's fingerprint takes of the tokenizer. A trained one's is its corpus
    fingerprint, known before it is built (the teachers' oracle shards are written while
    it is); a pretrained one's is its record's, or its path."""
    if recipe.tokenizer.kind == "train":
        return _corpus_fingerprint(recipe)
    tok_rec = _read_json(layout.run_dir(tok_dir, recipe.out) / TOKENIZER_RECORD) or {}
    return tok_rec.get("fingerprint", str(tok_dir))


def train_bootstrap(
    recipe: Recipe,
    d: str,
    tok_dir: Path,
    force: bool = False,
    tokenizer_ready: Callable[[], None] = lambda: None,
) -> dict[str, Any]:
    """Oracle shards then single-domain training; skipped when already done.
    ``tokenizer_ready()`` returns once the tokenizer in ``tok_dir`` is built (it is
    called between the two)."""
    from distill.train.loop import train

    t = recipe.teachers[d]
    out = recipe.out / "teachers" / d
    run = layout.run_dir(out, recipe.out)  # oracle shards, checkpoints, logs, the record
    fp = teacher_fingerprint(recipe, d, _tokenizer_key(recipe, tok_dir))
    rec = _read_json(run / TEACHER_RECORD)
    whole = (out / "config.json").exists() and any(out.glob("*.safetensors"))  # none deleted
    if rec and rec.get("fingerprint") == fp and whole and not force:
        console.print(f"teacher {d}: up to date in {out}")
        return rec
    (run / TEACHER_RECORD).unlink(missing_ok=True)
    t0 = time.time()
    rows = write_oracle_shards(recipe, d, run / "oracle", fp)
    oracle_s = time.time() - t0
    tokenizer_ready()
    console.print(f"teacher {d}: training on {rows} oracle traces → {out}")
    t0 = time.time()
    report = train(
        init=t.arch,
        tokenizer_dir=tok_dir,
        shards={d: run / "oracle"},
        out_dir=out,
        run_dir=run,
        cfg=t.train,
        seed=recipe.seed,
        desc=f"teacher {d}",
    )
    if not report.get("finished", True):
        raise UserError(
            f"teachers.{d}.train: stopped at step {report.get('steps')} before it finished; "
            f"rerun `distill teachers` to resume from the checkpoint"
        )
    rec = {
        "fingerprint": fp,
        "domain": d,
        "oracle_rows": rows,
        "oracle_s": round(oracle_s, 2),  # writing the oracle shards (the stage's record has it)
        "train_s": time.time() - t0,
        "train": report,
    }
    _write_json(run / TEACHER_RECORD, rec)
    return rec


def check_hf(d: str, path: str) -> dict[str, Any]:
    """Load config, tokenizer and weights of an HF directory and run one tiny forward."""
    if not Path(path).is_dir():  # never tried as a hub repo id: distill downloads nothing
        raise UserError(
            f"teachers.{d}.path: {path}: no such directory (an hf teacher is a local model "
            "directory; nothing is downloaded)"
        )
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from distill.dsa import register

        register()  # a DSA model directory loads too
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path)
        ids = tok("ping", return_tensors="pt", add_special_tokens=False)["input_ids"][:, :8]
        with torch.no_grad():
            logits = model(input_ids=ids).logits
    except Exception as e:  # any loading failure is the user's path or files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"teachers.{d}.path: cannot load an HF causal LM from {path}: {first}"
        ) from None
    if not torch.isfinite(logits).all():
        raise UserError(f"teachers.{d}.path: {path} produced non-finite logits")
    params = sum(p.numel() for p in model.parameters())
    console.print(f"teacher {d}: hf model {path} loads ({params:,} parameters)")
    return {"kind": "hf", "path": path, "params": params}


def check_openai(d: str, t: TeacherConfig) -> dict[str, Any]:
    """One real request to ``<base_url>/models``: the endpoint answers and serves the
    model the recipe names."""
    import httpx

    url = t.base_url.rstrip("/") + "/models"
    headers = {}
    if t.api_key_env:
        key = os.environ.get(t.api_key_env)
        if not key:
            raise UserError(
                f"teachers.{d}.api_key_env: environment variable {t.api_key_env} is not set"
            )
        headers["Authorization"] = f"Bearer {key}"
    try:
        r = httpx.get(url, headers=headers, timeout=min(t.request_timeout_s, 30.0))
        r.raise_for_status()
        served = [m.get("id") for m in r.json().get("data", [])]
    except (httpx.HTTPError, ValueError, AttributeError) as e:
        raise UserError(f"teachers.{d}.base_url: endpoint {url} does not answer: {e}") from None
    if served and t.model not in served:
        raise UserError(
            f"teachers.{d}.model: {t.model!r} is not served by {t.base_url} (serves {', '.join(map(str, served))})"
        )
    console.print(f"teacher {d}: endpoint {t.base_url} serves {t.model}")
    return {"kind": "openai", "base_url": t.base_url, "model": t.model}


def run(recipe: Recipe, force: bool = False) -> dict[str, Any]:
    """The teachers stage (``distill teachers``); ``force`` retrains what is up to date."""
    bootstrap = [d for d in recipe.active_domains() if recipe.teachers[d].kind == "bootstrap"]
    info: dict[str, Any] = {}
    if _parallel_ok(bootstrap):  # the tokenizer is built while the teachers write their data
        trained, tok = _train_parallel(recipe, bootstrap, force)
    else:
        trained = {}
        tok = (
            build_tokenizer(recipe, force)
            if (bootstrap or recipe.tokenizer.kind == "train")
            else None
        )
    for d in recipe.active_domains():
        t = recipe.teachers[d]
        if t.kind == "bootstrap":
            rec = trained.get(d) or train_bootstrap(recipe, d, tok, force)
            info[d] = {
                "kind": "bootstrap",
                "path": str(recipe.out / "teachers" / d),
                "oracle_s": rec.get("oracle_s"),
                "train_s": rec.get("train_s"),
            }
        elif t.kind == "hf":
            info[d] = check_hf(d, t.path)
        else:
            info[d] = check_openai(d, t)
    from distill.rl.specialist import sharpen, sharpened_dir

    for d in recipe.active_domains():  # specialist RL after every supervised phase
        if (rl := sharpen(recipe, d, force)) is not None:
            info[d]["rl"] = {"path": str(sharpened_dir(recipe, d)), **rl}
    return {"teachers": info, "record": {"teachers": info}}


def _parallel_ok(bootstrap: list[str]) -> bool:
    """Train several bootstrap teachers at once when the hardware has room for them.

    CPU: a ~1M-parameter model keeps one core busy and gains little from a second thread,
    so two teachers side by side nearly halve the stage. GPU: a bootstrap teacher is far
    too small to fill one (a 10M-parameter teacher ran at 4-5% MFU on an H200, bound by
    kernel launches), so all of them share the GPUs, each in its own process.
    Not under ``accelerate launch`` (WORLD_SIZE > 1): the launcher owns the devices."""
    import torch

    if len(bootstrap) < 2 or int(os.environ.get("WORLD_SIZE", "1")) != 1:
        return False
    return torch.cuda.is_available() or (os.cpu_count() or 1) >= 2


def _workers(n: int) -> tuple[int, int]:
    """(processes, GPUs): one process per teacher over the GPUs, else one per core."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return (n if gpus else min(n, os.cpu_count() or 1)), gpus


def _train_parallel(recipe: Recipe, domains: list[str], force: bool) -> tuple[dict[str, Any], Path]:
    """Each teacher in its own spawned process on one CPU thread (and, with GPUs, one GPU
    given round-robin); output goes to ``runs/teachers/<domain>/train.log`` so the progress
    bars do not interleave. This process builds the tokenizer meanwhile: the teachers
    write their oracle shards (which do not need it) and wait for it before training.
    On an H100 host (2026-12-06) the tokenizer took 11 s, then ~31 s passed before the
    agents teacher, the stage's last, began its training call (spawning, its 30,000
    oracle conversations), one after the other."""
    import multiprocessing as mp

    from distill.launch import spawn_pool

    workers, gpus = _workers(len(domains))
    ctx = mp.get_context("spawn")
    ready, failed = ctx.Event(), ctx.Value("b", 0)
    tok = tokenizer_dir(recipe)
    where = f" on {gpus} GPU{'s' if gpus > 1 else ''}" if gpus else ""
    console.print(
        f"teachers: training {', '.join(domains)} in {workers} processes{where} "
        f"(logs in {recipe.out / layout.RUNS / 'teachers'}/<domain>/train.log)"
    )
    out: dict[str, Any] = {}
    with spawn_pool(workers, _worker_init, (ready, failed)) as pool:
        # longest first, so the last teachers to start are the short ones
        order = sorted(domains, key=lambda d: -(recipe.teachers[d].train.max_steps or 0))
        share = _tokenize_share(workers)
        jobs = {
            d: pool.submit(
                _train_in_worker, recipe, d, tok, force, i % gpus if gpus else None, share
            )
            for i, d in enumerate(order)
        }
        try:
            tok = build_tokenizer(recipe, force)
        except BaseException:
            failed.value = 1  # the teachers stop before training; this error is the one told
            raise
        finally:
            ready.set()
        for d, job in jobs.items():
            try:
                out[d] = job.result()
            except UserError:
                raise
            except Exception as e:  # a crashed worker names its teacher and its log
                log = layout.run_dir(recipe.out / "teachers" / d, recipe.out) / "train.log"
                raise UserError(f"teachers.{d}: training failed ({e}); see {log}") from None
            rep = out[d].get("train", {})
            console.print(
                f"teacher {d}: done in {out[d].get('train_s') or 0:.0f} s, "
                f"{rep.get('steps', '?')} steps, final loss {rep.get('final_loss') or float('nan'):.4f}"
            )
    return out, tok


_TOKENIZER: tuple[Any, Any] | None = None  # a teacher worker's (ready, failed) from its parent


def _worker_init(ready: Any, failed: Any) -> None:
    global _TOKENIZER
    _TOKENIZER = (ready, failed)


def _tokenizer_ready() -> None:
    """Return once the parent has built the tokenizer; raise if it could not."""
    if _TOKENIZER is None:
        return
    ready, failed = _TOKENIZER
    ready.wait()
    if failed.value:
        raise UserError("tokenizer: not built (the stage's error says why)")


def _tokenize_share(workers: int) -> int:
    """Tokenizing processes each teacher may start (distill/tokenize.py): the host's
    cores split between the teachers that start at once (the agents teacher, the GPU
    recipe's last to finish, tokenizes 30,000 multi-turn traces before its first step).
    Hosts under 8 cores tokenize in the teacher's own."""
    from distill.launch import MANY_CORES, usable_cores

    cores = usable_cores()
    return max(1, cores // workers) if cores >= MANY_CORES else 1


def _train_in_worker(
    recipe: Recipe, d: str, tok: Path, force: bool, gpu: int | None = None, tokenize: int = 1
) -> dict[str, Any]:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("DISTILL_TOKENIZE_WORKERS", str(tokenize))
    if gpu is not None:  # before CUDA is first touched in this process
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(i) for i in range(gpu + 1)]
        os.environ["CUDA_VISIBLE_DEVICES"] = ids[gpu]
    import torch

    torch.set_num_threads(1)
    log = layout.run_dir(recipe.out / "teachers" / d, recipe.out) / "train.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        return train_bootstrap(recipe, d, tok, force, _tokenizer_ready)
