"""Log lines about requests and load: one per request with ``--enable-log-requests``, and
one every ``interval_s`` (10 s) while the engine is busy, like vLLM's periodic stats line.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from dstp.server.metrics import FinishedRequest

if TYPE_CHECKING:
    from dstp.server.protocol import ParsedRequest

log = logging.getLogger("dstp")
STATS_INTERVAL_S = 10.0


def log_received(
    request_id: str, parsed: ParsedRequest, decode: Callable[[list[int]], str], max_len: int | None
) -> None:
    """vLLM's "Received request" line: the id the client got, the prompt (text and ids, cut
    at ``--max-log-len``), the sampling parameters and the constraint's kind."""
    ids = parsed.prompt_token_ids[:max_len] if max_len is not None else parsed.prompt_token_ids
    text = parsed.prompt_text if parsed.prompt_text is not None else decode(ids)
    if max_len is not None:
        text = text[:max_len]
    params = parsed.params
    spec = params.structured_outputs
    shown = {
        f.name: getattr(params, f.name)
        for f in dataclasses.fields(params)
        if f.name != "structured_outputs"
        and getattr(params, f.name) != f.default
        and not (f.default_factory is not dataclasses.MISSING and not getattr(params, f.name))
    }
    log.info(
        "received request %s: prompt: %r, params: %s, constraint: %s, prompt_token_ids: %s, "
        "prompt_tokens: %d",
        request_id,
        text,
        shown,
        spec.kind if spec is not None else None,
        ids,
        len(parsed.prompt_token_ids),
    )


def log_request(request_id: str, req: FinishedRequest, status: str) -> None:
    """One line for a finished request; ``status``: ok, aborted (client gone), error (its
    generation failed alone) or failed (engine failure or shutdown)."""
    ttft = "-" if req.first_token is None else f"{req.first_token - req.arrival:.3f}s"
    queue = "-" if req.scheduled is None else f"{req.scheduled - req.arrival:.3f}s"
    reasons = ",".join(r or "-" for r in req.finished_reasons) or "-"
    log.info(
        "request %s: status=%s finish_reason=%s prompt_tokens=%d output_tokens=%d "
        "n=%d ttft=%s queue=%s latency=%.3fs",
        request_id,
        status,
        reasons,
        req.prompt_tokens,
        req.output_tokens,
        req.n,
        ttft,
        queue,
        req.end - req.arrival,
    )


class StatsLogger:
    """Logs load once per interval while the engine has work or did some in the interval."""

    def __init__(self, interval_s: float = STATS_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self._last_time = time.monotonic()
        self._last = (0, 0, 0, 0)  # prompt tokens, generation tokens, prefix queries, hits

    def maybe_log(self, stats: Mapping, prompt_tokens: int, generation_tokens: int) -> bool:
        """Call often (after every step and heartbeat); logs when an interval has passed."""
        now = time.monotonic()
        elapsed = now - self._last_time
        if elapsed < self.interval_s:
            return False
        queries = int(stats.get("prefix_cache_queries", 0) or 0)
        hits = int(stats.get("prefix_cache_hits", 0) or 0)
        current = (prompt_tokens, generation_tokens, queries, hits)
        d_prompt, d_gen, d_queries, d_hits = (
            a - b for a, b in zip(current, self._last, strict=True)
        )
        self._last_time, self._last = now, current
        running = int(stats.get("num_running", 0) or 0)
        waiting = int(stats.get("num_waiting", 0) or 0)
        if not (running or waiting or d_prompt or d_gen):
            return False  # idle all interval: stay quiet
        # over the interval; since start when the interval looked nothing up
        d_hits, d_queries = (d_hits, d_queries) if d_queries else (hits, queries)
        hit_rate = d_hits / d_queries if d_queries else 0.0
        log.info(
            "engine: running: %d reqs, waiting: %d reqs, KV cache usage: %.1f%%, "
            "prompt throughput: %.1f tok/s, generation throughput: %.1f tok/s, "
            "prefix cache hit rate: %.1f%%",
            running,
            waiting,
            100.0 * float(stats.get("kv_usage", 0.0) or 0.0),
            d_prompt / elapsed,
            d_gen / elapsed,
            100.0 * hit_rate,
        )
        return True
