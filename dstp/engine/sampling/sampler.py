"""Turn gathered logits into tokens: batched over rows, on the logits' device.

The semantics are vLLM's and HF's, and those of dstp's first, per-row sampler
(kept as the test oracle in tests/helpers/reference_sampler.py): suppress stop
tokens before ``min_tokens``, apply repetition / presence / frequency
penalties, then temperature, top-k, top-p and min-p, and draw. Logprobs
describe the model's raw distribution (before penalties and temperature).

The per-row sampler cost ~1.1 s a step at batch 64 on one CPU thread while
every GPU waited. This one runs as one batch, one job per module: penalties.py
(edits in place at the ids a row has seen), filters.py (top-k / top-p / min-p
over whole rows on an accelerator; on the CPU over a prefix of each row, the
whole row when the prefix cannot decide),
draw.py (blocked argmax and exponential races), logprobs.py, and readback.py
(the one transfer back). Every per-row value they use is planned on the host by
step.py and goes up in one packed copy (packed.py).
"""

from __future__ import annotations

import torch

from dstp.engine.outputs import TokenLogprob
from dstp.engine.sampling.constraints import constrain
from dstp.engine.sampling.draw import max_and_argmax, tokens
from dstp.engine.sampling.logprobs import logprob_tensors
from dstp.engine.sampling.penalties import edits, written
from dstp.engine.sampling.readback import Readback, RowStatus, read_back
from dstp.engine.sampling.state import SampleState
from dstp.engine.sampling.step import Step

NEG_INF = float("-inf")


class SamplingError(RuntimeError):
    """One row cannot be sampled; it fails its own request only."""


class NothingToDraw(SamplingError):
    """Every token is masked: by a grammar together with stop ids held back before
    ``min_tokens`` (the engine ends such a constrained row), or by stop ids alone."""


Picks = list[tuple[int, TokenLogprob | None]]


def sample(
    logits: torch.Tensor,
    states: list[SampleState],
    draws: list[int] | None = None,
    allowed: torch.Tensor | None = None,
) -> list[Picks | Exception]:
    """Sample ``draws[i]`` tokens (default 1) for each row; returns per-row [(token, logprob)].

    ``allowed``: the rows' grammar masks (llguidance's packed bitmask, see constraints.py),
    applied before anything else, so logprobs describe the constrained distribution (as
    vLLM reports them).

    A row that fails (non-finite logits, every token masked, any error while
    sampling it) gives its exception in place of its picks: the failure belongs
    to that row's request, and the other rows are still sampled. The logits are
    read on their own device, and are as they were when this returns.
    """
    if not states:
        return []
    draws = list(draws) if draws else [1] * len(states)
    try:
        return _sample_batch(logits, states, draws, allowed)
    except Exception as exc:  # one row's inputs broke the batch: find it by sampling rows alone
        if len(states) == 1:
            return [exc]
    return [
        _sample_alone(logits, i, state, n, allowed)
        for i, (state, n) in enumerate(zip(states, draws, strict=True))
    ]


def _sample_alone(
    logits: torch.Tensor, i: int, state: SampleState, draws: int, allowed: torch.Tensor | None
) -> Picks | Exception:
    try:
        row_allowed = None if allowed is None else allowed[i : i + 1]
        return _sample_batch(logits[i : i + 1], [state], [draws], row_allowed)[0]
    except Exception as exc:  # isolated to this row's request
        return exc


@torch.inference_mode()  # the engine's logits are inference tensors, edited in place here
def _sample_batch(
    logits: torch.Tensor,
    states: list[SampleState],
    draws: list[int],
    allowed: torch.Tensor | None = None,
) -> list[Picks | Exception]:
    x = logits.float().contiguous()
    step = Step(states, draws, x.shape[1], x.device, allowed, fused=True)  # the one upload
    if step.allowed is not None:
        x = constrain(x, step.allowed)  # a new tensor: the logits stay as they were
    raw_max, argmax = max_and_argmax(x, step.ops)
    broken = raw_max.isnan() | raw_max.isposinf()
    changes = edits(x, step)
    with written(x, changes):
        row_max = raw_max
        if changes:
            row_max, argmax = max_and_argmax(x, step.ops)
        masked = torch.where(row_max == NEG_INF, RowStatus.MASKED.value, RowStatus.OK.value)
        status = torch.where(broken, RowStatus.BROKEN.value, masked)
        drawn = tokens(x, step, argmax, status != RowStatus.OK.value)
    logprobs = logprob_tensors(x, step, drawn)  # raw logits again
    return _results(read_back(drawn, status, logprobs), states, draws)


_FAILURES = {
    RowStatus.BROKEN: "the model produced non-finite logits (NaN or +inf)",
    RowStatus.MASKED: "every token is masked (stop_token_ids before min_tokens?)",
}


def _results(
    back: Readback, states: list[SampleState], draws: list[int]
) -> list[Picks | Exception]:
    """Per-row picks, or the row's SamplingError."""
    asked = {row: j for j, row in enumerate(back.logprob_rows)}
    chosen = iter(back.chosen)
    results: list[Picks | Exception] = []
    slot = 0
    for i, state in enumerate(states):
        picks: Picks = []
        for token in back.tokens[slot : slot + draws[i]]:
            logprob = None
            if i in asked:
                top = back.top[asked[i]] if back.top else []
                logprob = TokenLogprob(token, next(chosen), dict(top[: state.params.logprobs]))
            picks.append((token, logprob))
        slot += draws[i]
        status = back.status[i]
        error = NothingToDraw if status == RowStatus.MASKED else SamplingError
        results.append(error(_FAILURES[status]) if status in _FAILURES else picks)
    return results
