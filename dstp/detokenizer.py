"""Incremental detokenisation and stop strings (rank 0).

Decoding the whole output each step keeps multi-token characters and
tokenizer-specific spacing right; text that ends in an incomplete UTF-8
sequence (U+FFFD) is held back until the next token completes it, or until
the sequence finishes (then it is reported as it decodes).
"""

from __future__ import annotations

from typing import Any


class Detokenizer:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def text(self, token_ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def update(
        self, output_ids: list[int], stop: list[str], previous_len: int
    ) -> tuple[str, str | None]:
        """(text so far, the stop string hit or None); text is cut before the stop string."""
        text = self.text(output_ids)
        if text.endswith("\ufffd"):
            text = text.rstrip("\ufffd")
        for s in stop:
            # only look where the new text could complete a match
            start = max(0, previous_len - len(s) + 1)
            pos = text.find(s, start)
            if pos != -1:
                return text[:pos], s
        return text, None
