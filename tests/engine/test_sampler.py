"""The sampler against transformers' logits processors and against the per-row oracle.

tests/helpers/reference_sampler.py is dstp's first sampler, kept as the oracle (verbatim
but for the top-p and min-p cut rules, which follow filters.py's order-free statement):
greedy rows, filters, penalties and logprobs must agree with it exactly, and
sampled rows in distribution (a seeded chi-square test).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from dstp.cpu import kernels
from dstp.engine.sampling import SampleState, SamplingError, filters, make_generator, sample
from dstp.engine.sampling import step as step_module
from dstp.engine.sampling.draw import exp_noise, max_and_argmax, splitmix64
from dstp.engine.sampling.filters import candidates, prefix_candidates
from dstp.engine.sampling.penalties import edits, written
from dstp.engine.sampling.step import Step
from dstp.engine.sampling_params import InvalidRequest, SamplingParams
from tests.helpers import reference_sampler as oracle
from tests.helpers.reference_sampler import _filter, _penalise


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


@pytest.fixture(params=["cpu", "accelerator"])
def path(request, monkeypatch):
    """Both filter paths, run on the CPU: the CPU's (a prefix of each row, and a mid-step
    read of the rows it cannot decide) and an accelerator's (whole rows, nothing read back
    before the end; step.py)."""
    monkeypatch.setattr(step_module, "HOST_BRANCH", request.param == "cpu")
    return request.param


def new_probs(logits: torch.Tensor, states: list[SampleState]) -> torch.Tensor:
    """dstp.engine.sampling's filtered distribution of each (sampled) row, as dense [B, V]."""
    x = logits.float().clone()
    with torch.inference_mode():
        step = Step(states, None, x.shape[1], x.device)
        with written(x, edits(x, step)):
            found = candidates(x, step, torch.zeros(len(states), dtype=torch.bool))
    out = torch.zeros_like(x)
    if found.prefix_rows:
        prefix = found.prefix_rows
        out[prefix] = out[prefix].scatter(1, found.ids, found.prefix_probs)
    if found.whole_rows:
        out[found.whole_rows] = found.whole_probs
    return out


def oracle_probs(logits: torch.Tensor, state: SampleState) -> torch.Tensor:
    """The oracle's filtered distribution of one row."""
    row = logits.float().clone()
    if len(state.output_ids) < state.params.min_tokens and state.stop_ids:
        row[list(state.stop_ids)] = float("-inf")
    return torch.softmax(_filter(_penalise(row, state), state.params), -1)


def new_penalised(logits: torch.Tensor, state: SampleState) -> torch.Tensor:
    """One row after dstp.engine.sampling's penalty and stop-id edits."""
    x = logits.clone().unsqueeze(0)
    with torch.inference_mode():
        for where, values in edits(x, Step([state], None, x.shape[1], x.device)):
            x.view(-1)[where] = values
    return x[0]


FILTERS = [
    dict(temperature=0.7),
    dict(temperature=1.0, top_k=20),
    dict(temperature=1.3, top_p=0.8),
    dict(temperature=0.9, top_k=50, top_p=0.9),
    dict(temperature=1.0, min_p=0.05),
    dict(temperature=0.8, top_k=100, top_p=0.95, min_p=0.02),
]


@pytest.mark.parametrize("kwargs", FILTERS)
def test_filters_match_hf(kwargs, path):
    torch.manual_seed(0)
    p = SamplingParams(**kwargs)
    for _ in range(5):  # the oracle
        logits = torch.randn(512) * 3
        ours = torch.softmax(_filter(logits.clone(), p), -1)
        theirs = torch.softmax(hf_filtered(logits.clone(), p), -1)
        assert torch.allclose(ours, theirs, atol=1e-6)
    logits = torch.randn(5, 4096) * 3  # dstp.engine.sampling, over a 1024-token prefix of 4096
    ours = new_probs(logits, [SampleState(p, [0], [], None) for _ in range(5)])
    for row, theirs in zip(ours, logits, strict=True):
        assert torch.allclose(row, torch.softmax(hf_filtered(theirs, p), -1), atol=1e-6)


