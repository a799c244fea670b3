"""Structured outputs (issue 23 item 6): the cost of a constrained decode step and of compiling.

    python benchmarks/structured.py [--batch 64] [--rounds 4] [--warmup 3] [--steps 12]
                                    [--vocab 32000] [--hidden 768] [--layers 4]
                                    [--dtype float32] [--threads N] [--compile-reps 7] [--workdir DIR]
                                    [--skip-engine] [--skip-compile] [--others] [--llg-apply]

1. **A constrained step.** A batch of ``--batch`` requests through the real TP=1 ``Engine``,
   every row under one JSON schema (an object holding a long array of small objects with
   bounded strings, an enum, an integer and a boolean, so the rows keep walking through the
   grammar's structure), against the same rows free: same prompts, greedy, ``ignore_eos``,
   ``max_tokens`` so that every row runs all measured steps. Each ``engine.step()`` is timed
   once all rows are decoding (prefill steps are skipped, then ``--warmup`` more); free and
   constrained runs alternate (A, B, A, B, ...) so load on the machine hits both alike.
   Prints the median ms/step of each, their ratio, and a breakdown from one instrumented
   constrained run: the wait for the mask after the forward (0 when the fill ran entirely
   beside it), applying it in the sampler, and advancing the matchers. Then the mask fill
   alone (``MaskJob`` over all rows, the same token sequences replayed) with nothing else
   running.
2. **Compiling.** A typical schema (a pydantic-style object with ~10 fields: a nested
   object, an enum, an array, optional fields) through ``GrammarCompiler.matcher``: cold (a
   text not seen before; a fresh compiler for each, so nothing is cached) and cached (the
   same text again), medians of ``--compile-reps``; plus the first mask of a fresh matcher
   (llguidance builds its lexer lazily, so part of the work lands there) and building the
   compiler itself (converting the tokenizer, once per engine). With the 32k tokenizer and
   with the packaged stories260K one (512 tokens).
3. ``--others``: the same compile and mask figures through xgrammar and outlines-core when
   they are installed (skipped, and said so, when not).

The mask costs scale with the vocabulary, so the model is a random Llama whose vocabulary
is a byte-level BPE of ``--vocab`` tokens trained here with ``tokenizers`` on the Python
sources of the installed ``transformers`` package (offline; deterministic for a given
installed version: the vocabulary's hash is printed). Tokenizer and model are written to
``--workdir`` (default: a temporary folder, removed at the end) and reused when present.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.helpers

from benchmarks.sysinfo import machine  # noqa: E402
from dstp.engine import Engine, EngineConfig, SamplingParams  # noqa: E402
from dstp.engine.sampling_params import StructuredOutputs  # noqa: E402
from dstp.engine.structured import GrammarCompiler, MaskJob  # noqa: E402
from dstp.engine.structured.matcher import GrammarState  # noqa: E402

# Keeps every row generating: 1000 items of bounded fields, so the grammar cycles through
# keys, strings, numbers, enums and booleans rather than sitting in one long string.
DECODE_SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 24},
        "items": {
            "type": "array",
            "minItems": 1000,
            "items": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer", "minimum": 0, "maximum": 99999},
                    "name": {"type": "string", "maxLength": 16},
                    "kind": {"enum": ["book", "film", "song", "game"]},
                    "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}},
                    "ok": {"type": "boolean"},
                },
                "required": ["id", "name", "kind", "tags", "ok"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["title", "items"],
    "additionalProperties": False,
}


def typical_schema(tag: int) -> dict:
    """What ``model_json_schema()`` gives for a ~10-field pydantic model with a nested
    model, an enum and a list; ``tag`` changes the text (not the language) for a cold run."""
    return {
        "$defs": {
            "Address": {
                "properties": {
                    "street": {"title": "Street", "type": "string"},
                    "city": {"title": "City", "type": "string"},
                    "zip": {"title": "Zip", "type": "string", "pattern": "^[0-9]{5}$"},
                },
                "required": ["street", "city", "zip"],
                "title": "Address",
                "type": "object",
            },
            "Status": {"enum": ["active", "suspended", "closed"], "title": "Status"},
        },
        "properties": {
            "id": {"title": "Id", "type": "integer", "minimum": 1},
            "name": {"title": "Name", "type": "string", "maxLength": 64},
            "email": {"title": "Email", "type": "string", "format": "email"},
            "age": {"anyOf": [{"type": "integer"}, {"type": "null"}], "default": None},
            "score": {"title": "Score", "type": "number", "minimum": 0, "maximum": 100},
            "verified": {"title": "Verified", "type": "boolean"},
            "status": {"$ref": "#/$defs/Status"},
            "address": {"$ref": "#/$defs/Address"},
            "tags": {"items": {"type": "string"}, "title": "Tags", "type": "array"},
            "created": {"title": "Created", "type": "string", "format": "date-time"},
        },
        "required": ["id", "name", "email", "score", "verified", "status", "address", "tags"],
        "title": "Customer",
        "description": f"A customer record (variant {tag}).",
        "type": "object",
    }


# -- the tokenizer and the model ----------------------------------------------------------


def build_tokenizer(folder: Path, vocab: int) -> Path:
    """A byte-level BPE of ``vocab`` tokens (specials included), saved as an HF fast tokenizer."""
    if (folder / "tokenizer.json").exists():
        return folder
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    root = Path(sysconfig.get_paths()["purelib"]) / "transformers"
    files, size = [], 0
    for path in sorted(root.rglob("*.py")):  # sorted: the same corpus every time
        files.append(str(path))
        size += path.stat().st_size
        if size > 12e6:
            break
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is a token
        show_progress=False,
    )
    tok.train(files, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(folder)
    return folder


def build_model(folder: Path, vocab: int, hidden: int, layers: int) -> Path:
    """A random Llama with the tokenizer's vocabulary, next to the tokenizer in ``folder``."""
    if (folder / "config.json").exists():
        return folder
    from tests.helpers.tiny_models import llama_config, save_random_model

    config = llama_config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3 // 64 * 64,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=max(1, hidden // 256),
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    return save_random_model(config, folder)


