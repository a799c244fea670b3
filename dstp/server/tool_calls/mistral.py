"""Mistral calls: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`` (tokenizer up to
v7), and the newer ``[TOOL_CALLS]name{...}`` / ``[TOOL_CALLS]name[ARGS]{...}`` form, one marker
per call (v11+).

As vLLM's mistral parser: content before the first marker is kept; ids are 9 alphanumerics
(Mistral's templates reject others). A marker not followed by a valid call stays content.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from dstp.server.tool_calls.base import (
    ContentDelta,
    ToolCallStream,
    ToolDelta,
    ToolParser,
    call_from_json,
    decode_json,
    held_prefix_len,
    json_call_grammar,
    marker,
    mistral_call_id,
)

BOT = "[TOOL_CALLS]"
ARGS = "[ARGS]"
_NAME = re.compile(r"[A-Za-z0-9_.\-]+")


def _maybe_name_form(rest: str) -> bool:
    """Whether ``rest`` (after the marker) can still become ``name[ARGS]{...`` / ``name{...``."""
    m = _NAME.match(rest)
    if not m:
        return rest == ""
    tail = rest[m.end() :]
    return ARGS.startswith(tail) or tail.startswith(ARGS + "{") or tail.startswith("{")


class MistralStream(ToolCallStream):
    def _step(self, final: bool) -> list[ToolDelta]:
        out: list[ToolDelta] = []
        while self.buf:
            start = self.buf.find(BOT)
            if start < 0:
                keep = 0 if final else held_prefix_len(self.buf, BOT)
                out.append(ContentDelta(self.buf[: len(self.buf) - keep]))
                self.buf = self.buf[len(self.buf) - keep :]
                break
            out.append(ContentDelta(self.buf[:start]))
            self.buf = self.buf[start:]
            rest = self.buf[len(BOT) :]
            body = rest.lstrip()
            lead = len(rest) - len(body) if body.startswith("[") else 0
            parsed = None if not body and not final else self._parse(rest[lead:])
            if parsed is None:  # undecided: wait for more text
                if not final:
                    break
                parsed = (None, 0)
            calls, used = parsed
            if calls is None:
                # Not a call: the marker is content, and scanning goes on after it.
                out.append(ContentDelta(BOT))
                self.buf = rest
                continue
            out += [self._call(*c) for c in calls]
            self.buf = rest[lead + used :]
        return out

    def _parse(self, rest: str) -> tuple[list[tuple[str, dict]] | None, int] | None:
        """(calls or None when invalid, chars used) after a marker; None while undecided."""
        if rest.startswith("["):
            try:
                items, end = decode_json(rest)
            except ValueError:
                return None
            calls = (
                [call_from_json(i, ("arguments",)) for i in items]
                if isinstance(items, list)
                else [None]
            )
            return (None, 0) if not calls or None in calls else (calls, end)
        m = _NAME.match(rest)
        if m:
            at = m.end() + (len(ARGS) if rest.startswith(ARGS, m.end()) else 0)
            if rest.startswith("{", at):
                try:
                    args, end = decode_json(rest, at)
                except ValueError:
                    return None
                if isinstance(args, dict):
                    return [(m.group(), args)], end
                return None, 0
        return None if _maybe_name_form(rest) else (None, 0)


class MistralToolParser(ToolParser):
    name = "mistral"
    stream_class = MistralStream

    def new_id(self) -> str:
        return mistral_call_id()

    def call_grammar(self, tool: dict) -> str:
        return json_call_grammar(tool, "arguments")

    def wrap_grammar(self, call_rule: str, many: bool, token_ids: Mapping[str, int] | None) -> str:
        more = f' (", " {call_rule})*' if many else ""
        return f'start: {marker(BOT, token_ids)} "[" {call_rule}{more} "]"'
