"""The `distill` command line. Thin: each command parses arguments and calls one
function in the module of its stage; errors meant for the user exit with status 2."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from distill.errors import UserError

app = typer.Typer(
    help="Specialist-to-generalist distillation: teachers -> generate -> filter -> train -> eval.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
recipe_app = typer.Typer(help="Show, validate and edit recipes.", no_args_is_help=True)
shards_app = typer.Typer(help="Inspect and export trace shards.", no_args_is_help=True)
app.add_typer(recipe_app, name="recipe")
app.add_typer(shards_app, name="shards")

RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML file.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a recipe key: a.b.c=value (repeatable)."),
]


def load(recipe: Path, overrides: list[str] | None):
    """Load and validate a recipe with overrides (imported lazily: fast --help)."""
    from distill.recipe import load_recipe

    return load_recipe(recipe, overrides or [])


# Stage and tool commands are added below, one block per command.


def main() -> None:
    try:
        app()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