def test_repetition_penalty_matches_hf():
    torch.manual_seed(1)
    logits = torch.randn(100)
    prompt, output = [3, 5, 7, 7], [9, 3, 50]
    p = SamplingParams(repetition_penalty=1.3)
    state = SampleState(p, prompt, output, None)
    ours = _penalise(logits.clone(), state)
    theirs = RepetitionPenaltyLogitsProcessor(1.3)(
        torch.tensor([prompt + output]), logits.clone().unsqueeze(0)
    )[0]
    assert torch.allclose(ours, theirs)
    assert torch.equal(new_penalised(logits, state), ours)


def test_presence_and_frequency_penalties_follow_openai():
    logits = torch.zeros(10)
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    state = SampleState(p, [1, 2], [4, 4, 4, 6], None)
    expected = torch.zeros(10)
    expected[4] = -(3 * 0.25 + 0.5)
    expected[6] = -(1 * 0.25 + 0.5)
    assert torch.equal(_penalise(logits.clone(), state), expected)  # prompt tokens are not
    assert torch.equal(new_penalised(logits, state), expected)


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
    assert [type(r).__name__ for r in results[1:]] == ["SamplingError"] * 2 + ["NothingToDraw"]
    assert all(isinstance(r, SamplingError) for r in results[1:])
    assert "non-finite" in str(results[1]) and "masked" in str(results[3])


# -- dstp.engine.sampling against the per-row oracle ------------------------------------------------


def test_a_row_whose_inputs_break_fails_alone():
    with torch.inference_mode():  # as the engine's logits are: edited in place all the same
        logits = torch.randn(3, 16)
    before = logits.clone()
    bad_stop = SampleState(SamplingParams(min_tokens=2), [0], [], None, stop_ids=frozenset({99}))
    bad_prompt = SampleState(SamplingParams(repetition_penalty=1.2), [5, 40], [], None)
    fine = SampleState(SamplingParams(temperature=0, logprobs=1), [0], [], None)
    results = sample(logits, [bad_stop, fine, bad_prompt])
    assert isinstance(results[0], IndexError) and isinstance(results[2], IndexError)
    assert results[1] == oracle.sample(logits[1:2], [fine])[0]
    assert torch.equal(logits, before)


GREEDY = [
    dict(temperature=0),
    dict(temperature=0, repetition_penalty=1.3),
    dict(temperature=0, repetition_penalty=0.7, presence_penalty=0.5),
    dict(temperature=0, frequency_penalty=-1.5, presence_penalty=-0.5, logprobs=3),
    dict(temperature=0, frequency_penalty=2.0, repetition_penalty=2.0, logprobs=0),
    dict(temperature=0, min_tokens=4, max_tokens=8, stop_token_ids=[1, 2, 3], logprobs=5),
    dict(top_k=1, repetition_penalty=1.2, min_tokens=2, stop_token_ids=[1]),
    dict(temperature=0, n=3, logprobs=2),
]


@pytest.mark.parametrize("vocab", [3000, 3001])  # 3001 is prime: the blocked argmax pads
def test_greedy_rows_match_the_oracle_exactly(vocab, path):
    """Penalties, min_tokens and logprobs over 6 steps, with sampled rows in the batch."""
    gen = torch.Generator().manual_seed(vocab)
    params = [SamplingParams(**kw) for kw in GREEDY] + [
        SamplingParams(temperature=0.9, top_p=0.9, repetition_penalty=1.1, logprobs=2),
        SamplingParams(temperature=1.0, seed=4),
    ]
    states = []
    for p in params:
        prompt = torch.randint(vocab, (40,), generator=gen).tolist() + [1, 2, 3, 4]
        stop_ids = frozenset({1, 2, *p.stop_token_ids})
        states.append(SampleState(p, prompt, [], make_generator(p.seed, 0), stop_ids))
    greedy = [i for i, p in enumerate(params) if p.greedy]
    for step in range(6):
        logits = torch.randn(len(states), vocab, generator=gen) * 3
        logits[:, 1:5] += 8  # the stop ids and prompt tokens lead: masks and penalties matter
        logits[0, [17, vocab - 1]] = 50.0  # a tie: the first index wins
        draws = [p.n if step == 0 else 1 for p in params]
        before = logits.clone()
        ours = sample(logits, states, draws)
        assert torch.equal(logits, before)  # edits are undone
        theirs = oracle.sample(logits, states, draws)
        assert [ours[i] for i in greedy] == [theirs[i] for i in greedy]
        for state, picks in zip(states, ours, strict=True):
            state.output_ids = state.output_ids + [picks[0][0]]
    assert all(s.output_ids[0] not in (1, 2, 3) for s in states[5:6])  # masked before min_tokens


