"""The ``lora`` section, shared by ``train`` and ``rl`` (its own module: the RL section is
defined apart from the schema that imports it)."""

from __future__ import annotations

from pydantic import Field

from distill.recipe.base import Section


class LoraConfig(Section):
    """LoRA adapters; the keys are peft's ``LoraConfig`` names."""

    renamed = {"alpha": "lora_alpha", "dropout": "lora_dropout"}

    enabled: bool = Field(False, description="Train LoRA adapters (peft) instead of all weights.")
    r: int = Field(16, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(32, ge=1, description="LoRA scaling numerator.")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA path.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="Module names that receive adapters.",
    )
    merge: bool = Field(
        True, description="Merge adapters into the base weights when saving the final model."
    )
