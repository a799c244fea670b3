"""Engine behaviour that needs no extra ranks: stop conditions, limits, request validation."""

from __future__ import annotations

import pytest

from dstp.engine.llm_engine import Engine, EngineConfig
from dstp.engine.sampling_params import InvalidRequest, SamplingParams
from tests.helpers.tiny_models import STORIES

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def engine():
    return Engine(
        EngineConfig(model=str(STORIES), dtype="float32", num_blocks=64, max_model_len=64)
    )


def run(engine, params, prompt=PROMPT):
    return engine.generate([prompt], params)[0].outputs[0]


def test_stop_token_id_ends_generation(engine):
    free = run(engine, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    stop_at = free.token_ids[5]
    first = free.token_ids.index(stop_at)
    out = run(engine, SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[stop_at]))
    assert out.token_ids == free.token_ids[: first + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop_at)


def test_stop_string_cuts_text_before_it(engine):
    free = run(engine, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    stop = free.text[20:26]
    out = run(engine, SamplingParams(max_tokens=30, temperature=0, stop=[stop]))
    assert out.text == free.text[: free.text.index(stop)]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop)


def test_eos_stops_unless_ignored(engine):
    eos = engine.tokenizer.eos_token_id
    out = run(engine, SamplingParams(max_tokens=60, temperature=0))
    if out.finish_reason == "stop":
        assert out.token_ids[-1] == eos
    out = run(engine, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    assert out.finish_reason == "length" and len(out.token_ids) == 40


def test_context_length_finishes_with_length(engine):
    prompt_ids = engine.tokenizer.encode(PROMPT)
    out = run(engine, SamplingParams(max_tokens=500, temperature=0, ignore_eos=True), prompt_ids)
    assert out.finish_reason == "length"
    assert len(prompt_ids) + len(out.token_ids) == engine.max_model_len == 64


def test_streamed_deltas_add_up(engine):
    engine.add_request(
        "stream", engine.tokenizer.encode(PROMPT), SamplingParams(max_tokens=15, temperature=0)
    )
    text, ids = "", []
    while engine.has_unfinished():
        for out in engine.step():
            text += out.outputs[0].delta_text
            ids += out.outputs[0].new_token_ids
    assert ids == out.outputs[0].token_ids and text == out.outputs[0].text


def test_bad_requests_are_refused(engine):
    with pytest.raises(InvalidRequest, match="context is 64"):
        engine.add_request("long", list(range(3, 70)), SamplingParams())
    with pytest.raises(InvalidRequest, match="token ids must be in"):
        engine.add_request("vocab", [1, 10_000], SamplingParams())
    with pytest.raises(InvalidRequest, match="empty"):
        engine.add_request("empty", [], SamplingParams())
    engine.add_request("dup", [1, 2], SamplingParams(max_tokens=2))
    with pytest.raises(InvalidRequest, match="already in use"):
        engine.add_request("dup", [1, 2], SamplingParams())
    engine.abort("dup")
    engine.step()
    assert engine.scheduler.allocator.all_free()


def test_partial_characters_are_flushed_at_the_end(engine):
    """Text ending in an incomplete UTF-8 sequence is held back while running, reported when finished."""
    tok = engine.tokenizer
    byte_tokens = [i for i in range(len(tok)) if tok.convert_ids_to_tokens(i).startswith("<0x")]
    if not byte_tokens:
        pytest.skip("tokenizer has no byte-fallback tokens")
    lead = tok.convert_tokens_to_ids("<0xE2>")  # first byte of a 3-byte character
    out = engine.generate(
        [[1, 50, 60]], SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    )[0].outputs[0]
    full = engine.tokenizer.decode(out.token_ids, skip_special_tokens=True)
    assert out.text == full
    stream = engine.detokenizer.stream([1, 50, 60])
    assert stream.step(lead) == ""  # held while the character is incomplete
    assert stream.flush() == engine.tokenizer.decode([lead]) != ""


def _finish_all(engine) -> dict:
    finals = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    return finals


class _BrokenStream:
    def step(self, token_id: int) -> str:
        raise RuntimeError("detokenizer broke")

    def flush(self) -> str:
        return ""


def test_a_request_that_fails_on_its_own_ends_alone(engine):
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    ids = engine.tokenizer.encode(PROMPT)
    for rid in ("a", "bad", "c"):
        engine.add_request(rid, ids, params)
    engine.step()  # prefill, first tokens
    engine.scheduler.requests["bad"].seqs[0].text_stream = _BrokenStream()
    finals = _finish_all(engine)
    assert finals["bad"].outputs[0].finish_reason == "error"
    assert "detokenizer broke" in finals["bad"].error
    assert [finals[r].outputs[0].finish_reason for r in "ac"] == ["length", "length"]
    assert finals["a"].outputs[0].text == finals["c"].outputs[0].text != ""
    assert engine.scheduler.allocator.all_free()


def test_non_finite_logits_fail_their_request_only(engine, monkeypatch):
    real, calls = engine.runner.execute, []

    def first_row_nan_once(plan):
        logits = real(plan).clone()
        if not calls:
            logits[0] = float("nan")
        calls.append(1)
        return logits

    monkeypatch.setattr(engine.runner, "execute", first_row_nan_once)
    params = SamplingParams(max_tokens=6, temperature=0.7, seed=1, ignore_eos=True, n=2)
    ids = engine.tokenizer.encode(PROMPT)
    engine.add_request("nan", ids, params)
    engine.add_request("ok", ids, params)
    finals = _finish_all(engine)
    assert [c.finish_reason for c in finals["nan"].outputs] == ["error"]
    assert "non-finite" in finals["nan"].error
    assert [c.finish_reason for c in finals["ok"].outputs] == ["length", "length"]
    assert engine.scheduler.allocator.all_free()


def test_a_context_cut_to_the_kv_cache_is_a_warning(caplog):
    with caplog.at_level("WARNING", logger="dstp"):
        small = Engine(EngineConfig(model=str(STORIES), dtype="float32", num_blocks=2))
    assert small.max_model_len == 32
    assert "max_model_len cut from 512 to 32" in caplog.text
    assert "raise --num-kv-blocks" in caplog.text


def test_a_context_past_the_trained_one_is_refused_unless_allowed(monkeypatch):
    """One rule for the server's flag check and the library: no silent clamp either way."""
    from dstp.engine.config import ALLOW_LONG_ENV

    config = EngineConfig(model=str(STORIES), dtype="float32", num_blocks=80, max_model_len=1024)
    monkeypatch.delenv(ALLOW_LONG_ENV, raising=False)
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings 512"):
        Engine(config)
    monkeypatch.setenv(ALLOW_LONG_ENV, "1")
    assert Engine(config).max_model_len == 1024  # 80 blocks x 16 hold it: not cut to 512