def test_sampled_rows_logprobs_match_the_oracle(path):
    torch.manual_seed(2)
    logits = torch.randn(3, 2000) * 2
    params = [SamplingParams(temperature=0.8, top_p=0.9, logprobs=k) for k in (0, 3, 20)]
    states = [SampleState(p, [0], [], make_generator(i, 0)) for i, p in enumerate(params)]
    raw = torch.log_softmax(logits, -1)
    for i, picks in enumerate(sample(logits, states, [1, 2, 1])):
        for token, logprob in picks:
            assert logprob == oracle._logprob(raw, i, token, params[i].logprobs)


FLAT, PEAKED = 0.02, 4.0  # logit scales: the prefix's mass is ~25 % of a flat row's, ~100 % else


def mixed_rows(scale: float) -> tuple[torch.Tensor, list[SampleState]]:
    """Every filter alone and mixed with penalties, min_tokens and stop ids, over 4096 ids."""
    torch.manual_seed(5)
    kwargs = FILTERS + [
        dict(temperature=0.9, top_p=0.5, repetition_penalty=1.4, frequency_penalty=0.5),
        dict(temperature=1.1, top_k=2000, top_p=0.7),  # top_k beyond the prefix
        dict(temperature=1.0, min_p=0.9, presence_penalty=-1.0),
        dict(temperature=0.6, top_p=0.95, min_tokens=3, stop_token_ids=[7, 8]),
    ]
    states = [
        SampleState(SamplingParams(**kw), [7, 8, 9, 100], [9, 9, 4000], None, frozenset({7, 8}))
        for kw in kwargs
    ]
    logits = torch.randn(len(states), 4096) * scale
    logits[:, 7:10] += 3 * scale
    return logits, states


@pytest.mark.parametrize("scale", [FLAT, 1.0, PEAKED])
def test_filtered_distributions_match_the_oracle(scale, path):
    """Kept sets equal, probabilities equal to rounding, on both the prefix and whole-row paths."""
    logits, states = mixed_rows(scale)
    ours = new_probs(logits, states)
    for row, state, mine in zip(logits, states, ours, strict=True):
        theirs = oracle_probs(row, state)
        assert torch.equal(mine > 0, theirs > 0)
        assert torch.allclose(mine, theirs, rtol=1e-4, atol=1e-7)


def test_top_p_fallback_row_is_the_oracles_filter_exactly(path):
    """A flat row whose top 1024 hold less than top_p is filtered over its whole row."""
    torch.manual_seed(6)
    vocab = 128256
    logits = torch.randn(3, vocab) * 0.01
    params = [
        SamplingParams(temperature=1.0, top_p=0.9),
        SamplingParams(temperature=0.7, min_p=0.95),
        SamplingParams(temperature=1.0, top_k=5000, top_p=0.5),
    ]
    states = [SampleState(p, [0], [], None) for p in params]
    with torch.inference_mode():
        prefix = Step(states, None, vocab, logits.device, branch=True).prefix
        exact = prefix_candidates(logits, prefix)[2]
    assert prefix.rows == [0, 1] and not exact.any()  # the prefix cannot decide these rows
    ours = new_probs(logits, states)
    for row, state, mine in zip(logits, states, ours, strict=True):
        assert torch.equal(mine, oracle_probs(row, state))


def test_top_p_keeps_or_drops_tokens_tied_at_the_cut_together(path):
    """filters.py's rule: a token is kept when the mass of strictly likelier tokens is at most
    top_p's share, so a tie class straddling the cut is kept whole (a sort would split it
    by its order), on the prefix path, the whole-row path and the fallback alike."""
    vocab = 128256
    logits = torch.full((4, vocab), -10.0)
    logits[:, 5000:5010] = 4.0  # ten likely tokens, ~40 % of the mass
    logits[:, 9000:9300] = 1.0  # 300 tied ones, ~60 %: top_p 0.5 cuts inside them
    logits[3] = torch.randn(vocab).bfloat16().float() * 0.5  # flat, many ties: the fallback
    params = [
        SamplingParams(temperature=1.0, top_p=0.5),  # the cut inside the tie: all 300 kept
        SamplingParams(temperature=1.0, top_p=0.1),  # the ten tokens: the tie dropped whole
        SamplingParams(temperature=1.0, top_k=400, top_p=0.5),  # a prefix row with top-k
        SamplingParams(temperature=1.0, top_p=0.7),
    ]
    states = [SampleState(p, [0], [], None) for p in params]
    ours = new_probs(logits, states)
    for row, state, mine in zip(logits, states, ours, strict=True):
        assert torch.equal(mine > 0, oracle_probs(row, state) > 0)
    assert (ours[0, 9000:9300] > 0).all() and (ours[0] > 0).sum() == 310
    assert (ours[1] > 0).sum() == 10
    assert (ours[2] > 0).sum() == 310
    kept = logits[3][ours[3] > 0]
    cut = kept.min()  # every token at the cut's value is kept, none below it
    assert torch.equal(ours[3] > 0, logits[3] >= cut)


