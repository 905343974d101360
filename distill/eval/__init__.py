"""The eval stage: held-out tasks of every domain, every model, the recovery report.

- :mod:`~distill.eval.stage`: scoring models on domains, the stage's ``run`` and ``one_off``
- :mod:`~distill.eval.report`: the report as Markdown, JSON, a PNG chart and a table
"""

from distill.eval.stage import evaluate_model, load_report, one_off, run

__all__ = ["evaluate_model", "load_report", "one_off", "run"]
