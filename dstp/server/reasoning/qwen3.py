"""Qwen3: the model writes ``<think>...</think>`` itself; an output not starting with
``<think>`` is plain content (thinking disabled, ``enable_thinking=False``).

As vLLM's: ``<think>`` without ``</think>`` yet is all reasoning (what vLLM streams).
Choice: ``<think>`` counts only at the start of the output (after whitespace), which is
where Qwen3 writes it; vLLM looks for it anywhere and drops the text before it. This lets
an answer without thinking stream (and be constrained) from its first token.
Pass ``enable_thinking=False`` when the prompt disabled thinking: then all is content
(vLLM reads the same switch from chat_template_kwargs).
"""

from __future__ import annotations

from dstp.server.reasoning.base import START, ReasoningParser


class Qwen3ReasoningParser(ReasoningParser):
    name = "qwen3"

    def open(self, text: str, final: bool) -> tuple[str, str] | None:
        head = text.lstrip()
        if head.startswith(START):
            return "reasoning", head[len(START) :]
        if not final and START.startswith(head):
            return None
        return "content", text
