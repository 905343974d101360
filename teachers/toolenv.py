"""The agents domain's tool environment: a tiny deterministic bank.

State is a dict of account balances (whole numbers). Three tools act on it, described
by OpenAI tool schemas (:data:`TOOLS`)::

    balance(account)            -> "40"
    transfer(from, to, amount)  -> "ok: alice 28, bob 52"
    deposit(account, amount)    -> "ok: carol 30"

Every call returns a string and never raises. Calls the model got wrong (invalid JSON,
unknown tool, arguments that break the schema) return ``error: ...`` and are marked
``invalid``; calls the bank refuses (unknown account, insufficient funds) return
``error: ...`` and are marked ``refused``: the verifier fails the former outright and
lets the final state and answers judge the latter.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

__all__ = ["TOOLS", "TOOL_NAMES", "BankEnv", "ToolResult", "schema_error", "normalize_tools"]


def _tool(name: str, description: str, params: dict[str, str]) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {
                "type": "object",
                "properties": {k: {"type": t} for k, t in params.items()},
                "required": list(params),
            },
        },
    }


# Short names and descriptions on purpose: the schemas are rendered into every prompt,
# and a tiny bootstrap teacher must fit the whole trace in a few hundred tokens.
TOOLS: list[dict[str, Any]] = [
    _tool("balance", "Read a balance.", {"account": "string"}),
    _tool(
        "transfer",
        "Move money.",
        {"from": "string", "to": "string", "amount": "integer"},
    ),
    _tool("deposit", "Add money.", {"account": "string", "amount": "integer"}),
]
TOOL_NAMES = tuple(t["function"]["name"] for t in TOOLS)

_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
    "null": (type(None),),
}


def _type_ok(value: Any, name: str) -> bool:
    if name == "integer" and isinstance(value, float):
        return value.is_integer()  # JSON Schema: 3.0 is an integer
    if isinstance(value, bool) and name in ("integer", "number"):
        return False  # bool is an int subclass in Python, not in JSON
    return isinstance(value, _JSON_TYPES.get(name, object))


def _type_name(value: Any) -> str:
    for name in ("boolean", "integer", "number", "string", "object", "array", "null"):
        if isinstance(value, _JSON_TYPES[name]) and _type_ok(value, name):
            return name
    return type(value).__name__


def schema_error(value: Any, schema: dict[str, Any], where: str = "arguments") -> str | None:
    """The first way ``value`` breaks ``schema``, or None.

    The JSON Schema subset tool schemas use: ``type`` (a name or a list), ``enum``,
    ``minimum``/``maximum``, ``properties``, ``required``, ``items``. Unknown properties
    are rejected unless ``additionalProperties`` is true (as in OpenAI strict mode)."""
    types = schema.get("type")
    if types is not None:
        names = [types] if isinstance(types, str) else list(types)
        if not any(_type_ok(value, t) for t in names):
            return f"{where} must be {' or '.join(names)}, got {_type_name(value)}"
    if "enum" in schema and value not in schema["enum"]:
        return f"{where} must be one of {schema['enum']}, got {value!r}"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            return f"{where} must be >= {schema['minimum']}, got {value}"
        if "maximum" in schema and value > schema["maximum"]:
            return f"{where} must be <= {schema['maximum']}, got {value}"
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for key in schema.get("required", []):
            if key not in value:
                return f"missing required argument '{key}'"
        for key, item in value.items():
            if key in props:
                err = schema_error(item, props[key], f"argument '{key}'")
                if err:
                    return err
            elif schema.get("additionalProperties") is not True:
                return f"unknown argument '{key}'"
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            err = schema_error(item, schema["items"], f"{where}[{i}]")
            if err:
                return err
    return None


def normalize_tools(tools: list[Any] | None) -> list[dict[str, Any]]:
    """OpenAI tool schemas in the nested ``{"type": "function", "function": {...}}``
    form (a bare ``{"name", "parameters"}`` is wrapped). Raises ValueError naming a tool
    the bank does not implement or a malformed entry."""
    if tools is None:
        return TOOLS
    if not isinstance(tools, list) or not tools:
        raise ValueError("tools must be a non-empty list of OpenAI tool schemas")
    out = []
    for i, t in enumerate(tools):
        fn = t.get("function", t) if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ValueError(f"tools[{i}] is not an OpenAI tool schema (needs a function name)")
        if fn["name"] not in TOOL_NAMES:
            raise ValueError(
                f"tools[{i}]: tool '{fn['name']}' is not provided by the bank environment "
                f"(known: {', '.join(TOOL_NAMES)})"
            )
        params = fn.get("parameters", {})
        if not isinstance(params, dict) or not isinstance(params.get("properties", {}), dict):
            raise ValueError(f"tools[{i}]: parameters must be a JSON Schema object")
        out.append({"type": "function", "function": fn})
    return out


@dataclass(frozen=True)
class ToolResult:
    """What one call returned; ``status`` is ``ok``, ``refused`` or ``invalid``."""

    content: str
    status: str = "ok"
    revealed: tuple[str, ...] = ()  # accounts whose current balance the result shows


class BankEnv:
    """A live bank for one episode, built from a state ``{"accounts": {name: int}}``."""

    def __init__(self, state: dict[str, Any], tools: list[dict[str, Any]] | None = None):
        self.accounts: dict[str, int] = {str(k): int(v) for k, v in state["accounts"].items()}
        self.tools = normalize_tools(tools)
        self._schemas = {
            t["function"]["name"]: t["function"].get("parameters", {}) for t in self.tools
        }

    def state(self) -> dict[str, Any]:
        """The current state, in the form the constructor takes."""
        return {"accounts": dict(self.accounts)}

    def execute(self, name: str, arguments: str) -> str:
        """Run one call and return the tool message content (the ToolEnv protocol)."""
        return self.call(name, arguments).content

    def call(self, name: str, arguments: str | dict | None) -> ToolResult:
        """Run one call with its raw JSON arguments; never raises."""
        if name not in self._schemas:
            return ToolResult(f"error: unknown tool '{name}'", "invalid")
        try:
            if isinstance(arguments, dict):  # already decoded by a lenient caller
                args = arguments
            else:
                args = json.loads(arguments) if arguments and arguments.strip() else {}
        except (json.JSONDecodeError, TypeError, AttributeError) as e:
            return ToolResult(f"error: invalid JSON arguments: {getattr(e, 'msg', e)}", "invalid")
        try:
            err = schema_error(args, {"type": "object", **self._schemas[name]})
        except (TypeError, ValueError, AttributeError):  # a record's malformed schema
            return ToolResult(f"error: the schema of tool '{name}' is malformed", "invalid")
        if err:
            return ToolResult(f"error: {err}", "invalid")
        try:
            return getattr(self, f"_{name}")(**args)
        except (TypeError, ValueError) as e:  # a record's schema that does not fit ours
            return ToolResult(f"error: bad arguments for '{name}': {e}", "invalid")

    def _account(self, name: str) -> str | None:
        return None if name in self.accounts else f"error: no account '{name}'"

    def _balance(self, account: str) -> ToolResult:
        missing = self._account(account)
        return (
            ToolResult(missing, "refused")
            if missing
            else ToolResult(str(self.accounts[account]), "ok", (account,))
        )

    def _deposit(self, account: str, amount: int) -> ToolResult:
        amount = int(amount)
        refusal = self._account(account) or (amount <= 0 and "error: amount must be positive")
        if refusal:
            return ToolResult(refusal, "refused")
        self.accounts[account] += amount
        return ToolResult(f"ok: {account} {self.accounts[account]}", "ok", (account,))

    def _transfer(self, amount: int, **names: str) -> ToolResult:
        src, dst, amount = names.get("from"), names.get("to"), int(amount)
        refusal = (
            self._account(src)
            or self._account(dst)
            or (src == dst and "error: from and to are the same account")
            or (amount <= 0 and "error: amount must be positive")
            or (
                amount > self.accounts[src]
                and f"error: insufficient funds: {src} has {self.accounts[src]}"
            )
        )
        if refusal:
            return ToolResult(refusal, "refused")
        self.accounts[src] -= amount
        self.accounts[dst] += amount
        return ToolResult(
            f"ok: {src} {self.accounts[src]}, {dst} {self.accounts[dst]}", "ok", (src, dst)
        )
