"""One contract, three engines: the fake the server tests use and the real ones behave alike.

Every assertion here runs against ``tests/helpers/fake_engine.FakeEngine``, a real
:class:`Engine` (TP=1 in process, stories260k at fp32) and a ``ReplicatedEngine`` over
that engine with no remote replica: what the server's engine loop and serving layer rely
on from an :class:`EngineClient`. Where the fake and the engine differ, the fake is wrong.
"""

from __future__ import annotations

import pytest

from dstp.engine.llm_engine import Engine, EngineConfig
from dstp.engine.outputs import RequestOutput
from dstp.engine.protocol import EngineClient
from dstp.engine.sampling_params import InvalidRequest, SamplingParams
from tests.helpers.fake_engine import FakeEngine
from tests.helpers.tiny_models import STORIES

PROMPT = "Once upon a time"
MAX_MODEL_LEN = 64
STATS_KEYS = {
    "num_running",
    "num_waiting",
    "kv_blocks_total",
    "kv_blocks_free",
    "kv_usage",
    "prefix_cache_queries",
    "prefix_cache_hits",
    "num_preemptions",
}


@pytest.fixture(scope="module")
def real_engine() -> Engine:
    config = EngineConfig(
        model=str(STORIES), dtype="float32", num_blocks=64, max_model_len=MAX_MODEL_LEN
    )
    return Engine(config)


def _fake() -> FakeEngine:
    from dstp.model.default_model import build_tokenizer

    return FakeEngine(build_tokenizer(), max_model_len=MAX_MODEL_LEN, num_blocks=64)


@pytest.fixture(params=["fake", "engine", "replicated"])
def engine(request) -> EngineClient:
    if request.param == "fake":
        made = _fake()
    elif request.param == "engine":
        made = request.getfixturevalue("real_engine")
    else:
        from dstp.replicas import ReplicatedEngine

        made = ReplicatedEngine(request.getfixturevalue("real_engine"), {})
    yield made
    assert not made.has_unfinished(), "a test left requests behind"


def run(engine: EngineClient, request_id: str, prompt: list[int], params: SamplingParams):
    """Step ``request_id`` to its end: (every output it got, in order)."""
    engine.add_request(request_id, prompt, params)
    got: list[RequestOutput] = []
    while engine.has_unfinished():
        got += [out for out in engine.step() if out.request_id == request_id]
    return got


def greedy(**kwargs) -> SamplingParams:
    return SamplingParams(temperature=0, ignore_eos=True, **kwargs)


def assert_all_blocks_free(engine: EngineClient) -> None:
    stats = engine.stats()
    assert stats.keys() >= STATS_KEYS
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]
    assert (stats["num_running"], stats["num_waiting"]) == (0, 0)


# -- the protocol ----------------------------------------------------------------------------


def test_the_engines_are_engine_clients(engine):
    assert isinstance(engine, EngineClient)


def test_the_replicated_engine_is_an_engine_client(real_engine):
    from dstp.replicas import ReplicatedEngine

    assert isinstance(ReplicatedEngine(real_engine, {}), EngineClient)


# -- a request's life ------------------------------------------------------------------------


def test_a_request_ends_in_one_final_output(engine):
    prompt = engine.tokenizer.encode(PROMPT)
    outs = run(engine, "one", prompt, greedy(max_tokens=8))
    assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
    (final,) = outs[-1].outputs
    assert final.finish_reason == "length" and len(final.token_ids) == 8
    assert outs[-1].prompt_token_ids == prompt
    assert [t for o in outs for t in o.outputs[0].new_token_ids] == final.token_ids
    assert "".join(o.outputs[0].delta_text for o in outs) == final.text
    assert all(o.outputs[0].token_ids == [] for o in outs[:-1])  # totals on the final only
    assert_all_blocks_free(engine)
    assert run(engine, "one", prompt, greedy(max_tokens=2))[-1].finished  # the id is free again


def test_a_request_runs_from_its_first_step_to_its_end(engine):
    engine.add_request("r", engine.tokenizer.encode(PROMPT), greedy(max_tokens=3))
    assert engine.running_request_ids() == set()  # waiting until a step admits it
    engine.step()
    assert engine.running_request_ids() == {"r"}
    while engine.has_unfinished():
        engine.step()
    assert engine.running_request_ids() == set()


def test_logprobs_come_per_token_and_in_total_at_the_end(engine):
    outs = run(engine, "lp", engine.tokenizer.encode(PROMPT), greedy(max_tokens=5, logprobs=2))
    for out in outs:
        (c,) = out.outputs
        assert len(c.new_logprobs) == len(c.new_token_ids)
        assert [lp.token_id for lp in c.new_logprobs] == c.new_token_ids
    final = outs[-1].outputs[0]
    assert [lp.token_id for lp in final.logprobs] == final.token_ids
    assert all(o.outputs[0].logprobs is None for o in outs[:-1])


