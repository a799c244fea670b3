"""Sampling parameters, validated so that the server can answer 400 naming the parameter.

Field names follow the OpenAI API and vLLM where they overlap, so clients'
habits carry over.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


class InvalidRequest(ValueError):
    """A request parameter is out of range; the message names it and the valid range."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


# Below this temperature sampling is greedy (vLLM's rule): dividing logits by a
# smaller number overflows to inf and the softmax to NaN.
GREEDY_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class StructuredOutputs:
    """A constraint on the output (vLLM's ``structured_outputs``): exactly one of ``json`` (a
    JSON schema, as a dict or its text), ``json_object`` (any JSON object), ``regex``,
    ``choice`` (one of these strings) or ``grammar`` (Lark or GBNF, llguidance's dialects).

    JSON is compact unless ``whitespace_flexible`` (a small model left free whitespace can
    spend its whole budget on it). Compiling is :mod:`dstp.engine.structured`'s job."""

    json: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    whitespace_flexible: bool = False
    # Reasoning models: the constraint starts after this token (e.g. ``</think>``'s id), as
    # vLLM applies structured output to the answer only; before it the output is free.
    after_token: int | None = None

    KINDS = ("json", "json_object", "regex", "choice", "grammar")

    def __post_init__(self) -> None:
        if isinstance(self.choice, list):
            object.__setattr__(self, "choice", tuple(self.choice))
        set_kinds = [k for k in self.KINDS if getattr(self, k) not in (None, False)]
        if len(set_kinds) != 1:
            raise InvalidRequest(
                "structured_outputs must set exactly one of "
                f"{', '.join(self.KINDS)}; got {', '.join(set_kinds) or 'none'}",
                "structured_outputs",
            )

    @property
    def kind(self) -> str:
        """Which constraint this is (for logs and metrics)."""
        return next(k for k in self.KINDS if getattr(self, k) not in (None, False))


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # below GREEDY_TEMPERATURE: greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    n: int = 1
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None  # None: none; k >= 0: chosen token plus top-k alternatives
    structured_outputs: StructuredOutputs | None = None  # a grammar the output must follow

    MAX_N = 16
    MAX_LOGPROBS = 20
    MAX_STOP = 8
    MAX_STOP_CHARS = 256  # a held-back partial match is searched for every step
    # Finite bounds keep penalised logits finite (logits / 1e-300 is inf).
    REPETITION_PENALTY_RANGE = (0.01, 10.0)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1

    def validate(self) -> None:
        """Range checks that need no model; each error names its parameter and range."""
        for ok, param, message in self._checks():
            if not ok:
                raise InvalidRequest(
                    f"{param} must be {message}, got {getattr(self, param)!r}", param
                )

    def _checks(self):
        n, lp = self.MAX_N, self.MAX_LOGPROBS
        rp_low, rp_high = self.REPETITION_PENALTY_RANGE
        yield is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens", "an integer >= 1"
        yield _in(self.temperature, 0.0, 2.0), "temperature", "a number in [0, 2]"
        yield _in(self.top_p, 0.0, 1.0) and self.top_p > 0, "top_p", "a number in (0, 1]"
        yield is_int(self.top_k) and self.top_k >= -1, "top_k", "-1 (off) or an integer >= 1"
        yield _in(self.min_p, 0.0, 1.0), "min_p", "a number in [0, 1]"
        yield (
            _in(self.repetition_penalty, rp_low, rp_high),
            "repetition_penalty",
            f"a number in [{rp_low}, {rp_high}]",
        )
        yield _in(self.presence_penalty, -2.0, 2.0), "presence_penalty", "a number in [-2, 2]"
        yield _in(self.frequency_penalty, -2.0, 2.0), "frequency_penalty", "a number in [-2, 2]"
        yield self.seed is None or is_int(self.seed), "seed", "an integer"
        yield is_int(self.n) and 1 <= self.n <= n, "n", f"an integer in [1, {n}]"
        yield (
            isinstance(self.stop, list)
            and len(self.stop) <= self.MAX_STOP
            and all(isinstance(s, str) and 0 < len(s) <= self.MAX_STOP_CHARS for s in self.stop),
            "stop",
            f"a string or a list of at most {self.MAX_STOP} strings, each of 1 to "
            f"{self.MAX_STOP_CHARS} characters",
        )
        yield (
            isinstance(self.stop_token_ids, list)
            and all(is_int(t) and t >= 0 for t in self.stop_token_ids),
            "stop_token_ids",
            "a list of non-negative integers",
        )
        yield isinstance(self.ignore_eos, bool), "ignore_eos", "a boolean"
        yield (
            is_int(self.min_tokens) and 0 <= self.min_tokens <= self.max_tokens,
            "min_tokens",
            "an integer in [0, max_tokens]",
        )
        yield (
            self.logprobs is None or (is_int(self.logprobs) and 0 <= self.logprobs <= lp),
            "logprobs",
            f"an integer in [0, {lp}]",
        )
        yield (
            self.structured_outputs is None
            or isinstance(self.structured_outputs, StructuredOutputs),
            "structured_outputs",
            "a StructuredOutputs",
        )

    def check_against_model(self, vocab_size: int, eos_ids: frozenset[int]) -> None:
        """Checks that need the model: token ids exist, and min_tokens leaves a token to draw."""
        outside = [t for t in self.stop_token_ids if t >= vocab_size]
        if outside:
            raise InvalidRequest(
                f"stop_token_ids must be token ids in [0, {vocab_size}), got {outside[:5]}",
                "stop_token_ids",
            )
        masked = set(self.stop_token_ids) | (set() if self.ignore_eos else eos_ids)
        if self.min_tokens and len(masked) >= vocab_size:
            raise InvalidRequest(
                "stop_token_ids (with EOS) cover the whole vocabulary, so no token can be "
                "drawn before min_tokens; drop some ids or set min_tokens to 0",
                "stop_token_ids",
            )


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    return is_int(value) or (isinstance(value, float) and math.isfinite(value))


def _in(value: object, low: float, high: float) -> bool:
    return is_number(value) and low <= value <= high


def check_request(
    prompt_token_ids: list[int],
    params: SamplingParams,
    vocab_size: int,
    max_model_len: int,
    eos_ids: frozenset[int],
) -> None:
    """Every engine's admission rule (``InvalidRequest``): a non-empty prompt of in-vocabulary
    ids shorter than the context, and parameters valid for this model."""
    if not prompt_token_ids:
        raise InvalidRequest("the prompt is empty", "prompt")
    if any(not 0 <= t < vocab_size for t in prompt_token_ids):
        raise InvalidRequest(f"prompt token ids must be in [0, {vocab_size})", "prompt")
    if len(prompt_token_ids) >= max_model_len:
        raise InvalidRequest(
            f"the prompt has {len(prompt_token_ids)} tokens but this model's context is "
            f"{max_model_len}: shorten it",
            "prompt",
        )
    params.validate()
    params.check_against_model(vocab_size, eos_ids)
