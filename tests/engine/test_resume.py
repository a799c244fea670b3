"""A request handed back to a fresh engine with the tokens it already emitted (a replay
after a rank died) ends exactly as the uninterrupted run: ids, text, logprobs, finish.

Oracle: the same request run uninterrupted on the same engine (TP=1, stories260K, fp32),
cut after ``k`` emitted tokens; the replay gets those tokens (and their logprobs) back
through ``add_request(..., resume=...)``.
"""

from __future__ import annotations

import itertools

import pytest

from dstp.engine import Engine, EngineConfig, SamplingParams
from dstp.engine.outputs import RequestOutput, ResumedChoice
from dstp.engine.sampling_params import InvalidRequest, StructuredOutputs
from tests.helpers.schemas import PERSON
from tests.helpers.tiny_models import STORIES

PROMPT = "Once upon a time, there was a little girl"
_ids = itertools.count()


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(EngineConfig(model=str(STORIES), dtype="float32", num_blocks=256))


def run(engine: Engine, params: SamplingParams, resume=()) -> tuple[RequestOutput, list]:
    """The final output and every step's output of one request."""
    request_id = f"r{next(_ids)}"
    engine.add_request(request_id, engine.tokenizer.encode(PROMPT), params, resume=resume)
    steps = []
    while engine.has_unfinished():
        steps += [o for o in engine.step() if o.request_id == request_id]
    return steps[-1], steps


def cut(steps: list[RequestOutput], k: int) -> tuple[list[ResumedChoice], dict[int, str]]:
    """What a front-end journal holds after the outputs carrying each choice's first ``k``
    tokens: the choices still running with their tokens and logprobs, and the text sent."""
    ids: dict[int, list] = {}
    logprobs: dict[int, list] = {}
    text: dict[int, str] = {}
    done: set[int] = set()
    for out in steps:
        for c in out.outputs:
            if len(ids.get(c.index, [])) >= k:
                continue
            ids.setdefault(c.index, []).extend(c.new_token_ids)
            logprobs.setdefault(c.index, []).extend(c.new_logprobs or [])
            text[c.index] = text.get(c.index, "") + c.delta_text
            if c.finished:
                done.add(c.index)
    choices = [ResumedChoice(i, ids[i], logprobs[i] or None) for i in sorted(ids) if i not in done]
    return choices, text


def assert_same_end(full: RequestOutput, resumed: RequestOutput, indexes: list[int]) -> None:
    by_index = {c.index: c for c in full.outputs}
    assert sorted(c.index for c in resumed.outputs) == indexes
    for c in resumed.outputs:
        want = by_index[c.index]
        assert c.token_ids == want.token_ids
        assert c.text == want.text
        assert (c.finish_reason, c.stop_reason) == (want.finish_reason, want.stop_reason)
        if want.logprobs is not None:  # re-prefilled K/V differ from decoded K/V in the last bits
            assert [(t.token_id, sorted(t.top)) for t in c.logprobs] == [
                (t.token_id, sorted(t.top)) for t in want.logprobs
            ]
            got = [v for t in c.logprobs for v in (t.logprob, *t.top.values())]
            expected = [v for t in want.logprobs for v in (t.logprob, *t.top.values())]
            assert got == pytest.approx(expected, abs=1e-5)


CASES = {
    "greedy": SamplingParams(max_tokens=40, temperature=0.0, logprobs=2),
    "seeded": SamplingParams(
        max_tokens=40, temperature=0.9, top_p=0.9, seed=7, repetition_penalty=1.3, logprobs=1
    ),
    "seeded_n2": SamplingParams(max_tokens=30, temperature=1.0, seed=3, n=2, min_tokens=20),
    "json": SamplingParams(
        max_tokens=60, temperature=0.8, seed=11, structured_outputs=StructuredOutputs(json=PERSON)
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("k", [1, 9])
def test_a_replayed_request_ends_as_the_uninterrupted_one(engine, case, k):
    params = CASES[case]
    full, steps = run(engine, params)
    choices, sent = cut(steps, k)
    assert choices, "the cut must leave something to replay"
    resumed, resumed_steps = run(engine, params, resume=choices)
    assert_same_end(full, resumed, [c.index for c in choices])
    for c in choices:  # a stream continues with exactly what was not sent yet
        deltas = "".join(
            o.delta_text for out in resumed_steps for o in out.outputs if o.index == c.index
        )
        assert sent[c.index] + deltas == next(o.text for o in full.outputs if o.index == c.index)


def test_a_stop_string_across_the_cut_still_ends_the_choice(engine):
    free = SamplingParams(max_tokens=40, temperature=0.0)
    full, steps = run(engine, free)
    choices, sent = cut(steps, 6)
    boundary = len(sent[0])
    stop = full.outputs[0].text[boundary - 3 : boundary + 3]  # half sent, half to come
    params = SamplingParams(max_tokens=40, temperature=0.0, stop=[stop])
    want, steps = run(engine, params)
    assert want.outputs[0].finish_reason == "stop" and want.outputs[0].stop_reason == stop
    choices, _ = cut(steps, 6)
    resumed, _ = run(engine, params, resume=choices)
    assert_same_end(want, resumed, [0])


def test_a_finished_choice_is_not_replayed_and_the_others_continue(engine):
    params = CASES["seeded_n2"]
    full, steps = run(engine, params)
    choices, _ = cut(steps, 12)
    resumed, _ = run(engine, params, resume=choices[1:])
    assert_same_end(full, resumed, [1])


@pytest.mark.parametrize(
    "choices",
    [
        [ResumedChoice(2, [5])],  # n=2 has choices 0 and 1
        [ResumedChoice(0, [5]), ResumedChoice(0, [6])],
        [ResumedChoice(0, [10**6])],
        [ResumedChoice(0, [5] * 30)],  # max_tokens reached
    ],
)
def test_a_replay_that_cannot_continue_is_refused(engine, choices):
    params = SamplingParams(max_tokens=30, n=2, temperature=1.0)
    with pytest.raises(InvalidRequest):
        engine.add_request("bad", [1, 2, 3], params, resume=choices)
    assert not engine.has_unfinished()