def vocab_hash(folder: Path) -> str:
    vocab = json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]
    return hashlib.sha256(json.dumps(vocab, sort_keys=True).encode()).hexdigest()[:12]


# -- 1. the constrained step ----------------------------------------------------------------


def prompts(tokenizer, batch: int) -> list[list[int]]:
    """``batch`` different prompts of 16-40 tokens (text from this file)."""
    words = Path(__file__).read_text().split()
    out = []
    for i in range(batch):
        ids = tokenizer.encode(" ".join(words[i * 7 : i * 7 + 12 + i % 20]))
        out.append(ids[: 16 + i % 25])
    return out


def decode_run(
    engine: Engine, ids: list[list[int]], params: SamplingParams, warmup: int, steps: int
):
    """Adds the rows, then steps the engine, yielding (wall ms, process CPU ms) of each of
    ``steps`` steps taken while every row decodes (after the prefill steps and ``warmup``
    more); returns each row's output ids (aborting the rest). CPU time counts every thread
    of the process (the mask worker's included) and is far less disturbed than wall time by
    other processes on a shared machine."""
    sched = engine.scheduler
    for i, prompt in enumerate(ids):
        engine.add_request(f"r{i}", prompt, params)
    taken, decoding = 0, 0
    outputs: dict[str, list[int]] = {}
    while engine.has_unfinished():
        running = sched.running
        all_decode = len(running) == len(ids) and all(s.output_ids for s in running)
        started, cpu = time.perf_counter(), time.process_time()
        for out in engine.step():
            outputs[out.request_id] = out.outputs[0].token_ids
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
        if all_decode:
            decoding += 1
            if decoding > warmup:
                taken += 1
                yield elapsed * 1e3, cpu * 1e3
            if taken == steps:
                for i in range(len(ids)):
                    engine.abort(f"r{i}")
    while engine.has_unfinished():  # report the aborts
        engine.step()
    return [list(outputs[f"r{i}"]) for i in range(len(ids))]


