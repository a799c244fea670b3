"""OpenAI-compatible HTTP API (Flask), served by waitress on global rank 0.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with
``stream: true`` as server-sent events in OpenAI's format), ``GET /v1/models``,
``GET /health``, ``GET /metrics`` (Prometheus text) and the native
``POST /generate`` (token ids in and out). Handlers parse and validate
(``server_protocol``), hand the request to the ``EngineDriver`` and format its
outputs; they never touch the engine directly.
"""

from __future__ import annotations

import functools
import hmac
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from .async_engine import EngineDriver, EngineUnavailable, QueueFull, RequestFailed
from .sampling import InvalidRequest, RequestOutput
from .server_protocol import APIError, ParsedRequest, parse_chat, parse_completion, parse_generate

log = logging.getLogger("dstp")

ENDPOINTS = (
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/models",
    "/generate",
    "/health",
    "/metrics",
)


@dataclass
class ServerConfig:
    model_name: str  # the id /v1/models reports and requests may name
    max_model_len: int
    vocab_size: int
    api_key: str | None = None
    max_body_bytes: int = 4 * 1024 * 1024
    retry_after_s: int = 1
    model_aliases: tuple[str, ...] = ()  # other accepted "model" values (e.g. the path)
    model_description: str | None = None  # shown in /v1/models (the default model says "random")
    tp_size: int = 1


