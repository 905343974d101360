"""The `distill` command line. Thin: each command parses arguments and calls one
function in the module of its stage; errors meant for the user exit with status 2."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from distill.errors import UserError

app = typer.Typer(
    help="Specialist-to-generalist distillation: teachers → generate → filter → train → rl → "
    "eval, each a command on one recipe (`distill run RECIPE` runs them all).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
recipe_app = typer.Typer(help="Show, validate and edit recipes.", no_args_is_help=True)
shards_app = typer.Typer(help="Inspect and export trace shards.", no_args_is_help=True)
app.add_typer(recipe_app, name="recipe")
app.add_typer(shards_app, name="shards")

RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML file.")]
# eval and rl take a recipe, or run one-off on a model given by option
OneOffRecipeArg = Annotated[
    Path | None, typer.Argument(help="Recipe YAML file (optional for a one-off: --model ...).")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a recipe key: a.b.c=value (repeatable)."),
]
DomainsOpt = Annotated[
    str | None,
    typer.Option(help="One-off: comma-separated domains (default: every registered one)."),
]


def load(recipe: Path, overrides: list[str] | None):
    """Load and validate a recipe with overrides (imported lazily: fast --help)."""
    from distill.recipe.schema import load_recipe

    return load_recipe(recipe, overrides or [])


def domain_list(domains: str | None) -> list[str]:
    """A comma-separated --domains value; every registered domain when not given (the
    registry is read here, not at import: fast --help)."""
    from teachers.base import REGISTRY

    return [d.strip() for d in (domains or ",".join(REGISTRY)).split(",") if d.strip()]


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"distill {version('distill')}")
        except PackageNotFoundError:  # run from a source tree that was never installed
            typer.echo("distill (not installed)")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    from distill.progress import quiet_libraries

    quiet_libraries()  # before any command imports transformers (and in every rank it starts)


# Stage and tool commands are added below, one block per command.


# --- end to end: teachers, eval, run -------------------------------------------------


@app.command()
def teachers(recipe: RecipeArg, set_: SetOpt = None) -> None:
    """Train the tokenizer and bootstrap teachers; check hf/openai teachers answer.

    Writes <out>/tokenizer/ and <out>/teachers/<domain>/ (HF model dirs, oracle shards)."""
    _stage("teachers", recipe, set_)


@app.command("eval")
def eval_(
    recipe: OneOffRecipeArg = None,
    set_: SetOpt = None,
    model: Annotated[
        str | None, typer.Option(help="One-off: evaluate this HF model directory.")
    ] = None,
    base_url: Annotated[
        str | None, typer.Option(help="One-off: evaluate an OpenAI-compatible endpoint.")
    ] = None,
    model_name: Annotated[str | None, typer.Option(help="Model name sent to --base-url.")] = None,
    domains: DomainsOpt = None,
    tasks: Annotated[int, typer.Option(help="One-off: eval tasks per domain.")] = 100,
    out: Annotated[
        Path | None, typer.Option(help="One-off: report directory (default data/eval/<model>).")
    ] = None,
) -> None:
    """Evaluate teachers and student on held-out tasks; print the recovery table.

    Writes <out>/eval/report.md, report.json, report.png. With --model DIR (or
    --base-url URL --model-name NAME) evaluates one model on any domains."""
    from distill.eval import stage as evaluate

    if model or base_url:
        if model and not Path(model).is_dir():
            raise UserError(f"--model {model}: no such directory")
        r = load(recipe, set_) if recipe else None
        evaluate.one_off(
            model=model,
            base_url=base_url,
            model_name=model_name,
            n_tasks=tasks,
            domains=domain_list(domains),
            out_dir=out,
            recipe=r,
        )
    elif recipe is None:
        raise UserError("eval: give a RECIPE, or --model DIR / --base-url URL for a one-off")
    else:
        _stage("eval", recipe, set_)


@app.command("run")
def run_all(
    recipe: RecipeArg,
    set_: SetOpt = None,
    force: Annotated[
        bool, typer.Option("--force", help="Rerun every stage, even those up to date.")
    ] = False,
) -> None:
    """Run every stage in order, skipping those that are up to date.

    A stage reruns when its recipe sections or an upstream stage changed; each rerun
    says why. Writes everything under the recipe's output dir."""
    from distill.pipeline import run

    run(load(recipe, set_), force=force)


# --- verify: judge completions of real records -----------------------------------------


@app.command()
def verify(
    domain: Annotated[str, typer.Argument(help="Domain: a name in teachers/base.py REGISTRY.")],
    input_: Annotated[
        Path,
        typer.Argument(
            metavar="INPUT.jsonl",
            help="Records in the domain's real-data format plus a 'completion' (or 'messages') field.",
        ),
    ],
    out: Annotated[
        Path | None, typer.Option("--out", help="Write verdicts here (JSONL) instead of stdout.")
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option("--workers", min=1, help="Verifier processes (default: every core)."),
    ] = None,
) -> None:
    """Verify model completions of real records with the domain's verifier.

    Reads INPUT.jsonl; writes one verdict per line (id, passed, score, reason)
    to --out or stdout, then `N passed, M failed` to stderr. A bad record: exit 2."""
    from distill.verify import run

    run(domain, input_, out=out, workers=workers)


