"""Prefill latency and decode throughput of a HF-compatible model, identical on every rank.

Every rank of a TP group must run the same forward calls in the same order
(each holds a shard); rank 0's clock is reported. A barrier before each timed
call keeps one rank's start-up lag out of the other's figure.

* Prefill: one forward of a batch-1 prompt with a fresh KV cache and
  ``logits_to_keep=1`` (what a server computes before the first token).
* Decode: HF ``generate`` (greedy, exactly N new tokens); a logits processor
  timestamps every step, and tokens/s counts steps 2..N, so the prefill and
  the first step's one-off costs stay out of the decode rate.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def barrier() -> None:
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()


def prompt_ids(batch: int, length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """The same random token ids on every rank (ids 3.. avoid special tokens)."""
    gen = torch.Generator().manual_seed(seed + 7919 * length + batch)
    return torch.randint(3, vocab, (batch, length), generator=gen)


def timed(fn: Callable[[], Any]) -> float:
    barrier()
    start = time.perf_counter()
    with torch.inference_mode():
        fn()
    return time.perf_counter() - start


def prefill(model: Any, length: int, vocab: int, repeats: int, budget_s: float) -> dict:
    """Median latency of ``repeats`` prefills (fewer when one exceeds the budget share).

    Ranks must agree on how many repeats run, so the stop decision uses rank 0's
    timings broadcast to all ranks.
    """
    ids = prompt_ids(1, length, vocab)

    def once() -> None:
        model(input_ids=ids, use_cache=True, logits_to_keep=1)

    times = []
    for _ in range(repeats):
        times.append(timed(once))
        if agreed(sum(times) > budget_s):
            break
    return {"tokens": length, "median_s": statistics.median(times), "runs_s": times}


def agreed(flag: bool) -> bool:
    """Rank 0's ``flag`` on every rank (ranks' clocks differ slightly)."""
    import torch.distributed as tdist

    if not (tdist.is_available() and tdist.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    tdist.broadcast(t, src=0)
    return bool(t.item())


class StepClock:
    """A logits processor that records when each generation step's logits arrive."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.stamps.append(time.perf_counter())
        return scores


def generate(
    model: Any,
    ids: torch.Tensor,
    new_tokens: int,
    clock: StepClock | None = None,
    attention_mask: torch.Tensor | None = None,
):
    from transformers import LogitsProcessorList

    return model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids) if attention_mask is None else attention_mask,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
        logits_processor=LogitsProcessorList([clock] if clock else []),
    )


def decode(model: Any, batch: int, prompt: int, new_tokens: int, vocab: int) -> dict:
    """Decode tokens/s at ``batch`` (after a short warm-up generate at the same shapes)."""
    ids = prompt_ids(batch, prompt, vocab)
    timed(lambda: generate(model, ids, 3))  # warm kernels for these shapes
    clock = StepClock()
    barrier()
    start = time.perf_counter()
    with torch.inference_mode():
        generate(model, ids, new_tokens, clock)
    end = time.perf_counter()
    s = clock.stamps
    steps = [b - a for a, b in zip(s, s[1:], strict=False)]
    decode_s = s[-1] - s[0]
    return {
        "batch": batch,
        "prompt": prompt,
        "new_tokens": new_tokens,
        "tok_s": batch * len(steps) / decode_s,
        "step_median_s": statistics.median(steps),
        "step_p99_s": sorted(steps)[min(len(steps) - 1, int(0.99 * len(steps)))],
        "ttft_s": s[0] - start,
        "total_s": end - start,
    }


def lm_head_copy_bytes(model: Any) -> int:
    """Bytes the LM head allocates per batch row for a sliced (non-contiguous) input.

    HF slices ``hidden[:, -1:, :]`` before the LM head. For a 3-D non-contiguous
    input PyTorch's matmul only folds to one GEMM when the weight requires grad;
    otherwise it expands the weight to ``[batch, in, out]`` and copies it: a full
    copy of the head per sequence (8.4 GB at batch 32 for a 1B model's half vocab).
    HF's own weights require grad and escape; TP layers with frozen weights don't.
    """
    from torch.profiler import ProfilerActivity, profile

    head = model.get_output_embeddings()
    param = next(head.parameters())
    # the model's hidden size: DeepSpeed's head splits its weight on the hidden dim
    # and slices the full-width input itself
    hidden = torch.zeros(4, 2, model.config.hidden_size, dtype=param.dtype)
    with (
        torch.inference_mode(),
        profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof,
    ):
        try:
            head(hidden[:, -1:, :])
        except Exception:  # a head that needs its collective partner; treat as unknown
            return 0
    biggest = max((e.cpu_memory_usage for e in prof.events()), default=0)
    shard = max(p.numel() * p.element_size() for p in head.parameters())
    return biggest // 4 if biggest >= shard else 0
