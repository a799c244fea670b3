"""DeepSeek-R1: the chat template opens ``<think>`` in the prompt, so the output is
``reasoning</think>content``, with or without the model repeating ``<think>`` first.

As vLLM's: until ``</think>`` everything is reasoning (an output cut short is all reasoning).
A leading ``<think>`` (after whitespace) is dropped; one elsewhere is reasoning text (vLLM
drops any text before the first ``<think>``; R1 never writes text there).
"""

from __future__ import annotations

from dstp.server.reasoning.base import START, ReasoningParser


class DeepSeekR1ReasoningParser(ReasoningParser):
    name = "deepseek_r1"

    def open(self, text: str, final: bool) -> tuple[str, str] | None:
        head = text.lstrip()
        if head.startswith(START):
            return "reasoning", head[len(START) :]
        if not final and START.startswith(head):
            return None  # maybe the model's own <think>
        return "reasoning", text
