"""Incremental detokenisation and stop strings (rank 0).

A completion's text is ``decode(prompt + output)`` minus ``decode(prompt)``, so
a SentencePiece token keeps its leading space ("▁sat" is " sat" after a
prompt) and ``prompt_text + completion_text`` reads as the tokenizer decodes
the whole sequence. Re-decoding the whole output every step would be
quadratic, so each sequence keeps a short window of ids (vLLM's prefix/read
offsets, the scheme of tokenizers' ``DecodeStream``): the new text is what
decoding the window with the new tokens adds to decoding it without them,
and the window starts on a token both decodes share, so per-sequence decoder
rules (a stripped leading space, byte fallback) cancel out. Text that ends in
an incomplete UTF-8 character (U+FFFD) is held until a later token completes
it, or until the sequence finishes. SentencePiece's byte fallback decodes a
run of byte tokens as one group (an invalid group becomes U+FFFD for every
byte, and skipped special tokens do not break a run), so text is also held
while the newest token is a byte token or a special one.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

Decode = Callable[[list[int]], str]

# Prompt tokens decoded with the first output tokens: context for the rules above.
PROMPT_WINDOW = 6


class TextStream:
    """One sequence's text, a few tokens at a time."""

    def __init__(
        self, decode: Decode, prompt_ids: Sequence[int], held_ids: frozenset[int] = frozenset()
    ) -> None:
        self._decode = decode
        self._held_ids = held_ids  # tokens whose text depends on the next ones
        start = max(0, len(prompt_ids) - PROMPT_WINDOW)
        while start > 0 and prompt_ids[start] in held_ids:  # not inside a run of bytes
            start -= 1
        self._ids = list(prompt_ids[start:])  # the window: [prefix, read) + unread
        self._read = len(self._ids)
        self._prefix_text = decode(self._ids)

    def step(self, token_id: int) -> str:
        """Append a token; the text it completes ('' while a character is incomplete)."""
        self._ids.append(token_id)
        if token_id in self._held_ids:
            return ""
        text = self._decode(self._ids)
        if text.endswith("\ufffd") or len(text) <= len(self._prefix_text):
            return ""
        return self._advance(text)

    def flush(self) -> str:
        """At the end: what the held tokens decode to, incomplete characters included."""
        if self._read == len(self._ids):
            return ""
        text = self._decode(self._ids)
        return self._advance(text) if len(text) > len(self._prefix_text) else ""

    def _advance(self, text: str) -> str:
        new = text[len(self._prefix_text) :]
        del self._ids[: self._read]  # the emitted tokens become the next prefix
        self._read = len(self._ids)
        self._prefix_text = self._decode(self._ids)
        return new


class Detokenizer:
    """Makes each sequence's :class:`TextStream` with the fastest exact decode."""

    def __init__(self, tokenizer: Any) -> None:
        self.decode = _decode_function(tokenizer)
        self.byte_tokens = _byte_fallback_tokens(tokenizer)

    def stream(self, prompt_ids: Sequence[int]) -> TextStream:
        return TextStream(self.decode, prompt_ids, self.byte_tokens)


def _decode_function(tokenizer: Any) -> Decode:
    """The Rust decoder itself when ``tokenizer.decode`` adds nothing to it."""
    if tokenizer is None:
        return lambda ids: ""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return lambda ids: backend.decode(ids, skip_special_tokens=True)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _byte_fallback_tokens(tokenizer: Any) -> frozenset[int]:
    """Ids of SentencePiece byte tokens (``<0xE3>``) and of special tokens (skipped when
    decoding, so invisible inside a run of bytes) when the decoder groups byte runs."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or "ByteFallback" not in repr(backend.decoder):
        return frozenset()
    vocab = backend.get_vocab(with_added_tokens=False)
    byte_ids = {i for t, i in vocab.items() if _BYTE_TOKEN.fullmatch(t)}
    return frozenset(byte_ids | set(tokenizer.all_special_ids))


def find_stop(text: str, start: int, stops: Sequence[str]) -> tuple[int, str] | None:
    """The earliest stop string in ``text`` that ends at or after ``start``: (position, it)."""
    best = None
    for s in stops:
        pos = text.find(s, max(0, start - len(s) + 1))
        if pos != -1 and (best is None or pos < best[0]):
            best = (pos, s)
    return best


def partial_stop_len(text: str, stops: Sequence[str]) -> int:
    """How many characters at the end of ``text`` could start a stop string.

    Those are held back from clients until a later token rules the match out,
    so streamed deltas never show text that the final answer cuts.
    """
    held = 0
    for s in stops:
        tail = text[-(len(s) - 1) :] if len(s) > 1 else ""
        at = tail.find(s[0])
        while at != -1 and len(tail) - at > held:
            if s.startswith(tail[at:]):
                held = len(tail) - at
                break
            at = tail.find(s[0], at + 1)
    return held
