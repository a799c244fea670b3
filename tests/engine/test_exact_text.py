"""Every text the engine returns is the tokenizer's own ``decode``.

The property, on the full decode (special tokens skipped): the completion text is
exactly how ``decode(prompt + output)`` ends, and what comes before it is
``decode(prompt)``, except where the output continues the prompt's end: an
incomplete last character (U+FFFD) it completes, or a trailing run of byte tokens
(SentencePiece's byte fallback decodes a run as one group: a run left invalid turns
every byte into U+FFFD, the prompt's included). Streamed deltas concatenate to the final text, also when a stop string
spans tokens. Checked on the real stories260k SentencePiece-style tokenizer and on
a byte-level BPE trained here, on random token sequences (byte runs, invalid
UTF-8, special tokens), alone and through the engine (TP=1, in process), greedy
and sampled.
"""

from __future__ import annotations

import random

import pytest

from dstp.engine.detokenizer import Detokenizer, find_stop, partial_stop_len
from dstp.engine.llm_engine import Engine, EngineConfig
from dstp.engine.sampling_params import SamplingParams
from tests.helpers.text_tokenizers import CORPUS, byte_level_bpe
from tests.helpers.tiny_models import STORIES, llama_config, save_random_model


def _stories_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(STORIES)


TOKENIZERS = {
    "sentencepiece": _stories_tokenizer,
    "byte_bpe": pytest.param(byte_level_bpe),
}


def decode(tok, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=True)


def stable_prompt(tok, prompt: list[int]) -> list[int]:
    """The prompt without its trailing run of byte fallback (or special) tokens, which
    the output may continue."""
    run = Detokenizer(tok).byte_tokens
    end = len(prompt)
    while end > 0 and prompt[end - 1] in run:
        end -= 1
    return prompt[:end]


def assert_exact(tok, prompt: list[int], output: list[int], text: str) -> None:
    """The completion is the tail of the full decode; before it, the prompt's text."""
    full = decode(tok, prompt + output)
    assert full.endswith(text), (text, full)
    head = full[: len(full) - len(text)]
    # an incomplete last character (U+FFFD) may be completed by the output
    settled = decode(tok, stable_prompt(tok, prompt)).rstrip("\ufffd")
    if settled == decode(tok, prompt):  # nothing to continue: the prompt reads as alone
        assert head == settled, (settled, text, full)
    else:
        assert head.startswith(settled), (settled, text, full)


@pytest.mark.parametrize("make", TOKENIZERS.values(), ids=TOKENIZERS.keys())
def test_random_token_sequences_stream_exactly(make):
    tok = make()
    detok = Detokenizer(tok)
    rng = random.Random(0)
    for _ in range(600):
        prompt, output = random_case(tok, rng)
        stream = detok.stream(prompt)
        text = "".join(stream.step(t) for t in output) + stream.flush()
        assert_exact(tok, prompt, output, text)


def test_stop_string_search_and_hold_back():
    assert find_stop("a time, there", 0, ["there", "time"]) == (2, "time")
    assert find_stop("abcdef", 5, ["cd"]) is None  # ended before the new text
    assert find_stop("abcdef", 4, ["de"]) == (3, "de")
    assert partial_stop_len("Once upon a ti", ["time, there"]) == 2
    assert partial_stop_len("Once upon a time,", ["time, there", "x"]) == 5
    assert partial_stop_len("Once upon", ["time"]) == 0
    assert partial_stop_len("abab", ["abac"]) == 2
    assert partial_stop_len("x", ["x"]) == 0  # a whole match is found, not held


def random_case(tok, rng: random.Random) -> tuple[list[int], list[int]]:
    """(prompt, output): text from the corpus, or random ids (byte runs at the boundary)."""
    if rng.random() < 0.5:
        source = rng.choice(CORPUS)
        start = rng.randrange(len(source))
        prompt = tok.encode(source[start : start + rng.randrange(1, 40)] or "x")
    else:
        prompt = [rng.randrange(len(tok)) for _ in range(rng.randrange(1, 20))]
    return prompt, [rng.randrange(len(tok)) for _ in range(rng.randrange(0, 40))]


