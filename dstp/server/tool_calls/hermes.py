"""Hermes / Qwen2.5 / Qwen3 calls: ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``.

As vLLM's hermes parser: any number of calls, content before them kept, and a final call
whose ``</tool_call>`` never came still counts if its JSON is complete. Unlike vLLM, text
between and after calls is kept as content too (whitespace right after a call is dropped),
and a block whose JSON is not a call stays content verbatim.
"""

from __future__ import annotations

from collections.abc import Mapping

from dstp.server.tool_calls.base import (
    ContentDelta,
    ToolCallStream,
    ToolDelta,
    ToolParser,
    call_from_json,
    held_prefix_len,
    json_call_grammar,
    loads_json,
    marker,
)

OPEN = "<tool_call>"
CLOSE = "</tool_call>"


def parse_block(body: str) -> tuple[str, dict] | None:
    """The call inside one ``<tool_call>`` block, or None when it is not a valid call."""
    try:
        return call_from_json(loads_json(body), ("arguments", "parameters"))
    except ValueError:
        return None


class HermesStream(ToolCallStream):
    after_call = False  # whitespace right after a call is a separator, not content

    def _step(self, final: bool) -> list[ToolDelta]:
        out: list[ToolDelta] = []
        while self.buf:
            if self.after_call:
                stripped = self.buf.lstrip()
                self.buf = stripped
                if not stripped:
                    break
                self.after_call = False
            start = self.buf.find(OPEN)
            if start < 0:
                keep = 0 if final else held_prefix_len(self.buf, OPEN)
                out.append(ContentDelta(self.buf[: len(self.buf) - keep]))
                self.buf = self.buf[len(self.buf) - keep :]
                break
            out.append(ContentDelta(self.buf[:start]))
            self.buf = self.buf[start:]
            end = self.buf.find(CLOSE, len(OPEN))
            if end < 0 and not final:
                break
            stop = len(self.buf) if end < 0 else end + len(CLOSE)
            call = parse_block(self.buf[len(OPEN) : stop if end < 0 else end])
            if call is None:
                out.append(ContentDelta(self.buf[:stop]))
            else:
                out.append(self._call(*call))
                self.after_call = True
            self.buf = self.buf[stop:]
        return out


class HermesToolParser(ToolParser):
    name = "hermes"
    stream_class = HermesStream

    def call_grammar(self, tool: dict) -> str:
        return json_call_grammar(tool, "arguments")

    def wrap_grammar(self, call_rule: str, many: bool, token_ids: Mapping[str, int] | None) -> str:
        one = f'{marker(OPEN, token_ids)} "\\n" {call_rule} "\\n" {marker(CLOSE, token_ids)}'
        return f"start: {one}" + (f' ("\\n" {one})*' if many else "")