# --- foundation: recipe show|validate|set|reference, shards inspect|export ----------


@recipe_app.command("show")
def recipe_show(recipe: RecipeArg, set_: SetOpt = None) -> None:
    """Print the resolved recipe as YAML with field descriptions as comments.

    Precedence: defaults < YAML < --set. Reads RECIPE; writes nothing."""
    from distill.recipe.doc import show_yaml

    typer.echo(show_yaml(load(recipe, set_), source=str(recipe)), nl=False)


@recipe_app.command("validate")
def recipe_validate(recipe: RecipeArg, set_: SetOpt = None) -> None:
    """Check RECIPE (with --set overrides): prints 'ok' or one error line (exit 2)."""
    r = load(recipe, set_)
    r.require_domains()  # what every stage checks first
    typer.echo(f"ok: {recipe} (name {r.name}, domains {', '.join(r.active_domains())})")


@recipe_app.command("set")
def recipe_set(
    recipe: RecipeArg,
    assignments: Annotated[
        list[str], typer.Argument(help="key.path=value (value parsed as YAML).")
    ],
) -> None:
    """Edit keys of RECIPE in place, keeping its comments and key order.

    The result is validated first: an invalid edit exits 2 and leaves the file untouched."""
    from distill.recipe.edit import set_keys

    set_keys(recipe, assignments)
    typer.echo(f"updated {recipe}: {', '.join(assignments)}", err=True)


@recipe_app.command("reference")
def recipe_reference(
    write: Annotated[
        Path | None,
        typer.Option(
            help="Update the generated block of this Markdown file (docs/recipes.md) in place."
        ),
    ] = None,
) -> None:
    """Print the recipe reference generated from the schema (Markdown tables).

    With --write docs/recipes.md, update its generated block in place."""
    from distill.recipe.doc import reference_markdown, sync_reference

    if write is None:
        typer.echo(reference_markdown(), nl=False)
        return
    try:
        same = sync_reference(write, write=True)
    except ValueError as e:
        raise UserError(str(e)) from None
    typer.echo(f"{write}: {'already up to date' if same else 'recipe reference updated'}", err=True)


@shards_app.command("inspect")
def shards_inspect(
    path: Annotated[
        Path,
        typer.Argument(
            help="A shard directory, or any directory above shard directories: a stage "
            "directory (raw/) or a whole run (data/demo)."
        ),
    ],
    rows: Annotated[int, typer.Option(help="Rendered rows per directory.")] = 2,
    verify: Annotated[
        bool, typer.Option(help="Check every shard's sha256 against the manifest.")
    ] = False,
) -> None:
    """Rows per domain, pass/fail verdict counts, schema and a few rendered rows.

    Reads PATH (manifest-listed shards only); writes nothing."""
    from distill.shards.view import print_inspect

    print_inspect(path, rows=rows, verify=verify)


