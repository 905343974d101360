"""The RL sections of a recipe: ``rl`` (mixed RL on the student, after ``train``) and
``teachers.<domain>.rl`` (a specialist sharpened on its own domain). One schema for both:
GRPO as DeepSeek-V3.2 runs it (see :mod:`distill.rl.loss` for the formulas). Keys take
the names TRL's ``GRPOConfig`` (and transformers' ``TrainingArguments``) give the same
knob: ``num_generations``, ``epsilon``/``epsilon_high``, ``beta``,
``off_policy_mask_threshold``, ``steps_per_generation``, ``learning_rate``, ..."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from distill.recipe.base import RUN_ONLY, DomainName, Section, Trackers
from distill.recipe.lora import LoraConfig


class RewardConfig(Section):
    """Reward shaping of one domain, added to its verifier's score (0..1)."""

    overlong_buffer: int = Field(
        0,
        ge=0,
        description="DAPO soft overlong penalty: over the last N tokens before the length "
        "limit the penalty grows linearly from 0 to overlong_penalty; 0 = off.",
    )
    overlong_penalty: float = Field(
        1.0, ge=0, description="Penalty at the length limit (soft overlong)."
    )
    efficiency: float = Field(
        0.0,
        ge=0,
        description="Token efficiency: a passing answer loses efficiency × its tokens / the "
        "length limit, so within a group shorter correct answers get the larger advantage.",
    )
    length_group: float = Field(
        0.0,
        ge=0,
        description="Token efficiency relative to the group (Kimi k1.5's length reward): "
        "each completion gets length_group × (0.5 − (len − min) / (max − min)) over its "
        "group's lengths, a wrong one only when that is negative; 0 = off.",
    )
    truncated: Literal["mask", "zero"] = Field(
        "zero",
        description="Completions cut at the length limit: zero = reward 0 (they still count "
        "in their group); mask = their tokens carry no loss (DAPO overlong filtering).",
    )


class RLDomainConfig(Section):
    """One domain of an RL run."""

    renamed = {"kl_coef": "beta"}

    weight: float = Field(1.0, ge=0, description="Prompt mixture weight; 0 = no prompts.")
    beta: float = Field(
        0.0,
        ge=0,
        description="β of the unbiased KL to the frozen starting model; 0 everywhere = no "
        "reference model is loaded.",
    )
    tasks: int = Field(2000, ge=1, description="Training-split tasks in the prompt pool.")
    reward: RewardConfig = Field(default_factory=RewardConfig, description="Reward shaping.")


