"""The final HF model directory: what an HF model repo holds (config, safetensors,
tokenizer with its chat template, generation config) plus a model card, and nothing a run
leaves behind (those go to its run directory, :mod:`distill.layout`).

LoRA with ``merge: false`` also writes the adapter as its own repo beside the model,
``<model>-adapter/``, whose ``base_model_name_or_path`` names a base that exists: the HF
model it started from, or (a scratch model) the untrained base saved as ``<model>-base/``.
The model directory itself always holds the merged model, so every stage, ``distill
serve`` and ``from_pretrained`` load it as it is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distill.models import set_generation_config
from distill.recipe.base import Section
from distill.recipe.schema import ModelArch, TrainConfig

CARD = "README.md"
EVAL_START, EVAL_END = "<!-- eval:start -->", "<!-- eval:end -->"


def adapter_dirs(out: Path) -> tuple[Path, Path]:
    """Where ``merge: false`` puts the adapter and a scratch model's base."""
    return out.with_name(out.name + "-adapter"), out.with_name(out.name + "-base")


def save_model(acc, objective, tokenizer, cfg: TrainConfig, out: Path, init=None) -> None:
    """The final HF model directory (see the module doc); ``init`` is what training
    started from (an HF directory or a :class:`ModelArch`), the adapter's base."""
    acc.wait_for_everyone()
    model = acc.unwrap_model(objective).model
    base_state = None
    if cfg.lora.enabled:
        if acc.is_main_process and not cfg.lora.merge:
            base_state = save_adapter(model, tokenizer, out, init)
        model = model.merge_and_unload()
        state = model.state_dict()
    else:
        full = acc.get_state_dict(objective)  # gathers FSDP shards; keys start with "model."
        state = {k.removeprefix("model."): v for k, v in full.items()}
    if acc.is_main_process:
        set_generation_config(model, tokenizer)
        model.save_pretrained(out, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(out)
        if base_state is not None:
            base = adapter_dirs(out)[1]
            model.save_pretrained(base, state_dict=base_state, safe_serialization=True)
            tokenizer.save_pretrained(base)
    acc.wait_for_everyone()


def save_adapter(model, tokenizer, out: Path, init) -> dict[str, Any] | None:
    """Save ``model``'s adapter (a ``PeftModel``) as its own repo beside ``out``; return the
    base weights to save when the base is a scratch model that exists nowhere else (None
    when it is an HF directory)."""
    adapter, base_dir = adapter_dirs(out)
    scratch = init is None or isinstance(init, ModelArch)
    base = base_dir if scratch else Path(init)
    for c in model.peft_config.values():
        c.base_model_name_or_path = str(base.resolve())
    model.save_pretrained(adapter)
    tokenizer.save_pretrained(adapter)
    if not scratch:
        return None
    # the frozen weights under the adapters: peft's keys less its prefix and base_layer
    return {
        k.removeprefix("base_model.model.").replace(".base_layer.", "."): v.detach().clone()
        for k, v in model.state_dict().items()
        if "lora_" not in k
    }


def train_card(out: Path, run: Path, desc: str, init, cfg: TrainConfig, shards, report, sw, lw):
    """The card of a model ``train`` wrote: where it started, its data, how it trained."""
    from distill.shards import read_manifest

    scratch = isinstance(init, ModelArch)
    start = "a model built from scratch" if scratch else f"`{init}`"
    intro = (
        f"Distilled by `distill` ({desc}) from {start} on verified "
        f"reasoning traces. Run files (checkpoints, logs, `train_report.json`, the resolved "
        f"recipe) are in `{run}`."
    )
    rows = [
        "| domain | shards | rows | examples | sampling weight | loss weight |",
        "|---|---|---|---|---|---|",
    ]
    for d, p in sorted(shards.items()):
        n = read_manifest(p)["rows"]
        rows.append(f"| {d} | `{p}` | {n} | {report['examples'].get(d, 0)} | {sw[d]} | {lw[d]} |")
    loss = report["final_loss"]
    trained = (
        f"{report['steps']} optimizer steps, {report['tokens']:,} tokens, "
        f"{report['seconds']:.0f} s on {report['world_size']} process(es); final loss "
        f"{'n/a' if loss is None else f'{loss:.4f}'}."
    )
    sections = [("Data", "\n".join(rows)), ("Training", trained)]
    write_card(out, desc, intro, sections, cfg, None if scratch else str(init))


def rl_card(out: Path, run: Path, desc: str, init, cfg, tasks: dict, report: dict) -> None:
    """The card of a model the RL trainer wrote: its start, prompts, steps, settings."""
    intro = (
        f"`{init}` trained further by `distill` ({desc}) with GRPO as DeepSeek-V3.2 runs it, "
        f"rewards from the domains' verifiers. Run files (`rl_log.jsonl`, `rl_report.json`, "
        f"checkpoints) are in `{run}`."
    )
    rows = ["| domain | prompt tasks | weight |", "|---|---|---|"]
    for d, ts in sorted(tasks.items()):
        w = cfg.domain(d).weight
        rows.append(f"| {d} | {len(ts)} | {w} |")
    last = report.get("last") or {}
    trained = f"{report['steps']} RL steps in {report['seconds']:.0f} s" + (
        f"; last step: reward {last['reward']:.3f}, pass rate {last['pass']:.2f}."
        if {"reward", "pass"} <= last.keys()
        else "."
    )
    if curve := report.get("heldout"):
        first, end = curve[0], curve[-1]
        trained += (
            f" Held-out greedy pass@1 (`rl.eval_steps`, {cfg.eval_tasks} eval-split tasks a "
            f"domain): {first['eval/pass1']:.1%} at step {first['step']}, "
            f"{end['eval/pass1']:.1%} at step {end['step']}."
        )
    sections = [("Prompts", "\n".join(rows)), ("Training", trained)]
    write_card(out, desc, intro, sections, cfg, str(init))


def write_card(
    out: Path,
    desc: str,
    intro: str,
    sections: list[tuple[str, str]],
    cfg: Section,
    base: str | None,
) -> None:
    """The model card ``README.md``: front matter, ``intro`` under Model, then ``sections``
    (heading, Markdown), then the recipe section ``cfg`` as YAML; an evaluation added later
    (:func:`add_eval`) is kept when the card is rewritten."""
    from distill.recipe.doc import section_yaml

    title = f"{out.name} ({desc})"
    sections = [("Model", intro), *sections, ("Recipe", f"```yaml\n{section_yaml(cfg)}```")]
    path = out / CARD
    old = path.read_text() if path.exists() else ""
    evals = (
        old[old.find(EVAL_START) : old.find(EVAL_END) + len(EVAL_END)] if EVAL_END in old else ""
    )
    head = ["---", "library_name: transformers", "pipeline_tag: text-generation", "tags:"]
    head += ["- distill", "- reasoning", "- tool-use"]
    if base:
        head.append(f"base_model: {base}")
    lines = [*head, "---", "", f"# {title}", ""]
    for heading, body in sections:
        lines += [f"## {heading}", "", body.rstrip(), ""]
    lines += [evals or f"{EVAL_START}\n{EVAL_END}", ""]
    path.write_text("\n".join(lines))


def eval_markdown(scores: list, report: Path) -> str:
    """An evaluation table for a card: one row per domain of ``scores`` (one model's)."""
    rows = ["| domain | tasks | pass@1 (greedy) | pass@k | tokens per correct answer |"]
    rows.append("|---|---|---|---|---|")
    for s in scores:
        passk = "—" if s.passk is None else f"{s.passk:.1%} (k={s.k})"
        tpc = "—" if s.tokens_per_correct is None else f"{s.tokens_per_correct:.0f}"
        rows.append(f"| {s.domain} | {s.tasks} | {s.pass1:.1%} | {passk} | {tpc} |")
    return "\n".join(rows) + f"\n\nHeld-out tasks of each domain; the whole report: `{report}`."


def add_eval(out: Path, markdown: str) -> None:
    """Put ``markdown`` (an evaluation of this model) in its card, replacing an earlier one."""
    path = out / CARD
    if not path.exists():
        return
    text = path.read_text()
    block = f"{EVAL_START}\n## Evaluation\n\n{markdown.rstrip()}\n{EVAL_END}"
    if EVAL_START in text and EVAL_END in text:
        text = text[: text.find(EVAL_START)] + block + text[text.find(EVAL_END) + len(EVAL_END) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
