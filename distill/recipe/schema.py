"""Recipes: YAML validated into typed config objects at load time.

Precedence: field defaults < YAML file < ``--set key.path=value`` overrides. Every field
carries a description; it feeds ``distill recipe show`` and the README's recipe reference.
A bad recipe raises :class:`RecipeError` with one line naming the key path, the expected
type and the value given (``train.learning_rate: expected a number, got 'fast'``); a key
renamed to the field's usual name (TRL, transformers) is an error naming the new key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from distill.errors import UserError
from distill.files import json_hash
from distill.recipe.base import RUN_ONLY, DomainName, Section, Share, Trackers
from distill.recipe.errors import format_error as _format_error
from distill.recipe.lora import LoraConfig
from distill.recipe.rl import RLConfig


class RecipeError(UserError):
    """A recipe that cannot be loaded; the message is one line meant for the user."""


# --------------------------------------------------------------------------- models


class ModelArch(Section):
    """Shape of a model built from scratch (a Llama-style causal LM)."""

    hidden_size: int = Field(64, ge=8, description="Width of the residual stream.")
    num_layers: int = Field(4, ge=1, description="Number of transformer blocks.")
    num_heads: int = Field(4, ge=1, description="Attention heads.")
    num_kv_heads: int | None = Field(
        None, ge=1, description="Key/value heads (GQA); null = num_heads."
    )
    intermediate_size: int | None = Field(
        None, ge=8, description="MLP width; null = 4 * hidden_size."
    )
    max_position_embeddings: int = Field(
        1024, ge=16, description="Longest sequence the model accepts."
    )
    tie_word_embeddings: bool = Field(
        True, description="Share input and output embeddings (saves parameters at tiny sizes)."
    )
    initializer_range: float = Field(
        0.02,
        gt=0,
        description="Standard deviation of the initial weights (transformers' default 0.02). "
        "A tiny model that must copy names from a long prompt leaves its plateau sooner at 0.1 "
        "(recipes/demo.yaml, agents teacher).",
    )
    attention: Literal["dense", "dsa"] = Field(
        "dense",
        description="dsa = DeepSeek Sparse Attention: the student is trained dense, then a "
        "lightning indexer per layer picks each query's index_top_k keys (phases in train.dsa; "
        "docs/dsa.md). Student only; with student.kind hf it converts that model.",
    )
    index_heads: int = Field(4, ge=1, description="Indexer query heads (attention: dsa).")
    index_head_dim: int = Field(
        32, ge=2, multiple_of=2, description="Width of an indexer head (attention: dsa)."
    )
    index_top_k: int = Field(
        2048,
        ge=1,
        description="Keys each query reads (attention: dsa); at or above the sequence length "
        "DSA is dense attention plus the indexer's cost.",
    )

    @model_validator(mode="after")
    def _heads(self) -> ModelArch:
        # checked here, not when the model is built: after the stages before it ran
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size: {self.hidden_size} is not a multiple of num_heads ({self.num_heads})"
            )
        kv = self.num_kv_heads or self.num_heads
        if self.num_heads % kv:
            raise ValueError(
                f"num_heads: {self.num_heads} is not a multiple of num_kv_heads ({kv})"
            )
        return self


class DSATrainConfig(Section):
    """The phases that turn the dense student into a DSA one (student.arch.attention: dsa)."""

    warmup_steps: int = Field(
        400,
        ge=0,
        description="Dense warm-up steps at most (the learning rate decays over them): only "
        "the indexer trains, toward the main attention (KL); 0 = none.",
    )
    warmup_plateau: float | None = Field(
        0.02,
        ge=0,
        lt=1,
        description="End the warm-up once its KL stops falling: the mean of the last 50 steps "
        "is less than this fraction under the mean of the 50 before; null = all warmup_steps.",
    )
    warmup_learning_rate: float = Field(
        1e-3, gt=0, description="Learning rate of the warm-up (the indexer alone)."
    )
    sparse_steps: int = Field(
        200,
        ge=1,
        description="Sparse training steps: every weight, CE plus the indexer's KL over the "
        "selected keys.",
    )
    sparse_learning_rate: float | None = Field(
        None, gt=0, description="Learning rate of sparse training; null = learning_rate."
    )


class KDConfig(Section):
    enabled: bool = Field(
        False,
        description="Add a KL term against the teacher's top-k logprobs stored in the shards.",
    )
    alpha: float = Field(
        0.5, ge=0, le=1, description="Weight of the KL term: (1-alpha)*CE + alpha*KL."
    )
    temperature: float = Field(
        1.0, gt=0, description="Softmax temperature applied to student logits for the KL term."
    )


class TrainConfig(Section):
    """Optimisation settings; shared by bootstrap teachers and the student.

    Keys take the names transformers' ``TrainingArguments`` and TRL's ``SFTConfig`` give
    the same knob. Those without a counterpart differ in kind: batches count tokens where
    theirs count sequences, ``precision`` is one choice where theirs are flags."""

    renamed = {
        "lr": "learning_rate",
        "betas": ("adam_beta1", "adam_beta2"),
        "schedule": "lr_scheduler_type",
        "epochs": "num_train_epochs",
        "max_seq_len": "max_length",
        "grad_clip": "max_grad_norm",
        "compile": "torch_compile",
        "save_every": "save_steps",
        "keep_last": "save_total_limit",
        "log_every": "logging_steps",
        "trackers": "report_to",
    }

    learning_rate: float = Field(3e-3, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    adam_beta2: float = Field(0.95, ge=0, lt=1, description="AdamW beta2.")
    warmup_steps: int = Field(20, ge=0, description="Linear warmup steps.")
    lr_scheduler_type: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Decay after warmup (down to min_lr_ratio; constant = none)."
    )
    min_lr_ratio: float = Field(
        0.1, ge=0, le=1, description="Final learning rate as a fraction of learning_rate."
    )
    max_steps: int | None = Field(
        None, ge=1, description="Optimizer steps; null = derive from num_train_epochs."
    )
    num_train_epochs: float = Field(
        1.0, gt=0, description="Passes over the mixed data when max_steps is null."
    )
    max_time_s: float | None = Field(
        None,
        gt=0,
        description="Stop after this many seconds of training (checkpoint saved); the lr "
        "decay then follows the time used when that is ahead of the steps.",
    )
    batch_tokens: int = Field(
        8192, ge=16, description="Tokens per optimizer step (global, all ranks and micro-batches)."
    )
    micro_batch_tokens: int = Field(
        2048,
        ge=16,
        description="Tokens per micro-batch on one device; accumulation fills batch_tokens.",
    )
    max_length: int = Field(
        512, ge=16, description="Longest packed row; longer traces are dropped and counted."
    )
    packing: bool = Field(
        True, description="Pack several traces per row with block-diagonal attention."
    )
    mixture: Literal["rows", "tokens"] = Field(
        "tokens", description="Domain sampling weights apply to rows or to token budget."
    )
    max_grad_norm: float | None = Field(
        1.0, gt=0, description="Clip the global gradient norm; null = off."
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto = bf16 on GPU, fp32 on CPU."
    )
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute activations in backward to save memory.",
        json_schema_extra=RUN_ONLY,
    )
    torch_compile: bool = Field(False, description="torch.compile the model.")
    save_steps: int = Field(
        0,
        ge=0,
        description="Checkpoint every N optimizer steps; 0 = only at the end.",
        json_schema_extra=RUN_ONLY,
    )
    save_total_limit: int = Field(
        2, ge=1, description="Checkpoints kept.", json_schema_extra=RUN_ONLY
    )
    logging_steps: int = Field(
        10, ge=1, description="Log losses every N steps.", json_schema_extra=RUN_ONLY
    )
    report_to: Trackers = Field(
        default_factory=list,
        description="Accelerate trackers (tensorboard, wandb); each must be installed.",
        json_schema_extra=RUN_ONLY,
    )
    kd: KDConfig = Field(default_factory=KDConfig, description="Logit distillation.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA adapters.")
    dsa: DSATrainConfig = Field(
        default_factory=DSATrainConfig,
        description="DSA phases after the dense student (student.arch.attention: dsa).",
    )


# --------------------------------------------------------------------------- stages


class TokenizerConfig(Section):
    kind: Literal["train", "pretrained"] = Field(
        "train",
        description="train = a byte-level BPE trained on the oracle corpora; pretrained = load from path.",
    )
    path: str | None = Field(None, description="Tokenizer directory for kind=pretrained.")
    vocab_size: int = Field(1024, ge=300, description="Vocabulary size for a trained tokenizer.")
    corpus_tasks: int = Field(
        2000, ge=10, description="Oracle traces per domain used to train the tokenizer."
    )


RECORD_FORMATS = (".jsonl", ".json", ".ndjson", ".parquet")  # what teachers.common reads


class TaskSource(Section):
    kind: Literal["generated", "file"] = Field(
        "generated", description="generated = the domain's task generator; file = real records."
    )
    path: str | None = Field(
        None,
        description="JSONL or Parquet of real records (GSM8K, MATH, HumanEval, MBPP, ...) for kind=file.",
    )
    eval_path: str | None = Field(
        None, description="Held-out real records for evaluation; null = hash split of path."
    )

    @model_validator(mode="after")
    def _readable(self) -> TaskSource:
        if self.kind == "file" and not self.path:
            raise ValueError("path: required for kind=file (a JSONL or Parquet file of records)")
        for key in ("path", "eval_path"):
            value = getattr(self, key)
            if value and not value.lower().endswith(RECORD_FORMATS):
                raise ValueError(
                    f"{key}: {value!r} is not a format distill reads; records are JSONL "
                    "(.jsonl, .json: one object per line) or Parquet (.parquet)"
                )
        return self


class DomainConfig(Section):
    enabled: bool = Field(True, description="Include this domain in every stage.")
    sampling_weight: float = Field(
        1.0, ge=0, description="Share of the student's training mixture."
    )
    loss_weight: float = Field(
        1.0, ge=0, description="Per-token loss weight w_d in the student's objective."
    )
    # the student's side of teachers.<d>.oracle_short_prompt_share (a copying curriculum)
    short_prompt_share: Share = Field(
        0.0,
        description="Share of the clean traces the student trains on without system prompt and tools.",
    )
    difficulty: int = Field(1, ge=1, le=5, description="Task generator difficulty (1 = easiest).")
    source: TaskSource = Field(default_factory=TaskSource, description="Where tasks come from.")
    train_tasks: int = Field(
        1000, ge=1, description="Training tasks given to the teacher in generate."
    )
    eval_tasks: int = Field(200, ge=1, description="Held-out tasks used by eval.")
    temperature: float | None = Field(
        None, ge=0, description="Sampling temperature; null = generate.temperature."
    )
    top_p: float | None = Field(
        None, gt=0, le=1, description="Nucleus sampling; null = generate.top_p."
    )
    max_new_tokens: int | None = Field(
        None, ge=1, description="Per assistant turn; null = generate.max_new_tokens."
    )


class TeacherConfig(Section):
    kind: Literal["bootstrap", "hf", "openai"] = Field(
        "bootstrap",
        description="bootstrap = tiny model trained on oracle traces; hf = a local transformers directory; openai = an OpenAI-compatible endpoint.",
    )
    path: str | None = Field(None, description="Model directory for kind=hf.")
    base_url: str | None = Field(
        None, description="Endpoint for kind=openai, e.g. http://127.0.0.1:8000/v1."
    )
    model: str | None = Field(None, description="Model name sent to the endpoint (kind=openai).")
    api_key_env: str | None = Field(
        None, description="Environment variable holding the API key (never stored)."
    )
    max_concurrency: int = Field(16, ge=1, description="Requests in flight (kind=openai).")
    request_timeout_s: float = Field(600.0, gt=0, description="Per-request timeout (kind=openai).")
    arch: ModelArch = Field(default_factory=ModelArch, description="Model shape (kind=bootstrap).")
    oracle_tasks: int = Field(
        3000, ge=1, description="Oracle traces the bootstrap teacher trains on."
    )
    oracle_short_prompt_share: Share = Field(
        0.0,
        description="Share of the oracle traces whose prompt is cut to the user turns (no "
        "system prompt, no tool list): a curriculum for a tiny teacher, which learns to copy "
        "from a short prompt first; the others keep the whole prompt, as generate and eval "
        "give it.",
    )
    oracle_check_share: Share = Field(
        0.0,
        description="Share of the oracle traces that redo their work as a self-check before "
        "answering (math and logic restate their steps, code drafts its code in the reasoning first, "
        "agents read the accounts they touched again): correct, and longer than needed, as "
        "real teachers' traces are. A teacher trained on them has a habit that token "
        "efficiency (the filter's shortest-correct selection, the RL length rewards) can "
        "remove; the report's tokens ratio says whether it did. 0 = the shortest traces.",
    )
    train: TrainConfig = Field(
        default_factory=TrainConfig, description="Training of the bootstrap teacher."
    )
    rl: RLConfig = Field(
        default_factory=RLConfig,
        description="Specialist RL on the teacher's own domain after its supervised phase "
        "(bootstrap or hf teachers; generate then samples from the sharpened teacher).",
    )

    @model_validator(mode="after")
    def _needs(self) -> TeacherConfig:
        if self.kind == "hf" and not self.path:
            raise ValueError("path: required for kind=hf")
        if self.kind == "openai" and not (self.base_url and self.model):
            raise ValueError("base_url and model: required for kind=openai")
        if self.arch.attention != "dense":
            raise ValueError("arch.attention: dsa is for the student only (student.arch)")
        return self


class GenerateConfig(Section):
    samples_per_task: int = Field(4, ge=1, description="Samples (k) per task.")
    temperature: float = Field(0.8, ge=0, description="Default sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Default nucleus sampling.")
    max_new_tokens: int = Field(256, ge=1, description="Default tokens per assistant turn.")
    batch_size: int = Field(64, ge=1, description="Sequences decoded together (hf backend).")
    topk_logprobs: int = Field(
        0,
        ge=0,
        le=20,
        description="Store the teacher's top-k logprobs per token (logit KD); 0 = off.",
    )
    max_turns: int = Field(8, ge=1, description="Assistant turns per agent episode.")
    max_episode_tokens: int = Field(2048, ge=16, description="Token budget per agent episode.")
    shard_rows: int = Field(2000, ge=1, description="Rows per shard.")


class FilterConfig(Section):
    workers: int | None = Field(None, ge=1, description="Verifier processes; null = every core.")
    keep_failed: bool = Field(False, description="Keep failed traces, flagged, for analysis.")
    drop_malformed: bool = Field(
        True,
        description="Drop truncated traces, traces without a final answer, with unparsable tool calls or (require_reasoning) empty reasoning.",
    )
    require_reasoning: bool = Field(True, description="Drop traces with empty reasoning.")
    dedup_exact: bool = Field(True, description="Drop exact duplicates (normalised text hash).")
    dedup_near: bool = Field(True, description="Drop near duplicates (MinHash LSH).")
    dedup_with_prompt: bool = Field(
        True,
        description="Dedup compares the user turns plus the assistant output; false = the assistant output alone (distinct tasks with the same answer then collapse).",
    )
    near_threshold: float = Field(
        0.9, gt=0, le=1, description="Jaccard similarity above which traces are near duplicates."
    )
    shingle_size: int = Field(5, ge=1, description="Word n-gram size of MinHash shingles.")
    num_perm: int = Field(128, ge=16, description="MinHash permutations.")
    decontaminate: bool = Field(
        True,
        description="Drop traces whose prompt or answer overlaps an eval task (token n-grams).",
    )
    decontam_ngram: int = Field(13, ge=3, description="n-gram size (tokens) for long texts.")
    decontam_short_ngram: int = Field(
        8, ge=2, description="n-gram size for texts shorter than 2*decontam_ngram words."
    )
    decontam_boilerplate: float = Field(
        0.05,
        ge=0,
        le=1,
        description="n-grams found in more than this fraction of one domain's eval tasks (and in 3 or more) are template text and never flag a trace.",
    )
    decontam_overlap: float = Field(
        0.8,
        ge=0,
        le=1,
        description="Share of an eval text's n-grams a training prompt or answer must contain to be contaminated; 0 = any shared n-gram.",
    )
    max_per_task: int | None = Field(
        2, ge=1, description="Correct traces kept per task; null = all."
    )
    prefer: Literal["shortest", "diverse"] = Field(
        "shortest", description="Which traces a task keeps."
    )
    pass_rate_min: float = Field(
        0.0, ge=0, le=1, description="Keep tasks whose teacher pass rate >= this."
    )
    pass_rate_max: float = Field(
        1.0, ge=0, le=1, description="Keep tasks whose teacher pass rate <= this."
    )
    max_per_domain: int | None = Field(None, ge=1, description="Cap on kept traces per domain.")

    @model_validator(mode="after")
    def _ordered(self) -> FilterConfig:
        if self.pass_rate_min > self.pass_rate_max:
            raise ValueError(
                f"pass_rate_min: {self.pass_rate_min} is above pass_rate_max "
                f"({self.pass_rate_max}); no task could be kept"
            )
        if self.decontam_short_ngram > self.decontam_ngram:
            raise ValueError(
                f"decontam_short_ngram: {self.decontam_short_ngram} must not exceed "
                f"decontam_ngram ({self.decontam_ngram})"
            )
        return self


class StudentConfig(Section):
    kind: Literal["scratch", "hf"] = Field(
        "scratch",
        description="scratch = build from arch with the run's tokenizer; hf = start from a model directory.",
    )
    path: str | None = Field(None, description="Model directory for kind=hf.")
    arch: ModelArch = Field(default_factory=ModelArch, description="Model shape (kind=scratch).")


def _target(default: float | None, what: str, **bounds):
    """A target the report checks (met or missed, with the gap); null = none."""
    return Field(default, **bounds, description=f"Target the report checks: {what}; null = none.")


class EvalConfig(Section):
    pass_k: int = Field(4, ge=1, description="Samples per task for pass@k.")
    temperature: float = Field(
        0.8, ge=0, description="Sampling temperature for pass@k (pass@1 is greedy)."
    )
    teachers_on_all_domains: bool = Field(
        False, description="Also evaluate every teacher on every domain."
    )
    batch_size: int = Field(64, ge=1, description="Sequences decoded together.")
    target_teacher_acc: float | None = _target(
        0.5, "every teacher's greedy pass@1 on its own domain (far above chance)", ge=0, le=1
    )
    target_recovery: float | None = _target(
        0.9, "student pass@1 / teacher pass@1 on each teacher's domain", ge=0
    )
    target_tokens_ratio: float | None = _target(
        None,
        "the student's tokens per correct answer / the supervised teacher's (before "
        "specialist RL), on each teacher's domain, at most this",
        gt=0,
    )
    target_wall_s: float | None = _target(
        None, "the whole pipeline's seconds (each stage's last run, added up)", gt=0
    )
    target_peak_gb: float | None = _target(
        None, "the largest peak resident memory of any stage, in GB", gt=0
    )


class Recipe(Section):
    """A whole pipeline run."""

    name: str = Field(
        ..., min_length=1, description="Run name; outputs go to data/<name>/ by default."
    )
    seed: int = Field(0, description="Seed for tasks, sampling, data order and initialisation.")
    output_dir: str | None = Field(
        None, description="Where every stage writes; null = data/<name>."
    )
    tokenizer: TokenizerConfig = Field(
        default_factory=TokenizerConfig, description="The shared tokenizer."
    )
    domains: dict[DomainName, DomainConfig] = Field(
        default_factory=dict, description="Domains by name, with mixture and loss weights."
    )
    teachers: dict[DomainName, TeacherConfig] = Field(
        default_factory=dict, description="One teacher per domain."
    )
    generate: GenerateConfig = Field(
        default_factory=GenerateConfig, description="Teacher sampling."
    )
    filter: FilterConfig = Field(default_factory=FilterConfig, description="What clean data keeps.")
    student: StudentConfig = Field(
        default_factory=StudentConfig, description="The general student."
    )
    train: TrainConfig = Field(default_factory=TrainConfig, description="Student training.")
    rl: RLConfig = Field(
        default_factory=RLConfig,
        description="Mixed RL on the distilled student over every domain (the stage between "
        "train and eval; eval then scores the RL-trained student).",
    )
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation.")

    @model_validator(mode="after")
    def _teacher_per_domain(self) -> Recipe:
        missing = [d for d, c in self.domains.items() if c.enabled and d not in self.teachers]
        if missing:
            raise ValueError(f"teachers: no teacher for domain {', '.join(missing)}")
        return self

    @property
    def out(self) -> Path:
        return Path(self.output_dir or f"data/{self.name}")

    def active_domains(self) -> list[str]:
        return [d for d, c in self.domains.items() if c.enabled]

    def require_domains(self) -> None:
        """A recipe the pipeline can run names at least one enabled domain (checked before
        any stage runs; a recipe for a one-off ``eval --model`` needs none)."""
        if not self.active_domains():
            from teachers.base import REGISTRY

            raise RecipeError(
                f"domains: no enabled domain; the pipeline needs at least one of "
                f"{', '.join(REGISTRY)}"
            )

    def fingerprint(self, *sections: str) -> str:
        """Hash of the named sections (all when none), stable across key order."""
        data = self.model_dump(mode="json")
        if sections:
            data = {s: data[s] for s in sections}
        return json_hash(data)


# --------------------------------------------------------------------------- loading

_yaml = YAML(typ="safe")


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Load, override and validate a recipe; raise :class:`RecipeError` on bad input."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        data = _yaml.load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise RecipeError(
            f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at {e.start})"
        ) from None
    except YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError(f"{path}:{where} invalid YAML: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    for ov in overrides or []:
        apply_override(data, ov)
    return validate(data, source=str(path), overrides=overrides or [])


def validate(data: dict[str, Any], source: str = "recipe", overrides: list[str] = ()) -> Recipe:
    """``data`` as a :class:`Recipe`; an error is blamed on the ``--set`` override that
    wrote the key at fault, else on ``source``."""
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        loc = [str(p) for p in e.errors()[0]["loc"]]
        for ov in reversed(overrides):  # the last override of a key is the one that counts
            keys = parse_override(ov)[0]
            n = min(len(keys), len(loc))
            if n and keys[:n] == loc[:n]:
                source = f"--set {ov}"
                break
        raise RecipeError(f"{source}: {format_error(e, data)}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value parsed as YAML)."""
    if "=" not in text:
        raise RecipeError(f"--set {text!r}: expected key.path=value")
    key, raw = text.split("=", 1)
    keys = [k for k in key.strip().split(".")]
    if not all(keys):
        raise RecipeError(f"--set {text!r}: empty key in {key!r}")
    try:
        value = _yaml.load(raw) if raw.strip() else None
    except YAMLError:
        value = raw
    return keys, value


def apply_override(data: dict[str, Any], text: str) -> None:
    keys, value = parse_override(text)
    node = data
    for k in keys[:-1]:
        nxt = node.get(k)
        if nxt is None:
            nxt = node[k] = {}
        if not isinstance(nxt, dict):
            raise RecipeError(f"--set {text!r}: {k} is not a section")
        node = nxt
    node[keys[-1]] = value


def format_error(e: ValidationError, data: Any) -> str:
    """One line for the first error of a recipe: key path, expected type, value given."""
    return _format_error(e, data, Recipe)
