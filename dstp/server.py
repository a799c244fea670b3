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
import io
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from flask import Flask, Response, request
from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser
from waitress.server import TcpWSGIServer
from waitress.task import ErrorTask, ThreadedTaskDispatcher
from waitress.utilities import Error as WaitressError
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
GENERATION_ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/generate")
MAX_JSON_DEPTH = 64  # nesting levels a request body may have (OpenAI bodies need < 10)


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
            raise APIError(
                400, f"chat template rejected the messages: {exc}", param="messages"
            ) from None

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


def _internal_error(what: str, exc: BaseException | None = None) -> APIError:
    """Log the exception (default: the one being handled) with a fresh id; the client gets
    the id, never the exception's text."""
    error_id = f"err-{uuid.uuid4().hex[:12]}"
    log.error("internal error %s in %s", error_id, what, exc_info=exc or True)
    return APIError(
        500,
        f"internal server error (id {error_id}); the server log has the details",
        type="server_error",
        code="internal_error",
    )


def _too_deep(obj: object, limit: int) -> bool:
    """Whether JSON ``obj`` nests deeper than ``limit`` (iterative: no recursion to overflow)."""
    stack = [(obj, 1)] if isinstance(obj, (dict, list)) else []
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item
        if depth > limit:
            return True
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


def _usage(out: RequestOutput) -> dict:
    completion = sum(len(c.token_ids) for c in out.outputs)
    prompt = len(out.prompt_token_ids)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


class GenerationFailed(Exception):
    """The engine ended this request alone (finish_reason "error"); it logged the cause."""

    def api_error(self) -> APIError:
        return APIError(500, str(self), type="server_error", code="generation_failed")