def test_n_samples_have_one_choice_index_each(engine):
    params = SamplingParams(n=3, max_tokens=6, temperature=1.0, seed=3, ignore_eos=True)
    outs = run(engine, "n", engine.tokenizer.encode(PROMPT), params)
    final = outs[-1]
    assert sorted(c.index for c in final.outputs) == [0, 1, 2]
    for c in final.outputs:
        assert c.finish_reason == "length" and len(c.token_ids) == 6
        streamed = [
            t for o in outs for d in o.outputs if d.index == c.index for t in d.new_token_ids
        ]
        assert streamed == c.token_ids
    assert_all_blocks_free(engine)


def test_context_length_ends_with_length(engine):
    prompt = engine.tokenizer.encode(PROMPT)
    final = run(engine, "ctx", prompt, greedy(max_tokens=500))[-1].outputs[0]
    assert final.finish_reason == "length"
    assert len(prompt) + len(final.token_ids) == engine.max_model_len == MAX_MODEL_LEN


# -- stops -------------------------------------------------------------------------------------


def test_stop_string_cuts_the_text_and_streams_exactly(engine):
    prompt = engine.tokenizer.encode(PROMPT)
    free = run(engine, "free", prompt, greedy(max_tokens=20))[-1].outputs[0]
    stop = free.text[10:16]
    outs = run(engine, "stop", prompt, greedy(max_tokens=20, stop=[stop]))
    final = outs[-1].outputs[0]
    assert final.text == free.text[: free.text.index(stop)]
    assert (final.finish_reason, final.stop_reason) == ("stop", stop)
    assert "".join(o.outputs[0].delta_text for o in outs) == final.text  # never shown, then cut


def test_stop_token_id_ends_the_sample_with_it(engine):
    prompt = engine.tokenizer.encode(PROMPT)
    free = run(engine, "free", prompt, greedy(max_tokens=12))[-1].outputs[0]
    stop_at = free.token_ids[4]
    first = free.token_ids.index(stop_at)
    final = run(engine, "st", prompt, greedy(max_tokens=12, stop_token_ids=[stop_at]))
    final = final[-1].outputs[0]
    assert final.token_ids == free.token_ids[: first + 1]
    assert (final.finish_reason, final.stop_reason) == ("stop", stop_at)


# -- abort -------------------------------------------------------------------------------------


def test_abort_reports_once_and_frees(engine):
    prompt = engine.tokenizer.encode(PROMPT)
    engine.add_request("ab", prompt, greedy(max_tokens=40, n=2))
    engine.step()
    assert engine.stats()["kv_blocks_free"] < engine.stats()["kv_blocks_total"]
    engine.abort("ab")
    engine.abort("never-added")  # ignored
    assert engine.has_unfinished()  # the abort is still to report
    outs = [o for o in engine.step() if o.request_id == "ab"]
    (out,) = outs
    assert out.finished and {c.finish_reason for c in out.outputs} == {"abort"}
    while engine.has_unfinished():
        assert not [o for o in engine.step() if o.request_id == "ab"]
    assert_all_blocks_free(engine)
    engine.abort("ab")  # finished: ignored
    assert not engine.has_unfinished()


# -- refusals ----------------------------------------------------------------------------------


def test_check_request_refuses_what_add_request_would(engine):
    cases = [
        ([], SamplingParams(), "prompt", "empty"),
        ([1, engine.vocab_size], SamplingParams(), "prompt", "must be in"),
        ([5] * engine.max_model_len, SamplingParams(), "prompt", "context is"),
        ([5, 6], SamplingParams(stop_token_ids=[engine.vocab_size]), "stop_token_ids", None),
    ]
    for prompt, params, param, match in cases:
        for call, args in (
            (engine.check_request, (prompt, params)),
            (engine.add_request, ("bad", prompt, params)),
        ):
            with pytest.raises(InvalidRequest, match=match) as info:
                call(*args)
            assert info.value.param == param
    assert not engine.has_unfinished()
    engine.check_request([5] * 10, SamplingParams())  # fine, and adds nothing
    with pytest.raises(InvalidRequest, match="context is 8"):
        engine.check_request([5] * 10, SamplingParams(), max_model_len=8)  # a router's shortest
    assert not engine.has_unfinished()


def test_a_request_id_in_use_is_refused(engine):
    engine.add_request("dup", [5, 6], greedy(max_tokens=2))
    with pytest.raises(InvalidRequest, match="already in use"):
        engine.add_request("dup", [5, 6], greedy(max_tokens=2))
    while engine.has_unfinished():
        engine.step()


def test_heartbeat_and_stats_while_idle(engine):
    engine.heartbeat()
    assert_all_blocks_free(engine)
