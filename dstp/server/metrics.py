"""Server metrics, exposed through ``prometheus_client`` in the Prometheus text format.

Two sets of names, both documented in docs/serving.md:

- vLLM's metrics with the ``dstp:`` prefix instead of ``vllm:`` and a ``model_name`` label
  on every sample (``dstp:num_requests_running``, ``dstp:time_to_first_token_seconds``,
  ...), with vLLM's meanings and buckets, so a vLLM Grafana dashboard works after replacing
  ``vllm:`` by ``dstp:``;
- dstp's own earlier ``dstp_*`` names (unlabelled), kept for existing consumers;

plus ``prometheus_client``'s process, platform and garbage-collector metrics. Requests are
observed from the engine driver's thread and HTTP threads; engine gauges are read from the
driver's last stats snapshot at scrape time.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

PREFIX = "dstp:"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
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


class Histogram:
    """Bucket counts, a sum and a count; the caller holds the lock."""

    def __init__(self, buckets: Iterable[float]) -> None:
        self.bounds = tuple(float(b) for b in buckets)
        self.counts = [0] * (len(self.bounds) + 1)  # last: above every bound
        self.total = 0.0
        self.n = 0

    def observe(self, value: float, times: int = 1) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += times
        self.total += value * times
        self.n += times

    def family(self, name: str, help_text: str, labels: Mapping[str, str]) -> Metric:
        fam = HistogramMetricFamily(name, help_text, labels=list(labels))
        cumulative, running = [], 0
        for bound, count in zip(self.bounds, self.counts, strict=False):
            running += count
            cumulative.append((_le(bound), running))
        cumulative.append(("+Inf", self.n))
        fam.add_metric(list(labels.values()), cumulative, self.total)
        return fam


def _le(bound: float) -> str:
    return str(int(bound)) + ".0" if float(bound).is_integer() else repr(bound)


@dataclass
class FinishedRequest:
    """What the driver knows about a request when it ends (monotonic seconds)."""

    prompt_tokens: int
    output_tokens: int
    n: int
    max_tokens: int
    finished_reasons: list[str]  # one per choice
    arrival: float
    scheduled: float | None
    first_token: float | None
    end: float


# vLLM name (without prefix) -> help; the histograms observed per finished request.
_REQUEST_HISTOGRAMS = {
    "e2e_request_latency_seconds": "Histogram of e2e request latency in seconds.",
    "request_queue_time_seconds": "Histogram of time spent in WAITING phase for request.",
    "request_inference_time_seconds": "Histogram of time spent in RUNNING phase for request.",
    "request_prefill_time_seconds": "Histogram of time spent in PREFILL phase for request.",
    "request_decode_time_seconds": "Histogram of time spent in DECODE phase for request.",
    "request_time_per_output_token_seconds": (
        "Histogram of time_per_output_token_seconds per request."
    ),
}
_PROCESS_REGISTRY = CollectorRegistry(auto_describe=False)
ProcessCollector(registry=_PROCESS_REGISTRY)
PlatformCollector(registry=_PROCESS_REGISTRY)
GCCollector(registry=_PROCESS_REGISTRY)


class ServerMetrics:
    """Request-level counters and histograms, updated from several threads."""

    def __init__(self, model_name: str = "dstp", max_model_len: int = 1 << 20) -> None:
        self.model_name = model_name  # the create_app caller sets the served name
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str], int] = {}  # (endpoint, status code) -> count
        self.admitted_prompt_tokens = 0  # dstp_prompt_tokens_total: counted at admission
        self.prompt_tokens = 0  # dstp:prompt_tokens_total: counted once prefilled
        self.generation_tokens = 0
        self.success = dict.fromkeys(FINISHED_REASONS, 0)
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.latency = {name: Histogram(REQUEST_LATENCY_BUCKETS) for name in _REQUEST_HISTOGRAMS}
        self.latency["request_time_per_output_token_seconds"] = Histogram(ITL_BUCKETS)
        token_buckets = buckets_1_2_5(max_model_len)
        self.request_prompt_tokens = Histogram(token_buckets)
        self.request_generation_tokens = Histogram(token_buckets)
        self.request_max_tokens = Histogram(token_buckets)
        self.request_n = Histogram(N_BUCKETS)

    # -- observations --------------------------------------------------------------------
    def count_request(self, endpoint: str, status: int) -> None:
        with self._lock:
            key = (endpoint, str(status))
            self.requests[key] = self.requests.get(key, 0) + 1

    def observe_prompt(self, num_tokens: int) -> None:
        """A request with ``num_tokens`` prompt tokens was admitted."""
        with self._lock:
            self.admitted_prompt_tokens += num_tokens

    def observe_prefilled(self, num_tokens: int) -> None:
        """A request's prompt was processed (its first token came out)."""
        with self._lock:
            self.prompt_tokens += num_tokens

    def observe_tokens(self, num_tokens: int, seconds_each: float | None) -> None:
        """``num_tokens`` new tokens; ``seconds_each`` is the inter-token latency (None: first)."""
        with self._lock:
            self.generation_tokens += num_tokens
            if seconds_each is not None and num_tokens:
                self.itl.observe(seconds_each, num_tokens)

    def observe_ttft(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def observe_finished(self, req: FinishedRequest) -> None:
        """Per-request histograms and request_success_total (one count per choice, as vLLM's
        per-sample child requests are counted)."""
        first = req.first_token if req.first_token is not None else req.end
        scheduled = req.scheduled if req.scheduled is not None else first
        values = {
            "e2e_request_latency_seconds": req.end - req.arrival,
            "request_queue_time_seconds": max(0.0, scheduled - req.arrival),
            "request_inference_time_seconds": max(0.0, req.end - scheduled),
            "request_prefill_time_seconds": max(0.0, first - scheduled),
            "request_decode_time_seconds": max(0.0, req.end - first),
        }
        per_choice = req.output_tokens / max(1, req.n)
        with self._lock:
            for name, value in values.items():
                self.latency[name].observe(value)
            if per_choice > 1:
                tpot = (req.end - first) / (per_choice - 1)
                self.latency["request_time_per_output_token_seconds"].observe(tpot)
            for reason in req.finished_reasons:
                key = reason if reason in self.success else "error"
                self.success[key] += 1
            self.request_prompt_tokens.observe(req.prompt_tokens)
            self.request_generation_tokens.observe(req.output_tokens)
            self.request_max_tokens.observe(req.max_tokens)
            self.request_n.observe(req.n)

    # -- exposition ---------------------------------------------------------------------
    def render(self, driver, tp_size: int) -> bytes:
        """The whole /metrics page."""
        families = list(self.families(driver, tp_size))
        families += list(_PROCESS_REGISTRY.collect())
        return generate_latest(_Families(families))

    def families(self, driver, tp_size: int) -> Iterator[Metric]:
        stats = driver.stats()
        block_size = _block_size(driver)
        with self._lock:
            yield from self._vllm_families(stats, block_size)
            yield from self._legacy_families(driver, tp_size, stats)
        yield from replica_families(stats)  # one sample per data-parallel replica

    def _vllm_families(self, stats: Mapping, block_size: int) -> Iterator[Metric]:
        labels = {"model_name": self.model_name}
        names, values = list(labels), list(labels.values())

        def gauge(name: str, help_text: str, value: float) -> Metric:
            fam = GaugeMetricFamily(PREFIX + name, help_text, labels=names)
            fam.add_metric(values, float(value))
            return fam

        def counter(name: str, help_text: str, value: float) -> Metric:
            fam = CounterMetricFamily(PREFIX + name, help_text, labels=names)
            fam.add_metric(values, float(value))
            return fam

        yield gauge(
            "num_requests_running",
            "Number of requests in model execution batches.",
            stats.get("num_running", 0),
        )
        yield gauge(
            "num_requests_waiting", "Number of requests waiting to be processed.",
            stats.get("num_waiting", 0),
        )  # fmt: skip
        yield gauge(
            "kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
            stats.get("kv_usage", 0.0),
        )  # fmt: skip
        yield counter(
            "num_preemptions", "Cumulative number of preemption from the engine.",
            stats.get("num_preemptions", 0),
        )  # fmt: skip
        yield counter(
            "prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
            stats.get("prefix_cache_queries", 0) * block_size,
        )
        yield counter(
            "prefix_cache_hits",
            "Prefix cache hits, in terms of number of cached tokens.",
            stats.get("prefix_cache_hits", 0) * block_size,
        )
        yield counter("prompt_tokens", "Number of prefill tokens processed.", self.prompt_tokens)
        yield counter(
            "generation_tokens", "Number of generation tokens processed.", self.generation_tokens
        )
        success = CounterMetricFamily(
            PREFIX + "request_success",
            "Count of successfully processed requests.",
            labels=[*names, "finished_reason"],
        )
        for reason, count in self.success.items():
            success.add_metric([*values, reason], float(count))
        yield success
        yield self.ttft.family(
            PREFIX + "time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            labels,
        )
        yield self.itl.family(
            PREFIX + "inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            labels,
        )
        yield self.itl.family(
            PREFIX + "time_per_output_token_seconds",
            "Histogram of time per output token in seconds (same as inter_token_latency).",
            labels,
        )
        for name, help_text in _REQUEST_HISTOGRAMS.items():
            yield self.latency[name].family(PREFIX + name, help_text, labels)
        yield self.request_prompt_tokens.family(
            PREFIX + "request_prompt_tokens",
            "Number of prefill tokens processed.",
            labels,
        )
        yield self.request_generation_tokens.family(
            PREFIX + "request_generation_tokens",
            "Number of generation tokens processed.",
            labels,
        )
        yield self.request_max_tokens.family(
            PREFIX + "request_params_max_tokens",
            "Histogram of the max_tokens request parameter.",
            labels,
        )
        yield self.request_n.family(
            PREFIX + "request_params_n", "Histogram of the n request parameter.", labels
        )

    def _legacy_families(self, driver, tp_size: int, stats: Mapping) -> Iterator[Metric]:
        fam = CounterMetricFamily(
            "dstp_requests", "HTTP requests by endpoint and status code.",
            labels=["endpoint", "status"],
        )  # fmt: skip
        for (endpoint, status), count in sorted(self.requests.items()):
            fam.add_metric([endpoint, status], float(count))
        yield fam
        yield CounterMetricFamily(
            "dstp_prompt_tokens", "Prompt tokens of admitted requests.",
            value=self.admitted_prompt_tokens,
        )  # fmt: skip
        yield CounterMetricFamily(
            "dstp_generation_tokens", "Generated tokens.", value=self.generation_tokens
        )
        yield self.ttft.family(
            "dstp_time_to_first_token_seconds",
            "Time from admission to the first generated token.",
            {},
        )
        yield self.itl.family(
            "dstp_time_per_output_token_seconds",
            "Latency between consecutive generated tokens of a request.",
            {},
        )
        yield self.latency["e2e_request_latency_seconds"].family(
            "dstp_e2e_request_latency_seconds", "Time from admission to the last token.", {}
        )
        gauges = {
            "dstp_healthy": ("gauge", "1 when every rank answers.", float(driver.healthy)),
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
            gauges["dstp_prefix_cache_hit_rate"] = ("gauge", _HIT_RATE_HELP, rate)
        for name, (kind, help_text, value) in sorted(gauges.items()):
            cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            yield cls(name, help_text, value=value)


class _Families:
    """What ``generate_latest`` needs: an object whose ``collect()`` yields families."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


def _block_size(driver) -> int:
    """Tokens per KV block, to report prefix-cache queries and hits in tokens as vLLM does."""
    engine = getattr(driver, "engine", None)
    for holder in (engine, getattr(engine, "config", None), getattr(engine, "scheduler", None)):
        size = getattr(holder, "block_size", None)
        if isinstance(size, int) and size > 0:
            return size
    return 1


_HIT_RATE_HELP = "Prefix-cache hits / queries since start."
# Engine stats keys -> (legacy metric name, kind, help).
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
    "prefix_cache_hit_rate": ("dstp_prefix_cache_hit_rate", "gauge", _HIT_RATE_HELP),
    "num_preemptions": (
        "dstp_num_preemptions_total",
        "counter",
        "Requests preempted (KV blocks reclaimed, recomputed later).",
    ),
}


# -- data-parallel replicas (dstp.replicas) ------------------------------------------------------------------------------
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
