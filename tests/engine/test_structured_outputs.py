"""Structured outputs through the real engine (TP=1, stories260K, fp32): every constrained
output follows its grammar, and nothing else changes.

Oracles: ``jsonschema`` and ``re`` for validity; HF's own logits, masked by a fresh
llguidance matcher replayed over the same tokens, for the constrained logprobs; the same
requests without a constraint (or run alone) for everything a constraint must not touch.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import replace

import jsonschema
import llguidance
import llguidance.torch
import pytest
import torch
from transformers import AutoModelForCausalLM

from dstp.engine import Engine, EngineConfig, SamplingParams
from dstp.engine.sampling_params import InvalidRequest, StructuredOutputs
from dstp.engine.structured import GrammarCompiler, GrammarError, MaskJob
from tests.helpers.schemas import PERSON
from tests.helpers.tiny_models import STORIES

PROMPTS = ["Once upon a time", "Lily and Ben went to the park", "The cat said", "One day"]
JSON = StructuredOutputs(json=PERSON)
REGEX = r"[0-9]{3}-[a-z]{2,6}"


def params(**kw) -> SamplingParams:
    return SamplingParams(**{"max_tokens": 80, "temperature": 0.0, **kw})


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(EngineConfig(model=str(STORIES), dtype="float32", num_blocks=256))


@pytest.fixture(scope="module")
def tight_engine() -> Engine:
    """Too few blocks for the batch: rows are preempted and recomputed."""
    cfg = EngineConfig(
        model=str(STORIES), dtype="float32", num_blocks=10, max_num_batched_tokens=48
    )
    return Engine(cfg)


@pytest.fixture(scope="module")
def greedy_json(engine):
    """The greedy JSON answers to PROMPTS, shared by the tests that compare against them."""
    return engine.generate(PROMPTS, params(structured_outputs=JSON))


def texts(outs) -> list[list[str]]:
    return [[c.text for c in out.outputs] for out in outs]


def valid_person(text: str) -> dict:
    value = json.loads(text)
    jsonschema.validate(value, PERSON)
    assert text == json.dumps(value, separators=(",", ":"), ensure_ascii=False), "compact JSON"
    return value


def test_json_schema_greedy_and_seeded_outputs_are_valid(engine, greedy_json):
    sampling = params(
        temperature=1.0, top_p=0.9, seed=7, n=3, repetition_penalty=1.3, structured_outputs=JSON
    )
    seeded = engine.generate(PROMPTS[:2], sampling)
    for out in greedy_json + seeded:
        for choice in out.outputs:
            assert choice.finish_reason == "stop", choice.text
            valid_person(choice.text)
    # the seeded samples are a function of the seed, constrained or not
    again = engine.generate(PROMPTS[:2], sampling)
    assert texts(again) == texts(seeded)
    assert len({c.text for c in seeded[0].outputs}) > 1, "n samples differ"


def test_regex_choice_grammar_and_json_object(engine):
    grammar = 'start: "The answer is " ANSWER "."\nANSWER: "yes" | "no"'
    cases = [
        (StructuredOutputs(regex=REGEX), lambda t: re.fullmatch(REGEX, t)),
        (
            StructuredOutputs(choice=("red", "green", "blue")),
            lambda t: t in {"red", "green", "blue"},
        ),
        (
            StructuredOutputs(grammar=grammar),
            lambda t: t in {"The answer is yes.", "The answer is no."},
        ),
        (StructuredOutputs(json_object=True), lambda t: isinstance(json.loads(t), dict)),
    ]
    compiler = GrammarCompiler(engine.tokenizer, engine.vocab_size)
    greedy, seeded = params(max_tokens=40), params(max_tokens=40, temperature=1.0, seed=3)
    for spec, ok in cases:
        out = engine.generate(
            PROMPTS[:2],
            [replace(greedy, structured_outputs=spec), replace(seeded, structured_outputs=spec)],
        )
        for choice in (o.outputs[0] for o in out):
            if choice.finish_reason == "length":  # an unbounded object may run out of tokens
                assert spec.json_object
                compiler.matcher(spec).replay(choice.token_ids)  # a prefix the grammar takes
                continue
            assert choice.finish_reason == "stop" and ok(choice.text), (spec.kind, choice.text)


def test_free_rows_are_untouched_by_constrained_neighbours(engine):
    free = params(max_tokens=16, logprobs=3, ignore_eos=True)
    alone = engine.generate(PROMPTS, free)
    mixed = engine.generate(PROMPTS * 2, [free] * 4 + [params(structured_outputs=JSON)] * 4)
    for a, m in zip(alone, mixed[:4], strict=True):
        assert a.outputs[0].token_ids == m.outputs[0].token_ids
        for x, y in zip(a.outputs[0].logprobs, m.outputs[0].logprobs, strict=True):
            assert list(x.top) == list(y.top)  # another batch shape: sums may round apart
            assert list(x.top.values()) == pytest.approx(list(y.top.values()), abs=1e-4)
    for m in mixed[4:]:
        valid_person(m.outputs[0].text)


def test_logprobs_are_those_of_the_constrained_distribution(engine):
    """Chosen and top-3 logprobs equal HF's logits with the grammar's mask, log-softmaxed."""
    prompt = engine.tokenizer.encode(PROMPTS[1])
    out = engine.generate([prompt], params(max_tokens=12, structured_outputs=JSON, logprobs=3))
    out = out[0].outputs[0]
    hf = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()
    matcher = GrammarCompiler(engine.tokenizer, engine.vocab_size, engine.eos_ids).matcher(JSON)
    ids = list(prompt)
    for token, logprob in zip(out.token_ids, out.logprobs, strict=True):
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0, -1:].float()
        mask = llguidance.torch.allocate_token_bitmask(1, engine.vocab_size)
        llguidance.torch.fill_next_token_bitmask(matcher.matcher, mask, 0)
        llguidance.torch.apply_token_bitmask_inplace(logits, mask)
        ref = torch.log_softmax(logits[0], dim=-1)
        assert logprob.logprob == pytest.approx(ref[token].item(), abs=1e-4)
        allowed = int((ref > float("-inf")).sum())
        top = ref.topk(min(3, allowed))
        assert list(logprob.top) == top.indices.tolist()  # -inf alternatives are left out
        assert list(logprob.top.values()) == pytest.approx(top.values.tolist(), abs=1e-4)
        matcher.accept(token)
        ids.append(token)


def test_preemption_and_recompute_keep_constrained_outputs(tight_engine, greedy_json):
    tight = tight_engine.generate(PROMPTS, params(structured_outputs=JSON))
    assert tight_engine.stats()["num_preemptions"] > 0
    assert texts(tight) == texts(greedy_json)
    assert tight_engine.scheduler.allocator.num_free == tight_engine.runner.num_blocks


def test_max_tokens_gives_a_valid_prefix_and_stop_strings_cut(engine, greedy_json):
    short = engine.generate(PROMPTS[:1], params(max_tokens=5, structured_outputs=JSON))[0]
    choice = short.outputs[0]
    assert choice.finish_reason == "length" and len(choice.token_ids) == 5
    fresh = GrammarCompiler(engine.tokenizer, engine.vocab_size).matcher(JSON)
    fresh.replay(choice.token_ids)  # a prefix the grammar accepts
    full = greedy_json[0].outputs[0].text
    cut = engine.generate(PROMPTS[:1], params(structured_outputs=JSON, stop=['"mood"']))[0]
    assert cut.outputs[0].text == full[: full.index('"mood"')]
    assert cut.outputs[0].stop_reason == '"mood"'


def test_min_tokens_lets_the_grammar_decide_where_eos_goes(engine):
    """EOS is drawable only where the grammar may end; min_tokens keeps it masked before."""
    spec = StructuredOutputs(regex="[a-z ]{1,40}")
    out = engine.generate(PROMPTS[:2], params(structured_outputs=spec, min_tokens=6))
    for choice in (o.outputs[0] for o in out):
        assert len(choice.token_ids) >= 6 and re.fullmatch("[a-z ]{1,40}", choice.text)


def test_invalid_constraints_are_refused_naming_the_parameter(engine):
    bad = [
        StructuredOutputs(json={"type": "objectx"}),
        StructuredOutputs(json="{not json"),
        StructuredOutputs(regex="a(b"),
        StructuredOutputs(grammar="start: missing_rule"),
        StructuredOutputs(choice=()),
    ]
    for spec in bad:
        with pytest.raises(InvalidRequest) as err:
            engine.add_request(f"bad-{spec.kind}", [1, 2, 3], params(structured_outputs=spec))
        assert err.value.param == "structured_outputs", spec
    with pytest.raises(InvalidRequest, match="exactly one"):
        StructuredOutputs(regex="a", choice=("a",))
    assert not engine.has_unfinished()


def test_compiling_is_cached_and_bounded(engine, monkeypatch):
    """Cached by text, process-wide per tokenizer: a second compiler (the HTTP side's, say)
    finds what the first compiled; a compile past the bound is a GrammarError. (Times are
    the benchmark's: benchmarks/structured.py.)"""
    spec = StructuredOutputs(json={**PERSON, "title": "cache probe"})
    first = GrammarCompiler(engine.tokenizer, engine.vocab_size, engine.eos_ids)
    first.matcher(spec)
    other = GrammarCompiler(engine.tokenizer, engine.vocab_size, engine.eos_ids)
    assert other.tokenizer is first.tokenizer  # llguidance's tokenizer is built once too
    monkeypatch.setattr(other, "_build", lambda text: pytest.fail("compiled twice"))
    fresh = other.matcher(spec)
    fresh.replay(engine.tokenizer.encode('{"name":"a"', add_special_tokens=False)[1:])
    slow = GrammarCompiler(engine.tokenizer, engine.vocab_size, timeout_s=0.05)
    build = slow._build
    monkeypatch.setattr(slow, "_build", lambda text: time.sleep(0.5) or build(text))
    with pytest.raises(GrammarError, match="took over"):
        slow.matcher(StructuredOutputs(json={**PERSON, "title": "uncached"}))


def test_no_masks_without_constraints(engine):
    """A step with no constrained row makes no bitmask (the free path stays as it was)."""
    from dstp.engine.structured import MaskJob

    assert MaskJob([None, None], engine.vocab_size).result() is None
    compiled = GrammarCompiler(engine.tokenizer, engine.vocab_size).matcher(JSON)
    bits = MaskJob([None, compiled], engine.vocab_size).result()
    assert bits.shape == (2, (engine.vocab_size + 31) // 32)
    assert bool((bits[0] == -1).all()) and not bool((bits[1] == -1).all())


def test_a_constraint_after_a_token_leaves_the_output_free_until_it(engine):
    """Reasoning models: the grammar starts after ``</think>``'s id; here after '.'."""
    period = engine.tokenizer.convert_tokens_to_ids(".")
    spec = StructuredOutputs(choice=("yes", "no"), after_token=period)
    free = engine.generate(PROMPTS[:2], params(max_tokens=60, ignore_eos=True))
    out = engine.generate(PROMPTS[:2], params(max_tokens=60, structured_outputs=spec))
    for f, o in zip(free, out, strict=True):
        ids, free_ids = o.outputs[0].token_ids, f.outputs[0].token_ids
        cut = free_ids.index(period) + 1  # the free run's first '.'
        assert ids[:cut] == free_ids[:cut]  # untouched up to and with the token
        assert engine.tokenizer.decode(ids[cut:]) in ("yes", "no")
        assert o.outputs[0].finish_reason == "stop"


def test_a_grammar_whose_tokens_min_tokens_holds_back_ends_the_request(engine):
    """Every token the grammar allows is a stop id held back by min_tokens: each of the n
    samples ends ("stop", empty) instead of failing the request."""
    spec = StructuredOutputs(choice=("yes", "no"))
    bits = MaskJob([GrammarCompiler(engine.tokenizer, engine.vocab_size).matcher(spec)], 512)
    allowed = [t for t in range(engine.vocab_size) if bits.result()[0, t // 32] >> (t % 32) & 1]
    p = params(structured_outputs=spec, stop_token_ids=allowed, min_tokens=2, n=2, seed=1)
    (out,) = engine.generate(PROMPTS[:1], p)
    assert [(c.text, c.finish_reason) for c in out.outputs] == [("", "stop"), ("", "stop")]
    assert not out.error and not engine.has_unfinished()