# -- through the engine ------------------------------------------------------------
PROMPTS = ["Once upon a time", "The cat sat", "Lily and Ben", "Café déjà", "日本語の", "🙂 emoji"]


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    made = {}
    bpe = byte_level_bpe()
    path = tmp_path_factory.mktemp("byte_bpe_llama")
    save_random_model(
        llama_config(vocab_size=len(bpe), num_attention_heads=4, num_key_value_heads=2),
        path,
    )
    bpe.save_pretrained(path)
    made["byte_bpe"] = path
    made["sentencepiece"] = STORIES
    sp = _stories_tokenizer()
    path = tmp_path_factory.mktemp("sentencepiece_random")  # random tokens, bytes included
    save_random_model(
        llama_config(vocab_size=len(sp), num_attention_heads=4, num_key_value_heads=2), path
    )
    sp.save_pretrained(path)
    made["sentencepiece_random"] = path
    return {
        name: Engine(EngineConfig(model=str(p), dtype="float32", num_blocks=128, max_model_len=96))
        for name, p in made.items()
    }


def run_many(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> dict:
    """Finish every prompt in one batch: request id -> (streamed text, final output)."""
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    deltas: dict[str, str] = {}
    final = {}
    while engine.has_unfinished():
        for out in engine.step():
            deltas[out.request_id] = deltas.get(out.request_id, "") + out.outputs[0].delta_text
            if out.finished:
                final[out.request_id] = out
    return {rid: (deltas[rid], out.outputs[0]) for rid, out in final.items()}


def run_streamed(engine: Engine, prompt: list[int], params: SamplingParams) -> list:
    """Finish one request step by step; per sample: (deltas joined, final output)."""
    engine.add_request("r", prompt, params)
    deltas: dict[int, str] = {}
    final = None
    while engine.has_unfinished():
        for out in engine.step():
            for c in out.outputs:
                deltas[c.index] = deltas.get(c.index, "") + c.delta_text
            final = out
    assert final is not None and final.finished
    return [(deltas[c.index], c) for c in final.outputs]


SAMPLING = {
    "greedy": SamplingParams(max_tokens=40, temperature=0, ignore_eos=True),
    "sampled": SamplingParams(max_tokens=40, temperature=1.0, seed=7, n=2, ignore_eos=True),
}


@pytest.mark.parametrize("name", ["sentencepiece", "byte_bpe"])
@pytest.mark.parametrize("mode", SAMPLING)
def test_engine_text_is_the_tokenizers_decode(engines, name, mode):
    engine = engines[name]
    tok = engine.tokenizer
    for prompt_text in PROMPTS:
        prompt = tok.encode(prompt_text)
        for streamed, out in run_streamed(engine, prompt, SAMPLING[mode]):
            assert streamed == out.text
            assert_exact(tok, prompt, out.token_ids, out.text)
    assert engine.scheduler.allocator.all_free()


def test_stop_string_spanning_tokens_is_held_back_while_streaming(engines):
    engine = engines["sentencepiece"]
    tok = engine.tokenizer
    prompt = tok.encode("Once upon")
    greedy = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    ((_, free),) = run_streamed(engine, prompt, greedy)
    # " a time, there" spans several tokens; its start appears in the deltas before the rest
    stop = free.text[2:14]
    assert len(tok.encode(stop, add_special_tokens=False)) > 1
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop=[stop])
    ((streamed, out),) = run_streamed(engine, prompt, params)
    assert out.text == free.text[: free.text.index(stop)] == streamed
    assert (out.finish_reason, out.stop_reason) == ("stop", stop)
    # a partial match that never completes is released: nothing is lost
    never = free.text[5:12] + "\x00never"
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop=[never])
    ((streamed, out),) = run_streamed(engine, prompt, params)
    assert streamed == out.text == free.text and out.finish_reason == "length"


@pytest.mark.parametrize("name", ["sentencepiece_random", "byte_bpe"])
def test_random_sequences_through_the_engine(engines, name):
    """60 random prompts per tokenizer (byte runs at the boundary among them), each
    continued by a random-weight model sampling over the whole vocabulary."""
    engine = engines[name]
    tok = engine.tokenizer
    rng = random.Random(1)
    prompts = [random_case(tok, rng)[0] for _ in range(60)]
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=3, ignore_eos=True)
    done = run_many(engine, prompts, params)
    assert len(done) == len(prompts)
    for rid, (streamed, out) in done.items():
        assert streamed == out.text and len(out.token_ids) == 12
        assert_exact(tok, prompts[int(rid)], out.token_ids, out.text)
    assert engine.scheduler.allocator.all_free()
