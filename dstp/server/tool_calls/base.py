"""The shared shape of every tool-call parser: calls, stream deltas, the parser base class,
and the llguidance grammar helpers the formats build on.

Every format is parsed by ONE incremental scanner (``ToolCallStream._step``) that both the
stream and ``extract`` run, so streamed output equals unstreamed output by construction: a
call is emitted only once it is complete and valid, and text that can no longer become a
call is released as content.
"""

from __future__ import annotations

import json
import secrets
import string
from collections.abc import Mapping
from dataclasses import dataclass

# Compact JSON with json.dumps' separators: no free whitespace (which lets a constrained model
# loop on spaces) yet the spacing the models were trained on, and what extract() returns.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass
class ToolCall:
    """One complete call; ``arguments`` is the JSON text of an object."""

    id: str
    name: str
    arguments: str

    def to_openai(self) -> dict:
        """The ``tool_calls`` entry of a chat completion message."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass
class ContentDelta:
    """Plain assistant text."""

    text: str


@dataclass
class CallDelta:
    """A tool-call delta as OpenAI streams it: the first one of a call carries id and name."""

    index: int
    id: str | None
    name: str | None
    arguments: str

    def to_openai(self) -> dict:
        """The ``delta.tool_calls`` entry of a chat completion chunk."""
        if self.id is None:
            return {"index": self.index, "function": {"arguments": self.arguments}}
        return {
            "index": self.index,
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


ToolDelta = ContentDelta | CallDelta


def random_call_id() -> str:
    """vLLM's id form: ``chatcmpl-tool-`` and 32 hex digits."""
    return f"chatcmpl-tool-{secrets.token_hex(16)}"


def mistral_call_id() -> str:
    """Mistral's chat templates reject ids that are not exactly 9 alphanumerics."""
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(9))


def dump_args(args: dict) -> str:
    """The arguments text every parser returns (json.dumps style, unicode kept)."""
    return json.dumps(args, ensure_ascii=False)


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


_DECODER = json.JSONDecoder(parse_constant=_no_constant)


def decode_json(text: str, start: int = 0) -> tuple[object, int]:
    """The strict JSON value at ``text[start:]`` and where it ends; ValueError when there is
    none (NaN/Infinity, which would make invalid arguments, and absurd nesting included)."""
    try:
        return _DECODER.raw_decode(text, start)
    except RecursionError as e:
        raise ValueError("JSON nested too deeply") from e


def loads_json(text: str) -> object:
    """``json.loads`` with ``decode_json``'s strictness."""
    text = text.strip()
    obj, end = decode_json(text)
    if end != len(text):
        raise ValueError("extra data after the JSON value")
    return obj


