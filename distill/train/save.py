"""Saving the final HF model directory (merged LoRA or full weights, tokenizer, generation
config)."""

from pathlib import Path

from distill.models import set_generation_config
from distill.recipe.schema import TrainConfig


def save_model(acc, objective, tokenizer, cfg: TrainConfig, out: Path) -> None:
    """The final HF model directory: config, safetensors, tokenizer + chat template,
    generation config (eos = end of turn). LoRA adapters are merged when asked, and kept
    in ``out/adapter`` when not."""
    acc.wait_for_everyone()
    model = acc.unwrap_model(objective).model
    if cfg.lora.enabled:
        if acc.is_main_process and not cfg.lora.merge:
            model.save_pretrained(out / "adapter")
        model = model.merge_and_unload()
        state = model.state_dict()
    else:
        full = acc.get_state_dict(objective)  # gathers FSDP shards; keys start with "model."
        state = {k.removeprefix("model."): v for k, v in full.items()}
    if acc.is_main_process:
        set_generation_config(model, tokenizer)
        model.save_pretrained(out, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(out)
    acc.wait_for_everyone()
