"""DeepSeek Sparse Attention students (DeepSeek-V3.2's DSA): a lightning indexer picks
each query's top-k keys and attention reads only those.

- :mod:`~distill.dsa.config`: ``DSAConfig`` (model type ``distill_dsa``)
- :mod:`~distill.dsa.model`: ``DSAForCausalLM`` (Llama plus an indexer per layer),
  ``from_dense`` (conversion of a trained dense student)
- :mod:`~distill.dsa.attention`: the reference (CPU) attention and the indexer's KL
- :mod:`~distill.dsa.kernels`: the GPU path (Triton sparse attention, chunked indexer)
- :mod:`~distill.dsa.train`: the dense warm-up and sparse training as train-stage phases

The model class is registered with transformers' ``AutoConfig`` and
``AutoModelForCausalLM`` by :func:`register`, which every place that loads a model
directory calls (``distill.models.load_model``, the ``hf`` backend, teacher checks). No
code is read from a model directory (no ``trust_remote_code``): the directory holds
weights and config only, and the code that runs is the installed package's.
"""

from __future__ import annotations

import functools


@functools.cache
def register() -> None:
    """Make ``AutoConfig`` / ``AutoModelForCausalLM`` know ``model_type: distill_dsa``.
    Lazy (importing transformers costs seconds, and ``distill --help`` should not) and
    idempotent."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from distill.dsa.config import MODEL_TYPE, DSAConfig
    from distill.dsa.model import DSAForCausalLM

    AutoConfig.register(MODEL_TYPE, DSAConfig, exist_ok=True)
    AutoModelForCausalLM.register(DSAConfig, DSAForCausalLM, exist_ok=True)


__all__ = ["register"]