@pytest.mark.parametrize("scale", [0.01, 0.5, 1.0, 4.0])
def test_radix_select_cut_is_the_oracles(scale):
    """The whole-row top-p (a radix select over the weights' bits, blocks of rows on the
    CPU) keeps exactly the oracle's tokens: bf16-rounded logits (ties), -inf tokens, top_p
    from tiny to nearly 1."""
    torch.manual_seed(12)
    vocab = 128256
    logits = (torch.randn(6, vocab) * scale).bfloat16().float()
    logits[1, 100:] = float("-inf")  # a top-k-like row
    logits[2, :50000] = logits[2, 50000:100000]  # pairs of equal logits
    top_p = [1e-6, 0.3, 0.5, 0.9, 0.99, 0.9999]
    ours = filters.top_p_threshold(logits.clone(), torch.tensor(top_p))
    for row, p, mine in zip(logits, top_p, ours, strict=True):
        theirs = _filter(row.clone(), SamplingParams(temperature=1.0, top_p=p))
        assert torch.equal(mine > float("-inf"), theirs > float("-inf"))


def test_the_oracle_counts_mass_in_filters_units():
    assert oracle.MASS_BITS == filters.MASS_BITS


def chi_square_p(tokens: list[int], probs: torch.Tensor) -> float:
    """p-value of the tokens' counts against ``probs`` (categories expected < 5 times pooled)."""
    counts = torch.bincount(torch.tensor(tokens), minlength=len(probs)).double()
    assert counts[probs == 0].sum() == 0, "a token outside the kept set was drawn"
    expected = probs.double() * len(tokens)
    big = expected >= 5
    observed = torch.cat([counts[big], counts[~big].sum().view(1)])
    expected = torch.cat([expected[big], expected[~big].sum().view(1)])
    if expected[-1] < 5:  # too few to test apart: fold into the last big category
        observed, expected = observed[:-1], expected[:-1]
        observed[-1] += counts[~big].sum()
        expected[-1] += probs.double()[~big].sum() * len(tokens)
    stat = ((observed - expected) ** 2 / expected).sum()
    df = torch.tensor(len(expected) - 1, dtype=torch.double)
    return float(torch.special.gammaincc(df / 2, stat / 2))


@pytest.mark.parametrize(
    "kwargs, scale, draws",
    [
        (dict(temperature=0.9, top_p=0.9), PEAKED, 4000),  # prefix, whole-row normaliser
        (dict(temperature=1.2, top_k=30, repetition_penalty=1.3, seed=5), 1.0, 4000),  # seeded
        (dict(temperature=1.0, min_p=0.1, frequency_penalty=1.0), 1.0, 4000),
        (dict(temperature=0.7), 1.0, 20000),  # whole row: the two-level race
        (dict(temperature=1.0, top_p=0.5, seed=9), 0.05, 20000),  # a flat row: the fallback
    ],
)
def test_sampled_rows_follow_the_oracle_distribution(kwargs, scale, draws, path):
    torch.manual_seed(7)
    vocab = 4096
    p = SamplingParams(**kwargs)
    state = SampleState(p, [1, 2, 3], [3, 3, 4], make_generator(p.seed, 0))
    logits = torch.randn(1, vocab) * scale
    logits[0, :5] += 2 * scale
    (picks,) = sample(logits, [state], [draws])
    assert chi_square_p([t for t, _ in picks], oracle_probs(logits[0], state)) > 1e-3


