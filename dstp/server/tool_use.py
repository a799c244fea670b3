"""Chat's ``tools`` and ``tool_choice``: checked, turned into a constraint, parsed back.

``tool_choice`` "required" and a named function constrain generation to the tool-call
parser's own call format with each function's parameter schema, so the call always
parses; "auto" leaves the model free and parses what it wrote (vLLM's flags
``--enable-auto-tool-choice`` and ``--tool-call-parser`` choose the format).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from dstp.engine.sampling_params import InvalidRequest, StructuredOutputs
from dstp.server.structured import Constraint
from dstp.server.tool_calls import ToolParser, get_parser

FUNCTION_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # OpenAI's rule for function names
DEFAULT_PARSER = "hermes"  # forced calls need some format; hermes' is the most widely trained


@dataclass(frozen=True)
class ToolSettings:
    """The server's flags: ``--tool-call-parser`` and ``--enable-auto-tool-choice``."""

    parser: str | None = None
    auto: bool = False


@dataclass
class ToolUse:
    """A chat request's tools: what the template gets, and how to read the answer."""

    tools: list[dict]  # as sent (OpenAI form), for the chat template
    choice: str  # "none", "auto", "required" or "function" (a named one)
    parser: ToolParser | None  # None for "none": the text is the answer

    @property
    def parses(self) -> bool:
        return self.parser is not None


def tool_use(
    body: dict, settings: ToolSettings, special_ids: dict[str, int] | None = None
) -> tuple[ToolUse | None, Constraint | None]:
    """The request's ``tools`` / ``tool_choice``, and the constraint a forced call needs."""
    tools = _tools(body.get("tools"))
    choice = body.get("tool_choice")
    if tools is None:
        if choice not in (None, "none"):
            raise InvalidRequest("'tool_choice' needs 'tools' to choose from", "tool_choice")
        return None, None
    if choice is None:  # OpenAI's default is auto; vLLM's too, where auto is enabled
        choice = "auto" if settings.auto else "none"
    if choice == "none":
        return ToolUse(tools, "none", None), None
    if choice == "auto":
        if not (settings.auto and settings.parser):
            raise InvalidRequest(
                '"auto" tool choice requires the server flags --enable-auto-tool-choice and '
                '--tool-call-parser; or send tool_choice "required" or a named function',
                "tool_choice",
            )
        return ToolUse(tools, "auto", get_parser(settings.parser)), None
    parser = get_parser(settings.parser or DEFAULT_PARSER)
    if choice == "required":
        grammar = parser.required_grammar(tools, special_ids)
        return ToolUse(tools, "required", parser), _forced(grammar)
    tool = _named(choice, tools)
    return ToolUse(tools, "function", parser), _forced(parser.named_grammar(tool, special_ids))


def _forced(grammar: str) -> Constraint:
    return Constraint(StructuredOutputs(grammar=grammar), "tool_choice")


def _tools(raw: object) -> list[dict] | None:
    if raw is None or raw == []:
        return None
    if not isinstance(raw, list):
        raise InvalidRequest("'tools' must be a list of function tools", "tools")
    names = set()
    for i, tool in enumerate(raw):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not (isinstance(tool, dict) and tool.get("type") == "function" and isinstance(fn, dict)):
            raise InvalidRequest(
                f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ...}}}}", "tools"
            )
        name = fn.get("name")
        if not isinstance(name, str) or not FUNCTION_NAME.fullmatch(name):
            raise InvalidRequest(
                f"tools[{i}].function.name must be 1-64 letters, digits, '_', '.' or '-', "
                f"got {name!r}",
                "tools",
            )
        if name in names:
            raise InvalidRequest(f"tools[{i}]: the function name {name!r} is repeated", "tools")
        names.add(name)
        _check_parameters(i, fn.get("parameters"))
    return raw


def _check_parameters(i: int, schema: object) -> None:
    if schema is None:
        return
    if not isinstance(schema, dict):
        raise InvalidRequest(
            f"tools[{i}].function.parameters must be a JSON schema object", "tools"
        )
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        raise InvalidRequest(
            f"tools[{i}].function.parameters is not a valid JSON schema: {exc.message}", "tools"
        ) from None


def _named(choice: object, tools: list[dict]) -> dict:
    fn = choice.get("function") if isinstance(choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not (
        isinstance(choice, dict) and choice.get("type") == "function" and isinstance(name, str)
    ):
        raise InvalidRequest(
            '\'tool_choice\' must be "none", "auto", "required" or '
            f"{{'type': 'function', 'function': {{'name': ...}}}}, got {choice!r}",
            "tool_choice",
        )
    for tool in tools:
        if tool["function"]["name"] == name:
            return tool
    known = ", ".join(t["function"]["name"] for t in tools)
    raise InvalidRequest(
        f"tool_choice names {name!r}, which is not in tools ({known})", "tool_choice"
    )


# -- messages the chat template gets ----------------------------------------------------------
def assistant_tool_calls(i: int, calls: object) -> list[dict]:
    """An assistant message's ``tool_calls`` as HF chat templates expect them: arguments as
    an object (templates render them with ``tojson``), id and type kept."""
    where = f"messages[{i}].tool_calls"
    if not isinstance(calls, list):
        raise InvalidRequest(f"{where} must be a list", "messages")
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not (isinstance(fn, dict) and isinstance(fn.get("name"), str)):
            raise InvalidRequest(f"{where}[{j}] needs a function with a name", "messages")
        args = fn.get("arguments", "{}")
        if isinstance(args, str):
            try:
                args = json.loads(args or "{}")
            except json.JSONDecodeError:
                raise InvalidRequest(
                    f"{where}[{j}].function.arguments is not JSON: {args[:80]!r}", "messages"
                ) from None
        entry = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
        if isinstance(call.get("id"), str):
            entry["id"] = call["id"]
        out.append(entry)
    return out
