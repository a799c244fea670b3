"""Server metrics: vLLM's, named ``dstp:`` for ``vllm:`` and labelled ``model_name``, in one
``prometheus_client`` registry with its process, platform and garbage-collector collectors.

Keeping vLLM's names, meanings and buckets lets a vLLM Grafana dashboard work after replacing
``vllm:`` by ``dstp:``; docs/serving.md lists every metric. Requests are observed from the
engine loop's thread and the HTTP threads (``prometheus_client``'s metrics are thread-safe);
the engine's gauges and counters are read from the loop's last stats snapshot at scrape time.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

disable_created_metrics()  # no *_created series: vLLM's dashboards do not use them
PREFIX = "dstp:"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # what generate_latest writes
FINISHED_REASONS = ("stop", "length", "abort", "error")  # request_success_total's label values

# vLLM's buckets (vllm/v1/metrics/loggers.py), so dashboards' quantiles mean the same.
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
REQUEST_LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
    60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
N_BUCKETS = (1, 2, 5, 10, 20)

TOKENS = None  # a histogram of token counts: 1-2-5 buckets up to max_model_len
# FinishedRequest.phases() -> what its histogram's help says it measures
_PHASES = {
    "e2e_request_latency_seconds": "e2e request latency in seconds",
    "request_queue_time_seconds": "time spent in WAITING phase for request",
    "request_inference_time_seconds": "time spent in RUNNING phase for request",
    "request_prefill_time_seconds": "time spent in PREFILL phase for request",
    "request_decode_time_seconds": "time spent in DECODE phase for request",
}
# vLLM name (without prefix) -> (help, buckets) of the histograms labelled model_name
_HISTOGRAMS = {
    "time_to_first_token_seconds": ("Histogram of time to first token in seconds.", TTFT_BUCKETS),
    "inter_token_latency_seconds": ("Histogram of inter-token latency in seconds.", ITL_BUCKETS),
    "time_per_output_token_seconds": (
        "Histogram of time per output token in seconds (same as inter_token_latency).",
        ITL_BUCKETS,
    ),
    **{name: (f"Histogram of {what}.", REQUEST_LATENCY_BUCKETS) for name, what in _PHASES.items()},
    "request_time_per_output_token_seconds": (
        "Histogram of time_per_output_token_seconds per request.",
        ITL_BUCKETS,
    ),
    "request_prompt_tokens": ("Number of prefill tokens processed.", TOKENS),
    "request_generation_tokens": ("Number of generation tokens processed.", TOKENS),
    "request_params_max_tokens": ("Histogram of the max_tokens request parameter.", TOKENS),
    "request_params_n": ("Histogram of the n request parameter.", N_BUCKETS),
}
# vLLM name -> help of the counters labelled model_name
_COUNTERS = {
    "prompt_tokens": "Number of prefill tokens processed.",
    "generation_tokens": "Number of generation tokens processed.",
}
# engine stats key (or the admission count) -> (vLLM name, help) of the gauges read at scrape time
_GAUGES = {
    "num_running": ("num_requests_running", "Number of requests in model execution batches."),
    "num_waiting": ("num_requests_waiting", "Number of requests waiting to be processed."),
    "kv_usage": ("kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage."),
    "num_in_flight": (
        "num_requests_in_flight",
        "Requests admitted by the HTTP server and not finished (what --max-queued-requests "
        "bounds).",
    ),
}


def buckets_1_2_5(max_value: int) -> tuple[float, ...]:
    """1, 2, 5, 10, 20, 50, ... up to ``max_value`` (vLLM's token-count buckets)."""
    out: list[float] = []
    exponent = 0
    while True:
        for m in (1, 2, 5):
            value = m * 10**exponent
            if value > max_value:
                return tuple(out)
            out.append(float(value))
        exponent += 1


@dataclass
class FinishedRequest:
    """What the engine loop knows about a request when it ends (monotonic seconds)."""

    prompt_tokens: int
    output_tokens: int
    n: int
    max_tokens: int
    finished_reasons: list[str]  # one per choice
    arrival: float
    scheduled: float | None
    first_token: float | None
    end: float

    def phases(self) -> dict[str, float]:
        """Seconds in each of vLLM's request phases (a missing time: the phase took none)."""
        first = self.first_token if self.first_token is not None else self.end
        scheduled = self.scheduled if self.scheduled is not None else first
        return {
            "e2e_request_latency_seconds": self.end - self.arrival,
            "request_queue_time_seconds": max(0.0, scheduled - self.arrival),
            "request_inference_time_seconds": max(0.0, self.end - scheduled),
            "request_prefill_time_seconds": max(0.0, first - scheduled),
            "request_decode_time_seconds": max(0.0, self.end - first),
        }


class StatsSource(Protocol):
    """What the scrape reads: the engine loop's last engine stats and its admission count."""

    num_in_flight: int

    def stats(self) -> Mapping: ...


class ServerMetrics:
    """Every metric of the server, in its own registry; :meth:`bind` labels them with the
    served model's name and connects the engine's stats before the first request."""

    def __init__(self, model_name: str = "dstp", max_model_len: int = 1 << 20) -> None:
        self.registry = CollectorRegistry()
        for collector in (ProcessCollector, PlatformCollector, GCCollector):
            collector(registry=self.registry)
        self._lock = threading.Lock()
        self.prompt_tokens = 0  # totals the periodic load line reads (request_log.StatsLogger)
        self.generation_tokens = 0
        self._source: StatsSource | None = None
        self._block_size = 1
        self._define(buckets_1_2_5(max_model_len))
        self.registry.register(_EngineCollector(self))
        self.bind(model_name)

    def _define(self, token_buckets: tuple[float, ...]) -> None:
        reg, label = self.registry, ["model_name"]
        self._hist = {}
        for name, (doc, buckets) in _HISTOGRAMS.items():
            self._hist[name] = Histogram(
                PREFIX + name, doc, label, buckets=buckets or token_buckets, registry=reg
            )
        self._counters = {
            name: Counter(PREFIX + name, doc, label, registry=reg)
            for name, doc in _COUNTERS.items()
        }
        self._success = Counter(
            PREFIX + "request_success",
            "Count of successfully processed requests.",
            [*label, "finished_reason"],
            registry=reg,
        )
        self._gauges = {
            key: Gauge(PREFIX + name, doc, label, registry=reg)
            for key, (name, doc) in _GAUGES.items()
        }
        self._http = Counter(
            "http_requests_total",
            "HTTP requests by handler, method and status code.",
            ["handler", "method", "status"],
            registry=reg,
        )

    def bind(self, model_name: str, source: StatsSource | None = None, block_size: int = 1) -> None:
        """Label every metric with ``model_name`` (each sample exported from zero) and read
        engine stats from ``source`` at scrape time; ``block_size`` turns the prefix cache's
        block counts into tokens, as vLLM counts them."""
        self.model_name, self._source, self._block_size = model_name, source, block_size
        labelled = [*self._counters.values(), *self._hist.values(), *self._gauges.values()]
        for metric in [*labelled, self._success]:
            metric.clear()
        for metric in labelled:
            metric.labels(model_name)
        for reason in FINISHED_REASONS:
            self._success.labels(model_name, reason)
        for key, gauge in self._gauges.items():
            gauge.labels(model_name).set_function(self._stat(key))

    def _stat(self, key: str) -> Callable[[], float]:
        if key == "num_in_flight":  # the engine loop's admission count, not an engine stat
            return lambda: self._source.num_in_flight if self._source is not None else 0
        return lambda: float(self.stats().get(key, 0) or 0)

    def stats(self) -> Mapping:
        return self._source.stats() if self._source is not None else {}

    # -- observations --------------------------------------------------------------------
    def count_request(self, handler: str, method: str, status: int) -> None:
        self._http.labels(handler, method, str(status)).inc()

    def observe_prefilled(self, num_tokens: int) -> None:
        """A request's prompt was processed (its first token came out)."""
        self._counters["prompt_tokens"].labels(self.model_name).inc(num_tokens)
        with self._lock:
            self.prompt_tokens += num_tokens

    def observe_tokens(self, num_tokens: int, seconds_each: float | None) -> None:
        """``num_tokens`` new tokens; ``seconds_each`` is the inter-token latency (None: first)."""
        self._counters["generation_tokens"].labels(self.model_name).inc(num_tokens)
        with self._lock:
            self.generation_tokens += num_tokens
        if seconds_each is not None:
            for name in ("inter_token_latency_seconds", "time_per_output_token_seconds"):
                for _ in range(num_tokens):
                    self._observe(name, seconds_each)

    def observe_ttft(self, seconds: float) -> None:
        self._observe("time_to_first_token_seconds", seconds)

    def observe_finished(self, req: FinishedRequest) -> None:
        """Per-request histograms and request_success_total (one count per choice, as vLLM's
        per-sample child requests are counted)."""
        phases = req.phases()
        for key, value in phases.items():
            self._observe(key, value)
        per_choice = req.output_tokens / max(1, req.n)
        if per_choice > 1:
            decode_s = phases["request_decode_time_seconds"]
            self._observe("request_time_per_output_token_seconds", decode_s / (per_choice - 1))
        for reason in req.finished_reasons:
            reason = reason if reason in FINISHED_REASONS else "error"
            self._success.labels(self.model_name, reason).inc()
        self._observe("request_prompt_tokens", req.prompt_tokens)
        self._observe("request_generation_tokens", req.output_tokens)
        self._observe("request_params_max_tokens", req.max_tokens)
        self._observe("request_params_n", req.n)

    def _observe(self, name: str, value: float) -> None:
        self._hist[name].labels(self.model_name).observe(value)

    def render(self) -> bytes:
        """The whole /metrics page."""
        return generate_latest(self.registry)


class _EngineCollector:
    """The engine's cumulative counters (kept by the engine, so exported as they are) and
    one sample per data-parallel replica."""

    _COUNTERS = {  # engine stats key = name without prefix -> help
        "num_preemptions": "Cumulative number of preemption from the engine.",
        "prefix_cache_queries": "Prefix cache queries, in terms of number of queried tokens.",
        "prefix_cache_hits": "Prefix cache hits, in terms of number of cached tokens.",
        "engine_restarts": "Engine-job restarts after a rank died (supervised mode).",
        "replayed_requests": "Requests resubmitted to a restarted engine job (supervised mode).",
    }

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        stats = m.stats()
        for key, doc in self._COUNTERS.items():
            family = CounterMetricFamily(PREFIX + key, doc, labels=["model_name"])
            per_token = m._block_size if key.startswith("prefix_cache") else 1
            family.add_metric([m.model_name], float(stats.get(key, 0) or 0) * per_token)
            yield family
        yield from replica_families(stats)


# per-replica stats key -> (metric name, kind, help); every one labelled {replica="r"}
_REPLICA_METRICS = {
    "healthy": ("dstp_replica_up", "gauge", "1 while the replica's ranks answer."),
    "num_running": ("dstp_replica_num_requests_running", "gauge", "Requests running."),
    "num_waiting": ("dstp_replica_num_requests_waiting", "gauge", "Requests waiting."),
    "kv_blocks_total": ("dstp_replica_kv_cache_blocks", "gauge", "KV-cache blocks per rank."),
    "kv_blocks_free": ("dstp_replica_kv_cache_free_blocks", "gauge", "Free KV-cache blocks."),
    "kv_usage": ("dstp_replica_kv_cache_usage_ratio", "gauge", "Fraction of KV blocks in use."),
    "outstanding_requests": (
        "dstp_replica_outstanding_requests",
        "gauge",
        "Requests routed to the replica and not finished.",
    ),
    "outstanding_tokens": (
        "dstp_replica_outstanding_tokens",
        "gauge",
        "Prompt tokens not yet prefilled plus tokens still to generate (the router's load).",
    ),
    "assigned_requests": (
        "dstp_replica_requests_routed",
        "counter",
        "Requests the router sent to the replica.",
    ),
    "num_preemptions": ("dstp_replica_num_preemptions", "counter", "Requests preempted."),
}


def replica_families(stats: Mapping) -> list[Metric]:
    """Prometheus families with one sample per replica, from :meth:`ReplicatedEngine.stats`
    (none for a single replica: its stats have no ``replicas``)."""
    per = stats.get("replicas")
    if not per:
        return []
    families = []
    for key, (name, kind, help_text) in _REPLICA_METRICS.items():
        cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
        family = cls(name, help_text, labels=["replica"])
        for index, replica in enumerate(per):
            value = replica.get(key)
            if isinstance(value, (int, float)):
                family.add_metric([str(index)], float(value))
        families.append(family)
    return families