def held_prefix_len(text: str, marker: str) -> int:
    """How many trailing chars of ``text`` could be the start of ``marker`` (to hold back)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def lark_str(text: str) -> str:
    """A Lark string literal for ``text`` (JSON string escapes are valid in llguidance Lark)."""
    return json.dumps(text)


def marker(text: str, token_ids: Mapping[str, int] | None) -> str:
    """Lark for a format's marker: ``<[id]>`` when the tokenizer has it as a special token
    (llguidance never matches special tokens by their text), else the literal text."""
    if token_ids and text in token_ids:
        return f"<[{int(token_ids[text])}]>"
    return lark_str(text)


def json_rule(schema: dict) -> str:
    """An embedded compact-JSON rule body for ``schema`` (llguidance's ``%json``)."""
    return "%json " + json.dumps({**schema, "x-guidance": JSON_STYLE})


def tool_function(tool: dict) -> dict:
    """The ``function`` part of an OpenAI tool (accepting the bare function too)."""
    return tool.get("function", tool)


class ToolCallStream:
    """Incremental parser: ``feed`` text deltas, then ``finish``; subclasses write ``_step``.

    ``_step(final)`` consumes what it can decide from ``self.buf`` and returns deltas; with
    ``final`` it must consume everything (an unfinished call becomes content).
    """

    def __init__(self, parser: ToolParser) -> None:
        self.parser = parser
        self.buf = ""
        self.calls: list[ToolCall] = []

    def feed(self, delta_text: str) -> list[ToolDelta]:
        self.buf += delta_text
        return self._merge(self._step(final=False))

    def finish(self) -> list[ToolDelta]:
        out = self._step(final=True)
        assert not self.buf, "a scanner left text unconsumed at finish"
        return self._merge(out)

    def _step(self, final: bool) -> list[ToolDelta]:
        raise NotImplementedError

    def _call(self, name: str, args: dict) -> CallDelta:
        """Record a complete call and return its (single) delta."""
        call = ToolCall(self.parser.new_id(), name, dump_args(args))
        self.calls.append(call)
        return CallDelta(len(self.calls) - 1, call.id, call.name, call.arguments)

    @staticmethod
    def _merge(deltas: list[ToolDelta]) -> list[ToolDelta]:
        """Join adjacent content pieces and drop empty ones."""
        out: list[ToolDelta] = []
        for d in deltas:
            if isinstance(d, ContentDelta):
                if not d.text:
                    continue
                if out and isinstance(out[-1], ContentDelta):
                    out[-1] = ContentDelta(out[-1].text + d.text)
                    continue
            out.append(d)
        return out


class ToolParser:
    """A model family's tool-call format: parse it (whole or streamed) and constrain it."""

    name: str = ""
    stream_class: type[ToolCallStream] = ToolCallStream

    def new_id(self) -> str:
        return random_call_id()

    def stream(self) -> ToolCallStream:
        return self.stream_class(self)

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content outside the calls or None, the calls) of a whole output."""
        s = self.stream()
        deltas = s.feed(text) + s.finish()
        content = "".join(d.text for d in deltas if isinstance(d, ContentDelta))
        return content or None, s.calls

    def call_grammar(self, tool: dict) -> str:
        """Lark rule body (right-hand side) of one call of ``tool`` in this format."""
        raise NotImplementedError

    def wrap_grammar(self, call_rule: str, many: bool, token_ids: Mapping[str, int] | None) -> str:
        """The ``start`` rule around ``call_rule`` (one call, or one or more)."""
        raise NotImplementedError

    def required_grammar(
        self, tools: list[dict], token_ids: Mapping[str, int] | None = None
    ) -> str:
        """Grammar for tool_choice="required": one or more calls to any of ``tools``.

        ``token_ids`` maps marker texts that are special tokens in the served tokenizer
        (Mistral's ``[TOOL_CALLS]``) to their ids."""
        if not tools:
            raise ValueError("tool_choice=required needs at least one tool")
        rules = [f"fn_{i}: {self.call_grammar(t)}" for i, t in enumerate(tools)]
        alts = " | ".join(f"fn_{i}" for i in range(len(tools)))
        start = self.wrap_grammar("call", many=True, token_ids=token_ids)
        return "\n".join([start, f"call: {alts}", *rules])

    def named_grammar(self, tool: dict, token_ids: Mapping[str, int] | None = None) -> str:
        """Grammar for a named tool_choice: exactly one call of that function."""
        start = self.wrap_grammar("call", many=False, token_ids=token_ids)
        return "\n".join([start, f"call: {self.call_grammar(tool)}"])


def json_call_grammar(tool: dict, args_key: str) -> str:
    """``{"name": "<name>", "<args_key>": <compact args JSON>}`` as a Lark rule body."""
    fn = tool_function(tool)
    head = f'{{"name": {json.dumps(fn["name"])}, "{args_key}": '
    return (
        f"{lark_str(head)} {json_rule(fn.get('parameters') or {'type': 'object'})} {lark_str('}')}"
    )


def call_from_json(obj: object, args_keys: tuple[str, ...]) -> tuple[str, dict] | None:
    """(name, arguments) of a decoded ``{"name": ..., <args_key>: {...}}`` or None if not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    for key in args_keys:
        if key in obj:
            args = obj[key]
            if isinstance(args, str):  # some models send the arguments as JSON text
                try:
                    args = loads_json(args)
                except ValueError:
                    return None
            return (obj["name"], args) if isinstance(args, dict) else None
    return obj["name"], {}
