"""Tool-call parsers by name (the names vLLM's ``--tool-call-parser`` uses)."""

from __future__ import annotations

from dstp.server.tool_calls.base import (
    CallDelta,
    ContentDelta,
    ToolCall,
    ToolCallStream,
    ToolDelta,
    ToolParser,
)
from dstp.server.tool_calls.hermes import HermesToolParser
from dstp.server.tool_calls.llama3_json import Llama3JsonToolParser
from dstp.server.tool_calls.mistral import MistralToolParser
from dstp.server.tool_calls.pythonic import PythonicToolParser

PARSERS: dict[str, type[ToolParser]] = {
    p.name: p
    for p in (HermesToolParser, Llama3JsonToolParser, MistralToolParser, PythonicToolParser)
}


def get_parser(name: str) -> ToolParser:
    """A new parser for ``name``; ValueError naming the valid ones otherwise."""
    try:
        return PARSERS[name]()
    except KeyError:
        raise ValueError(
            f"unknown tool call parser {name!r}; valid: {', '.join(sorted(PARSERS))}"
        ) from None


__all__ = [
    "PARSERS",
    "CallDelta",
    "ContentDelta",
    "ToolCall",
    "ToolCallStream",
    "ToolDelta",
    "ToolParser",
    "get_parser",
]