def decode_steps(engine, ids, params, warmup: int, steps: int):
    """:func:`decode_run` to the end: (the steps' wall ms, the outputs)."""
    run = decode_run(engine, ids, params, warmup, steps)
    times = []
    while True:
        try:
            times.append(next(run)[0])
        except StopIteration as stop:
            return times, stop.value


def alternate(a, b) -> tuple[list, list, list, list]:
    """Steps two runs in turn (a, b, a, b, ...): their (wall, CPU) step times and outputs."""
    times: tuple[list, list] = ([], [])
    results: list = [None, None]
    live = [a, b]
    while any(r is not None for r in live):
        for k, run in enumerate(live):
            if run is None:
                continue
            try:
                times[k].append(next(run))
            except StopIteration as stop:
                results[k], live[k] = stop.value, None
    return times[0], times[1], results[0], results[1]


class Breakdown:
    """Instrumentation for one constrained run: where a constrained step's extra time goes."""

    def __init__(self) -> None:
        import dstp.engine.sampling.sampler as sampler

        self.wait, self.apply, self.accept = [], [], []
        real_result, real_constrain = MaskJob.result, sampler.constrain
        real_accept = GrammarState.accept

        def result(job):
            t = time.perf_counter()
            out = real_result(job)
            self.wait.append(time.perf_counter() - t)
            return out

        def constrain(x, bits):
            t = time.perf_counter()
            out = real_constrain(x, bits)
            self.apply.append(time.perf_counter() - t)
            return out

        def accept(state, token):
            t = time.perf_counter()
            real_accept(state, token)
            self.accept.append(time.perf_counter() - t)

        MaskJob.result, sampler.constrain, GrammarState.accept = result, constrain, accept
        self._undo = [
            lambda: setattr(MaskJob, "result", real_result),
            lambda: setattr(sampler, "constrain", real_constrain),
            lambda: setattr(GrammarState, "accept", real_accept),
        ]

    def close(self) -> None:
        for undo in self._undo:
            undo()


def make_engine(model: Path, args: argparse.Namespace) -> Engine:
    return Engine(
        EngineConfig(
            model=str(model),
            dtype=args.dtype,
            num_blocks=args.batch * 8,
            max_num_seqs=args.batch,
            max_num_batched_tokens=4096,
            enable_prefix_caching=False,
        )
    )


