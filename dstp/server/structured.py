"""What a request asks its output to look like -> the engine's ``StructuredOutputs``.

Three request fields can ask: chat's ``response_format`` (OpenAI), vLLM's
``structured_outputs`` (chat and completions) and chat's ``tool_choice`` (see
``tool_use.py``). Each is checked for shape here (``InvalidRequest`` naming the field: a 400); whether the
schema, regex or grammar compiles is checked by the same compiler the engine uses
(``Serving`` calls it before the request reaches the engine).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from dstp.engine.sampling_params import InvalidRequest, StructuredOutputs

# vLLM's StructuredOutputsParams fields that dstp takes. JSON is compact by default (a small
# model left free whitespace can spend its whole budget on it); vLLM's
# ``disable_any_whitespace`` is accepted for compatibility and changes nothing.
STRUCTURED_OUTPUTS_FIELDS = ("json", "regex", "choice", "grammar", "json_object")
_COMPAT_FLAGS = ("disable_any_whitespace", "disable_additional_properties")


@dataclass(frozen=True)
class Constraint:
    """A request's constraint and the field that asked for it (the ``param`` of its 400s)."""

    spec: StructuredOutputs
    param: str


def from_structured_outputs(value: object) -> Constraint | None:
    """vLLM's ``structured_outputs`` object: exactly one of json, regex, choice, grammar,
    json_object."""
    param = "structured_outputs"
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidRequest(f"'{param}' must be an object with one of {_fields()}", param)
    unknown = sorted(set(value) - set(STRUCTURED_OUTPUTS_FIELDS) - set(_COMPAT_FLAGS))
    if unknown:
        raise InvalidRequest(
            f"'{param}' has unknown field(s) {', '.join(unknown)}; use {_fields()}", param
        )
    kinds = {k: value[k] for k in STRUCTURED_OUTPUTS_FIELDS if value.get(k) not in (None, False)}
    _check_kinds(kinds, param)
    return Constraint(_spec(kinds, param), param)


def from_response_format(value: object) -> Constraint | None:
    """OpenAI's ``response_format``: text (no constraint), json_object or json_schema."""
    param = "response_format"
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint(StructuredOutputs(json_object=True), param)
    if kind != "json_schema":
        raise InvalidRequest(
            f"'{param}' must be {{'type': 'text'}}, {{'type': 'json_object'}} or "
            f"{{'type': 'json_schema', 'json_schema': {{'name': ..., 'schema': {{...}}}}}}; "
            f"got {value!r}",
            param,
        )
    spec = value.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise InvalidRequest(f"'{param}.json_schema' must be an object with a string 'name'", param)
    schema = spec.get("schema", {})  # OpenAI: no schema means any JSON object
    if not isinstance(schema, dict):
        raise InvalidRequest(f"'{param}.json_schema.schema' must be a JSON schema object", param)
    return Constraint(StructuredOutputs(json=schema or {"type": "object"}), param)


def _check_kinds(kinds: dict, param: str) -> None:
    if len(kinds) != 1:
        raise InvalidRequest(
            f"'{param}' must set exactly one of {_fields()}; got {', '.join(kinds) or 'none'}",
            param,
        )
    ((kind, value),) = kinds.items()
    ok = {
        "json": isinstance(value, (dict, str)),
        "regex": isinstance(value, str),
        "grammar": isinstance(value, str),
        "choice": isinstance(value, list)
        and bool(value)
        and all(isinstance(c, str) for c in value),
        "json_object": value is True,
    }[kind]
    if not ok:
        what = {
            "json": "a JSON schema (an object, or its text)",
            "regex": "a string",
            "grammar": "a string (Lark or GBNF)",
            "choice": "a non-empty list of strings",
            "json_object": "true",
        }[kind]
        raise InvalidRequest(f"'{param}.{kind}' must be {what}, got {value!r}", param)


def _spec(kinds: dict, param: str) -> StructuredOutputs:
    ((kind, value),) = kinds.items()
    if kind == "json" and isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise InvalidRequest(f"'{param}.json' is not valid JSON: {exc}", param) from None
    if kind == "choice":
        value = tuple(value)
    try:
        return StructuredOutputs(**{kind: value})
    except InvalidRequest as exc:
        raise InvalidRequest(str(exc), param) from None


def _fields() -> str:
    return ", ".join(STRUCTURED_OUTPUTS_FIELDS)
