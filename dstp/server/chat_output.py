"""A chat choice's text -> OpenAI's message: reasoning, content and tool calls.

The text goes through the reasoning parser first (``--reasoning-parser``: the thinking
becomes ``reasoning_content``), then, where the request has tools to parse, through the
tool-call parser (``tool_calls``). Streamed deltas join to the unstreamed message: both
run the same parsers' streams.
"""

from __future__ import annotations

from dataclasses import dataclass

from dstp.server.reasoning import ReasoningParser, ThinkStream
from dstp.server.tool_calls import CallDelta, ContentDelta, ToolCallStream, ToolParser


@dataclass
class ChatReader:
    """How one request's choices are read (each choice gets its own :meth:`stream`)."""

    reasoning: ReasoningParser | None = None
    tools: ToolParser | None = None

    @property
    def plain(self) -> bool:
        return self.reasoning is None and self.tools is None

    def message(self, text: str) -> tuple[dict, bool]:
        """The whole choice's message, and whether it called tools."""
        stream = self.stream()
        delta = stream.step(text, final=True)
        message = {"role": "assistant", "content": delta.get("content")}
        if "reasoning_content" in delta:
            message["reasoning_content"] = delta["reasoning_content"]
        calls = stream.tool_calls
        if calls:
            message["tool_calls"] = calls
        elif message["content"] is None and "reasoning_content" not in message:
            message["content"] = ""  # an empty answer is "": null only beside calls or thinking
        return message, bool(calls)

    def stream(self) -> ChoiceStream:
        return ChoiceStream(self)


class ChoiceStream:
    """One choice's text, delta by delta: each ``feed`` gives an OpenAI ``delta`` object."""

    def __init__(self, reader: ChatReader) -> None:
        self.think: ThinkStream | None = reader.reasoning.stream() if reader.reasoning else None
        self.tools: ToolCallStream | None = reader.tools.stream() if reader.tools else None

    @property
    def tool_calls(self) -> list[dict]:
        """The complete calls so far, as the message's ``tool_calls``."""
        return [call.to_openai() for call in self.tools.calls] if self.tools else []

    def step(self, text: str, final: bool) -> dict:
        """The delta for ``text`` (the choice's new text); ``final`` flushes what was held."""
        if self.think is None:
            pieces = [("content", text)]
        else:
            pieces = self.think.feed(text) + (self.think.finish() if final else [])
        return self._delta(pieces, final)

    def _delta(self, pieces: list[tuple[str, str]], final: bool) -> dict:
        delta: dict = {}
        reasoning = "".join(t for kind, t in pieces if kind == "reasoning")
        if reasoning:
            delta["reasoning_content"] = reasoning
        content = "".join(t for kind, t in pieces if kind == "content")
        if self.tools is None:
            if content:
                delta["content"] = content
            return delta
        parsed = self.tools.feed(content) if content else []
        if final:
            parsed += self.tools.finish()
        text = "".join(d.text for d in parsed if isinstance(d, ContentDelta))
        if text:
            delta["content"] = text
        calls = [d.to_openai() for d in parsed if isinstance(d, CallDelta)]
        if calls:
            delta["tool_calls"] = calls
        return delta