def bench_engine(model: Path, args: argparse.Namespace) -> dict:
    """Two engines on the same checkpoint, one for the free rows and one for the constrained
    rows, stepped in turn: load on the machine lands on both alike, step by step."""
    engines = {"free": make_engine(model, args), "constrained": make_engine(model, args)}
    ids = prompts(engines["free"].tokenizer, args.batch)
    max_tokens = args.warmup + args.steps + 8
    spec = StructuredOutputs(json=DECODE_SCHEMA)
    params = {
        "free": SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
        "constrained": SamplingParams(
            max_tokens=max_tokens, temperature=0.0, ignore_eos=True, structured_outputs=spec
        ),
    }
    for name, engine in engines.items():  # warm up; compiles the grammar once
        decode_steps(engine, ids, params[name], 1, 2)
    runs: dict[str, list[float]] = {"free": [], "constrained": []}
    cpus: dict[str, list[float]] = {"free": [], "constrained": []}
    pairs, cpu_pairs, per_round = [], [], []
    for r in range(args.rounds):
        order = ["free", "constrained"] if r % 2 == 0 else ["constrained", "free"]
        gens = [decode_run(engines[n], ids, params[n], args.warmup, args.steps) for n in order]
        t0, t1, o0, o1 = alternate(*gens)
        got = {order[0]: (t0, o0), order[1]: (t1, o1)}
        for name in runs:
            runs[name] += [w for w, _ in got[name][0]]
            cpus[name] += [c for _, c in got[name][0]]
        for (fw, fc), (cw, cc) in zip(got["free"][0], got["constrained"][0], strict=False):
            pairs.append(cw / fw)
            cpu_pairs.append(cc / fc)
        tokens = got["constrained"][1]
        row = {n: statistics.median(w for w, _ in got[n][0]) for n in runs}
        per_round.append(row)
        print(
            f"  round {r + 1}: free {row['free']:.1f} ms/step, "
            f"constrained {row['constrained']:.1f} ms/step",
            flush=True,
        )
    engine = engines["constrained"]
    sample_text = engine.tokenizer.decode(tokens[0][:60])
    probe = Breakdown()
    try:
        times, _ = decode_steps(engine, ids, params["constrained"], args.warmup, args.steps)
    finally:
        probe.close()
    n = args.warmup + args.steps + 1  # the instrumented run's decode steps (+ the prefill's)
    fill = mask_fill_alone(engine, spec, tokens)
    free_ms, con_ms = statistics.median(runs["free"]), statistics.median(runs["constrained"])
    return {
        "vocab": engine.vocab_size,
        "steps": len(runs["free"]),
        "free_ms": free_ms,
        "constrained_ms": con_ms,
        "ratio": con_ms / free_ms,
        "pair_ratio": statistics.median(pairs),
        "free_cpu_ms": statistics.median(cpus["free"]),
        "constrained_cpu_ms": statistics.median(cpus["constrained"]),
        "cpu_ratio": statistics.median(cpus["constrained"]) / statistics.median(cpus["free"]),
        "cpu_pair_ratio": statistics.median(cpu_pairs),
        "ratio_per_round": [r["constrained"] / r["free"] for r in per_round],
        "instrumented_ms": statistics.median(times),
        "wait_ms": 1e3 * statistics.median(probe.wait[1:]),
        "apply_ms": 1e3 * statistics.median(probe.apply[1:]),
        "accept_ms": 1e3 * sum(probe.accept) / n,
        "fill": fill,
        "sample": sample_text,
        "tokens": tokens,
    }


