"""The configuration of a DSA student: a Llama-style causal LM whose every attention layer
carries a lightning indexer (DeepSeek-V3.2's DeepSeek Sparse Attention)."""

from __future__ import annotations

from transformers import LlamaConfig

from distill.errors import UserError

MODEL_TYPE = "distill_dsa"

# What transformers calls a layer whose cache keeps indexer keys beside K/V: 5.14-5.17 know
# "deepseek_sparse_attention" (5.16-5.17 "qwen_sparse_attention" too), later versions
# "indexed_attention"; 5.12 has the layer but no table of names to look it up by.
# A saved config may carry any of them; the installed version's own name is used.
INDEXED_LAYER_NAMES = ("indexed_attention", "deepseek_sparse_attention", "qwen_sparse_attention")


def indexed_layer_type() -> str:
    """The installed transformers' name for a cache layer with indexer keys."""
    from transformers import cache_utils

    known = getattr(cache_utils, "DYNAMIC_LAYER_TYPE_MAPPING", {})
    for name in INDEXED_LAYER_NAMES:
        if name in known:
            return name
    import transformers

    raise UserError(
        f"transformers {transformers.__version__} has no cache layer for indexer keys: a DSA "
        "student needs transformers >= 5.14.1"
    )


def is_dsa(model) -> bool:
    """Whether ``model`` (any HF model) is a DSA student."""
    return getattr(model.config, "model_type", None) == MODEL_TYPE


class DSAConfig(LlamaConfig):
    """:class:`~transformers.LlamaConfig` plus the indexer's shape and ``index_top_k``.

    ``index_warmup``: the indexer has not been trained yet; training this checkpoint runs
    the dense warm-up (indexer only, main model frozen). The warm-up's saved output says
    false, so training it again is the sparse phase (distill/dsa/train.py).

    ``cache_8bit``: the hf backend's static decoder (GPU eval, serve, RL rollouts) caches
    the index keys of the layers that select in fp8 and their K and V in int8, each
    with a scale a row, as V3.2 decodes from an 8-bit cache (``llama_decode.INDEX_FP8``,
    ``KV_INT8``): 340 bytes a token a layer at the Qwen2-0.5B shape against 640 in bf16
    (a dense model's: 512). Training and transformers' ``generate`` never read it. Set
    it in the saved ``config.json``."""

    model_type = MODEL_TYPE

    index_n_heads: int = 4
    index_head_dim: int = 32
    index_top_k: int = 2048
    index_rope_dim: int | None = None
    index_warmup: bool = False
    cache_8bit: bool = False
    layer_types: list[str] | None = None

    def __post_init__(self, **kwargs):
        # every layer keeps indexer keys in its cache: transformers' DynamicCache builds
        # DynamicIndexedLayer for this layer type (and generate() and our backend use it)
        if self.layer_types is None or set(self.layer_types) <= set(INDEXED_LAYER_NAMES):
            self.layer_types = [indexed_layer_type()] * self.num_hidden_layers
        super().__post_init__(**kwargs)

    @property
    def rope_dim(self) -> int:
        """Leading dims of an index head that get rotary embeddings (V3.2: 64 of 128)."""
        head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if self.index_rope_dim is not None:
            return self.index_rope_dim
        return 2 * min(self.index_head_dim // 4, head_dim // 2)
