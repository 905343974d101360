"""Where a run's files go. A model directory holds what an HF model repo holds (config,
weights, tokenizer with its chat template, generation config, a model card ``README.md``)
and nothing else, so it can be served, uploaded or copied as it is. What a run leaves
beside a model (checkpoints, tokenization caches, logs, reports, stage records, the
resolved recipe) goes to its run directory: the same path under ``<output_dir>/runs/``::

    data/<run>/teachers/math/          the math teacher (a model repo)
    data/<run>/teachers/math-rl/       the math teacher sharpened by RL (a model repo)
    data/<run>/student/  data/<run>/rl/
    data/<run>/runs/teachers/math/     oracle/, checkpoints/, cache/, logs/, train_report.json
    data/<run>/runs/teachers/math-rl/  rl_log.jsonl, rl_report.json, checkpoints/
    data/<run>/runs/student/           ... and the stage's _stage.json and _recipe.yaml
    data/<run>/runs/rl/  data/<run>/runs/raw/ ...  (every stage's record and recipe)

A model trained outside a recipe (``distill rl --model``, the Python API) keeps its run
beside it: ``<parent>/runs/<name>/``.
"""

from __future__ import annotations

from pathlib import Path

RUNS = "runs"


def run_dir(model_dir: str | Path, root: str | Path | None = None) -> Path:
    """The run directory of ``model_dir``: ``<root>/runs/<model_dir relative to root>``,
    or ``<parent>/runs/<name>`` without a root (or for a model outside it)."""
    model_dir = Path(model_dir)
    if root is not None:
        try:
            return Path(root) / RUNS / model_dir.relative_to(root)
        except ValueError:
            pass
    return model_dir.parent / RUNS / model_dir.name
