"""What every recipe section shares: unknown keys are errors, booleans are not numbers,
and domain names come from the registry (adding a domain touches no schema code)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, field_validator
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
_NUMBERS = (int, float, int | None, float | None)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, v: Any, info: Any) -> Any:
        # pydantic reads `lr: true` as 1.0; in a recipe that is always a mistake
        if isinstance(v, bool) and cls.model_fields[info.field_name].annotation in _NUMBERS:
            raise PydanticCustomError("float_type", "expected a number")
        return v