class RLConfig(Section):
    """GRPO on the policy's own rollouts, rewards from the domain verifiers."""

    renamed = {
        "group_size": "num_generations",
        "lr": "learning_rate",
        "grad_clip": "max_grad_norm",
        "updates_per_step": "steps_per_generation",
        "clip_low": "epsilon",
        "clip_high": "epsilon_high",
        "offpolicy_delta": "off_policy_mask_threshold",
        "save_every": "save_steps",
        "keep_last": "save_total_limit",
        "log_every": "logging_steps",
        "trackers": "report_to",
    }

    enabled: bool = Field(False, description="Run this RL phase.")
    steps: int = Field(20, ge=1, description="RL steps (one rollout batch each).")
    max_time_s: float | None = Field(
        None, gt=0, description="Stop after this many seconds (the model so far is saved)."
    )
    prompts_per_step: int = Field(16, ge=1, description="Prompts per step (global, all ranks).")
    num_generations: int = Field(8, ge=2, description="Samples per prompt (the group size G).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the rollouts.")
    top_p: float = Field(
        1.0, gt=0, le=1, description="Nucleus of the rollouts (its kept set is recorded)."
    )
    top_k: int = Field(0, ge=0, description="Top-k of the rollouts; 0 = off.")
    max_new_tokens: int | None = Field(
        None, ge=1, description="Tokens per assistant turn; null = the domain's generate setting."
    )
    max_turns: int | None = Field(
        None, ge=1, description="Assistant turns per agent episode; null = generate.max_turns."
    )
    learning_rate: float = Field(
        1e-4, gt=0, description="Learning rate (AdamW, constant after warmup)."
    )
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps.")
    adam_beta2: float = Field(
        0.999,
        gt=0,
        lt=1,
        description="AdamW's second-moment decay: RL's gradients are small and noisy, and "
        "a short memory (train's 0.95) turns the noise into full-size steps.",
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float | None = Field(
        1.0, gt=0, description="Global gradient norm clip; null = off."
    )
    steps_per_generation: int = Field(
        1,
        ge=1,
        description="Optimizer updates per rollout batch (the batch split into this many "
        "mini-batches); above 1 the later updates are off-policy.",
    )
    micro_batch_seqs: int = Field(
        16, ge=1, description="Sequences per forward/backward on one device."
    )
    decode_rows: int | None = Field(
        None,
        ge=1,
        description="Rollouts decoded at once on a GPU; null = all of a step's (on CPU: 64). "
        "The decoder's KV cache is sized for them and is most of a rollout's memory (4.5 "
        "GB for 512 rows of 712 positions on a 0.5B Qwen2): fewer rows, less peak memory, "
        "more decode passes (one H100 run, 2 timed steps each, 256 of 512 rows: peak 9.78 -> "
        "8.87 GB, the step 7.57 -> 7.99 s; BENCHMARKS.md).",
        json_schema_extra=RUN_ONLY,
    )
    epsilon: float = Field(0.2, ge=0, lt=1, description="ε_lo: ratio clipped below 1 − ε_lo.")
    epsilon_high: float = Field(
        0.28, ge=0, description="ε_hi: ratio clipped above 1 + ε_hi (DAPO clip-higher)."
    )
    loss_agg: Literal["token_mean", "seq_mean_token_mean", "seq_sum_const"] = Field(
        "token_mean",
        description="Loss aggregation, all with global denominators: token_mean; "
        "seq_mean_token_mean (V3.2 as written); seq_sum_const (Dr. GRPO).",
    )
    scale_rewards: Literal["none", "group", "batch"] = Field(
        "none", description="Divide advantages by the group's or batch's std; none = V3.2."
    )
    skip_zero_variance: bool = Field(
        True, description="Leave out groups whose rewards are all equal (no policy gradient)."
    )
    off_policy_mask_threshold: float | None = Field(
        None,
        gt=0,
        description="Off-policy sequence masking: a negative-advantage sequence whose mean "
        "log(π_old/π_θ) exceeds δ carries no policy loss; null = off.",
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto = bf16 on GPU, fp32 on CPU."
    )
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute each decoder layer's activations in backward: far less "
        "memory per micro-batch for one more forward (TRL's GRPO default is on).",
        json_schema_extra=RUN_ONLY,
    )
    torch_compile: bool = Field(
        False,
        description="torch.compile each decoder layer for the update's forward and backward "
        "(as train.torch_compile; GPU only, not DSA models: their decoding goes through the "
        "same layers). The first update pays the compile (tens of seconds): for long runs.",
        json_schema_extra=RUN_ONLY,
    )
    release_decoder_memory: bool = Field(
        True,
        description="Free the GPU decoder's KV cache and CUDA graphs before each update, so "
        "the update reuses their memory (peak memory falls by the cache's size; each rollout "
        "captures its graph again).",
        json_schema_extra=RUN_ONLY,
    )
    lora: LoraConfig = Field(
        default_factory=LoraConfig,
        description="LoRA adapters on the policy instead of all its weights; the reference "
        "(beta > 0) is then the policy with its adapters off, not a second model.",
    )
    eval_steps: int = Field(
        0,
        ge=0,
        description="Score greedy pass@1 on held-out (eval-split) tasks every N steps, "
        "before the first and after the last (rl_log.jsonl's eval/* keys); 0 = off. GRPO "
        "raises the sampled reward, which greedy pass@1 need not follow (docs/rl.md).",
        json_schema_extra=RUN_ONLY,
    )
    eval_tasks: int = Field(
        100, ge=1, description="Held-out tasks per domain for eval_steps.",
        json_schema_extra=RUN_ONLY,
    )  # fmt: skip
    save_steps: int = Field(
        0, ge=0, description="Checkpoint every N steps; 0 = only at the end.",
        json_schema_extra=RUN_ONLY,
    )  # fmt: skip
    save_total_limit: int = Field(
        2, ge=1, description="Checkpoints kept.", json_schema_extra=RUN_ONLY
    )
    logging_steps: int = Field(
        1, ge=1, description="Print a log line every N steps.", json_schema_extra=RUN_ONLY
    )
    report_to: Trackers = Field(
        default_factory=list,
        description="Accelerate trackers (every step's metrics; tensorboard, wandb); each "
        "must be installed.",
        json_schema_extra=RUN_ONLY,
    )
    domains: dict[DomainName, RLDomainConfig] = Field(
        default_factory=dict,
        description="Per-domain prompt weight, KL coefficient and reward shaping; a domain "
        "left out gets the defaults (weight 1).",
    )

    def domain(self, name: str) -> RLDomainConfig:
        """Domain ``name``'s RL settings: its entry under ``domains``, else the defaults
        (weight 1, β 0, no reward shaping). Every reader of a domain's weight, β, pool
        size or shaping asks here, so the fallback is one rule."""
        return self.domains.get(name, RLDomainConfig())