SEEDED = {  # row -> parameters; the unseeded rows only change the batch around the seeded ones
    0: dict(temperature=0.8, top_p=0.9, seed=11),
    1: dict(temperature=1.0, seed=12),
    2: dict(temperature=0.9, top_k=40, repetition_penalty=1.2, seed=13, n=3),
    3: dict(temperature=1.0),
    4: dict(temperature=1.0, top_p=0.95, seed=14),  # a flat row: the fallback
    5: dict(temperature=0),
}


def test_seeded_rows_ignore_batch_composition_and_order(path):
    torch.manual_seed(8)
    logits = torch.randn(3, len(SEEDED), 4096) * 3
    logits[:, 4] = torch.randn(3, 4096) * 0.02

    def run(order: list[int]) -> dict[int, list[list[int]]]:
        states = {}
        for i in order:
            p = SamplingParams(**SEEDED[i])
            states[i] = SampleState(p, [i, 10, 11], [], make_generator(p.seed, 0))
        drawn: dict[int, list[list[int]]] = {i: [] for i in order}
        for step in range(3):
            draws = [states[i].params.n if step == 0 else 1 for i in order]
            picks = sample(logits[step, order], [states[i] for i in order], draws)
            for i, row in zip(order, picks, strict=True):
                drawn[i].append([t for t, _ in row])
                states[i].output_ids = states[i].output_ids + [row[0][0]]
        return {i: d for i, d in drawn.items() if SEEDED[i].get("seed") is not None}

    full = run(list(range(len(SEEDED))))
    assert len(full[2][0]) == 3
    for order in ([5, 4, 3, 2, 1, 0], [2], [4, 0], [3, 1, 5], [0, 3, 4]):
        for i, tokens in run(order).items():
            assert tokens == full[i], (order, i)


def test_token_counts_follow_the_output_incrementally():
    p = SamplingParams(repetition_penalty=1.5, frequency_penalty=0.5, presence_penalty=0.25)
    state = SampleState(p, [3, 5, 5, 9], [], None)
    counts = state.token_counts()
    torch.manual_seed(9)
    for out in ([], [5], [5, 7], [5, 7, 7, 2], [5, 7, 7, 2, 11]):
        state.output_ids = out
        assert state.token_counts() is counts  # updated, not rebuilt
        assert counts.prompt.tolist() == [3, 5, 9] and counts.output.tolist() == out
        logits = torch.randn(12)
        assert torch.equal(new_penalised(logits, state), _penalise(logits.clone(), state))
        prompt_on_device = counts.on_device[torch.device("cpu")]  # uploaded once, then kept
        assert out == [] or counts.on_device[torch.device("cpu")] is prompt_on_device
    state.output_ids = [4]  # a shorter output (the sequence was reset): counted afresh
    assert state.token_counts() is not counts and state.token_counts().output.tolist() == [4]


def test_penalised_rows_send_only_their_new_output_ids():
    """The output ids live in a pool on the device: a step uploads only the new ones, and
    the penalties stay the oracle's while each row's region there grows and moves."""
    p = SamplingParams(repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.2)
    states = [SampleState(p, [3, 5, 5, 9], [], None) for _ in range(3)]
    torch.manual_seed(10)
    sent = []
    for n in range(40):  # past max_tokens (16): the regions move twice
        for k, state in enumerate(states):
            state.output_ids = state.output_ids + [(7 * n + 3 * k) % 50]
        logits = torch.randn(len(states), 50)
        x = logits.clone()
        with torch.inference_mode():
            step = Step(states, None, 50, x.device)
            for where, values in edits(x, step):
                x.view(-1)[where] = values
        sent.append(step.uploaded)
        for row, state, mine in zip(logits, states, x, strict=True):
            assert torch.equal(mine, _penalise(row.clone(), state))
    assert len(set(sent[1:])) == 1  # the same few words a step, however long the output


def test_a_sequence_sampled_on_another_thread_keeps_its_penalties():
    """Each thread has its own output pool (a step never sees another thread grow one): a
    sequence that moves sends its output to the new thread's pool once."""
    p = SamplingParams(repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.1)
    state = SampleState(p, [3, 5], [], None)
    torch.manual_seed(11)

    def check(out: list[int]) -> None:
        state.output_ids = out
        logits = torch.randn(50)
        assert torch.equal(new_penalised(logits, state), _penalise(logits.clone(), state))

    check([1, 2])
    with ThreadPoolExecutor(1) as other:
        other.submit(check, [1, 2, 2, 7]).result()
    check([1, 2, 2, 7, 7, 9])


