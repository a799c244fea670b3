"""The 64-request throughput workload (engine issue), and how each system runs it.

All requests arrive at t=0 (offline throughput). Prompt lengths are uniform
in [32, 512], output lengths uniform in [64, 128], EOS ignored, greedy; the
request set is fixed by a seed, so every system serves the same work.

Metrics, per request: TTFT = first token - arrival; TPOT = (finish - first
token) / (output tokens - 1). Output tok/s = requested output tokens / wall.

* Engine: dstp's continuous-batching ``Engine.generate`` (rank 0 drives,
  other ranks follow).
* Static: HF ``generate`` over fixed batches of ``static_batch`` requests in
  arrival order, left-padded; each batch runs to its longest output, and a
  request's tokens are timestamped at the step that produced them (generous
  to static batching: its finish is not delayed to the batch's end). A slow
  system stops after the batch that crosses ``budget_s``; its figures then
  cover the completed requests (``requests`` says how many).
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

from benchmarks.timing import StepClock, agreed, barrier, generate, prompt_ids


@dataclass(frozen=True)
class Request:
    prompt: list[int]
    output_len: int


def requests(spec: dict, vocab: int) -> list[Request]:
    rng = random.Random(spec.get("seed", 0))
    lo, hi = spec.get("prompt_len", (32, 512))
    olo, ohi = spec.get("output_len", (64, 128))
    out = []
    for _ in range(spec.get("num_requests", 64)):
        n = rng.randint(lo, hi)
        out.append(Request([rng.randrange(3, vocab) for _ in range(n)], rng.randint(olo, ohi)))
    return out


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summarize(
    wall: float, prompts: list[int], outputs: list[int], ttft: list[float], tpot: list[float]
) -> dict:
    return {
        "requests": len(outputs),
        "prompt_tokens": sum(prompts),
        "output_tokens": sum(outputs),
        "wall_s": wall,
        "output_tok_s": sum(outputs) / wall,
        "ttft_p50_s": statistics.median(ttft),
        "ttft_p99_s": _pct(ttft, 0.99),
        "tpot_p50_s": statistics.median(tpot),
        "tpot_p99_s": _pct(tpot, 0.99),
    }


def run_static(model: Any, spec: dict, vocab: int) -> dict:
    """HF ``generate`` with static batches (runs identically on every rank)."""
    reqs = requests(spec, vocab)
    size = spec.get("static_batch", 16)
    ttft, tpot, outs, prompts = [], [], [], []
    barrier()
    start = time.perf_counter()
    for i in range(0, len(reqs), size):
        batch = reqs[i : i + size]
        width = max(len(r.prompt) for r in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, r in enumerate(batch):  # left padding: generation continues on the right
            ids[row, width - len(r.prompt) :] = torch.tensor(r.prompt)
            mask[row, width - len(r.prompt) :] = 1
        clock = StepClock()
        with torch.inference_mode():
            generate(model, ids, max(r.output_len for r in batch), clock, attention_mask=mask)
        s = clock.stamps
        for r in batch:
            ttft.append(s[0] - start)
            tpot.append((s[r.output_len - 1] - s[0]) / (r.output_len - 1))
            outs.append(r.output_len)
            prompts.append(len(r.prompt))
        if agreed(time.perf_counter() - start > spec.get("budget_s", float("inf"))):
            break
    return {
        "static_batch": size,
        **summarize(time.perf_counter() - start, prompts, outs, ttft, tpot),
    }


def run_engine(engine: Any, spec: dict, vocab: int) -> dict:
    """dstp's engine on rank 0 (other ranks must be in ``engine.run_follower()``)."""
    from dstp.engine.sampling_params import SamplingParams

    reqs = requests(spec, vocab)
    params = [
        SamplingParams(
            max_tokens=r.output_len, min_tokens=r.output_len, temperature=0.0, ignore_eos=True
        )
        for r in reqs
    ]
    warm = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    engine.generate([reqs[0].prompt[:64]], warm)  # warm kernels outside the clock
    start = time.perf_counter()
    results = engine.generate([r.prompt for r in reqs], params)
    wall = time.perf_counter() - start
    ttft, tpot, outs = [], [], []
    for res in results:
        n = len(res.outputs[0].token_ids)
        outs.append(n)
        ttft.append(res.first_token_time - res.arrival_time)
        tpot.append((res.finish_time - res.first_token_time) / max(1, n - 1))
    summary = summarize(wall, [len(r.prompt) for r in reqs], outs, ttft, tpot)
    summary["engine_stats"] = engine.stats()
    return summary


def run_engine_decode(engine: Any, batch: int, prompt: int, new_tokens: int, vocab: int) -> dict:
    """The engine's decode rate at ``batch`` (rank 0): the same shapes as ``timing.decode``.

    All prompts arrive together and prefill in one step, so every sequence
    then decodes in every step; the rate counts tokens 2..N of each.
    """
    from dstp.engine.sampling_params import SamplingParams

    prompts = prompt_ids(batch, prompt, vocab).tolist()
    params = SamplingParams(
        max_tokens=new_tokens, min_tokens=new_tokens, temperature=0.0, ignore_eos=True
    )
    engine.generate(prompts, SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    steps_before = engine.num_steps
    results = engine.generate(prompts, params)
    first = max(r.first_token_time for r in results)
    last = max(r.finish_time for r in results)
    tokens = sum(len(r.outputs[0].token_ids) - 1 for r in results)
    return {
        "batch": batch,
        "prompt": prompt,
        "new_tokens": new_tokens,
        "tok_s": tokens / (last - first),
        "steps": engine.num_steps - steps_before,
    }
