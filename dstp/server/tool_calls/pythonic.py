"""Pythonic calls (Llama 3.2 / Llama 4): ``[get_weather(city="Paris"), f(x=1)]``, optionally
inside ``<|python_start|>...<|python_end|>``.

As vLLM's pythonic parser, the list counts only at the start of the output (after
whitespace); keyword arguments only; values are Python literals (read with ``ast``, never
evaluated) turned into JSON, and ``true``/``false``/``null`` are accepted as well since
models trained on JSON emit them. Unlike vLLM, text after a complete list is content
rather than turning the calls back into content.
"""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Mapping

from dstp.server.tool_calls.base import (
    ContentDelta,
    ToolCallStream,
    ToolDelta,
    ToolParser,
    json_rule,
    lark_str,
    tool_function,
)

START = "<|python_start|>"
END = "<|python_end|>"
_VIABLE = re.compile(r"\[\s*([A-Za-z_]\w*)?$|\[\s*[A-Za-z_]\w*\(")
_NAMES = {"true": True, "false": False, "null": None}


def literal(node: ast.expr) -> object:
    """The JSON value of a literal expression; ValueError for anything else."""
    if isinstance(node, ast.Name) and node.id in _NAMES:
        return _NAMES[node.id]
    if isinstance(node, ast.Dict):
        if any(k is None for k in node.keys):
            raise ValueError("** in a dict")
        keys = [literal(k) for k in node.keys]  # type: ignore[arg-type]
        if not all(isinstance(k, str) for k in keys):
            raise ValueError("JSON object keys must be strings")
        return dict(zip(keys, (literal(v) for v in node.values), strict=True))
    if isinstance(node, ast.List | ast.Tuple):
        return [literal(e) for e in node.elts]
    value = ast.literal_eval(node)
    if value is not None and not isinstance(value, str | int | float | bool):
        raise ValueError(f"not a JSON value: {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("JSON has no NaN or infinity")
    return value


def parse_call_list(text: str) -> list[tuple[str, dict]] | None:
    """The calls of a ``[f(a=1), ...]`` source text, or None if it is not exactly that."""
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    if not isinstance(tree, ast.List) or not tree.elts:
        return None
    calls = []
    for node in tree.elts:
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)) or node.args:
            return None
        try:
            args = {kw.arg: literal(kw.value) for kw in node.keywords if kw.arg}
        except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
            return None
        if len(args) != len(node.keywords):  # a **kwargs
            return None
        calls.append((node.func.id, args))
    return calls


class PythonicStream(ToolCallStream):
    mode = "start"  # start -> list -> content
    skip_ws = False  # whitespace right after the list is a separator, not content
    tried = 0  # chars of the list body already searched for its closing "]"

    def _step(self, final: bool) -> list[ToolDelta]:
        out: list[ToolDelta] = []
        if self.mode == "start":
            head = self.buf.lstrip()
            if head.startswith(START) or head.startswith("["):
                self.mode = "list"
            elif final or (head and not START.startswith(head)):
                self.mode = "content"
        if self.mode == "list":
            out += self._list(final)
        if self.mode == "content":
            if self.skip_ws:
                self.buf = self.buf.lstrip()
                self.skip_ws = not self.buf
            out.append(ContentDelta(self.buf))
            self.buf = ""
        return out

    def _list(self, final: bool) -> list[ToolDelta]:
        """Emit the calls once some ``]`` closes a valid list (or give up at the end)."""
        head = self.buf.lstrip()
        tagged = head.startswith(START)
        body = head[len(START) :] if tagged else head
        if body.lstrip() and not _VIABLE.match(body.lstrip()):
            self.mode = "content"  # cannot be a call list: release it now
            return []
        i = body.find("]", self.tried)
        while i >= 0:
            calls = parse_call_list(body[: i + 1])
            if calls is not None:
                rest = body[i + 1 :]
                if tagged:
                    rest = rest.lstrip()
                    if not final and END.startswith(rest) and rest != END:
                        self.tried = i  # the closing tag may be on its way
                        return []
                    rest = rest[len(END) :] if rest.startswith(END) else rest
                self.buf, self.mode, self.skip_ws = rest, "content", True
                return [self._call(*c) for c in calls]
            i = body.find("]", i + 1)
        self.tried = len(body)
        if final:
            self.mode = "content"
        return []


def kwargs_grammar(params: dict | None) -> str:
    """Lark for ``a=<json>, b=<json>``: required properties in order, then any optional ones
    in order (JSON literals are read as Python ones by ``literal``)."""
    params = params or {}
    props = params.get("properties") or {}
    defs = {k: params[k] for k in ("$defs", "definitions") if k in params}
    required = [p for p in props if p in set(params.get("required", []))]
    optional = [p for p in props if p not in required]

    def item(p: str) -> str:
        return f"{lark_str(p + '=')} {json_rule({**props[p], **defs})}"

    parts = [item(p) for p in required]
    tail = ""
    for p in reversed(optional):  # tail = a non-empty ordered subsequence of the optionals
        tail = f'({item(p)} (", " {tail})? | {tail})' if tail else f"({item(p)})"
    if not parts:
        return f"({tail})?" if tail else ""
    seq = ' ", " '.join(parts)
    return f'{seq} (", " {tail})?' if tail else seq


class PythonicToolParser(ToolParser):
    name = "pythonic"
    stream_class = PythonicStream

    def call_grammar(self, tool: dict) -> str:
        fn = tool_function(tool)
        return f'{lark_str(fn["name"] + "(")} {kwargs_grammar(fn.get("parameters"))} ")"'

    def wrap_grammar(self, call_rule: str, many: bool, token_ids: Mapping[str, int] | None) -> str:
        more = f' (", " {call_rule})*' if many else ""
        return f'start: "[" {call_rule}{more} "]"'