def _finish_reason(reason: str | None, request_id: str) -> str | None:
    if reason == "abort":  # ended by the server (shutdown), not by its client
        raise RequestFailed("request aborted by the server")
    if reason == "error":
        raise GenerationFailed(
            f"generation failed for request {request_id} (the other requests carry on); "
            "the server log has the details"
        )
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
        too_deep = APIError(
            400,
            f"request body is nested too deeply (more than {MAX_JSON_DEPTH} levels of "
            "arrays/objects)",
            code="json_too_deep",
        )
        try:
            body = json.loads(raw)
        except RecursionError:  # thousands of levels: the decoder itself gives up
            raise too_deep from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise APIError(400, f"request body is not valid JSON: {exc}") from None
        if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and _too_deep(body, MAX_JSON_DEPTH):
            raise too_deep  # later repr()s or copies of it could still overflow the stack
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

    def queue_full(message: str) -> APIError:
        return APIError(
            429,
            message,
            type="rate_limit_error",
            code="queue_full",
            headers={"Retry-After": str(config.retry_after_s)},
        )

    def submit(parsed: ParsedRequest):
        try:
            return driver.submit(parsed.prompt_token_ids, parsed.params)
        except InvalidRequest as exc:
            raise APIError(400, str(exc), param=exc.param) from None
        except QueueFull as exc:
            raise queue_full(str(exc)) from None
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
                _finish_reason(c.finish_reason, out.request_id)
        except RequestFailed as exc:
            raise APIError(503, str(exc), type="service_unavailable") from None
        except GenerationFailed as exc:
            raise exc.api_error() from None
        return out

    def stream(events: Iterator[str]) -> Response:
        return Response(
            events,
            mimetype="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    def stream_errors(gen: Iterator[str]) -> Iterator[str]:
        """An SSE error event instead of a hang or a cut stream when something fails mid-stream."""
        where = f"stream of {request.path}"  # no request context once the stream runs

        def events() -> Iterator[str]:
            try:
                yield from gen
            except RequestFailed as exc:
                err = APIError(503, str(exc), type="service_unavailable")
                yield _sse(err.body())
            except GenerationFailed as exc:
                yield _sse(exc.api_error().body())
            except Exception:  # a bug: headers are sent, so the error goes in the stream
                yield _sse(_internal_error(where).body())

        return events()

    def completion_logprobs(c, new_only: bool) -> dict | None:
        entries = c.new_logprobs if new_only else c.logprobs
        if entries is None:
            return None
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
        entries = c.new_logprobs if new_only else c.logprobs
        if entries is None:
            return None

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

    @app.before_request
    def check_content_type():
        """POST bodies must say they are JSON: a web page can send text/plain (or no type)
        cross-site without a CORS preflight, application/json it cannot."""
        if request.method != "POST" or request.url_rule is None:
            return None
        if request.mimetype != "application/json":  # parameters (charset) are allowed
            got = request.headers.get("Content-Type")
            return _error_json(
                APIError(
                    415,
                    "request bodies must be JSON sent with 'Content-Type: application/json' "
                    + (f"(got {got!r})" if got else "(got no Content-Type)"),
                    code="unsupported_media_type",
                )
            )
        return None

    @app.before_request
    def admit_early():
        """429 before parsing or tokenizing when the admission limit is already reached
        (``driver.submit`` decides atomically; this only saves a doomed request's work)."""
        if request.method == "POST" and request.path in GENERATION_ENDPOINTS:
            in_flight, limit = driver.num_in_flight, driver.max_queued_requests
            if in_flight >= limit:
                return _error_json(
                    queue_full(
                        f"server busy: {in_flight} requests in flight (limit {limit}); retry later"
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
        return _error_json(_internal_error(f"{request.method} {request.path}", err))

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
        echo = ""
        if parsed.echo:  # the prompt as the client sent it (token ids: their plain decode)
            echo = parsed.prompt_text or tok.decode(parsed.prompt_token_ids)

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
                    reason = _finish_reason(c.finish_reason, out.request_id)
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
                    reason = _finish_reason(c.finish_reason, out.request_id)
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
                    reason = _finish_reason(c.finish_reason, out.request_id)
                    if not (c.new_token_ids or reason):
                        continue
                    new = len(c.new_token_ids)
                    outputs.append(
                        {
                            "index": c.index,
                            "new_token_ids": c.new_token_ids,
                            "delta_text": c.delta_text,
                            "finish_reason": reason,
                            "logprobs": native_logprobs(c.new_logprobs if new else None),
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


# -- the HTTP server (waitress) ---------------------------------------------------------
# Every admitted generation request holds one waitress thread until its last byte is
# written (WSGI is synchronous), so the request pool is sized from the admission limit
# (``http_threads``): then the limit, not the pool, is what runs out, and the spare
# threads answer the 429s at once. GET /health, /metrics and /v1/models, and waitress's
# own error answers, run on a small pool of their own ("fast lane"), so they answer
# within milliseconds however many streams are running. Slow clients are bounded on the
# event-loop side: a whole request (headers and body) must arrive within
# ``request_read_timeout_s`` (a "slowloris" trickling one byte at a time resets
# waitress's idle timer forever), an idle connection closes after ``idle_timeout_s``,
# and at most ``connection_limit(threads)`` connections are open at once (further ones
# wait in the listen backlog).
RESERVE_THREADS = 16  # request threads beyond the admission limit: 4xx/429 answers, quick requests
FAST_THREADS = 4  # the fast lane
FAST_PATHS = frozenset(("/health", "/metrics", "/v1/models"))
REQUEST_READ_TIMEOUT_S = 30.0  # to receive one whole request, from its first byte
IDLE_TIMEOUT_S = 30  # a connection with no request in progress
MAX_HEADER_BYTES = 64 * 1024  # request line + headers (larger: 431)
# A body over --max-body-bytes is still read (and dropped) to its end, up to this, before
# the 413 goes out: a client that is still sending when the server closes gets a reset,
# not the answer (urllib, requests and curl without Expect all send the whole body first).
DRAIN_MAX_BYTES = 256 * 1024 * 1024
RECV_BYTES = 64 * 1024  # per read() of a socket (waitress: 8 KiB)


def http_threads(max_queued_requests: int) -> int:
    """Request threads for an admission limit: one per admitted request plus the reserve."""
    return max_queued_requests + RESERVE_THREADS


def connection_limit(threads: int) -> int:
    """Open connections at most: every thread's, as many again idle or being read, >= 100."""
    return max(100, 2 * (threads + FAST_THREADS))


class _HTTPError(WaitressError):
    """An error waitress answers before the app sees the request (see ``_JSONErrorTask``)."""

    def __init__(self, code: int, reason: str, message: str, error_code: str | None) -> None:
        super().__init__(message)
        self.code, self.reason, self.error_code = code, reason, error_code


def _body_too_large(limit: int) -> _HTTPError:
    message = f"request body exceeds the {limit}-byte limit"
    return _HTTPError(413, "Request Entity Too Large", message, "body_too_large")


class _DiscardBuffer:
    """Stands in for waitress's body buffer while an oversized body is read: keeps nothing."""

    def __init__(self, size: int) -> None:
        self.size = size

    def append(self, data: bytes) -> None:
        self.size += len(data)

    def __len__(self) -> int:
        return self.size

    def getfile(self):
        return io.BytesIO()

    def close(self) -> None:
        pass


class _RequestParser(HTTPRequestParser):
    """waitress's parser, plus: when its first byte came (for the read deadline), and a
    body over ``max_body_bytes`` read to its end and dropped, then answered 413."""

    max_body_bytes = 4 * 1024 * 1024  # set per server (make_wsgi_server)

    def __init__(self, adj) -> None:
        super().__init__(adj)
        self.started = time.monotonic()
        self._dropping = False

    def received(self, data: bytes) -> int:
        had_headers = self.headers_finished
        consumed = super().received(data)
        if self.error is not None or self._dropping or self.completed:
            return consumed  # waitress's own errors (past DRAIN_MAX_BYTES too) stay as they are
        if not had_headers and self.headers_finished:
            if self.content_length > self.max_body_bytes:
                self._drop_body()
        elif self.body_rcv is not None and len(self.body_rcv) > self.max_body_bytes:
            self._drop_body()  # chunked: the size shows as it arrives
        return consumed

    def _drop_body(self) -> None:
        self.error = _body_too_large(self.max_body_bytes)
        if self.expect_continue:  # "Expect: 100-continue" not answered yet: the body is held
            self.expect_continue = False  # back, so answer now (and send no 100 Continue)
            self.completed = True
            return
        rcv = self.body_rcv
        kept, rcv.buf = rcv.buf, _DiscardBuffer(len(rcv.buf))
        kept.close()
        self._dropping = True  # completed (then answered) when the body has all arrived


class _JSONErrorTask(ErrorTask):
    """waitress's own error answers (413, 431, malformed request 400, 500) as OpenAI JSON."""

    def execute(self) -> None:
        err = self.request.error
        code = getattr(err, "error_code", None)
        message = err.body
        if err.code == 413 and code is None:  # waitress's backstop, past DRAIN_MAX_BYTES
            err = _body_too_large(self.channel.server.max_body_bytes)
            code, message = err.error_code, err.body
        kind = "server_error" if err.code >= 500 else "invalid_request_error"
        body = json.dumps(APIError(err.code, message, type=kind, code=code).body()).encode()
        self.status = f"{err.code} {err.reason}"
        self.response_headers.append(("Content-Type", "application/json"))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class _Channel(HTTPChannel):
    parser_class = _RequestParser  # per server: a subclass with its max_body_bytes
    error_task_class = _JSONErrorTask


class WSGIServer(TcpWSGIServer):
    """waitress's TCP server with a fast lane, a request-read deadline and JSON errors."""

    def __init__(
        self,
        app,
        adj: Adjustments,
        max_body_bytes: int,
        request_read_timeout_s: float,
    ) -> None:
        self.max_body_bytes = max_body_bytes
        self.request_read_timeout_s = request_read_timeout_s
        parser = type("RequestParser", (_RequestParser,), {"max_body_bytes": max_body_bytes})
        self.channel_class = type("Channel", (_Channel,), {"parser_class": parser})
        self.socket_map: dict = {}  # what pump_once drives
        self.fast_dispatcher = ThreadedTaskDispatcher()
        super().__init__(app, self.socket_map, dispatcher=ThreadedTaskDispatcher(), adj=adj)
        # threads only once the port is bound (a taken port raises above, leaving none)
        self.task_dispatcher.set_thread_count(adj.threads)
        self.fast_dispatcher.set_thread_count(FAST_THREADS)

    def add_task(self, channel) -> None:
        """Called (event loop or a worker) when a channel has a complete request to serve."""
        req = channel.requests[0] if channel.requests else None
        fast = req is not None and (
            req.error is not None or (req.command in ("GET", "HEAD") and req.path in FAST_PATHS)
        )
        (self.fast_dispatcher if fast else self.task_dispatcher).add_task(channel)

    def maintenance(self, now: float) -> None:
        """Every ``cleanup_interval`` s on the event loop: close idle connections (waitress)
        and connections whose request has been arriving for too long (ours)."""
        super().maintenance(now)
        mono = time.monotonic()
        for channel in list(self.active_channels.values()):
            req = channel.request  # a request still being received
            if req is None or req.completed or channel.will_close:
                continue
            if channel.requests:  # still answering the one before: not the client's delay
                req.started = mono
            elif mono - getattr(req, "started", mono) > self.request_read_timeout_s:
                log.info(
                    "closing the connection from %s: its request did not arrive within %.0f s",
                    channel.addr[0] if channel.addr else "?",
                    self.request_read_timeout_s,
                )
                channel.will_close = True  # the loop closes it on its next pass

    def close(self) -> None:
        super().close()
        for dispatcher in (self.task_dispatcher, self.fast_dispatcher):
            dispatcher.set_thread_count(0)  # idle threads exit, busy ones after their task


def make_wsgi_server(
    app,
    host: str,
    port: int,
    threads: int,
    max_body_bytes: int,
    *,
    request_read_timeout_s: float = REQUEST_READ_TIMEOUT_S,
    idle_timeout_s: int = IDLE_TIMEOUT_S,
) -> WSGIServer:
    """A waitress server bound now (fails fast if the port is taken); ``pump_once`` serves.

    ``threads`` serve requests; size it with ``http_threads(admission limit)``.
    """
    adj = Adjustments(
        host=host,
        port=port,
        threads=threads,
        connection_limit=connection_limit(threads),
        channel_timeout=idle_timeout_s,
        cleanup_interval=1,  # how often maintenance() runs, so deadlines hold within ~1 s
        max_request_header_size=MAX_HEADER_BYTES,
        max_request_body_size=max(DRAIN_MAX_BYTES, max_body_bytes + 1),
        recv_bytes=RECV_BYTES,
        channel_request_lookahead=1,  # lets handlers see a client that hung up
        asyncore_use_poll=True,  # select() fails on descriptors >= 1024
        ident="dstp",
        clear_untrusted_proxy_headers=True,
    )
    return WSGIServer(app, adj, max_body_bytes, request_read_timeout_s)


def pump_once(server, timeout_s: float = 0.2) -> None:
    """One slice of waitress's event loop (it does the socket I/O for every response)."""
    from waitress import wasyncore

    wasyncore.loop(timeout=timeout_s, map=server.socket_map, count=1, use_poll=True)