def mask_fill_alone(engine: Engine, spec: StructuredOutputs, tokens) -> dict:
    """``MaskJob`` over all rows with nothing else running, the rows replaying the tokens
    the constrained run produced: ms per fill (median over the replayed steps). Then
    applying those masks to logits: dstp's ``constrain`` (torch ops, any device) against
    llguidance's CPU kernel (``apply_token_bitmask_inplace`` on a copy), in turn."""
    import llguidance.torch

    from dstp.engine.sampling.constraints import constrain

    states = [engine.grammars.matcher(spec) for _ in tokens]
    times, masks = [], []
    steps = min(len(t) for t in tokens)
    for k in range(steps):
        t = time.perf_counter()
        mask = MaskJob(states, engine.vocab_size).result()
        if k >= 1:
            times.append((time.perf_counter() - t) * 1e3)
            masks.append(mask)
        for state, row in zip(states, tokens, strict=True):
            state.accept(row[k])
    logits = torch.randn(len(tokens), engine.vocab_size, generator=torch.Generator().manual_seed(0))
    dstp_ms, llg_ms = [], []
    for mask in masks:
        t = time.perf_counter()
        ours = constrain(logits, mask)
        dstp_ms.append((time.perf_counter() - t) * 1e3)
        t = time.perf_counter()
        theirs = logits.clone()
        llguidance.torch.apply_token_bitmask_inplace(theirs, mask)
        llg_ms.append((time.perf_counter() - t) * 1e3)
        assert torch.equal(ours, theirs)
    allowed = statistics.median(
        float(((m.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1).sum()) / m.shape[0]
        for m in masks
    )
    return {
        "ms": statistics.median(times),
        "steps": len(times),
        "rows": len(tokens),
        "allowed_per_row": allowed,
        "apply_dstp_ms": statistics.median(dstp_ms),
        "apply_llg_ms": statistics.median(llg_ms),
    }


def use_llguidance_apply() -> None:
    """Swap the sampler's ``constrain`` for llguidance's CPU kernel on a copy (a what-if:
    CPU logits only)."""
    import llguidance.torch

    import dstp.engine.sampling.sampler as sampler

    def constrain(x: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        llguidance.torch.apply_token_bitmask_inplace(out, bitmask)
        return out

    sampler.constrain = constrain
    print("what-if: masks applied by llguidance.torch.apply_token_bitmask_inplace")


# -- 2. compiling ---------------------------------------------------------------------------


def bench_compile(tokenizer, vocab: int, eos: frozenset[int], reps: int) -> dict:
    t = time.perf_counter()
    GrammarCompiler(tokenizer, vocab, eos)
    setup_ms = (time.perf_counter() - t) * 1e3
    compilers = [GrammarCompiler(tokenizer, vocab, eos) for _ in range(reps + 1)]
    cold, cached, first_mask = [], [], []
    for i, compiler in enumerate(compilers):  # cold and cached alternate
        spec = StructuredOutputs(json=typical_schema(1000 + i))
        t = time.perf_counter()
        state = compiler.matcher(spec)
        c = time.perf_counter() - t
        t = time.perf_counter()
        compiler.matcher(spec)
        h = time.perf_counter() - t
        t = time.perf_counter()
        MaskJob([state], vocab).result()
        m = time.perf_counter() - t
        if i:  # the first pays one-time imports and thread starts
            cold.append(c * 1e3)
            cached.append(h * 1e3)
            first_mask.append(m * 1e3)
    return {
        "vocab": vocab,
        "setup_ms": setup_ms,
        "cold_ms": statistics.median(cold),
        "cold_max_ms": max(cold),
        "cached_ms": statistics.median(cached),
        "first_mask_ms": statistics.median(first_mask),
    }


# -- 3. other libraries ---------------------------------------------------------------------


def bench_others(tokenizer, vocab: int, reps: int, tokens: list[list[int]] | None) -> dict:
    """Compile (cold: a new text each time) and a one-row first mask through xgrammar and
    outlines-core if installed; for xgrammar also the step's mask over every row (one
    thread, as dstp gives llguidance on 2 cores), replaying the constrained run's tokens."""
    results = {}
    try:
        import xgrammar as xgr

        t = time.perf_counter()
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
        setup = time.perf_counter() - t
        cold, masks = [], []
        for i in range(reps + 1):
            compiler = xgr.GrammarCompiler(info, cache_enabled=False)
            t = time.perf_counter()
            compiled = compiler.compile_json_schema(
                json.dumps(typical_schema(2000 + i)), any_whitespace=False, separators=(",", ":")
            )
            c = time.perf_counter() - t
            matcher = xgr.GrammarMatcher(compiled)
            bits = xgr.allocate_token_bitmask(1, vocab)
            t = time.perf_counter()
            matcher.fill_next_token_bitmask(bits, 0)
            m = time.perf_counter() - t
            if i:
                cold.append(c * 1e3)
                masks.append(m * 1e3)
        t = time.perf_counter()
        compiled = xgr.GrammarCompiler(info, cache_enabled=False).compile_json_schema(
            json.dumps(DECODE_SCHEMA), any_whitespace=False, separators=(",", ":")
        )
        decode_compile = time.perf_counter() - t
        tokens = [row for row in tokens or [] if _xgr_accepts(xgr, compiled, row)]
        matchers = [xgr.GrammarMatcher(compiled) for _ in tokens]
        bits = xgr.allocate_token_bitmask(max(1, len(tokens)), vocab)
        fills = []
        for k in range(min((len(t) for t in tokens), default=0)):  # the rows llguidance replayed
            t = time.perf_counter()
            for i, m in enumerate(matchers):
                m.fill_next_token_bitmask(bits, i)
            if k >= 1:
                fills.append((time.perf_counter() - t) * 1e3)
            for m, row in zip(matchers, tokens, strict=True):
                assert m.accept_token(row[k])
        results["xgrammar"] = {
            "version": _version("xgrammar"),
            "setup_ms": setup * 1e3,
            "cold_ms": statistics.median(cold),
            "first_mask_ms": statistics.median(masks),
            "decode_schema_compile_ms": decode_compile * 1e3,
            "fill_ms": statistics.median(fills) if fills else None,
            "fill_rows": len(tokens),
        }
    except ImportError as exc:
        results["xgrammar"] = {"skipped": str(exc)}
    try:
        from outlines_core import Guide, Index, Vocabulary
        from outlines_core.json_schema import build_regex_from_schema

        results["outlines-core"] = _outlines(
            tokenizer, vocab, min(reps, 3), Guide, Index, Vocabulary, build_regex_from_schema
        )
        results["outlines-core"]["version"] = _version("outlines-core")
    except ImportError as exc:
        results["outlines-core"] = {"skipped": str(exc)}
    return results


def _xgr_accepts(xgr, compiled, row: list[int]) -> bool:
    """Whether xgrammar accepts a row llguidance produced (it refuses a token that ends
    inside a string escape, such as ``"^\\``, where llguidance waits for the next one)."""
    matcher = xgr.GrammarMatcher(compiled)
    return all(matcher.accept_token(t) for t in row)


def _outlines(tokenizer, vocab, reps, Guide, Index, Vocabulary, build_regex) -> dict:
    """outlines-core precompiles the whole schema into an index over the vocabulary."""
    eos = tokenizer.eos_token_id
    byte_decoder = {v: k for k, v in _bytes_to_unicode().items()}
    pieces: dict[str, list[int]] = {}
    for token, i in tokenizer.get_vocab().items():
        if i == eos or token in tokenizer.all_special_tokens:
            continue
        text = bytes(byte_decoder[c] for c in token).decode("utf-8", errors="replace")
        pieces.setdefault(text, []).append(i)
    t = time.perf_counter()
    vocabulary = Vocabulary(eos, pieces)
    setup = time.perf_counter() - t
    cold, masks = [], []
    for i in range(reps + 1):
        regex = build_regex(json.dumps(typical_schema(3000 + i)))
        t = time.perf_counter()
        index = Index(regex, vocabulary)
        c = time.perf_counter() - t
        guide = Guide(index)
        t = time.perf_counter()
        guide.get_tokens()
        m = time.perf_counter() - t
        if i:
            cold.append(c * 1e3)
            masks.append(m * 1e3)
    return {
        "setup_ms": setup * 1e3,
        "cold_ms": statistics.median(cold),
        "cold_max_ms": max(cold),
        "first_mask_ms": statistics.median(masks),
        "vocab": vocab,
    }


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (what the ByteLevel pre-tokenizer uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


# -- main -------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--compile-reps", type=int, default=7)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--skip-engine", action="store_true")
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--others", action="store_true")
    parser.add_argument(
        "--llg-apply",
        action="store_true",
        help="what-if: the sampler applies masks with llguidance's CPU kernel, not constrain",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.llg_apply:
        use_llguidance_apply()
    info = machine()
    print(
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {info.get('cpu')}, "
        f"{info.get('cpus')} CPUs, {'/'.join(info.get('isa', []))}, "
        f"load {info.get('load_avg_1m', 0):.1f}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    import llguidance

    print(f"llguidance {llguidance.__version__ if hasattr(llguidance, '__version__') else '?'}")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="dstp-structured-"))
    folder = workdir / f"llama-v{args.vocab}-h{args.hidden}-l{args.layers}"
    results: dict = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}}
    try:
        t = time.perf_counter()
        build_tokenizer(folder, args.vocab)
        build_model(folder, args.vocab, args.hidden, args.layers)
        print(
            f"model: random Llama, hidden {args.hidden}, {args.layers} layers, {args.dtype}, "
            f"byte-level BPE vocab {args.vocab} (sha {vocab_hash(folder)}), "
            f"built/loaded in {time.perf_counter() - t:.1f} s at {folder}",
            flush=True,
        )
        if not args.skip_engine:
            print(f"\n1. batch {args.batch} decode, free vs every row under a JSON schema")
            e = results["engine"] = bench_engine(folder, args)
            print(f"  a constrained row's output starts: {e['sample']!r}")
            print(
                f"  median over {e['steps']} steps each: free {e['free_ms']:.1f} ms/step, "
                f"constrained {e['constrained_ms']:.1f} ms/step, ratio {e['ratio']:.3f}; "
                f"median of step-pair ratios {e['pair_ratio']:.3f} "
                f"(per round: {', '.join(f'{r:.3f}' for r in e['ratio_per_round'])})"
            )
            print(
                f"  process CPU time per step: free {e['free_cpu_ms']:.1f} ms, constrained "
                f"{e['constrained_cpu_ms']:.1f} ms, ratio {e['cpu_ratio']:.3f}; median of "
                f"step-pair ratios {e['cpu_pair_ratio']:.3f}"
            )
            f = e["fill"]
            print(
                f"  mask fill alone (MaskJob, {f['rows']} rows, vocab {e['vocab']}): "
                f"{f['ms']:.2f} ms median over {f['steps']} steps "
                f"({f['allowed_per_row']:.0f} tokens allowed per row, median)"
            )
            print(
                f"  applying those masks to [{f['rows']}, {e['vocab']}] logits: dstp's constrain "
                f"{f['apply_dstp_ms']:.2f} ms, llguidance's CPU kernel on a copy "
                f"{f['apply_llg_ms']:.2f} ms (same result)"
            )
            print(
                f"  instrumented constrained run ({e['instrumented_ms']:.1f} ms/step): wait for "
                f"the mask after the forward {e['wait_ms']:.2f} ms, apply it in the sampler "
                f"{e['apply_ms']:.2f} ms, advance the matchers {e['accept_ms']:.2f} ms per step"
            )
        if not args.skip_compile:
            from transformers import AutoTokenizer

            from dstp.model.default_model import STORIES

            print(f"\n2. compiling a typical schema, medians of {args.compile_reps}")
            results["compile"] = {}
            for name, path in (("bpe32k", folder), ("stories260K", STORIES.locate())):
                tok = AutoTokenizer.from_pretrained(str(path))
                cfg = json.loads((Path(path) / "config.json").read_text())
                vocab = cfg["vocab_size"]
                eos = frozenset([tok.eos_token_id]) if tok.eos_token_id is not None else None
                c = results["compile"][name] = bench_compile(tok, vocab, eos, args.compile_reps)
                print(
                    f"  {name:11s} (vocab {vocab:5d}): cold {c['cold_ms']:.2f} ms "
                    f"(max {c['cold_max_ms']:.2f}), cached {c['cached_ms']:.3f} ms, first mask "
                    f"{c['first_mask_ms']:.2f} ms; compiler setup {c['setup_ms']:.0f} ms"
                )
        if args.others:
            from transformers import AutoTokenizer

            print("\n3. other libraries (32k tokenizer)")
            tok = AutoTokenizer.from_pretrained(str(folder))
            tokens = results.get("engine", {}).get("tokens")
            o = results["others"] = bench_others(tok, args.vocab, args.compile_reps, tokens)
            for name, r in o.items():
                print(f"  {name}: {r}")
    finally:
        if args.json:
            args.json.write_text(json.dumps(results, indent=1, default=str))
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
