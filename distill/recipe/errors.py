"""One-line messages for recipe validation errors: key path, expected type, value given.

Pydantic reports every problem with a location and an error type; users want the first
one as ``train.learning_rate: expected a number, got 'fast'`` and, for a misspelled key,
the closest valid one (``trian: unknown key; did you mean 'train'?``). A key that was
renamed names its new key (``train.lr: renamed to train.learning_rate``); an old recipe
gets every rename at once in that line, so it is fixed in one pass.
"""

from __future__ import annotations

import difflib
import types
import typing
from typing import Any

from pydantic import BaseModel, ValidationError

_TYPE_WORDS = {
    "float_parsing": "a number",
    "float_type": "a number",
    "int_parsing": "an integer",
    "int_type": "an integer",
    "int_from_float": "an integer",
    "bool_parsing": "true or false",
    "bool_type": "true or false",
    "string_type": "a string",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "list_type": "a list",
    "tuple_type": "a list",
}
_BOUNDS = {
    "greater_than": ("gt", ">"),
    "greater_than_equal": ("ge", ">="),
    "less_than": ("lt", "<"),
    "less_than_equal": ("le", "<="),
}


def format_error(e: ValidationError, data: Any, root: type[BaseModel]) -> str:
    """One line for the first error of ``e`` raised validating ``data`` as ``root``."""
    errors = e.errors()
    renames = [r for r in (_renamed(err, root) for err in errors) if r]
    if renames:
        line, left = "; ".join(renames), len(errors) - len(renames)
    else:
        line, left = _format_one(errors[0], data, root), len(errors) - 1
    if left:
        line += f" (and {left} more)"
    return line


def _renamed(err: dict[str, Any], root: type[BaseModel]) -> str | None:
    """``train.lr: renamed to train.learning_rate`` for an unknown key that was renamed."""
    if err["type"] != "extra_forbidden":
        return None
    loc = [str(p) for p in err["loc"]]
    parent = model_at(root, loc[:-1])
    new = getattr(parent, "renamed", {}).get(loc[-1]) if parent else None
    if new is None:
        return None
    prefix = "".join(f"{p}." for p in loc[:-1])
    names = [new] if isinstance(new, str) else list(new)
    return f"{prefix}{loc[-1]}: renamed to {' and '.join(prefix + n for n in names)}"


def _format_one(err: dict[str, Any], data: Any, root: type[BaseModel]) -> str:
    loc = [str(p) for p in err["loc"]]
    kind = err["type"]
    given = err.get("input")
    ctx = err.get("ctx") or {}
    if loc and loc[-1] == "[key]":  # a bad key of a dict section (domains, teachers)
        loc = loc[:-1]
        valid = _literal_values(ctx.get("expected", ""))
        return f"{'.'.join(loc)}: unknown {_singular(loc[-2]) if len(loc) > 1 else 'key'}{_hint(loc[-1], valid)}"
    if kind == "extra_forbidden":
        parent = model_at(root, loc[:-1])
        valid = list(parent.model_fields) if parent else []
        return f"{'.'.join(loc)}: unknown key{_hint(loc[-1], valid, list_all=True)}"
    if kind == "missing" and loc and loc[-1].isdigit():  # a tuple with too few items
        loc = loc[:-1]
        kind, given = "tuple_type", _value_at(data, loc)
    path = ".".join(loc) or "recipe"
    if kind in _TYPE_WORDS:
        return f"{path}: expected {_expected_words(root, loc, kind)}, got {given!r}"
    if kind in _BOUNDS:
        key, sign = _BOUNDS[kind]
        return f"{path}: expected a value {sign} {ctx.get(key)}, got {given!r}"
    if kind in ("too_long", "too_short"):
        return (
            f"{path}: expected {ctx.get('max_length', ctx.get('min_length'))} items, got {given!r}"
        )
    if kind == "string_too_short":
        return f"{path}: expected a non-empty string, got {given!r}"
    if kind == "literal_error":
        valid = _literal_values(ctx.get("expected", ""))
        close = difflib.get_close_matches(str(given), valid, n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return f"{path}: expected one of {', '.join(valid)}, got {given!r}{hint}"
    if kind == "missing":
        return f"{path}: required key is missing"
    if kind == "recipe_error":  # a message written for the user, whole
        return f"{path}: {err['msg']}"
    if kind == "value_error":
        msg = err["msg"].removeprefix("Value error, ")
        return f"{path + '.' if loc else ''}{msg}"
    return f"{path}: {err['msg']}, got {given!r}"


def _hint(word: str, valid: list[str], list_all: bool = False) -> str:
    close = closest(word, valid)
    if close:
        return f"; did you mean '{close}'?"
    if valid and (list_all or len(valid) < 12):
        return f"; valid: {', '.join(valid)}"
    return ""


def closest(word: str, valid: list[str]) -> str | None:
    """The valid key ``word`` most likely meant: spelled alike (difflib's ratio), or
    abbreviated (its letters, in order, in the key, from the same first letter, as
    ``lrate`` in ``learning_rate``, or the last word of a key: ``rate``)."""

    def score(key: str) -> float:
        s = difflib.SequenceMatcher(None, word, key).ratio()
        if len(word) >= 3 and word[0] == key[0] and _subsequence(word, key):
            s = max(s, 0.75)
        if len(word) >= 3 and word in key.split("_"):
            s = max(s, 0.7)
        return s

    best = max(valid, key=score, default=None)
    return best if best is not None and score(best) >= 0.5 else None


def _subsequence(word: str, key: str) -> bool:
    it = iter(key)
    return all(ch in it for ch in word)


def _singular(section: str) -> str:
    return {"domains": "domain", "teachers": "domain"}.get(section, "key")


def _literal_values(expected: str) -> list[str]:
    """``"'a', 'b' or 'c'"`` -> ``["a", "b", "c"]``."""
    parts = expected.replace(" or ", ", ").split(", ")
    return [p.strip().strip("'") for p in parts if p.strip()]


def _expected_words(root: type[BaseModel], loc: list[str], kind: str) -> str:
    # a tuple field reads better with its arity ("a list of 2 numbers")
    if kind == "tuple_type" and loc:
        parent = model_at(root, loc[:-1])
        field = parent.model_fields.get(loc[-1]) if parent else None
        args = typing.get_args(field.annotation) if field else ()
        if args and all(a is float for a in args):
            return f"a list of {len(args)} numbers"
    return _TYPE_WORDS[kind]


def _value_at(data: Any, loc: list[str]) -> Any:
    for k in loc:
        if isinstance(data, dict):
            data = data.get(k)
        else:
            return None
    return data


def _strip_optional(t: Any) -> Any:
    while typing.get_origin(t) in (typing.Union, types.UnionType):
        t = next(a for a in typing.get_args(t) if a is not type(None))
    return t


def model_at(model: type[BaseModel], loc: list[str]) -> type[BaseModel] | None:
    """The pydantic model class found by walking ``loc`` from ``model``."""
    cur: Any = model
    for part in loc:
        cur = _strip_optional(cur)
        if isinstance(cur, type) and issubclass(cur, BaseModel):
            field = cur.model_fields.get(part)
            if field is None:
                return None
            cur = field.annotation
        else:  # dict[...] values: the key is any name, step to the value type
            args = typing.get_args(cur)
            cur = args[-1] if args else None
    cur = _strip_optional(cur)
    if isinstance(cur, type) and issubclass(cur, BaseModel):
        return cur
    return None
