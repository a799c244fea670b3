"""Llama 3.1 / 3.2 JSON calls: optional ``<|python_tag|>``, then ``{"name": ..., "parameters":
{...}}`` objects separated by ``;`` (and/or whitespace).

As vLLM's llama3_json parser, calls count only when the output starts with them (after
whitespace); any other output is plain content. Unlike vLLM (all or nothing), calls already
complete stay calls and whatever follows that is not a call is content, so a stream never
has to take back a call it sent. A ``<|python_tag|>`` not followed by a JSON call (Llama
3.1's built-in ``brave_search.call(...)``) is dropped and the rest is content.
"""

from __future__ import annotations

from collections.abc import Mapping

from dstp.server.tool_calls.base import (
    ContentDelta,
    ToolCallStream,
    ToolDelta,
    ToolParser,
    call_from_json,
    decode_json,
    json_call_grammar,
)

BOT = "<|python_tag|>"


class Llama3JsonStream(ToolCallStream):
    mode = "start"  # start -> calls -> content

    def _step(self, final: bool) -> list[ToolDelta]:
        out: list[ToolDelta] = []
        if self.mode == "start":
            head = self.buf.lstrip()
            if head.startswith(BOT):
                self.buf, self.mode = head[len(BOT) :], "calls"
            elif head.startswith("{"):
                self.mode = "calls"
            elif not final and (not head or BOT.startswith(head)):
                return out
            else:
                self.mode = "content"
        if self.mode == "calls":
            out += self._calls(final)
        if self.mode == "content":
            out.append(ContentDelta(self.buf))
            self.buf = ""
        return out

    def _calls(self, final: bool) -> list[ToolDelta]:
        out: list[ToolDelta] = []
        while True:
            rest = self.buf.lstrip()
            if rest.startswith(";"):
                rest = rest[1:].lstrip()
            if not rest:
                if final:
                    self.buf, self.mode = "", "done"
                return out
            try:
                obj, end = decode_json(rest)
            except ValueError:
                if not final:
                    return out  # maybe an unfinished object
                obj, end = None, 0
            call = call_from_json(obj, ("parameters", "arguments")) if end else None
            if call is None:  # the rest is content (less the whitespace after the calls)
                self.buf, self.mode = self.buf.lstrip() if self.calls else self.buf, "content"
                return out
            out.append(self._call(*call))
            self.buf = rest[end:]


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"
    stream_class = Llama3JsonStream

    def call_grammar(self, tool: dict) -> str:
        return json_call_grammar(tool, "parameters")

    def wrap_grammar(self, call_rule: str, many: bool, token_ids: Mapping[str, int] | None) -> str:
        return f"start: {call_rule}" + (f' ("; " {call_rule})*' if many else "")
