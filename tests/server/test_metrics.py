"""/metrics through prometheus_client with vLLM's names (``dstp:`` for ``vllm:``), the
request log lines of --enable-log-requests and the periodic load line; fake engine, real
engine loop, Flask app and waitress server in-process."""

from __future__ import annotations

import logging
import re

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from dstp.model.default_model import build_tokenizer
from dstp.server.app import create_app
from dstp.server.engine_loop import EngineLoop
from dstp.server.request_log import StatsLogger
from dstp.server.serving import ServerConfig
from tests.helpers.fake_engine import FakeEngine
from tests.helpers.server_helpers import InProcessServer, wait_until

MODEL = "fake-model"
# vLLM's metric names (prefix swapped), as a scrape exposes them, with their types.
VLLM_METRICS = {
    "dstp:num_requests_running": "gauge",
    "dstp:num_requests_waiting": "gauge",
    "dstp:kv_cache_usage_perc": "gauge",
    "dstp:num_preemptions": "counter",
    "dstp:prefix_cache_queries": "counter",
    "dstp:prefix_cache_hits": "counter",
    "dstp:prompt_tokens": "counter",
    "dstp:generation_tokens": "counter",
    "dstp:request_success": "counter",
    "dstp:time_to_first_token_seconds": "histogram",
    "dstp:inter_token_latency_seconds": "histogram",
    "dstp:time_per_output_token_seconds": "histogram",
    "dstp:e2e_request_latency_seconds": "histogram",
    "dstp:request_queue_time_seconds": "histogram",
    "dstp:request_inference_time_seconds": "histogram",
    "dstp:request_prefill_time_seconds": "histogram",
    "dstp:request_decode_time_seconds": "histogram",
    "dstp:request_time_per_output_token_seconds": "histogram",
    "dstp:request_prompt_tokens": "histogram",
    "dstp:request_generation_tokens": "histogram",
    "dstp:request_params_max_tokens": "histogram",
    "dstp:request_params_n": "histogram",
}


class _Served:
    def __init__(self, engine: FakeEngine, **loop_kw) -> None:
        self.engine = engine
        self.loop = EngineLoop(engine, heartbeat_interval_s=0.1, **loop_kw)
        self.loop.start()
        cfg = ServerConfig(
            model_name=MODEL,
            max_model_len=engine.max_model_len,
            vocab_size=engine.vocab_size,
            block_size=engine.block_size,
            log_requests=loop_kw.get("log_requests", False),
            max_log_len=4,
        )
        self.server = InProcessServer.start(create_app(self.loop, engine.tokenizer, cfg))
        self.url = self.server.url

    def close(self) -> None:
        self.loop.stop()
        self.server.close()

    def complete(self, **body) -> dict:
        resp = requests.post(f"{self.url}/v1/completions", json=body, timeout=30)
        assert resp.status_code == 200, resp.text
        return resp.json()

    def scrape(self) -> dict:
        resp = requests.get(f"{self.url}/metrics", timeout=10)
        assert resp.status_code == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return {f.name: f for f in text_string_to_metric_families(resp.text)}


@pytest.fixture(scope="module")
def served():
    s = _Served(FakeEngine(build_tokenizer()), log_requests=True, stats_interval_s=0.2)
    yield s
    s.close()


def _value(family, sample_name: str, **labels) -> float:
    for sample in family.samples:
        if sample.name == sample_name and all(sample.labels.get(k) == v for k, v in labels.items()):
            return sample.value
    raise AssertionError(f"no sample {sample_name}{labels} in {family.samples}")


def test_vllm_metric_names_types_and_model_label(served):
    served.complete(prompt="hello there", max_tokens=5, ignore_eos=True, n=2)
    served.complete(prompt="abc", max_tokens=3, ignore_eos=True)
    fams = served.scrape()
    for name, kind in VLLM_METRICS.items():
        assert name in fams, f"{name} missing"
        assert fams[name].type == kind, name
        for sample in fams[name].samples:
            assert sample.labels.get("model_name") == MODEL, sample
    # meanings
    assert _value(fams["dstp:num_requests_running"], "dstp:num_requests_running") == 0
    blocks = served.engine.num_blocks
    usage = _value(fams["dstp:kv_cache_usage_perc"], "dstp:kv_cache_usage_perc")
    assert usage == pytest.approx(1 - served.engine.free_blocks / blocks)
    ok = _value(
        fams["dstp:request_success"], "dstp:request_success_total", finished_reason="length"
    )
    assert ok >= 3  # one per choice: n=2 plus 1
    for reason in ("stop", "length", "abort", "error"):  # every label value exported from 0
        _value(fams["dstp:request_success"], "dstp:request_success_total", finished_reason=reason)
    ttft = fams["dstp:time_to_first_token_seconds"]
    assert _value(ttft, "dstp:time_to_first_token_seconds_count") >= 2
    assert _value(ttft, "dstp:time_to_first_token_seconds_bucket", le="+Inf") >= 2
    assert (
        _value(fams["dstp:e2e_request_latency_seconds"], "dstp:e2e_request_latency_seconds_count")
        >= 2
    )
    queue = fams["dstp:request_queue_time_seconds"]
    assert _value(queue, "dstp:request_queue_time_seconds_count") >= 2
    assert _value(fams["dstp:generation_tokens"], "dstp:generation_tokens_total") >= 13
    prompt = _value(fams["dstp:prompt_tokens"], "dstp:prompt_tokens_total")
    assert prompt >= len(build_tokenizer().encode("hello there"))
    # the fake engine reports 10 queried and 4 hit blocks of 4 tokens: vLLM counts tokens
    assert _value(fams["dstp:prefix_cache_queries"], "dstp:prefix_cache_queries_total") == 40
    assert _value(fams["dstp:prefix_cache_hits"], "dstp:prefix_cache_hits_total") == 16
    n_hist = fams["dstp:request_params_n"]
    assert _value(n_hist, "dstp:request_params_n_bucket", le="2.0") >= 2


