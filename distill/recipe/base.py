"""What every recipe section shares: unknown keys are errors, booleans are not numbers,
and domain names come from the registry (adding a domain touches no schema code)."""

from __future__ import annotations

import importlib.util
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from teachers.base import REGISTRY


def _registered(name: str) -> str:
    # checked when a recipe is validated, so a domain registered at run time counts
    if name not in REGISTRY:
        known = ", ".join(f"'{d}'" for d in REGISTRY)
        raise PydanticCustomError(
            "literal_error", "Input should be {expected}", {"expected": known}
        )
    return name


# Domain names come from the registry, so adding a domain touches no schema code.
DomainName = Annotated[str, AfterValidator(_registered)]

# the packages accelerate's tracker needs (either one of them)
_TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}


def _installed_trackers(names: list[str]) -> list[str]:
    # a tracker that is not installed would log nothing and say nothing: refuse it at load
    for name in names:
        if not any(importlib.util.find_spec(p) for p in _TRACKER_PACKAGES[name]):
            raise PydanticCustomError(
                "recipe_error", "{name} is not installed (pip install {name})", {"name": name}
            )
    return names


Trackers = Annotated[list[Literal["tensorboard", "wandb"]], AfterValidator(_installed_trackers)]
_NUMBERS = (int, float, int | None, float | None)


# A field that changes how a stage runs (memory, logs, checkpoints), not what it writes:
# left out of stage fingerprints, so setting it, or a new field of this kind appearing
# with its default, reruns nothing. ``Field(..., json_schema_extra=RUN_ONLY)``.
RUN_ONLY = {"run_only": True}


def fingerprint_data(model: BaseModel, ignore: tuple[str, ...] = ()) -> dict:
    """``model``'s JSON dump without its run-only fields (nested ones too) and the top-level
    ``ignore`` keys: what a stage's or a resumed run's fingerprint hashes."""
    data = without_run_only(model, model.model_dump(mode="json"))
    return {k: v for k, v in data.items() if k not in ignore}


def without_run_only(model: BaseModel, data: dict) -> dict:
    """``data`` (``model``'s JSON dump, or part of it) without the run-only fields of
    ``model`` and of every section nested in it."""
    fields = type(model).model_fields
    out = {}
    for key, value in data.items():
        field = fields.get(key)
        if field is not None and (field.json_schema_extra or {}).get("run_only"):
            continue
        out[key] = _strip(getattr(model, key, None), value)
    return out


def _strip(obj: Any, data: Any) -> Any:
    if isinstance(obj, BaseModel) and isinstance(data, dict):
        return without_run_only(obj, data)
    if isinstance(obj, dict) and isinstance(data, dict):
        return {k: _strip(obj.get(k), v) for k, v in data.items()}
    if isinstance(obj, list | tuple) and isinstance(data, list):
        return [_strip(o, d) for o, d in zip(obj, data, strict=False)]
    return data


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # old key -> the new key(s) that replaced it; an old key is an error naming the new
    # one (``train.lr: renamed to train.learning_rate``), never silently accepted
    renamed: ClassVar[dict[str, str | tuple[str, ...]]] = {}

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, v: Any, info: Any) -> Any:
        # pydantic reads `lr: true` as 1.0; in a recipe that is always a mistake
        if isinstance(v, bool) and cls.model_fields[info.field_name].annotation in _NUMBERS:
            raise PydanticCustomError("float_type", "expected a number")
        return v


# a fraction of something (traces, tokens): 0 to 1
Share = Annotated[float, Field(ge=0, le=1)]
