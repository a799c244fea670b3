"""Sampling parameters (validated, so the server can answer 400) and request outputs.

These are the types the engine and the server exchange. Field names follow
the OpenAI API and vLLM where they overlap, so clients' habits carry over.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


class InvalidRequest(ValueError):
    """A request parameter is out of range; the message names it and the valid range."""


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
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

    MAX_N = 16
    MAX_LOGPROBS = 20

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def validate(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise InvalidRequest(message)

        check(
            _is_int(self.max_tokens) and self.max_tokens >= 1,
            f"max_tokens must be an integer >= 1, got {self.max_tokens!r}",
        )
        check(
            _is_num(self.temperature) and 0.0 <= self.temperature <= 2.0,
            f"temperature must be in [0, 2], got {self.temperature!r}",
        )
        check(
            _is_num(self.top_p) and 0.0 < self.top_p <= 1.0,
            f"top_p must be in (0, 1], got {self.top_p!r}",
        )
        check(
            _is_int(self.top_k) and (self.top_k >= -1),
            f"top_k must be -1 (off) or a positive integer, got {self.top_k!r}",
        )
        check(
            _is_num(self.min_p) and 0.0 <= self.min_p <= 1.0,
            f"min_p must be in [0, 1], got {self.min_p!r}",
        )
        check(
            _is_num(self.repetition_penalty) and 0.0 < self.repetition_penalty <= 10.0,
            f"repetition_penalty must be in (0, 10], got {self.repetition_penalty!r}",
        )
        check(
            _is_num(self.presence_penalty) and -2.0 <= self.presence_penalty <= 2.0,
            f"presence_penalty must be in [-2, 2], got {self.presence_penalty!r}",
        )
        check(
            _is_num(self.frequency_penalty) and -2.0 <= self.frequency_penalty <= 2.0,
            f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty!r}",
        )
        check(
            self.seed is None or _is_int(self.seed), f"seed must be an integer, got {self.seed!r}"
        )
        check(
            _is_int(self.n) and 1 <= self.n <= self.MAX_N,
            f"n must be an integer in [1, {self.MAX_N}], got {self.n!r}",
        )
        check(
            isinstance(self.stop, list)
            and all(isinstance(s, str) and s for s in self.stop)
            and len(self.stop) <= 8,
            "stop must be a non-empty string or a list of at most 8 non-empty strings",
        )
        check(
            isinstance(self.stop_token_ids, list)
            and all(_is_int(t) and t >= 0 for t in self.stop_token_ids),
            "stop_token_ids must be a list of non-negative integers",
        )
        check(isinstance(self.ignore_eos, bool), "ignore_eos must be a boolean")
        check(
            _is_int(self.min_tokens) and 0 <= self.min_tokens <= self.max_tokens,
            f"min_tokens must be an integer in [0, max_tokens], got {self.min_tokens!r}",
        )
        check(
            self.logprobs is None
            or (_is_int(self.logprobs) and 0 <= self.logprobs <= self.MAX_LOGPROBS),
            f"logprobs must be an integer in [0, {self.MAX_LOGPROBS}], got {self.logprobs!r}",
        )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_num(value: object) -> bool:
    return _is_int(value) or (isinstance(value, float) and math.isfinite(value))


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: dict[int, float]  # the top-k alternatives: token id -> logprob


@dataclass
class CompletionOutput:
    """One of the ``n`` samples of a request, as it stands after a step."""

    index: int
    token_ids: list[int]  # every generated token so far
    text: str  # detokenised generated text so far (stop string excluded)
    new_token_ids: list[int] = field(default_factory=list)  # since the previous output
    delta_text: str = ""  # text added since the previous output
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: str | int | None = None  # the stop string or token that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """What the engine reports about a request after a step."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    arrival_time: float = 0.0
    first_token_time: float | None = None
    finish_time: float | None = None
