"""Decode step time: packed (as the batch comes) vs padded to its bucket vs compiled.

A random Llama (``--hidden``, ``--layers``) at TP=1 on CPU; ``--batches`` sequences of
``--context`` tokens each decode one token per step. For each batch, interleaved step by
step: the packed path, the bucketed path run eagerly, and the bucketed path compiled with
each of ``--backends`` (Dynamo's ``eager``: fullgraph, static shapes; ``aot_eager`` and
``inductor`` also functionalize, see FINDINGS.md). It prints each one's median step time
(CPU time of the calling thread: run it with ``--threads 1``), the median ratios to the
packed path, and the bucket's compile time.
Example::

    python benchmarks/decode_buckets.py --dtype bfloat16 --batches 1,3,5,17 --threads 1
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch

from dstp.engine.llm_engine import Engine, EngineConfig
from dstp.worker.decode_buckets import bucket_for, compiled_forward
from dstp.worker.step_plan import StepPlan

BLOCK = 16


def _model(root: Path, hidden: int, layers: int) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig

    path = root / f"llama_h{hidden}_l{layers}"
    if (path / "config.json").exists():
        return path
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=max(1, hidden // 256),
        vocab_size=8192,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.05)
    model.save_pretrained(path)
    return path


def _plans(n: int, context: int, blocks_per_seq: int) -> tuple[StepPlan, StepPlan]:
    """A prefill of ``context - 1`` tokens per sequence, then one decode step."""
    lt = torch.long
    tables = torch.arange(n * blocks_per_seq, dtype=lt).view(n, blocks_per_seq)
    pre = context - 1
    positions = torch.arange(pre, dtype=lt).repeat(n)
    seq_of = torch.arange(n).repeat_interleave(pre)
    slots = tables[seq_of, positions // BLOCK] * BLOCK + positions % BLOCK
    starts = torch.arange(n + 1, dtype=lt) * pre
    prefill = StepPlan(
        (positions * 7 + seq_of) % 8000 + 3, positions, slots, starts,
        torch.full((n,), pre, dtype=lt), tables, starts[1:] - 1, torch.zeros((0, 2), dtype=lt),
    )  # fmt: skip
    last = torch.full((n,), pre, dtype=lt)
    decode = StepPlan(
        (last + torch.arange(n)) % 8000 + 3, last,
        tables[torch.arange(n), last // BLOCK] * BLOCK + last % BLOCK, torch.arange(n + 1),
        torch.full((n,), context, dtype=lt), tables[:, : -(-context // BLOCK)],
        torch.arange(n), torch.zeros((0, 2), dtype=lt),
    )  # fmt: skip
    return prefill, decode


def _interleaved(runner, plan: StepPlan, variants: dict, rounds: int) -> dict[str, float]:
    """Each round runs one step of every variant (``name -> (decode path, forward)``);
    the median per variant of this thread's CPU time per step (with ``--threads 1`` the
    step's whole work, steadier than wall time on a shared machine), in ms, and the median
    over rounds of each variant's ratio to the first. Interleaving keeps the machine's
    drift out of the ratios."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    bucketed = runner.decode or next(d for d, _ in variants.values() if d is not None)
    for round_ in range(rounds + 1):
        for name, (path, forward) in variants.items():
            runner.decode = path
            if forward is not None:
                bucketed.forward = forward
            start = time.thread_time()
            runner.execute(plan)
            if round_:  # the first round warms up
                times[name].append(time.thread_time() - start)
    first = next(iter(variants))
    out = {f"{name}_ms": statistics.median(t) * 1e3 for name, t in times.items()}
    for name, t in times.items():
        if name != first:
            ratios = [a / b for a, b in zip(t, times[first], strict=True)]
            out[f"{name}/{first}"] = statistics.median(ratios)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batches", default="1,3,5,17")
    parser.add_argument("--context", type=int, default=200)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--backends", default="eager")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    blocks_per_seq = -(-args.max_model_len // BLOCK)
    root = Path(tempfile.gettempdir()) / "dstp_bench_decode_buckets"
    path = _model(root, args.hidden, args.layers)
    engine = Engine(
        EngineConfig(
            model=str(path),
            dtype=args.dtype,
            max_model_len=args.max_model_len,
            max_num_seqs=args.max_num_seqs,
            block_size=BLOCK,
            num_blocks=max(batches) * blocks_per_seq,
            bucket_decode=True,
        )
    )
    runner = engine.runner
    bucketed = runner.decode
    eager = bucketed.forward
    for n in batches:
        prefill, decode = _plans(n, args.context, blocks_per_seq)
        runner.decode = None
        runner.execute(prefill)
        row: dict[str, float | int | str] = {"batch": n, "bucket": bucket_for(n, bucketed.sizes)}
        for backend in args.backends.split(","):
            torch._dynamo.reset()
            compiled = compiled_forward(eager, backend)
            runner.decode, bucketed.forward = bucketed, compiled
            start = time.perf_counter()
            runner.execute(decode)
            row[f"{backend}_compile_s"] = time.perf_counter() - start
            variants = {
                "packed": (None, None),
                "bucketed": (bucketed, eager),
                f"compiled_{backend}": (bucketed, compiled),
            }
            row.update(_interleaved(runner, decode, variants, args.reps))
        bucketed.forward = eager
        print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}))


if __name__ == "__main__":
    main()