class TokenizerAccess:
    """Serialises tokenizer calls: HF tokenizers are not safe to share across threads."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._lock = threading.Lock()
        self._token_cache: dict[int, str] = {}

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def _require(self) -> None:
        if self.tokenizer is None:
            raise APIError(
                400,
                "this model has no tokenizer: send prompts as token ids",
                param="prompt",
                code="no_tokenizer",
            )

    def encode(self, text: str) -> list[int]:
        self._require()
        with self._lock:
            return list(self.tokenizer.encode(text))

    def render_chat(self, messages: list[dict]) -> list[int]:
        self._require()
        if not self.has_chat_template:
            raise APIError(
                400,
                "this model has no chat template, so /v1/chat/completions cannot format "
                "messages; use /v1/completions with a plain prompt",
                param="messages",
                code="no_chat_template",
            )
        try:
            with self._lock:
                text = self.tokenizer.apply_chat_template(
                    messages, add_generation_prompt=True, tokenize=False
                )
                return list(self.tokenizer.encode(text, add_special_tokens=False))
        except APIError:
            raise
        except Exception as exc:  # jinja raise_exception(): e.g. roles not alternating
            raise APIError(400, f"chat template rejected the messages: {exc}", "messages") from None

    def decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        with self._lock:
            return self.tokenizer.decode(ids)

    def token(self, token_id: int) -> str:
        text = self._token_cache.get(token_id)
        if text is None:
            text = self.decode([token_id])
            self._token_cache[token_id] = text
        return text


def _envelope(
    rid: str, kind: str, created: int, model: str, choices: list[dict], usage: dict | None = None
) -> dict:
    """The OpenAI response object around ``choices`` (one SSE chunk, or a whole answer)."""
    obj = {"id": rid, "object": kind, "created": created, "model": model, "choices": choices}
    if usage is not None:
        obj["usage"] = usage
    return obj


def _sse(obj: object) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'), ensure_ascii=False)}\n\n"


def _error_json(err: APIError) -> Response:
    resp = Response(json.dumps(err.body()), status=err.status, mimetype="application/json")
    for key, value in err.headers.items():
        resp.headers[key] = value
    return resp


def _usage(out: RequestOutput) -> dict:
    completion = sum(len(c.token_ids) for c in out.outputs)
    prompt = len(out.prompt_token_ids)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _finish_reason(reason: str | None) -> str | None:
    if reason == "abort":  # ended by the server (shutdown), not by its client
        raise RequestFailed("request aborted by the server")
    return reason


def create_app(driver: EngineDriver, tokenizer, config: ServerConfig) -> Flask:
    """The Flask app; ``driver`` must be started by the caller."""
    app = Flask("dstp")
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    tok = TokenizerAccess(tokenizer)
    created = int(time.time())
    accepted_models = {config.model_name, *config.model_aliases}

    # -- helpers ---------------------------------------------------------------
    def read_json() -> dict:
        raw = request.get_data(cache=False)  # raises 413 past MAX_CONTENT_LENGTH
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise APIError(400, f"request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise APIError(400, "request body must be a JSON object")
        model = body.get("model")
        if isinstance(model, str) and model not in accepted_models:
            raise APIError(
                404,
                f"the model '{model}' does not exist; this server serves '{config.model_name}'",
                param="model",
                code="model_not_found",
            )
        return body

    def submit(parsed: ParsedRequest):
        try:
            return driver.submit(parsed.prompt_token_ids, parsed.params)
        except InvalidRequest as exc:
            raise APIError(400, str(exc)) from None
        except QueueFull as exc:
            raise APIError(
                429,
                str(exc),
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": str(config.retry_after_s)},
            ) from None
        except EngineUnavailable as exc:
            raise APIError(
                503,
                str(exc),
                type="service_unavailable",
                headers={"Retry-After": str(config.retry_after_s)},
            ) from None

    def disconnected_probe() -> Callable[[], bool] | None:
        return request.environ.get("waitress.client_disconnected")

    def wait_result(handle, probe) -> RequestOutput:
        try:
            out = handle.result(disconnected=probe)
        except RequestFailed as exc:
            raise APIError(503, str(exc), type="service_unavailable") from None
        if out is None:  # client gone; nobody reads this answer
            raise APIError(499, "client closed the request")
        try:
            for c in out.outputs:
                _finish_reason(c.finish_reason)
        except RequestFailed as exc:
            raise APIError(503, str(exc), type="service_unavailable") from None
        return out

    def stream(events: Iterator[str]) -> Response:
        return Response(
            events,
            mimetype="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    def stream_errors(gen: Iterator[str]) -> Iterator[str]:
        """An SSE error event instead of a hang when the engine fails mid-stream."""
        try:
            yield from gen
        except RequestFailed as exc:
            err = APIError(503, str(exc), type="service_unavailable")
            yield _sse(err.body())

    def completion_logprobs(c, new_only: bool) -> dict | None:
        if c.logprobs is None:
            return None
        entries = c.logprobs[-len(c.new_token_ids) :] if new_only else c.logprobs
        if new_only and not c.new_token_ids:
            entries = []
        tokens = [tok.token(e.token_id) for e in entries]
        offsets, pos = [], len(c.text) - len(c.delta_text) if new_only else 0
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        return {
            "tokens": tokens,
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{tok.token(t): lp for t, lp in e.top.items()} for e in entries],
            "text_offset": offsets,
        }

    def chat_logprobs(c, new_only: bool) -> dict | None:
        if c.logprobs is None:
            return None
        entries = c.logprobs[-len(c.new_token_ids) :] if new_only else c.logprobs
        if new_only and not c.new_token_ids:
            entries = []

        def item(token_id: int, lp: float) -> dict:
            s = tok.token(token_id)
            return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

        return {
            "content": [
                {
                    **item(e.token_id, e.logprob),
                    "top_logprobs": [item(t, lp) for t, lp in e.top.items()],
                }
                for e in entries
            ]
        }

    # -- hooks -----------------------------------------------------------------
    @app.before_request
    def check_api_key():
        if config.api_key is None or request.path == "/health":
            return None
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), config.api_key.encode()
        ):
            return _error_json(
                APIError(
                    401,
                    "missing or incorrect API key: send 'Authorization: Bearer <key>'",
                    type="authentication_error",
                    code="invalid_api_key",
                )
            )
        return None

    @app.after_request
    def count(resp: Response) -> Response:
        endpoint = request.path if request.path in ENDPOINTS else "other"
        driver.metrics.count_request(endpoint, resp.status_code)
        return resp

    @app.errorhandler(APIError)
    def api_error(err: APIError):
        return _error_json(err)

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(_err):
        return _error_json(
            APIError(
                413,
                f"request body exceeds the {config.max_body_bytes}-byte limit",
                code="body_too_large",
            )
        )

    @app.errorhandler(HTTPException)
    def http_error(err: HTTPException):
        return _error_json(APIError(err.code or 500, err.description or err.name))

    @app.errorhandler(Exception)
    def internal(err: Exception):
        log.exception("unhandled error in %s", request.path)
        return _error_json(APIError(500, f"internal error: {err}", type="server_error"))

    # -- routes ----------------------------------------------------------------
    @app.get("/health")
    def health():
        if driver.healthy:
            return {"status": "ok", "tp_size": config.tp_size}
        reason = "failed" if driver.failure else "stopping" if driver.stopping else "starting"
        return {"status": reason}, 503

    @app.get("/v1/models")
    def models():
        card = {
            "id": config.model_name,
            "object": "model",
            "created": created,
            "owned_by": "dstp",
            "max_model_len": config.max_model_len,
        }
        if config.model_description:
            card["description"] = config.model_description
        return {"object": "list", "data": [card]}

    @app.get("/metrics")
    def metrics():
        return Response(
            driver.metrics.render(_engine_gauges(driver, config)),
            mimetype="text/plain; version=0.0.4",
        )

    @app.post("/v1/completions")
    def completions():
        body = read_json()
        parsed = parse_completion(body, tok.encode, config.vocab_size, config.max_model_len)
        probe = disconnected_probe()
        handle = submit(parsed)
        rid, ts = f"cmpl-{handle.request_id}", int(time.time())
        echo = tok.decode(parsed.prompt_token_ids) if parsed.echo else ""

        chunk = functools.partial(_envelope, rid, "text_completion", ts, config.model_name)

        if not parsed.stream:
            out = wait_result(handle, probe)
            choices = [
                {
                    "index": c.index,
                    "text": echo + c.text,
                    "logprobs": completion_logprobs(c, new_only=False),
                    "finish_reason": c.finish_reason,
                }
                for c in sorted(out.outputs, key=lambda c: c.index)
            ]
            return chunk(choices, _usage(out))

        def events() -> Iterator[str]:
            last = None
            if echo:
                for i in range(parsed.params.n):
                    choice = {"index": i, "text": echo, "logprobs": None, "finish_reason": None}
                    yield _sse(chunk([choice]))
            for out in handle.outputs(disconnected=probe):
                last = out
                for c in out.outputs:
                    reason = _finish_reason(c.finish_reason)
                    if not (c.delta_text or reason):
                        continue  # e.g. half a UTF-8 character so far
                    choice = {
                        "index": c.index,
                        "text": c.delta_text,
                        "logprobs": completion_logprobs(c, new_only=True),
                        "finish_reason": reason,
                    }
                    yield _sse(chunk([choice]))
            if last is None or not last.finished:
                return  # client went away
            if parsed.include_usage:
                yield _sse(chunk([], _usage(last)))
            yield "data: [DONE]\n\n"

        return stream(stream_errors(events()))

    @app.post("/v1/chat/completions")
    def chat_completions():
        body = read_json()
        parsed = parse_chat(body, tok.render_chat, config.vocab_size, config.max_model_len)
        probe = disconnected_probe()
        handle = submit(parsed)
        rid, ts = f"chatcmpl-{handle.request_id}", int(time.time())

        chunk = functools.partial(_envelope, rid, "chat.completion.chunk", ts, config.model_name)

        if not parsed.stream:
            out = wait_result(handle, probe)
            choices = [
                {
                    "index": c.index,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": chat_logprobs(c, new_only=False),
                    "finish_reason": c.finish_reason,
                }
                for c in sorted(out.outputs, key=lambda c: c.index)
            ]
            return _envelope(rid, "chat.completion", ts, config.model_name, choices, _usage(out))

        def events() -> Iterator[str]:
            last = None
            for i in range(parsed.params.n):
                first = {"role": "assistant", "content": ""}
                yield _sse(
                    chunk([{"index": i, "delta": first, "logprobs": None, "finish_reason": None}])
                )
            for out in handle.outputs(disconnected=probe):
                last = out
                for c in out.outputs:
                    reason = _finish_reason(c.finish_reason)
                    if not (c.delta_text or reason):
                        continue
                    delta = {"content": c.delta_text} if c.delta_text else {}
                    choice = {
                        "index": c.index,
                        "delta": delta,
                        "logprobs": chat_logprobs(c, new_only=True),
                        "finish_reason": reason,
                    }
                    yield _sse(chunk([choice]))
            if last is None or not last.finished:
                return
            if parsed.include_usage:
                yield _sse(chunk([], _usage(last)))
            yield "data: [DONE]\n\n"

        return stream(stream_errors(events()))

    @app.post("/generate")
    def generate():
        body = read_json()
        parsed = parse_generate(body, config.vocab_size, config.max_model_len)
        probe = disconnected_probe()
        handle = submit(parsed)

        def native_logprobs(entries) -> list[dict] | None:
            if entries is None:
                return None
            return [
                {
                    "token_id": e.token_id,
                    "logprob": e.logprob,
                    "top": {str(t): lp for t, lp in e.top.items()},
                }
                for e in entries
            ]

        if not parsed.stream:
            out = wait_result(handle, probe)
            return {
                "request_id": handle.request_id,
                "prompt_token_ids": out.prompt_token_ids,
                "outputs": [
                    {
                        "index": c.index,
                        "token_ids": c.token_ids,
                        "text": c.text,
                        "finish_reason": c.finish_reason,
                        "stop_reason": c.stop_reason,
                        "logprobs": native_logprobs(c.logprobs),
                    }
                    for c in sorted(out.outputs, key=lambda c: c.index)
                ],
                "usage": _usage(out),
            }

        def events() -> Iterator[str]:
            last = None
            for out in handle.outputs(disconnected=probe):
                last = out
                outputs = []
                for c in out.outputs:
                    reason = _finish_reason(c.finish_reason)
                    if not (c.new_token_ids or reason):
                        continue
                    new = len(c.new_token_ids)
                    outputs.append(
                        {
                            "index": c.index,
                            "new_token_ids": c.new_token_ids,
                            "delta_text": c.delta_text,
                            "finish_reason": reason,
                            "logprobs": native_logprobs(
                                c.logprobs[-new:] if c.logprobs and new else None
                            ),
                        }
                    )
                if outputs:
                    yield _sse({"request_id": handle.request_id, "outputs": outputs})
            if last is not None and last.finished:
                yield _sse({"request_id": handle.request_id, "usage": _usage(last)})
                yield "data: [DONE]\n\n"

        return stream(stream_errors(events()))

    return app


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


def _engine_gauges(driver: EngineDriver, config: ServerConfig) -> dict:
    stats = driver.stats()
    gauges: dict[str, tuple[str, str, float]] = {
        "dstp_healthy": ("gauge", "1 when every rank answers.", 1.0 if driver.healthy else 0.0),
        "dstp_tp_size": ("gauge", "Tensor-parallel ranks.", float(config.tp_size)),
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


class LazyApp:
    """WSGI entry point: 503 until the real app is set, and a count of open responses.

    The port binds before the model loads (a taken port fails fast), and the
    count lets shutdown wait until every in-flight response has been written.
    """

    def __init__(self) -> None:
        self.app = None
        self._lock = threading.Lock()
        self.active = 0

    def __call__(self, environ, start_response):
        if self.app is None:
            body = json.dumps(
                {"error": {"message": "the model is loading", "type": "service_unavailable"}}
            ).encode()
            start_response(
                "503 Service Unavailable",
                [("Content-Type", "application/json"), ("Retry-After", "5")],
            )
            return [body]
        with self._lock:
            self.active += 1
        try:
            result = self.app(environ, start_response)
        except BaseException:
            self._done()
            raise
        return _Closing(result, self._done)

    def _done(self) -> None:
        with self._lock:
            self.active -= 1


class _Closing:
    """Iterate a WSGI response and call ``on_close`` exactly once when the server closes it."""

    def __init__(self, inner, on_close: Callable[[], None]) -> None:
        self._inner = inner
        self._on_close = on_close

    def __iter__(self):
        return iter(self._inner)

    def close(self) -> None:
        try:
            close = getattr(self._inner, "close", None)
            if close is not None:
                close()
        finally:
            on_close, self._on_close = self._on_close, None
            if on_close is not None:
                on_close()


def make_wsgi_server(app, host: str, port: int, threads: int, max_body_bytes: int):
    """A waitress server bound now (fails fast if the port is taken); ``pump_once`` serves."""
    from waitress import create_server

    socket_map: dict = {}
    server = create_server(
        app,
        map=socket_map,
        host=host,
        port=port,
        threads=threads,
        connection_limit=max(100, 2 * threads),
        # our own limit answers a JSON 413; waitress's (plain text) is only a backstop
        max_request_body_size=2 * max_body_bytes + 65536,
        channel_request_lookahead=1,  # lets handlers see a client that hung up
        ident="dstp",
        clear_untrusted_proxy_headers=True,
    )
    server.socket_map = socket_map  # what serve_forever / pump_once drive
    return server


def pump_once(server, timeout_s: float = 0.2) -> None:
    """One slice of waitress's event loop (it does the socket I/O for every response)."""
    from waitress import wasyncore

    wasyncore.loop(timeout=timeout_s, map=server.socket_map, count=1)
