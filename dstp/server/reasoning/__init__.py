"""Reasoning parsers by name (the names vLLM's ``--reasoning-parser`` uses)."""

from __future__ import annotations

from typing import Any

from dstp.server.reasoning.base import END as THINK_END
from dstp.server.reasoning.base import Piece, ReasoningParser, ThinkStream
from dstp.server.reasoning.deepseek_r1 import DeepSeekR1ReasoningParser
from dstp.server.reasoning.qwen3 import Qwen3ReasoningParser

REASONING_PARSERS: dict[str, type[ReasoningParser]] = {
    p.name: p for p in (DeepSeekR1ReasoningParser, Qwen3ReasoningParser)
}


def get_reasoning_parser(name: str, **kwargs: Any) -> ReasoningParser:
    """A parser for ``name`` (kwargs: ``enable_thinking``); ValueError naming valid names."""
    try:
        cls = REASONING_PARSERS[name]
    except KeyError:
        raise ValueError(
            f"unknown reasoning parser {name!r}; valid: {', '.join(sorted(REASONING_PARSERS))}"
        ) from None
    return cls(**kwargs)


__all__ = [
    "REASONING_PARSERS",
    "THINK_END",
    "Piece",
    "ReasoningParser",
    "ThinkStream",
    "get_reasoning_parser",
]
