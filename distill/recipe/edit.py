"""``distill recipe set``: edit keys of a recipe file in place, keeping its comments,
anchors, key order and formatting.

An existing scalar is replaced in the text itself (the rest of the file stays byte for
byte, the comment on that line keeps its column); anything else (a new key, a list or
mapping value) goes through a ruamel.yaml round trip. The edited recipe is validated
before anything is written: an invalid result leaves the file untouched.
"""

from __future__ import annotations

import re
from io import StringIO
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedBase, CommentedMap
from ruamel.yaml.error import YAMLError

from distill.files import atomic_write_text
from distill.recipe.schema import Recipe, RecipeError, parse_override, validate
from distill.recipe.yaml import scalar


def set_keys(path: str | Path, assignments: list[str]) -> Recipe:
    """Apply ``key.path=value`` assignments to the file at ``path`` in place.

    Values are parsed as YAML, like ``--set``. Missing sections are created. Raises
    :class:`RecipeError` (file untouched) when the result does not validate.
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    text = path.read_text()
    for assignment in assignments:
        keys, value = parse_override(assignment)
        text = _set_in_text(text, keys, value, path, assignment)
    recipe = validate(_plain(_load(text, path)), source=str(path))
    atomic_write_text(path, text)  # a reader never sees half a recipe
    return recipe


def _round_trip() -> YAML:
    yaml = YAML(typ="rt")
    yaml.preserve_quotes = True
    yaml.width = 4096  # never re-wrap a user's long lines
    yaml.indent(mapping=2, sequence=4, offset=2)
    return yaml


def _load(text: str, path: Path) -> Any:
    try:
        doc = _round_trip().load(text)
    except YAMLError as e:
        raise RecipeError(f"{path}: invalid YAML: {str(e).splitlines()[0]}") from None
    if doc is None:
        return CommentedMap()
    if not isinstance(doc, dict):
        raise RecipeError(f"{path}: expected a mapping at the top level")
    return doc


def _plain(node: Any) -> Any:
    """ruamel's commented containers as plain dicts and lists (for validation)."""
    if isinstance(node, dict):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    return node


def _set_in_text(text: str, keys: list[str], value: Any, path: Path, assignment: str) -> str:
    doc = _load(text, path)
    node, depth = doc, 0
    for k in keys[:-1]:
        nxt = node.get(k)
        if nxt is None:
            break
        if not isinstance(nxt, dict):
            raise RecipeError(f"{path}: cannot set {assignment!r}: {k} is not a section")
        line, col = node.lc.key(k)
        if re.match(r"[^:#]*:\s*\*", text.splitlines()[line][col:]):
            # editing through an alias would silently change every place sharing it
            where = ".".join(keys[: depth + 1])
            raise RecipeError(
                f"{path}: cannot set {assignment!r}: {where} is a YAML alias; edit its anchor or replace the alias"
            )
        node, depth = nxt, depth + 1
    if depth == len(keys) - 1 and keys[-1] in node:
        edited = _replace_scalar(text, node, keys[-1], value)
    else:
        edited = _insert_keys(text, node, keys[depth:], value)
    if edited is not None and _value_at(_load(edited, path), keys) == _plain(value):
        return edited
    return _set_by_round_trip(doc, keys, value, path, assignment)


def _insert_keys(text: str, parent: dict, keys: list[str], value: Any) -> str | None:
    """``text`` with ``keys`` (a chain of new nested keys) added at the end of the block
    mapping ``parent``; None when ``parent`` is not a non-empty block mapping."""
    if not parent or parent.fa.flow_style():
        return None
    last_line, col = parent.lc.key(list(parent)[-1])
    lines = text.splitlines(keepends=True)
    end = last_line + 1  # after the last line of the last key's value
    for i in range(last_line + 1, len(lines)):
        stripped = lines[i].strip()
        if not stripped or stripped.startswith("#"):
            continue  # comments between sections belong to what follows
        indent = len(lines[i]) - len(lines[i].lstrip(" "))
        if indent > col or (indent == col and stripped.startswith("- ")):
            end = i + 1
        else:
            break
    new = []
    for depth, k in enumerate(keys[:-1]):
        new.append(" " * (col + 2 * depth) + f"{k}:\n")
    new.append(" " * (col + 2 * (len(keys) - 1)) + f"{keys[-1]}: {scalar(value)}\n")
    if end > 0 and not lines[end - 1].endswith("\n"):
        lines[end - 1] += "\n"
    return "".join(lines[:end] + new + lines[end:])


def _replace_scalar(text: str, parent: dict, key: str, value: Any) -> str | None:
    """``text`` with the scalar at ``parent[key]`` replaced in place; None if it is
    not a one-line scalar (then the caller falls back to a round trip)."""
    old = parent.get(key, ...)
    if old is ... or isinstance(old, dict | list) or isinstance(value, dict | list):
        return None
    line_no, col = parent.lc.value(key)
    lines = text.splitlines(keepends=True)
    line = lines[line_no]
    end = _scalar_end(line, col, flow=parent.fa.flow_style())
    if end is None:
        return None
    new = scalar(value)
    rest = line[end:]
    if rest.lstrip(" ").startswith("#") and not parent.fa.flow_style():
        # keep the comment in its column when the new value is not longer
        gap = max(1, len(rest) - len(rest.lstrip(" ")) + (end - col) - len(new))
        rest = " " * gap + rest.lstrip(" ")
    lines[line_no] = line[:col] + new + rest
    return "".join(lines)


def _scalar_end(line: str, col: int, flow: bool) -> int | None:
    s = line[col:]
    if not s or s[0] in "|>*&!{[":  # block scalars, aliases, anchors, tags, collections
        return None
    if s[0] in "'\"":
        q, i = s[0], 1
        while i < len(s):
            if s[i] == "\\" and q == '"':
                i += 2
                continue
            if s[i] == q:
                if q == "'" and s[i + 1 : i + 2] == "'":  # '' escapes a quote
                    i += 2
                    continue
                return col + i + 1
            i += 1
        return None  # a quoted scalar over several lines
    m = re.search(r"\s#|[,}\]]" if flow else r"\s#", s)
    stop = m.start() if m else len(s.rstrip("\r\n"))
    return col + len(s[:stop].rstrip())


def _value_at(doc: Any, keys: list[str]) -> Any:
    for k in keys:
        if not isinstance(doc, dict) or k not in doc:
            return ...
        doc = doc[k]
    return _plain(doc)


def _set_by_round_trip(doc: Any, keys: list[str], value: Any, path: Path, assignment: str) -> str:
    node = doc
    for k in keys[:-1]:
        if node.get(k) is None:
            node[k] = CommentedMap()
        node = node[k]
        if not isinstance(node, dict):
            raise RecipeError(f"{path}: cannot set {assignment!r}: {k} is not a section")
    node[keys[-1]] = value
    _keep_anchors(doc)
    buf = StringIO()
    _round_trip().dump(doc, buf)
    return buf.getvalue()


def _keep_anchors(node: Any, seen: set[int] | None = None) -> None:
    """ruamel drops anchors nothing refers to; a user's anchors are part of the file."""
    seen = set() if seen is None else seen
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, CommentedBase) and node.anchor.value:
        node.yaml_set_anchor(node.anchor.value, always_dump=True)
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else []
    for child in children:
        _keep_anchors(child, seen)
