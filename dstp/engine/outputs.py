"""What the engine reports after each step: per request, per sample, per token."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: dict[int, float]  # the top-k alternatives: token id -> logprob


@dataclass
class CompletionOutput:
    """One of the ``n`` samples of a request, as it stands after a step.

    Each step's output carries what is new (``new_token_ids``, ``delta_text``,
    ``new_logprobs``); the running totals ``token_ids`` and ``logprobs`` are
    filled on the final output only, so a long generation copies nothing per
    step. ``text`` is always the text so far: the deltas concatenate to it.
    """

    index: int
    token_ids: list[int]  # every generated token (final output only)
    text: str  # detokenised generated text so far (stop string excluded)
    new_token_ids: list[int] = field(default_factory=list)  # since the previous output
    delta_text: str = ""  # text added since the previous output
    logprobs: list[TokenLogprob] | None = None  # every token's (final output only)
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error" | None
    stop_reason: str | int | None = None  # the stop string or token that ended it
    new_logprobs: list[TokenLogprob] | None = None  # of new_token_ids

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
    error: str | None = None  # why the request failed (finish_reason "error"), for the log


@dataclass(frozen=True)
class ResumedChoice:
    """A choice handed back to an engine to continue (a request replayed after a rank died):
    the tokens it already emitted and, if the request asked for them, their logprobs. The
    engine continues it as if it had produced them: penalties, ``max_tokens``/``min_tokens``,
    stop strings, seeded draws and the grammar all count them."""

    index: int
    output_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