def test_process_http_and_admission_metrics(served):
    fams = served.scrape()
    for name in ("process_cpu_seconds", "process_resident_memory_bytes", "python_info"):
        assert name in fams, name
    assert not [name for name in fams if name.startswith("dstp_")]  # one metric set
    requests.get(f"{served.url}/v1/models", timeout=10)
    fams = served.scrape()
    http = fams["http_requests"]
    assert _value(http, "http_requests_total", handler="/v1/models", method="GET", status="200")
    in_flight = fams["dstp:num_requests_in_flight"]
    assert _value(in_flight, "dstp:num_requests_in_flight", model_name=MODEL) == 0


def test_request_log_line(served, caplog):
    caplog.set_level(logging.INFO, logger="dstp")
    answer = served.complete(prompt="log me", max_tokens=4, ignore_eos=True)
    rid = answer["id"]  # the id the client got is the one the log names (vLLM's)
    assert rid.startswith("cmpl-")
    received = [
        r.getMessage() for r in caplog.records if f"received request {rid}:" in r.getMessage()
    ]
    assert len(received) == 1
    assert "prompt: 'log ', params: {'max_tokens': 4, 'ignore_eos': True}" in received[0]
    assert (
        "constraint: None" in received[0]
        and f"prompt_tokens: {answer['usage']['prompt_tokens']}" in received[0]
    )
    served.complete(prompt="x", max_tokens=3, structured_outputs={"regex": "[a-z]+"})
    assert any("constraint: regex" in r.getMessage() for r in caplog.records)
    pattern = re.compile(
        rf"request {re.escape(rid)}: status=ok finish_reason=length prompt_tokens=(\d+) "
        r"output_tokens=4 n=1 ttft=\d+\.\d+s queue=\d+\.\d+s latency=\d+\.\d+s"
    )
    assert wait_until(lambda: any(pattern.search(r.getMessage()) for r in caplog.records), 5)
    line = next(m for r in caplog.records if (m := pattern.search(r.getMessage())))
    assert int(line.group(1)) == answer["usage"]["prompt_tokens"]
    bad = requests.post(f"{served.url}/v1/completions", json={"prompt": 3}, timeout=10)
    assert bad.status_code == 400
    assert any(
        "request rejected: POST /v1/completions status=400" in r.getMessage()
        for r in caplog.records
    )


def test_periodic_stats_line_while_busy(caplog):
    caplog.set_level(logging.INFO, logger="dstp")
    s = _Served(FakeEngine(build_tokenizer(), step_delay_s=0.02), stats_interval_s=0.2)
    try:
        s.complete(prompt="busy busy", max_tokens=40, ignore_eos=True)  # ~0.8 s of steps
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("engine:")]
        assert lines, "no periodic stats line"
        assert re.match(
            r"engine: running: \d+ reqs, waiting: \d+ reqs, KV cache usage: \d+\.\d%, "
            r"prompt throughput: \d+\.\d tok/s, generation throughput: \d+\.\d tok/s, "
            r"prefix cache hit rate: \d+\.\d%$",
            lines[0],
        ), lines[0]
        assert any("generation throughput: 0.0 tok/s" not in line for line in lines)
        # no per-request lines without --enable-log-requests
        assert not any(r.getMessage().startswith("request ") for r in caplog.records)
    finally:
        s.close()


def test_stats_logger_quiet_when_idle_and_between_intervals(caplog):
    caplog.set_level(logging.INFO, logger="dstp")
    stats = {"num_running": 0, "num_waiting": 0, "kv_usage": 0.0}
    logger = StatsLogger(interval_s=0.0)
    assert not logger.maybe_log(stats, 0, 0)  # idle: nothing to say
    busy = {**stats, "num_running": 2, "prefix_cache_queries": 4, "prefix_cache_hits": 1}
    assert logger.maybe_log(busy, 10, 5)
    assert "prefix cache hit rate: 25.0%" in caplog.records[-1].getMessage()
    slow = StatsLogger(interval_s=3600)
    assert not slow.maybe_log(busy, 10, 5)  # the interval has not passed


def test_docs_serving_lists_every_metric_flag_and_endpoint(served):
    """docs/serving.md documents every metric a scrape shows, every flag and endpoint."""
    from pathlib import Path

    from dstp.server.app import ENDPOINTS
    from dstp.server.cli import build_parser

    doc = (Path(__file__).resolve().parents[2] / "docs" / "serving.md").read_text()
    for name, fam in served.scrape().items():
        if name.startswith(("process_", "python_")):
            continue
        shown = f"{name}_total" if fam.type == "counter" else name
        assert f"`{shown}" in doc, f"metric {shown} is not in docs/serving.md"
    for action in build_parser()._actions:
        for flag in action.option_strings:
            if flag not in ("-h", "--help"):
                assert f"`{flag}`" in doc, f"flag {flag} is not in docs/serving.md"
    for path in ENDPOINTS:
        assert f"{path}" in doc, path
