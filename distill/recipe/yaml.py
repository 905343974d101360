"""The one YAML scalar formatter: ``distill recipe show`` and ``distill recipe set`` both
write values with it, so a value reads the same in both (a test round-trips it)."""

from __future__ import annotations

import json
import re
from typing import Any

_PLAIN = re.compile(r"^[A-Za-z_][\w./-]*$")
# words YAML 1.1 readers take for booleans or null: such strings must be quoted
_YAML_WORDS = {"true", "false", "null", "yes", "no", "on", "off", "y", "n", "~"}


def scalar(value: Any) -> str:
    """``value`` as one line of YAML that reads back as the same value: plain words
    unquoted, floats in their shortest exact form (0.0003, 1e-05), everything else as JSON
    (valid flow YAML: null, 3, "text", [..]); tuples become lists."""
    if isinstance(value, str) and _PLAIN.match(value) and value.lower() not in _YAML_WORDS:
        return value
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, tuple):
        value = list(value)
    return json.dumps(value, ensure_ascii=False)
