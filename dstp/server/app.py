"""The Flask app: routes, and the checks every request passes first (API key, JSON content
type, early 429). The work behind each route is ``serving.py``'s; this file only routes.
"""

from __future__ import annotations

import hmac
import json
import logging
import time

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from dstp import __version__
from dstp.server.engine_loop import EngineLoop
from dstp.server.metrics import CONTENT_TYPE
from dstp.server.protocol import APIError, internal_error, parse_body, retry_later, unknown_model
from dstp.server.serving import ServerConfig, Serving

log = logging.getLogger("dstp")
ENDPOINTS = (
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/models",
    "/generate",
    "/tokenize",
    "/detokenize",
    "/health",
    "/metrics",
    "/version",
)
GENERATION_ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/generate")


def create_app(loop: EngineLoop, tokenizer, config: ServerConfig) -> Flask:
    """The Flask app; ``loop`` must be started by the caller."""
    app = Flask("dstp")
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    loop.metrics.bind(config.model_name, loop, config.block_size)
    loop.log_requests = loop.log_requests or config.log_requests
    _add_checks(app, loop, config)
    _add_error_handlers(app, config)
    _add_generation_routes(app, Serving(loop, tokenizer, config))
    _add_info_routes(app, loop, config)
    return app


def error_json(err: APIError) -> Response:
    resp = Response(json.dumps(err.body()), status=err.status, mimetype="application/json")
    for key, value in err.headers.items():
        resp.headers[key] = value
    return resp


def _authorized(api_key: str) -> bool:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        token.strip().encode(), api_key.encode()
    )


def _add_checks(app: Flask, loop: EngineLoop, config: ServerConfig) -> None:
    @app.before_request
    def check_api_key():
        if config.api_key is None or request.path == "/health" or _authorized(config.api_key):
            return None
        return error_json(
            APIError(
                401,
                "missing or incorrect API key: send 'Authorization: Bearer <key>'",
                type="authentication_error",
                code="invalid_api_key",
            )
        )

    @app.before_request
    def check_content_type():
        """POST bodies must say they are JSON: a web page can send text/plain (or no type)
        cross-site without a CORS preflight, application/json it cannot."""
        if request.method != "POST" or request.url_rule is None:
            return None
        if request.mimetype == "application/json":  # parameters (charset) are allowed
            return None
        got = request.headers.get("Content-Type")
        return error_json(
            APIError(
                415,
                "request bodies must be JSON sent with 'Content-Type: application/json' "
                + (f"(got {got!r})" if got else "(got no Content-Type)"),
                code="unsupported_media_type",
            )
        )

    @app.before_request
    def admit_early():
        """429 before parsing or tokenizing when the admission limit is already reached
        (``loop.submit_many`` decides atomically; this only saves a doomed request's work)."""
        if request.method == "POST" and request.path in GENERATION_ENDPOINTS:
            in_flight, limit = loop.num_in_flight, loop.max_queued_requests
            if in_flight >= limit:
                message = (
                    f"server busy: {in_flight} requests in flight (limit {limit}); retry later"
                )
                return error_json(retry_later(429, message, config.retry_after_s))
        return None

    @app.after_request
    def count(resp: Response) -> Response:
        endpoint = request.path if request.path in ENDPOINTS else "other"
        loop.metrics.count_request(endpoint, request.method, resp.status_code)
        if loop.log_requests and resp.status_code >= 400 and request.method == "POST":
            log.info(  # admitted requests get their line from the engine loop when they end
                "request rejected: %s %s status=%d", request.method, request.path,
                resp.status_code,
            )  # fmt: skip
        return resp


def _add_error_handlers(app: Flask, config: ServerConfig) -> None:
    @app.errorhandler(APIError)
    def api_error(err: APIError):
        return error_json(err)

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(_err):
        message = f"request body exceeds the {config.max_body_bytes}-byte limit"
        return error_json(APIError(413, message, code="body_too_large"))

    @app.errorhandler(HTTPException)
    def http_error(err: HTTPException):
        return error_json(APIError(err.code or 500, err.description or err.name))

    @app.errorhandler(Exception)
    def internal(err: Exception):
        return error_json(internal_error(f"{request.method} {request.path}", err))


def _add_generation_routes(app: Flask, serving: Serving) -> None:
    def body() -> dict:
        raw = request.get_data(cache=False)  # raises 413 past MAX_CONTENT_LENGTH
        return serving.check_model(parse_body(raw))

    def probe():
        return request.environ.get("waitress.client_disconnected")

    views = {
        "/v1/completions": lambda: serving.completions(body(), probe()),
        "/v1/chat/completions": lambda: serving.chat(body(), probe()),
        "/generate": lambda: serving.generate(body(), probe()),
        "/tokenize": lambda: serving.tokenize(body()),
        "/detokenize": lambda: serving.detokenize(body()),
    }
    for path, view in views.items():
        app.add_url_rule(path, path, view, methods=["POST"])


def _add_info_routes(app: Flask, loop: EngineLoop, config: ServerConfig) -> None:
    created = int(time.time())

    @app.get("/health")
    def health():
        if loop.recovering:  # supervised mode restarts the engine job; requests wait
            return {"status": "recovering"}, 503
        if loop.healthy:
            return {"status": "ok", "tp_size": config.tp_size}
        reason = "failed" if loop.failure else "stopping" if loop.stopping else "starting"
        return {"status": reason}, 503

    card = {
        "id": config.model_name,
        "object": "model",
        "created": created,
        "owned_by": "dstp",
        "max_model_len": config.max_model_len,
    }
    if config.model_description:
        card["description"] = config.model_description

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/<path:model_id>")
    def model(model_id: str):
        if model_id not in (config.model_name, *config.model_aliases):
            raise unknown_model(model_id, config.model_name)
        return card

    @app.get("/version")
    def version():
        return {"version": __version__}

    @app.get("/metrics")
    def metrics():
        return Response(loop.metrics.render(), headers={"Content-Type": CONTENT_TYPE})