@shards_app.command("export")
def shards_export(
    path: Annotated[
        Path,
        typer.Argument(
            help="A shard directory, or a stage directory of per-domain shard directories."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Output file.")],
    format_: Annotated[str, typer.Option("--format", help="jsonl or parquet.")] = "jsonl",
) -> None:
    """Write every committed row under PATH to one JSONL or Parquet file (--out)."""
    from distill.shards.view import export

    n = export(path, format_, out)
    typer.echo(f"wrote {n} rows to {out}", err=True)


# --- generation: generate, serve ------------------------------------------------------


@app.command()
def generate(recipe: RecipeArg, set_: SetOpt = None) -> None:
    """Have every domain's teacher answer its training tasks (k samples each).

    Reads <out>/teachers/<domain>/ (bootstrap) or the hf/openai teacher; writes raw
    trace shards to <out>/raw/<domain>/. Resumes after a crash without duplicating rows;
    under `accelerate launch` each process takes a slice of the tasks."""
    _stage("generate", recipe, set_)


@app.command()
def serve(
    model_dir: Annotated[
        Path, typer.Argument(help="HF model directory (a teacher or the student).")
    ],
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    batch_size: Annotated[int, typer.Option(help="Requests decoded together.")] = 64,
    device: Annotated[
        str | None, typer.Option(help="cpu, cuda, cuda:1 ... (default: cuda if available).")
    ] = None,
) -> None:
    """Serve MODEL_DIR as an OpenAI-compatible endpoint.

    /v1/models and /v1/chat/completions (n, temperature, top_p, max_tokens, seed, stop,
    logprobs, top_logprobs, tools, stream), with reasoning_content and tool_calls in the
    reply (as server-sent events with stream: true). Reads MODEL_DIR; writes nothing."""
    from distill.serve import serve as run_server

    run_server(model_dir, host=host, port=port, batch_size=batch_size, device=device)


# --- filter: raw -> clean shards -----------------------------------------------------


@app.command("filter")
def filter_(recipe: RecipeArg, set_: SetOpt = None) -> None:
    """Verify, drop malformed and failed, dedup, decontaminate and select traces.

    Reads <out>/raw/<domain>/ shards and every enabled domain's eval tasks; writes
    <out>/clean/<domain>/ shards and <out>/clean/filter_report.json and .md, and prints
    the funnel. A domain completed with the same inputs is kept, anything else redone."""
    _stage("filter", recipe, set_)


# --- train: clean shards -> student -------------------------------------------------


@app.command()
def train(recipe: RecipeArg, set_: SetOpt = None) -> None:
    """Distill every enabled domain's clean traces into the student (Accelerate).

    Reads <out>/clean/<domain>/ shards and the run tokenizer (or student.path); writes the
    HF model dir <out>/student/ (with its model card), and train_report.json,
    checkpoints/ (resumed when present), cache/ and logs/ to <out>/runs/student/. Several
    processes: `accelerate launch -m distill train RECIPE`."""
    _stage("train", recipe, set_)


# --- rl: GRPO on the student (or any HF model) ---------------------------------------


@app.command()
def rl(
    recipe: OneOffRecipeArg = None,
    set_: SetOpt = None,
    model: Annotated[
        Path | None, typer.Option(help="One-off: GRPO on this HF model directory.")
    ] = None,
    domains: DomainsOpt = None,
    steps: Annotated[
        int | None, typer.Option(min=1, help="One-off: RL steps (default: the rl section's).")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="One-off: output model directory (default data/rl/<model>).")
    ] = None,
) -> None:
    """Mixed RL (GRPO) on the distilled student over every domain, rewards from the verifiers.

    Reads <out>/student/; writes the RL-trained student to <out>/rl/, and rl_log.jsonl (one
    line of metrics per step), rl_report.json and checkpoints/ to <out>/runs/rl/ (a one-off
    to runs/<name>/ beside its output). With --model DIR: RL on any HF causal LM
    directory; the recipe's `rl` section (or its defaults) and --set rl.KEY=VALUE apply."""
    if model is None:
        if recipe is None:
            raise UserError("rl: give a RECIPE, or --model DIR for a one-off")
        _stage("rl", recipe, set_)
        return
    from distill.rl import one_off

    if recipe is not None:
        cfg = load(recipe, set_).rl
    else:  # the rl section's defaults, with --set rl.KEY=VALUE validated like a recipe's
        from distill.recipe.schema import apply_override, validate

        data: dict = {"name": "rl", "rl": {}}
        for s in set_ or []:
            apply_override(data, s)
        cfg = validate(data, source="--set").rl
    if steps is not None:
        cfg = cfg.model_copy(update={"steps": steps})
    names = domain_list(domains)
    dest = out or Path("data") / "rl" / model.name
    report = one_off(model, names, dest, cfg)
    typer.echo(f"wrote {dest} ({report['steps']} steps)", err=True)


def _stage(stage: str, recipe: Path, set_: list[str] | None) -> None:
    """One stage on its own, as `distill run` runs it (its time and memory noted)."""
    from distill.stages import run_stage

    run_stage(load(recipe, set_), stage)


def _reflow(doc: str | None) -> str | None:
    """A docstring as help text: each paragraph on one line, so the help wraps at the
    terminal's width rather than where the source broke its lines."""
    if not doc:
        return doc
    import inspect

    return "\n\n".join(" ".join(p.split()) for p in inspect.cleandoc(doc).split("\n\n"))


# after every command above is registered (a test checks that none is left out): help
# reflowed, and `distill --help` lists the pipeline in its order, then the tools
PIPELINE = ("run", "teachers", "generate", "filter", "train", "rl", "eval")
for _group in (app, recipe_app, shards_app):
    for _cmd in _group.registered_commands:
        _cmd.help = _reflow(_cmd.help or (_cmd.callback.__doc__ if _cmd.callback else None))
for _cmd in app.registered_commands:
    _cmd.name = _cmd.name or _cmd.callback.__name__.replace("_", "-")
    _cmd.rich_help_panel = "Pipeline" if _cmd.name in PIPELINE else "Tools"
for _sub in app.registered_groups:
    _sub.rich_help_panel = "Tools"
app.registered_commands.sort(key=lambda c: PIPELINE.index(c.name) if c.name in PIPELINE else 99)


def main() -> None:
    try:
        app()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except Exception as e:  # a full or read-only disk is the user's to fix: one line too
        from distill.errors import storage_error

        if (disk := storage_error(e)) is None:
            raise
        print(f"error: {disk}", file=sys.stderr)
        sys.exit(disk.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
