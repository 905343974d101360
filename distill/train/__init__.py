"""The trainer: one Accelerate loop for bootstrap teachers and the student.

- :mod:`~distill.train.loop`: :func:`train` (self-contained) and the ``train`` stage's ``run``
- :mod:`~distill.train.setup`: accelerator, optimizer, step statistics, progress, saving
- :mod:`~distill.train.loss`: weighted token cross-entropy and top-k logit KD
- :mod:`~distill.train.data`: tokenize once, mix domains, pack rows, resume
- :mod:`~distill.train.checkpoint`: checkpoints committed by rename
"""

from distill.train.loop import run, train

__all__ = ["run", "train"]
