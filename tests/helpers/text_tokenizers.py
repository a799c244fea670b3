"""Tokenizers for the exact-text tests: the real stories260k SentencePiece-style
tokenizer and a byte-level BPE trained here on a small multilingual corpus."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

CORPUS = [
    "Once upon a time, there was a little girl named Lily. She liked to play outside.",
    "The cat sat on the mat, and the dog ran to the park!",
    "Café, naïve, façade, déjà vu: accents are common in French words.",
    "Die Straße ist schön; Grüße aus München.",
    "日本語のテキストも少しあります。東京は大きな都市です。",
    "中文文本：你好，世界。今天天气很好。",
    "Emoji too: 🙂 🚀 🎉 👩‍👩‍👧 and symbols like € ∑ ≠ ∞.",
    "Привет, мир! Как дела?",
    "    indented code: def f(x): return x ** 2  # comment",
    "Numbers 0123456789 and punctuation ... --- !!! ??? (()) [[]] {{}}",
]


def byte_level_bpe() -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE (merges across bytes of multi-byte characters)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|bos|>", "<|eos|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>")
