"""Server metrics in the Prometheus text format (v0.0.4).

A few counters and histograms are all the server needs, so they are written here
(thread-safe, no extra dependency) rather than pulling in a client library.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Mapping

# Latency buckets in seconds: sub-millisecond decode steps on GPU up to slow CPU prefills.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


def _fmt(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(
        f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
        for k, v in sorted(labels.items())
    )
    return "{" + inner + "}"


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.bounds = tuple(buckets)
        self.counts = [0] * (len(buckets) + 1)  # last: above every bound
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.n += 1

    def render(self, name: str) -> list[str]:
        lines, running = [], 0
        for bound, count in zip(self.bounds, self.counts, strict=False):
            running += count
            lines.append(f'{name}_bucket{{le="{_fmt(bound)}"}} {running}')
        lines.append(f'{name}_bucket{{le="+Inf"}} {self.n}')
        lines.append(f"{name}_sum {_fmt(self.total)}")
        lines.append(f"{name}_count {self.n}")
        return lines


class ServerMetrics:
    """Request-level counters and latency histograms, updated from several threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str], int] = {}  # (endpoint, status code) -> count
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.tpot = Histogram(TPOT_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)

    def count_request(self, endpoint: str, status: int) -> None:
        with self._lock:
            key = (endpoint, str(status))
            self.requests[key] = self.requests.get(key, 0) + 1

    def observe_prompt(self, num_tokens: int) -> None:
        with self._lock:
            self.prompt_tokens += num_tokens

    def observe_tokens(self, num_tokens: int, seconds_each: float | None) -> None:
        """``num_tokens`` new tokens; ``seconds_each`` is the inter-token latency (None: first)."""
        with self._lock:
            self.generation_tokens += num_tokens
            if seconds_each is not None:
                for _ in range(num_tokens):
                    self.tpot.observe(seconds_each)

    def observe_ttft(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def observe_e2e(self, seconds: float) -> None:
        with self._lock:
            self.e2e.observe(seconds)

    def render(self, gauges: Mapping[str, tuple[str, str, float]]) -> str:
        """Prometheus text; ``gauges`` maps name -> (kind, help, value) from the engine."""
        out: list[str] = []

        def family(name: str, kind: str, help_text: str, lines: list[str]) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(lines)

        with self._lock:
            family(
                "dstp_requests_total",
                "counter",
                "HTTP requests by endpoint and status code.",
                [
                    f"dstp_requests_total{_labels({'endpoint': e, 'status': s})} {n}"
                    for (e, s), n in sorted(self.requests.items())
                ],
            )
            family(
                "dstp_prompt_tokens_total",
                "counter",
                "Prompt tokens of admitted requests.",
                [f"dstp_prompt_tokens_total {self.prompt_tokens}"],
            )
            family(
                "dstp_generation_tokens_total",
                "counter",
                "Generated tokens.",
                [f"dstp_generation_tokens_total {self.generation_tokens}"],
            )
            family(
                "dstp_time_to_first_token_seconds",
                "histogram",
                "Time from admission to the first generated token.",
                self.ttft.render("dstp_time_to_first_token_seconds"),
            )
            family(
                "dstp_time_per_output_token_seconds",
                "histogram",
                "Latency between consecutive generated tokens of a request.",
                self.tpot.render("dstp_time_per_output_token_seconds"),
            )
            family(
                "dstp_e2e_request_latency_seconds",
                "histogram",
                "Time from admission to the last token.",
                self.e2e.render("dstp_e2e_request_latency_seconds"),
            )
        for name, (kind, help_text, value) in sorted(gauges.items()):
            family(name, kind, help_text, [f"{name} {_fmt(value)}"])
        return "\n".join(out) + "\n"


# Engine stats keys -> (metric name, kind, help).
_STAT_METRICS = {
    "num_running": ("dstp_num_requests_running", "gauge", "Requests in the running batch."),
    "num_waiting": ("dstp_num_requests_waiting", "gauge", "Requests waiting for admission."),
    "kv_usage": ("dstp_kv_cache_usage_ratio", "gauge", "Fraction of KV-cache blocks in use."),
    "kv_blocks_total": ("dstp_kv_cache_blocks", "gauge", "KV-cache blocks per rank."),
    "kv_blocks_free": ("dstp_kv_cache_free_blocks", "gauge", "Free KV-cache blocks per rank."),
    "prefix_cache_queries": (
        "dstp_prefix_cache_queries_total",
        "counter",
        "Prompt blocks looked up in the prefix cache.",
    ),
    "prefix_cache_hits": (
        "dstp_prefix_cache_hits_total",
        "counter",
        "Prompt blocks found in the prefix cache.",
    ),
    "prefix_cache_hit_rate": (
        "dstp_prefix_cache_hit_rate",
        "gauge",
        "Prefix-cache hits / queries since start.",
    ),
    "num_preemptions": (
        "dstp_num_preemptions_total",
        "counter",
        "Requests preempted (KV blocks reclaimed, recomputed later).",
    ),
}


def engine_gauges(driver, tp_size: int) -> dict[str, tuple[str, str, float]]:
    """Gauges from the driver's last engine stats snapshot: name -> (kind, help, value)."""
    stats = driver.stats()
    gauges: dict[str, tuple[str, str, float]] = {
        "dstp_healthy": ("gauge", "1 when every rank answers.", 1.0 if driver.healthy else 0.0),
        "dstp_tp_size": ("gauge", "Tensor-parallel ranks.", float(tp_size)),
        "dstp_num_requests_in_flight": (
            "gauge",
            "Requests admitted by the server and not finished.",
            float(driver.num_in_flight),
        ),
    }
    for key, value in stats.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        name, kind, help_text = _STAT_METRICS.get(
            key, (f"dstp_engine_{key}", "gauge", f"Engine statistic '{key}'.")
        )
        gauges[name] = (kind, help_text, float(value))
    queries = stats.get("prefix_cache_queries")
    if isinstance(queries, (int, float)) and "dstp_prefix_cache_hit_rate" not in gauges:
        hits = stats.get("prefix_cache_hits", 0) or 0
        rate = hits / queries if queries else 0.0
        gauges["dstp_prefix_cache_hit_rate"] = (
            "gauge",
            "Prefix-cache hits / queries since start.",
            rate,
        )
    return gauges
