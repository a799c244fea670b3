"""OpenAI request parsing and validation: JSON bodies -> token ids + SamplingParams.

Every problem becomes an ``APIError`` with the status and the OpenAI error
shape (``{"error": {"message", "type", "param", "code"}}``), so a bad request
gets a precise answer and never reaches the engine. Unknown parameters are
rejected (a typo such as ``max_token`` would otherwise be silently ignored),
except the documented extensions below that vLLM-style benchmark clients send.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .sampling import InvalidRequest, SamplingParams

# Sampling extensions accepted on every endpoint (vLLM names).
EXTENSIONS = ("top_k", "min_p", "repetition_penalty", "ignore_eos", "min_tokens", "stop_token_ids")
_COMMON = ("model", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed")
_COMMON += ("presence_penalty", "frequency_penalty", "user", "logit_bias", *EXTENSIONS)
COMPLETION_PARAMS = frozenset(
    (*_COMMON, "prompt", "max_tokens", "logprobs", "echo", "suffix", "best_of")
)
CHAT_PARAMS = frozenset(
    (
        *_COMMON,
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "logprobs",
        "top_logprobs",
        "response_format",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
    )
)
GENERATE_PARAMS = frozenset(
    ("prompt_token_ids", "stream", "max_tokens", "logprobs", *_COMMON, *EXTENSIONS)
) - {"model", "user", "logit_bias", "stream_options"}
CHAT_ROLES = ("system", "developer", "user", "assistant")


class APIError(Exception):
    """An error answered as OpenAI-style JSON with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass
class ParsedRequest:
    prompt_token_ids: list[int]
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    logprobs: int | None = None  # top alternatives to report; None: no logprobs
    prompt_text: str | None = None  # the prompt as sent, when it was text (for echo)
    extra: dict[str, Any] = field(default_factory=dict)


# -- type checks --------------------------------------------------------------
def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: object) -> bool:
    return _is_int(v) or (isinstance(v, float) and math.isfinite(v))


def _valid_text(text: str, param: str, what: str | None = None) -> str:
    """``text`` if the tokenizer can take it; 400 for an unpaired surrogate (JSON "\\ud800")."""
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise bad(
                f"{what or repr(param)} contains an unpaired UTF-16 surrogate "
                f"(U+{ord(text[exc.start]):04X} at character {exc.start}); "
                "text must be valid Unicode",
                param=param,
                code="invalid_unicode",
            ) from None
    return text


def _expect(body: dict, name: str, ok: bool, what: str) -> None:
    if not ok:
        raise bad(f"'{name}' must be {what}, got {body[name]!r}", param=name)


def _check_types(body: dict) -> None:
    """Type errors name the parameter; range checks are SamplingParams' job."""
    for name in ("max_tokens", "max_completion_tokens", "n", "top_k", "min_tokens", "seed"):
        if body.get(name) is not None:
            _expect(body, name, _is_int(body[name]), "an integer")
    for name in (
        "temperature",
        "top_p",
        "min_p",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
    ):
        if body.get(name) is not None:
            _expect(body, name, _is_num(body[name]), "a number")
    for name in ("stream", "ignore_eos", "echo"):
        if body.get(name) is not None:
            _expect(body, name, isinstance(body[name], bool), "a boolean")
    if body.get("stop") is not None:
        stop = body["stop"]
        _expect(
            body,
            "stop",
            isinstance(stop, str)
            or (isinstance(stop, list) and all(isinstance(s, str) for s in stop)),
            "a string or a list of strings",
        )
        for s in [stop] if isinstance(stop, str) else stop:
            _valid_text(s, "stop")
    if body.get("stop_token_ids") is not None:
        ids = body["stop_token_ids"]
        _expect(
            body,
            "stop_token_ids",
            isinstance(ids, list) and all(_is_int(t) for t in ids),
            "a list of integers",
        )
    if body.get("model") is not None:
        _expect(body, "model", isinstance(body["model"], str), "a string")
    if body.get("user") is not None:
        _expect(body, "user", isinstance(body["user"], str), "a string")
    if body.get("logit_bias"):
        raise bad("'logit_bias' is not supported", param="logit_bias")
    opts = body.get("stream_options")
    if opts is not None:
        _expect(
            body,
            "stream_options",
            isinstance(opts, dict) and set(opts) <= {"include_usage", "continuous_usage_stats"},
            "an object with 'include_usage'",
        )
        if not body.get("stream"):
            raise bad("'stream_options' is only allowed with 'stream': true", "stream_options")