@pytest.mark.parametrize("vocab", [1, 7, 1000, 1009, 128256])
def test_blocked_argmax_is_torchs(vocab):
    x = torch.randint(-3, 4, (4, vocab)).float()  # ties everywhere
    x[1] = float("-inf")
    x[2, -1] = 10.0  # in the last (maybe padded) block
    row_max, argmax = max_and_argmax(x)
    assert torch.equal(argmax, x.argmax(-1)) and torch.equal(row_max, x.amax(-1))


def test_the_tensor_hash_is_splitmix64():
    """draw.py's int64 splitmix64 (wrapping products, logical shifts by masking) gives the
    oracle's uint64 bits (the kernel's rule), for keys and indices across the 64 bits; its
    noise is the oracle's to an ulp of log."""
    gen = torch.Generator().manual_seed(15)
    keys = torch.cat([
        torch.randint(0, 2**62, (60,), generator=gen) * 2 + torch.randint(0, 2, (60,), generator=gen),
        torch.tensor([0, 1, 2**63 - 1, 2**62]),
    ])  # fmt: skip
    index = torch.tensor([0, 1, 7, 255, 501, 2**32, 2**32 + 128255, 2**62, 2**63 - 2])
    bits = splitmix64(keys.unsqueeze(1), index)
    noise = exp_noise(keys.unsqueeze(1), index)
    for a, key in enumerate(keys.tolist()):
        for b, i in enumerate(index.tolist()):
            assert int(bits[a, b]) % 2**64 == oracle._splitmix64(key + (i + 1) * oracle._GOLDEN)
            assert float(noise[a, b]) == pytest.approx(oracle._exp_noise(key, i), rel=5e-16)


# -- the fused CPU ops (dstp/cpu/csrc/sampler_ops.cpp): the same rules in one call each -------

FUSED_OPS = kernels.sampler_ops()
needs_fused = pytest.mark.skipif(FUSED_OPS is None, reason="dstp's CPU kernels are not built")


def fused_probs(logits: torch.Tensor, states: list[SampleState]) -> torch.Tensor:
    """The fused op's filtered distribution of every row, after the fused edits, [B, V]."""
    x = logits.float().clone()
    with torch.inference_mode():
        step = Step(states, None, x.shape[1], x.device, fused=True)
        assert step.ops is not None
        with written(x, edits(x, step)):
            p = step.params
            rows = torch.arange(len(states))
            return FUSED_OPS.filter_probs(x, rows, p.temperature, p.top_k, p.top_p, p.min_p)


@needs_fused
@pytest.mark.parametrize("scale", [FLAT, 1.0, PEAKED])
def test_fused_filter_matches_the_oracle(scale):
    logits, states = mixed_rows(scale)
    for row, state, mine in zip(logits, states, fused_probs(logits, states), strict=True):
        theirs = oracle_probs(row, state)
        assert torch.equal(mine > 0, theirs > 0)
        assert torch.allclose(mine, theirs, rtol=1e-4, atol=1e-7)


@needs_fused
@pytest.mark.parametrize("scale", [0.01, 0.5, 4.0])
def test_fused_top_p_cut_is_the_oracles(scale):
    """Whole 128k rows: bf16-rounded logits (ties), -inf tokens, pairs of equal logits, a
    cut inside a tie class, top_p from tiny to nearly 1."""
    torch.manual_seed(12)
    vocab = 128256
    logits = (torch.randn(7, vocab) * scale).bfloat16().float()
    logits[1, 100:] = float("-inf")
    logits[2, :50000] = logits[2, 50000:100000]
    logits[6] = -10.0
    logits[6, 5000:5010], logits[6, 9000:9300] = 4.0, 1.0  # top_p 0.5 cuts inside the 300
    top_p = [1e-6, 0.3, 0.5, 0.9, 0.99, 0.9999, 0.5]
    states = [SampleState(SamplingParams(temperature=1.0, top_p=p), [0], [], None) for p in top_p]
    ours = fused_probs(logits, states)
    for row, state, mine in zip(logits, states, ours, strict=True):
        assert torch.equal(mine > 0, _filter(row.clone(), state.params) > float("-inf"))
    assert (ours[6] > 0).sum() == 310


