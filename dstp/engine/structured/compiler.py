"""A request's constraint -> a validated llguidance matcher, compiled once per text.

Compiling runs in a worker thread with a time bound (llguidance drops the GIL while it
builds a grammar) and under llguidance's own resource limits, so a pathological schema
costs its request a 400, not the server a stall. A compiled grammar is cached by its
text, process-wide per tokenizer: the HTTP thread that checks a request compiles it, and
the engine thread then finds it cached instead of stalling every row's step on it. Each
request gets a copy of the fresh matcher (``deep_copy``, microseconds).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import llguidance
import llguidance.hf

from dstp.engine.sampling_params import InvalidRequest, StructuredOutputs
from dstp.engine.structured.matcher import GrammarState

COMPILE_TIMEOUT_S = 2.0
CACHE_SIZE = 256
# llguidance's limits, a little tighter than its defaults: fuel is roughly work (~50k/ms).
LIMITS = dict(initial_lexer_fuel=1_000_000, step_lexer_fuel=200_000, max_grammar_size=200_000)


# (tokenizer key, grammar text) -> a fresh compiled matcher, shared by every compiler
_CACHE: OrderedDict[tuple[tuple, str], llguidance.LLMatcher] = OrderedDict()
_CACHE_LOCK = threading.Lock()
# tokenizer key -> llguidance's view of it (the HTTP side builds it, the engine reuses it)
_TOKENIZERS: dict[tuple, llguidance.LLTokenizer] = {}


class GrammarError(InvalidRequest):
    """The constraint cannot be compiled: an invalid schema, regex or grammar, or too costly."""


def grammar_text(spec: StructuredOutputs) -> str:
    """The llguidance grammar for ``spec``; JSON is compact unless asked otherwise."""
    if spec.json is not None or spec.json_object:
        schema = spec.json if spec.json is not None else {"type": "object"}
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as exc:
                raise GrammarError(f"the JSON schema is not valid JSON: {exc}") from None
        if not isinstance(schema, dict):
            raise GrammarError("the JSON schema must be a JSON object")
        options = {"whitespace_flexible": spec.whitespace_flexible}
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=options)
    if spec.regex is not None:
        return llguidance.LLMatcher.grammar_from_regex(spec.regex)
    if spec.choice is not None:
        if not spec.choice or not all(isinstance(c, str) and c for c in spec.choice):
            raise GrammarError("choice must be a non-empty list of non-empty strings")
        return llguidance.grammar_from("choice", json.dumps(list(spec.choice)))
    return llguidance.grammar_from("grammar", spec.grammar)


class GrammarCompiler:
    """Compiles constraints for one tokenizer; thread-safe (the HTTP threads validate, the
    engine thread builds its rows' matchers)."""

    def __init__(
        self,
        tokenizer,
        vocab_size: int,
        eos_ids: frozenset[int] | None = None,
        timeout_s: float = COMPILE_TIMEOUT_S,
    ) -> None:
        eos = sorted(eos_ids) if eos_ids else None
        # what makes two compilers' grammars interchangeable
        self.key = (getattr(tokenizer, "name_or_path", ""), len(tokenizer), vocab_size, str(eos))
        with _CACHE_LOCK:  # converting a 128k vocabulary takes ~1 s: once per process
            if self.key not in _TOKENIZERS:
                _TOKENIZERS[self.key] = llguidance.hf.from_tokenizer(
                    tokenizer, n_vocab=vocab_size, eos_token=eos
                )
            self.tokenizer = _TOKENIZERS[self.key]
        self.vocab_size = vocab_size
        self.timeout_s = timeout_s
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dstp-grammar")

    def matcher(self, spec: StructuredOutputs, param: str = "structured_outputs") -> GrammarState:
        """A fresh matcher for ``spec``; ``GrammarError`` (naming ``param``) if it cannot be."""
        try:
            text = grammar_text(spec)
        except GrammarError as exc:
            raise GrammarError(str(exc), param) from None
        except ValueError as exc:  # llguidance's own refusal of the grammar's text
            raise GrammarError(f"invalid {spec.kind}: {exc}", param) from None
        if spec.after_token is not None and not 0 <= spec.after_token < self.vocab_size:
            raise GrammarError(f"after_token {spec.after_token} is not a token id", param)
        matcher = self._compiled(text, spec.kind, param).deep_copy()
        return GrammarState(matcher, spec.kind, spec.after_token)

    def _compiled(self, text: str, kind: str, param: str) -> llguidance.LLMatcher:
        key = (self.key, text)
        with _CACHE_LOCK:
            if key in _CACHE:
                _CACHE.move_to_end(key)
                return _CACHE[key]
        future = self._pool.submit(self._build, text)
        try:
            matcher = future.result(timeout=self.timeout_s)
        except FutureTimeout:
            raise GrammarError(
                f"compiling this {kind} took over {self.timeout_s:g} s; simplify it", param
            ) from None
        if matcher.is_error():
            raise GrammarError(f"invalid {kind}: {_first_line(matcher.get_error())}", param)
        with _CACHE_LOCK:
            _CACHE[key] = matcher
            while len(_CACHE) > CACHE_SIZE:
                _CACHE.popitem(last=False)
        return matcher

    def _build(self, text: str) -> llguidance.LLMatcher:
        limits = llguidance.LLParserLimits(**LIMITS)
        return llguidance.LLMatcher(self.tokenizer, text, log_level=0, limits=limits)


def _first_line(error: str) -> str:
    """llguidance's message without its parser-state dump."""
    return error.strip().split("\n<state>")[0].strip()


def compiler_for(tokenizer, vocab_size: int, eos_ids: frozenset[int]) -> GrammarCompiler:
    """The model's grammar compiler (``InvalidRequest`` if it has no tokenizer to match text
    with): built on a model's first constrained request, by the engine and the front-end."""
    if tokenizer is None:
        raise InvalidRequest(
            "structured outputs need the model's tokenizer, and this model has none",
            "structured_outputs",
        )
    return GrammarCompiler(tokenizer, vocab_size, eos_ids)