def _check_known(body: dict, allowed: frozenset[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise bad(
            f"unknown parameter(s): {', '.join(unknown)} (supported: {', '.join(sorted(allowed))})",
            param=unknown[0],
            code="unknown_parameter",
        )


def _sampling(body: dict, max_tokens: int, logprobs: int | None) -> SamplingParams:
    kwargs: dict[str, Any] = {"max_tokens": max_tokens, "logprobs": logprobs}
    for name in (
        "temperature",
        "top_p",
        "n",
        "top_k",
        "min_p",
        "repetition_penalty",
        "presence_penalty",
        "frequency_penalty",
        "seed",
        "ignore_eos",
        "min_tokens",
        "stop_token_ids",
    ):
        if body.get(name) is not None:
            kwargs[name] = body[name]
    stop = body.get("stop")
    if stop is not None:
        kwargs["stop"] = [stop] if isinstance(stop, str) else list(stop)
    if kwargs.get("top_k") == 0:
        kwargs["top_k"] = -1  # OpenAI-style clients send 0 for "off"
    try:
        return SamplingParams(**kwargs)
    except InvalidRequest as exc:
        raise bad(str(exc), param=exc.param) from None


def _fit_context(prompt_len: int, requested: int | None, default: int | None, limit: int) -> int:
    """max_tokens to use, or a 400 when prompt + completion exceed the context."""
    if prompt_len == 0:
        raise bad("the prompt is empty", param="prompt")
    if prompt_len >= limit:
        raise bad(
            f"this model's maximum context length is {limit} tokens; the prompt has "
            f"{prompt_len} tokens, which leaves no room for a completion",
            param="prompt",
            code="context_length_exceeded",
        )
    room = limit - prompt_len
    if requested is None:
        return room if default is None else min(default, room)
    if requested >= 1 and prompt_len + requested > limit:
        raise bad(
            f"this model's maximum context length is {limit} tokens; you requested "
            f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} "
            "for the completion); shorten the prompt or lower max_tokens",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return requested


def _check_token_ids(ids: object, param: str, vocab_size: int) -> list[int]:
    if not isinstance(ids, list) or not all(_is_int(t) for t in ids):
        raise bad(f"'{param}' must be a list of integer token ids", param=param)
    bad_ids = [t for t in ids if not 0 <= t < vocab_size]
    if bad_ids:
        raise bad(f"'{param}' has token ids outside [0, {vocab_size}): {bad_ids[:5]}", param=param)
    return ids


def _stream_flags(body: dict) -> tuple[bool, bool]:
    stream = bool(body.get("stream", False))
    include_usage = bool((body.get("stream_options") or {}).get("include_usage", False))
    return stream, include_usage


# -- endpoints ----------------------------------------------------------------
def parse_completion(body: dict, encode, vocab_size: int, max_model_len: int) -> ParsedRequest:
    """/v1/completions; ``encode(text) -> ids`` tokenizes with the model's special tokens."""
    _check_known(body, COMPLETION_PARAMS)
    _check_types(body)
    if body.get("suffix") is not None:
        raise bad("'suffix' is not supported", param="suffix")
    if "prompt" not in body:
        raise bad("'prompt' is required", param="prompt")
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        ids = encode(_valid_text(prompt, "prompt"))
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        ids = _check_token_ids(prompt, "prompt", vocab_size)
    elif isinstance(prompt, list) and len(prompt) > 1:
        raise bad("only one prompt per request is supported; send one request each", "prompt")
    else:
        raise bad("'prompt' must be a string or a list of token ids", param="prompt")
    logprobs = body.get("logprobs")
    if logprobs is not None:
        _expect(body, "logprobs", _is_int(logprobs), "an integer")
    n = body.get("n", 1)
    best_of = body.get("best_of")
    if best_of is not None and best_of != n:
        raise bad("'best_of' other than n is not supported", param="best_of")
    echo = bool(body.get("echo", False))
    if echo and logprobs is not None:
        raise bad("'echo' together with 'logprobs' is not supported", param="echo")
    max_tokens = _fit_context(len(ids), body.get("max_tokens"), 16, max_model_len)
    stream, include_usage = _stream_flags(body)
    params = _sampling(body, max_tokens, logprobs)
    text = prompt if isinstance(prompt, str) else None
    return ParsedRequest(ids, params, stream, include_usage, echo, logprobs, prompt_text=text)


def _message_text(i: int, message: object) -> dict:
    if not isinstance(message, dict):
        raise bad(f"messages[{i}] must be an object", param="messages")
    role = message.get("role")
    if role not in CHAT_ROLES:
        raise bad(
            f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {role!r}",
            param="messages",
        )
    content = message.get("content")
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text"):
                raise bad(f"messages[{i}].content: only text parts are supported", "messages")
            if not isinstance(part.get("text"), str):
                raise bad(f"messages[{i}].content: a text part needs a string 'text'", "messages")
            parts.append(part["text"])
        content = "".join(parts)
    if not isinstance(content, str):
        raise bad(f"messages[{i}].content must be a string or a list of text parts", "messages")
    out = {"role": "system" if role == "developer" else role, "content": content}
    _valid_text(content, "messages", f"messages[{i}].content")
    if isinstance(message.get("name"), str):
        out["name"] = _valid_text(message["name"], "messages", f"messages[{i}].name")
    return out


def parse_chat(body: dict, render, vocab_size: int, max_model_len: int) -> ParsedRequest:
    """/v1/chat/completions; ``render(messages) -> ids`` applies the chat template."""
    _check_known(body, CHAT_PARAMS)
    _check_types(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list of messages", param="messages")
    messages = [_message_text(i, m) for i, m in enumerate(messages)]
    if body.get("tools"):
        raise bad("'tools' (function calling) is not supported", param="tools")
    if body.get("tool_choice") not in (None, "none"):
        raise bad("'tool_choice' is not supported", param="tool_choice")
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise bad("only response_format {'type': 'text'} is supported", param="response_format")
    if body.get("logprobs") is not None:
        _expect(body, "logprobs", isinstance(body["logprobs"], bool), "a boolean")
    top = body.get("top_logprobs")
    if top is not None:
        _expect(body, "top_logprobs", _is_int(top), "an integer")
        if not body.get("logprobs"):
            raise bad("'top_logprobs' requires 'logprobs': true", param="top_logprobs")
    logprobs = (top or 0) if body.get("logprobs") else None
    requested = body.get("max_completion_tokens", body.get("max_tokens"))
    ids = render(messages)
    max_tokens = _fit_context(len(ids), requested, None, max_model_len)
    stream, include_usage = _stream_flags(body)
    params = _sampling(body, max_tokens, logprobs)
    return ParsedRequest(ids, params, stream, include_usage, False, logprobs)


def parse_generate(body: dict, vocab_size: int, max_model_len: int) -> ParsedRequest:
    """Native /generate: token ids in, token ids out; SamplingParams fields at top level."""
    _check_known(body, GENERATE_PARAMS)
    _check_types(body)
    if "prompt_token_ids" not in body:
        raise bad("'prompt_token_ids' is required", param="prompt_token_ids")
    ids = _check_token_ids(body["prompt_token_ids"], "prompt_token_ids", vocab_size)
    logprobs = body.get("logprobs")
    if logprobs is not None:
        _expect(body, "logprobs", _is_int(logprobs), "an integer")
    max_tokens = _fit_context(len(ids), body.get("max_tokens"), 16, max_model_len)
    params = _sampling(body, max_tokens, logprobs)
    return ParsedRequest(ids, params, bool(body.get("stream", False)), False, False, logprobs)