def test_seeded_draws_are_the_oracles_keyed_draws(path):
    """On every path (the fused CPU ops, the CPU's plain prefix and whole-row ops, an
    accelerator's whole rows) a seeded row's tokens are the oracle's keyed draws
    (tests/helpers/reference_sampler.py) from the oracle's filtered distribution, at each
    position and for each of n draws: the same tokens everywhere."""
    torch.manual_seed(13)
    vocab = 3000  # not a multiple of the race's 256-token blocks
    kinds = [
        dict(temperature=0.8, top_p=0.9, seed=21, n=2),
        dict(temperature=1.0, top_k=50, repetition_penalty=1.2, seed=22),
        dict(temperature=1.0, min_p=0.05, seed=23, n=3),
        dict(temperature=1.0, seed=24, n=2),  # no filter: the whole row on every path
        dict(temperature=1.0, top_p=0.95, seed=25),  # flat: the prefix path's fallback
        dict(temperature=0.0),
        dict(temperature=1.0),  # unseeded: keyed off the step's random word
    ]
    params = [SamplingParams(**kw) for kw in kinds]
    states = [SampleState(p, [1, 2, 3], [], make_generator(p.seed, 0)) for p in params]
    for step in range(4):
        logits = torch.randn(len(states), vocab) * 2
        logits[4] *= 0.01
        draws = [p.n if step == 0 else 1 for p in params]
        ours = sample(logits, states, draws)
        for i, (state, p) in enumerate(zip(states, params, strict=True)):
            if p.seed is None:
                continue
            probs = oracle_probs(logits[i], state)
            key = oracle.choice_key(p.seed, 0)
            keys = [oracle.draw_key(key, len(state.output_ids), j) for j in range(draws[i])]
            assert [t for t, _ in ours[i]] == [oracle.keyed_draw(probs, k) for k in keys]
        for state, picks in zip(states, ours, strict=True):
            state.output_ids = state.output_ids + [picks[0][0]]


@needs_fused
def test_fused_edit_is_the_oracles_penalties_and_stop_mask():
    p = SamplingParams(
        repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.2, min_tokens=9
    )
    state = SampleState(p, [3, 5, 5, 9, 7], [5, 9, 9, 11, 7], None, frozenset({7, 12}))
    torch.manual_seed(14)
    logits = torch.randn(50) * 3
    x = logits.clone().unsqueeze(0)
    with torch.inference_mode():
        for where, values in edits(x, Step([state], None, 50, x.device, fused=True)):
            x.view(-1)[where] = values
    row = logits.clone()
    row[[7, 12]] = float("-inf")
    assert torch.equal(x[0], _penalise(row, state))


@needs_fused
def test_fused_row_max_argmax_is_torchs():
    x = torch.randint(-3, 4, (5, 1009)).float()
    x[1] = float("-inf")
    x[2, -1] = 10.0
    x[3, 7], x[3, 9] = float("nan"), 99.0
    row_max, argmax = FUSED_OPS.row_max_argmax(x)
    expected = x.max(-1)
    assert torch.equal(row_max.nan_to_num(), expected.values.nan_to_num())
    assert torch.equal(argmax, expected.indices)


@needs_fused
@pytest.mark.parametrize("vocab", [1, 7, 13, 300])  # shorter than, or not a multiple of, 8 lanes
def test_fused_ops_take_rows_of_any_width(vocab):
    torch.manual_seed(vocab)
    kinds = [
        dict(temperature=0.9, top_p=0.8),
        dict(temperature=1.0, top_k=3, min_p=0.1, repetition_penalty=1.3, seed=3, n=2),
        dict(temperature=1.0),
    ]
    params = [SamplingParams(**kw) for kw in kinds]
    states = [SampleState(p, [0], [0], make_generator(p.seed, 0)) for p in params]
    logits = torch.randn(len(states), vocab)
    picks = sample(logits, states, [p.n for p in params])
    assert all(0 <= token < vocab for row in picks for token, _ in row), picks
    for row, state, mine in zip(logits, states, fused_probs(logits, states), strict=True):
        theirs = oracle_probs(row, state)
        assert torch.equal(mine > 0, theirs > 0)
        assert torch.allclose(mine, theirs, rtol=1e-4, atol=1e-7)
