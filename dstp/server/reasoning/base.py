"""Reasoning parsers: split ``<think>...</think>`` reasoning from the answer, whole or streamed.

Both parsers are one state machine (``ThinkStream``) that ``split`` also runs, so streamed
pieces always join to the unstreamed split. Partial tags at the end of a delta are held back
until the next delta shows whether they are a tag.
"""

from __future__ import annotations

from dstp.server.tool_calls.base import held_prefix_len

START = "<think>"
END = "</think>"
Piece = tuple[str, str]  # (kind, text), kind "reasoning" or "content"


class ThinkStream:
    """Incremental splitter; states: ``open`` (before any tag), ``reasoning``, ``content``."""

    def __init__(self, parser: ReasoningParser) -> None:
        self.parser = parser
        self.state = "open"
        self.buf = ""

    @property
    def in_content(self) -> bool:
        """Whether the answer has begun: from the next token on, structured output applies
        (any content this stream already returned must be fed to the grammar first)."""
        return self.state == "content"

    def feed(self, delta: str) -> list[Piece]:
        self.buf += delta
        return self._step(final=False)

    def finish(self) -> list[Piece]:
        return self._step(final=True)

    def _step(self, final: bool) -> list[Piece]:
        out: list[Piece] = []
        if self.state == "open":
            parser = self.parser
            decided = (
                parser.open(self.buf, final) if parser.enable_thinking else ("content", self.buf)
            )
            if decided is None:
                return out
            self.state, self.buf = decided
        if self.state == "reasoning":
            at = self.buf.find(END)
            if at < 0:
                keep = 0 if final else held_prefix_len(self.buf, END)
                out.append(("reasoning", self.buf[: len(self.buf) - keep]))
                self.buf = self.buf[len(self.buf) - keep :]
                return [p for p in out if p[1]]
            out.append(("reasoning", self.buf[:at]))
            self.state, self.buf = "content", self.buf[at + len(END) :]
        out.append(("content", self.buf))
        self.buf = ""
        return [p for p in out if p[1]]


class ReasoningParser:
    """A family's thinking format. ``open`` decides, from the start of the output, whether
    it begins in reasoning or content (None: not yet known)."""

    name = ""

    def __init__(self, enable_thinking: bool = True) -> None:
        # False when the prompt turned thinking off (chat_template_kwargs): all is content.
        self.enable_thinking = enable_thinking

    def open(self, text: str, final: bool) -> tuple[str, str] | None:
        raise NotImplementedError

    def stream(self) -> ThinkStream:
        return ThinkStream(self)

    def split(self, text: str) -> tuple[str | None, str | None]:
        """(reasoning, content) of a whole output; an empty part is None (as vLLM's)."""
        s = self.stream()
        pieces = s.feed(text) + s.finish()
        reasoning = "".join(t for k, t in pieces if k == "reasoning")
        content = "".join(t for k, t in pieces if k == "content")
        return reasoning or None, content or None

    def content_start(self, text: str) -> int | None:
        """Where the answer begins in ``text`` (the output so far), or None while the model
        is still reasoning or it cannot be told yet. Structured output applies from there."""
        s = self.stream()
        pieces = s.feed(text)
        if not s.in_content:
            return None
        content = "".join(t for k, t in pieces if k == "content")
        return len(text) - len(content) - len(s.buf)

    def content_started(self, text: str) -> bool:
        return self.content_start(text) is not None
