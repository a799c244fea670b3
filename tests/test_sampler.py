"""The sampler's filters and penalties against transformers' own logits processors."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from dstp.sampler import SampleState, _filter, _penalise, make_generator, sample
from dstp.sampling_params import InvalidRequest, SamplingParams


def hf_filtered(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    scores = logits.unsqueeze(0)
    ids = torch.zeros((1, 1), dtype=torch.long)
    for proc in (
        TemperatureLogitsWarper(p.temperature),
        TopKLogitsWarper(p.top_k) if p.top_k > 0 else None,
        TopPLogitsWarper(p.top_p) if p.top_p < 1 else None,
        MinPLogitsWarper(p.min_p) if p.min_p > 0 else None,
    ):
        if proc is not None:
            scores = proc(ids, scores)
    return scores[0]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=0.7),
        dict(temperature=1.0, top_k=20),
        dict(temperature=1.3, top_p=0.8),
        dict(temperature=0.9, top_k=50, top_p=0.9),
        dict(temperature=1.0, min_p=0.05),
        dict(temperature=0.8, top_k=100, top_p=0.95, min_p=0.02),
    ],
)
def test_filters_match_hf(kwargs):
    torch.manual_seed(0)
    for _ in range(5):
        logits = torch.randn(512) * 3
        p = SamplingParams(**kwargs)
        ours = torch.softmax(_filter(logits.clone(), p), -1)
        theirs = torch.softmax(hf_filtered(logits.clone(), p), -1)
        assert torch.allclose(ours, theirs, atol=1e-6)


def test_repetition_penalty_matches_hf():
    torch.manual_seed(1)
    logits = torch.randn(100)
    prompt, output = [3, 5, 7, 7], [9, 3, 50]
    p = SamplingParams(repetition_penalty=1.3)
    ours = _penalise(logits.clone(), SampleState(p, prompt, output, None))
    theirs = RepetitionPenaltyLogitsProcessor(1.3)(
        torch.tensor([prompt + output]), logits.clone().unsqueeze(0)
    )[0]
    assert torch.allclose(ours, theirs)


def test_presence_and_frequency_penalties_follow_openai():
    logits = torch.zeros(10)
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    out = _penalise(logits.clone(), SampleState(p, [1, 2], [4, 4, 4, 6], None))
    expected = torch.zeros(10)
    expected[4] = -(3 * 0.25 + 0.5)
    expected[6] = -(1 * 0.25 + 0.5)
    assert torch.equal(out, expected)  # prompt tokens are not penalised


def test_min_tokens_suppresses_stop_ids_and_greedy_is_argmax():
    logits = torch.tensor([[0.0, 5.0, 1.0, 2.0]])
    p = SamplingParams(temperature=0, min_tokens=2, max_tokens=4)
    state = SampleState(p, [0], [], None, stop_ids=frozenset({1}))
    assert sample(logits, [state])[0][0][0] == 3
    state.output_ids = [3, 3]
    assert sample(logits, [state])[0][0][0] == 1


def test_seeded_draws_repeat_and_differ_by_seed():
    logits = torch.randn(3, 1000)
    p = SamplingParams(temperature=1.0)

    def draw(seed):
        states = [SampleState(p, [0], [], make_generator(seed, i)) for i in range(3)]
        return [sample(logits, states) for _ in range(5)]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


def test_logprobs_report_raw_distribution():
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.5]])
    p = SamplingParams(temperature=0, logprobs=2)
    ((token, lp),) = sample(logits, [SampleState(p, [0], [], None)])[0]
    raw = torch.log_softmax(logits[0], -1)
    assert token == 2 and lp.logprob == pytest.approx(float(raw[2]))
    assert list(lp.top) == [2, 1] and lp.top[1] == pytest.approx(float(raw[1]))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(max_tokens=0), "max_tokens"),
        (dict(temperature=-1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0), "top_p"),
        (dict(top_k=-5), "top_k"),
        (dict(n=0), "n"),
        (dict(n=True), "n"),
        (dict(stop=[""]), "stop"),
        (dict(min_tokens=20, max_tokens=4), "min_tokens"),
        (dict(logprobs=99), "logprobs"),
        (dict(seed="x"), "seed"),
        (dict(repetition_penalty=1e-300), "repetition_penalty"),
        (dict(repetition_penalty=11), "repetition_penalty"),
        (dict(presence_penalty=float("inf")), "presence_penalty"),
        (dict(temperature=2.5), "temperature"),
        (dict(stop=["x" * 257]), "stop"),
    ],
)
def test_invalid_parameters_name_the_field(kwargs, field):
    with pytest.raises(InvalidRequest, match=field) as info:
        SamplingParams(**kwargs)
    assert info.value.param == field


def test_parameters_are_checked_against_the_model():
    with pytest.raises(InvalidRequest, match=r"\[0, 100\)") as info:
        SamplingParams(stop_token_ids=[5, 2**63]).check_against_model(100, frozenset({2}))
    assert info.value.param == "stop_token_ids"
    every = SamplingParams(stop_token_ids=list(range(99)), min_tokens=1)
    with pytest.raises(InvalidRequest, match="whole vocabulary"):
        every.check_against_model(100, frozenset({99}))
    every.ignore_eos = True
    every.check_against_model(100, frozenset({99}))  # EOS is not masked then


def test_tiny_temperatures_are_greedy():
    logits = torch.tensor([[1.0, 5.0, 3.0, 0.5]]) * 1e3
    for temperature in (1e-300, 5e-324, 1e-6):
        p = SamplingParams(temperature=temperature)
        assert p.greedy
        assert sample(logits, [SampleState(p, [0], [], make_generator(1, 0))])[0] == [(1, None)]


def test_a_row_that_cannot_be_sampled_fails_alone():
    logits = torch.randn(4, 16)
    logits[1, 3] = float("nan")
    logits[2, 7] = float("inf")
    p = SamplingParams(temperature=0.8)
    masked = SampleState(p, [0], [], make_generator(0, 0), stop_ids=frozenset(range(16)))
    masked.params = SamplingParams(temperature=0.8, min_tokens=1)
    states = [SampleState(p, [0], [], make_generator(i, 0)) for i in range(3)] + [masked]
    results = sample(logits, states)
    assert isinstance(results[0], list) and len(results[0]) == 1
    assert [type(r).__name__ for r in results[1:]] == ["SamplingError"] * 3
    assert "non-finite" in str(results[1]) and "masked" in str(results[3])
