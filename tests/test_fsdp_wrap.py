"""FSDP's transformer wrap policy finds the decoder layers of whatever model the trainer
and the RL trainer wrap (no layer class fixed in recipes/accelerate/multi-gpu-fsdp.yaml)."""

from pathlib import Path

import pytest
from ruamel.yaml import YAML

ROOT = Path(__file__).parents[1]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_wrap_policy_finds_the_models_own_layers(arch):
    from accelerate.utils.dataclasses import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from distill.rl.policy import PolicyLogprobs
    from distill.train.loss import Objective

    cfg_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM),
                          "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[arch]  # fmt: skip
    model = model_cls(cfg_cls(vocab_size=64, hidden_size=16, intermediate_size=32,
                              num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1))  # fmt: skip
    cfg = YAML(typ="safe").load((ROOT / "recipes/accelerate/multi-gpu-fsdp.yaml").read_text())
    fsdp = cfg["fsdp_config"]
    assert "fsdp_transformer_layer_cls_to_wrap" not in fsdp
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy=fsdp["fsdp_auto_wrap_policy"].lower()
    )
    layer = type(model.model.layers[0])
    for wrapper in (Objective(model), PolicyLogprobs(model)):
        policy = fsdp2_prepare_auto_wrap_policy(plugin, wrapper)
        wrapped = [m for m in wrapper.modules() if policy(m)]
        assert wrapped and all(isinstance(m, layer) for m in wrapped), arch
        assert len(wrapped) == 2
