"""The front-end's journal: per request, what it needs to replay it on a fresh engine job.

Every output that reaches the front-end is recorded per choice (the ids and logprobs
emitted, the text sent, the finish), so when the engine job dies a request is resubmitted
as its prompt plus the ids each unfinished choice already emitted
(:class:`~dstp.engine.outputs.ResumedChoice`), and the replayed engine's outputs continue
the client's stream where it stopped. Choices that finished before the crash are kept
here and put back into the request's final output.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dstp.engine.outputs import CompletionOutput, RequestOutput, ResumedChoice, TokenLogprob
from dstp.engine.sampling_params import SamplingParams


@dataclass
class ChoiceRecord:
    """One choice as the client has seen it."""

    ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    text: str = ""  # the deltas sent so far
    finish_reason: str | None = None
    stop_reason: str | int | None = None

    def completion(self, index: int, want_logprobs: bool) -> CompletionOutput:
        """This (finished) choice as a final output's entry, with nothing new in it."""
        return CompletionOutput(
            index,
            list(self.ids),
            self.text,
            logprobs=list(self.logprobs) if want_logprobs else None,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
        )


@dataclass
class RequestRecord:
    """One request: what it asked for, what each choice emitted, how many crashes it saw."""

    request_id: str
    prompt: list[int]
    params: SamplingParams
    choices: dict[int, ChoiceRecord] = field(default_factory=dict)
    num_cached_tokens: int | None = None
    crashes: int = 0  # engine-job failures while it was in flight
    replayed: bool = False
    aborted: bool = False  # its client went away; the engine may not have heard yet

    def observe(self, out: RequestOutput) -> RequestOutput:
        """Record one output; a replayed request's final output gets back the choices that
        finished before the replay (the engine no longer knows them)."""
        for c in out.outputs:
            choice = self.choices.setdefault(c.index, ChoiceRecord())
            choice.ids += c.new_token_ids
            choice.logprobs += c.new_logprobs or []
            choice.text += c.delta_text
            choice.finish_reason, choice.stop_reason = c.finish_reason, c.stop_reason
        if self.num_cached_tokens is None:
            self.num_cached_tokens = out.num_cached_tokens
        if not (out.finished and self.replayed):
            return out
        present = {c.index for c in out.outputs}
        want_logprobs = self.params.logprobs is not None
        earlier = [
            choice.completion(i, want_logprobs)
            for i, choice in self.choices.items()
            if i not in present and choice.finish_reason is not None
        ]
        out.outputs = sorted([*out.outputs, *earlier], key=lambda c: c.index)
        out.num_cached_tokens = self.num_cached_tokens
        return out

    def resume(self) -> list[ResumedChoice]:
        """The unfinished choices with their tokens so far (empty before the first token:
        the request is then simply added again)."""
        if not any(c.ids for c in self.choices.values()):
            return []
        want_logprobs = self.params.logprobs is not None
        return [
            ResumedChoice(i, list(c.ids), list(c.logprobs) if want_logprobs else None)
            for i, c in sorted(self.choices.items())
            if c.finish_reason is None
        ]

    def failed(self, why: str) -> RequestOutput:
        """A final output that ends every unfinished choice with an error."""
        outputs = [
            CompletionOutput(i, list(c.ids), c.text, finish_reason=c.finish_reason or "error")
            for i, c in sorted(self.choices.items())
        ]
        missing = set(range(self.params.n)) - set(self.choices)
        outputs += [CompletionOutput(i, [], "", finish_reason="error") for i in sorted(missing)]
        return RequestOutput(self.request_id, self.prompt, outputs, True, error=why)

    def abort_output(self) -> RequestOutput:
        """The final output of a request its client dropped while no engine ran it."""
        outputs = [CompletionOutput(i, [], "", finish_reason="abort") for i in range(self.params.n)]
        return RequestOutput(self.request_id, self.prompt, outputs, True)


class Journal:
    """Every request in flight between the HTTP server and the engine job."""

    def __init__(self) -> None:
        self.requests: dict[str, RequestRecord] = {}

    def __len__(self) -> int:
        return len(self.requests)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self.requests

    def add(self, request_id: str, prompt: list[int], params: SamplingParams) -> RequestRecord:
        record = self.requests[request_id] = RequestRecord(request_id, list(prompt), params)
        return record

    def observe(self, out: RequestOutput) -> RequestOutput:
        """Record an output from the engine job; forget the request once it finished."""
        record = self.requests.get(out.request_id)
        if record is None:
            return out
        out = record.observe(out)
        if out.finished:
            del self.requests[out.request_id]
        return out

    def pop(self, request_id: str) -> RequestRecord | None:
        return self.requests.pop(request_id, None)
