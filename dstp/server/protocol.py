"""Request parsing and validation: JSON bodies -> token ids + SamplingParams, or an APIError.

The accepted fields and their JSON types come from ``SamplingParams``' own fields plus a
small table of OpenAI-only fields per endpoint, so a parameter cannot be accepted and
then silently dropped (``IGNORED_FIELDS``, which cannot change generation, are the one
exception: dropped with a log line). Unknown fields are rejected (a typo such as ``max_token`` would
otherwise be ignored).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import types
import typing
import uuid
from dataclasses import dataclass

from dstp.engine.sampling_params import InvalidRequest, SamplingParams, is_int, is_number
from dstp.server.defaults import SamplingDefaults
from dstp.server.structured import Constraint, from_response_format, from_structured_outputs
from dstp.server.tool_use import ToolSettings, ToolUse, assistant_tool_calls, tool_use

log = logging.getLogger("dstp")

MAX_JSON_DEPTH = 64  # nesting levels a request body may have (OpenAI bodies need < 10)
MAX_PROMPTS = 128  # prompts one /v1/completions request may batch (each times n choices)
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
ANY = object  # a field type the endpoint's parser checks itself
NO_DEFAULTS = SamplingDefaults()  # the OpenAI defaults: nothing filled in
NO_TOOLS = ToolSettings()  # no --tool-call-parser, no auto tool choice

# -- the schema ---------------------------------------------------------------
_HINTS = typing.get_type_hints(SamplingParams)
# Every SamplingParams field, with its JSON type where it differs from the dataclass's.
SAMPLING_FIELDS: dict[str, object] = {
    f.name: _HINTS[f.name] for f in dataclasses.fields(SamplingParams)
} | {"stop": str | list[str], "structured_outputs": ANY}
# Sampling fields each endpoint resolves itself (context fit; chat's boolean logprobs; the
# constraint, which chat may also take from response_format or tool_choice).
_RESOLVED = ("max_tokens", "logprobs", "structured_outputs")

_OPENAI_FIELDS = {"model": str, "stream": bool, "stream_options": ANY, "logit_bias": ANY}
# OpenAI fields that do not change what is generated: accepted and ignored (each is
# logged the first time it is seen), so clients that send them work unchanged.
IGNORED_FIELDS = frozenset(
    ("user", "store", "metadata", "service_tier", "parallel_tool_calls", "prompt_cache_key")
)
_ignored_seen: set[str] = set()
COMPLETION_FIELDS = (
    SAMPLING_FIELDS | _OPENAI_FIELDS | {"prompt": ANY, "echo": bool, "suffix": ANY, "best_of": ANY}
)
CHAT_FIELDS = (
    SAMPLING_FIELDS
    | _OPENAI_FIELDS
    | {
        "messages": ANY,
        "max_completion_tokens": int,
        "logprobs": bool,  # chat's: whether to report them; top_logprobs says how many
        "top_logprobs": int,
        "response_format": ANY,
        "tools": ANY,
        "tool_choice": ANY,
        "chat_template_kwargs": ANY,
    }
)
# Keys chat_template_kwargs may not set: the server decides them.
RESERVED_TEMPLATE_KWARGS = frozenset(
    (
        "conversation",
        "messages",
        "tokenize",
        "return_dict",
        "return_tensors",
        "tokenizer",
        "add_generation_prompt",
        "add_special_tokens",
    )
)
GENERATE_FIELDS = SAMPLING_FIELDS | {"prompt_token_ids": ANY, "stream": bool}


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
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers or {}

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


def unknown_model(model: str, served: str) -> APIError:
    return APIError(
        404,
        f"the model '{model}' does not exist; this server serves '{served}'",
        param="model",
        code="model_not_found",
    )


def retry_later(status: int, message: str, retry_after_s: int) -> APIError:
    """429 (queue full) or 503 (engine unavailable), with ``Retry-After``."""
    kind, code = (
        ("rate_limit_error", "queue_full") if status == 429 else ("service_unavailable", None)
    )
    return APIError(
        status, message, type=kind, code=code, headers={"Retry-After": str(retry_after_s)}
    )


def internal_error(what: str, exc: BaseException | None = None) -> APIError:
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


@dataclass
class ParsedRequest:
    prompt_token_ids: list[int]
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False
    continuous_usage: bool = False  # stream_options.continuous_usage_stats: usage on every chunk
    echo: bool = False
    prompt_text: str | None = None  # the prompt as sent, when it was text (for echo)
    constraint_param: str | None = None  # the field that asked for structured output
    tool_use: ToolUse | None = None  # chat: the request's tools and how to parse calls


# -- the body -----------------------------------------------------------------
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


def parse_body(raw: bytes) -> dict:
    """The request body as a JSON object, or a 400 (malformed, too deep, not an object)."""
    too_deep = APIError(
        400,
        f"request body is nested too deeply (more than {MAX_JSON_DEPTH} levels of arrays/objects)",
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
    return body


# -- type checks --------------------------------------------------------------
# JSON type -> (check, what the error says it must be, and in the plural)
_SCALARS = {
    bool: (lambda v: isinstance(v, bool), "a boolean", "booleans"),
    int: (is_int, "an integer", "integers"),
    float: (is_number, "a number", "numbers"),
    str: (lambda v: isinstance(v, str), "a string", "strings"),
}


def _matches(value: object, kind: object) -> bool:
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return any(_matches(value, k) for k in typing.get_args(kind) if k is not type(None))
    if typing.get_origin(kind) is list:
        (item,) = typing.get_args(kind)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    return kind is ANY or _SCALARS[kind][0](value)


def _describe(kind: object) -> str:
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return " or ".join(_describe(k) for k in typing.get_args(kind) if k is not type(None))
    if typing.get_origin(kind) is list:
        (item,) = typing.get_args(kind)
        return f"a list of {_SCALARS[item][2]}"
    return _SCALARS[kind][1]


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


def _drop_ignored(body: dict) -> None:
    for name in IGNORED_FIELDS & body.keys():
        del body[name]
        if name not in _ignored_seen:
            _ignored_seen.add(name)
            log.info("ignoring the request field %r: it does not change generation", name)


def _check(body: dict, schema: dict[str, object]) -> None:
    """Known fields of the right JSON types; range checks are SamplingParams' job."""
    _drop_ignored(body)
    unknown = sorted(set(body) - set(schema))
    if unknown:
        raise bad(
            f"unknown parameter(s): {', '.join(unknown)} (supported: {', '.join(sorted(schema))})",
            param=unknown[0],
            code="unknown_parameter",
        )
    for name, value in body.items():
        if value is not None and not _matches(value, schema[name]):
            raise bad(f"'{name}' must be {_describe(schema[name])}, got {value!r}", param=name)
        if name in SAMPLING_FIELDS:  # text the engine gets must be valid Unicode
            for text in value if isinstance(value, list) else [value]:
                if isinstance(text, str):
                    _valid_text(text, name)
    if body.get("logit_bias"):
        raise bad("'logit_bias' is not supported", param="logit_bias")
    opts = body.get("stream_options")
    if opts is not None:
        _expect(
            body,
            "stream_options",
            isinstance(opts, dict)
            and set(opts) <= {"include_usage", "continuous_usage_stats"}
            and all(isinstance(v, bool) or v is None for v in opts.values()),
            "an object with boolean 'include_usage' and 'continuous_usage_stats'",
        )
        if not body.get("stream"):
            raise bad("'stream_options' is only allowed with 'stream': true", "stream_options")


def _sampling(
    body: dict,
    max_tokens: int,
    logprobs: int | None,
    defaults: SamplingDefaults,
    constraint: Constraint | None,
) -> SamplingParams:
    """Every SamplingParams field the body sets (a field the schema accepts always arrives)."""
    kwargs = {k: body[k] for k in SAMPLING_FIELDS if k not in _RESOLVED and body.get(k) is not None}
    kwargs = defaults.fill(kwargs)  # --generation-config, --seed
    if kwargs.get("top_k") == 0:
        kwargs["top_k"] = -1  # OpenAI-style clients send 0 for "off"
    spec = constraint.spec if constraint is not None else None
    try:
        return SamplingParams(
            **kwargs, max_tokens=max_tokens, logprobs=logprobs, structured_outputs=spec
        )
    except InvalidRequest as exc:
        raise bad(str(exc), param=exc.param) from None


def _constraint(body: dict, **more: Constraint | None) -> Constraint | None:
    """The one constraint the body asks for (``structured_outputs`` or, for chat, the
    ``more`` fields: response_format, tool_choice); 400 when it asks for two."""
    try:
        asked = {"structured_outputs": from_structured_outputs(body.get("structured_outputs"))}
    except InvalidRequest as exc:
        raise bad(str(exc), param=exc.param) from None
    asked = {k: c for k, c in (asked | more).items() if c is not None}
    if len(asked) > 1:
        raise bad(
            f"set only one of {', '.join(asked)}: each constrains the output", list(asked)[-1]
        )
    return next(iter(asked.values()), None)


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
    if not isinstance(ids, list) or not all(is_int(t) for t in ids):
        raise bad(f"'{param}' must be a list of integer token ids", param=param)
    bad_ids = [t for t in ids if not 0 <= t < vocab_size]
    if bad_ids:
        raise bad(f"'{param}' has token ids outside [0, {vocab_size}): {bad_ids[:5]}", param=param)
    return ids


def _parsed(
    body: dict,
    ids: list[int],
    max_tokens: int,
    logprobs: int | None,
    defaults: SamplingDefaults,
    constraint: Constraint | None = None,
    **kw,
) -> ParsedRequest:
    stream = bool(body.get("stream", False))
    opts = body.get("stream_options") or {}
    include_usage = bool(opts.get("include_usage", False))
    continuous = bool(opts.get("continuous_usage_stats", False))
    params = _sampling(body, max_tokens, logprobs, defaults, constraint)
    param = constraint.param if constraint is not None else None
    return ParsedRequest(
        ids, params, stream, include_usage, continuous, constraint_param=param, **kw
    )


# -- endpoints ----------------------------------------------------------------
def _completion_prompts(body: dict, encode, vocab_size: int) -> list[tuple[list[int], str | None]]:
    """(token ids, text as sent or None) per prompt: a string, a list of token ids, or a
    list of either (a batch: one set of choices per prompt)."""
    if "prompt" not in body:
        raise bad("'prompt' is required", param="prompt")
    prompt = body["prompt"]
    if isinstance(prompt, str):
        return [(encode(_valid_text(prompt, "prompt")), prompt)]
    if isinstance(prompt, list) and prompt and all(is_int(t) for t in prompt):
        return [(_check_token_ids(prompt, "prompt", vocab_size), None)]
    what = (
        "'prompt' must be a string, a list of token ids, or a list of strings or of token-id lists"
    )
    if not isinstance(prompt, list) or not prompt:
        raise bad(what, param="prompt")
    if len(prompt) > MAX_PROMPTS:
        raise bad(
            f"'prompt' has {len(prompt)} prompts; at most {MAX_PROMPTS} per request", "prompt"
        )
    if all(isinstance(p, str) for p in prompt):
        return [(encode(_valid_text(p, "prompt", f"prompt[{i}]")), p) for i, p in enumerate(prompt)]
    if all(isinstance(p, list) for p in prompt):
        out = []
        for i, ids in enumerate(prompt):
            if not ids:
                raise bad(f"prompt[{i}] is empty", param="prompt")
            out.append((_check_token_ids(ids, "prompt", vocab_size), None))
        return out
    raise bad(what + " (not a mix)", param="prompt")


def parse_completion(
    body: dict,
    encode,
    vocab_size: int,
    max_model_len: int,
    defaults: SamplingDefaults = NO_DEFAULTS,
) -> list[ParsedRequest]:
    """/v1/completions, one ParsedRequest per prompt; ``encode(text) -> ids`` tokenizes with
    the model's special tokens."""
    _check(body, COMPLETION_FIELDS)
    if body.get("suffix") is not None:
        raise bad("'suffix' is not supported", param="suffix")
    prompts = _completion_prompts(body, encode, vocab_size)
    best_of = body.get("best_of")
    if best_of is not None and best_of != body.get("n", 1):
        raise bad("'best_of' other than n is not supported", param="best_of")
    logprobs, echo = body.get("logprobs"), bool(body.get("echo", False))
    if echo and logprobs is not None:
        raise bad("'echo' together with 'logprobs' is not supported", param="echo")
    constraint = _constraint(body)
    parsed = []
    for ids, text in prompts:
        max_tokens = _fit_context(len(ids), body.get("max_tokens"), 16, max_model_len)
        parsed.append(
            _parsed(
                body, ids, max_tokens, logprobs, defaults, constraint, echo=echo, prompt_text=text
            )
        )
    return parsed


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
    calls = message.get("tool_calls") if role == "assistant" else None
    if calls and content is None:
        content = ""  # an assistant turn that only called tools
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
    if calls:
        try:
            out["tool_calls"] = assistant_tool_calls(i, calls)
        except InvalidRequest as exc:
            raise bad(str(exc), param=exc.param) from None
    if role == "tool":
        call_id = message.get("tool_call_id")
        if not isinstance(call_id, str):
            raise bad(f"messages[{i}] (a tool result) needs a string 'tool_call_id'", "messages")
        out["tool_call_id"] = call_id
    return out


def _messages(raw: object) -> list[dict]:
    if not isinstance(raw, list) or not raw:
        raise bad("'messages' must be a non-empty list of messages", param="messages")
    return [_message_text(i, m) for i, m in enumerate(raw)]


def _check_chat_options(body: dict) -> int | None:
    """400 for what chat does not support; the number of top logprobs (None: none)."""
    top = body.get("top_logprobs")
    if top is not None and not body.get("logprobs"):
        raise bad("'top_logprobs' requires 'logprobs': true", param="top_logprobs")
    return (top or 0) if body.get("logprobs") else None


def chat_template_kwargs(body: dict) -> dict:
    """``chat_template_kwargs``: extra variables for the chat template (e.g. enable_thinking)."""
    kwargs = body.get("chat_template_kwargs")
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict):
        raise bad("'chat_template_kwargs' must be an object", param="chat_template_kwargs")
    reserved = sorted(RESERVED_TEMPLATE_KWARGS & kwargs.keys())
    if reserved:
        raise bad(
            f"'chat_template_kwargs' may not set {', '.join(reserved)}",
            param="chat_template_kwargs",
        )
    return kwargs


def parse_chat(
    body: dict,
    render,
    max_model_len: int,
    defaults: SamplingDefaults = NO_DEFAULTS,
    tools: ToolSettings = NO_TOOLS,
    special_ids: dict[str, int] | None = None,
) -> ParsedRequest:
    """/v1/chat/completions; ``render(messages, **template_kwargs) -> ids`` applies the chat
    template (``tools`` among its kwargs when the request has tools)."""
    _check(body, CHAT_FIELDS)
    template_kwargs = chat_template_kwargs(body)
    messages = _messages(body.get("messages"))
    logprobs = _check_chat_options(body)
    try:
        use, forced = tool_use(body, tools, special_ids)
        constraint = _constraint(
            body,
            response_format=from_response_format(body.get("response_format")),
            tool_choice=forced,
        )
    except InvalidRequest as exc:
        raise bad(str(exc), param=exc.param) from None
    if use is not None:
        template_kwargs = {**template_kwargs, "tools": use.tools}
    requested = body.get("max_completion_tokens", body.get("max_tokens"))
    ids = render(messages, **template_kwargs)
    max_tokens = _fit_context(len(ids), requested, None, max_model_len)
    return _parsed(body, ids, max_tokens, logprobs, defaults, constraint, tool_use=use)


def parse_generate(
    body: dict, vocab_size: int, max_model_len: int, defaults: SamplingDefaults = NO_DEFAULTS
) -> ParsedRequest:
    """Native /generate: token ids in, token ids out; SamplingParams fields at top level."""
    _check(body, GENERATE_FIELDS)
    if "prompt_token_ids" not in body:
        raise bad("'prompt_token_ids' is required", param="prompt_token_ids")
    ids = _check_token_ids(body["prompt_token_ids"], "prompt_token_ids", vocab_size)
    max_tokens = _fit_context(len(ids), body.get("max_tokens"), 16, max_model_len)
    return _parsed(body, ids, max_tokens, body.get("logprobs"), defaults, _constraint(body))


# -- /tokenize and /detokenize (vLLM's shapes) ----------------------------------
TOKENIZE_FIELDS = {
    "model": str,
    "prompt": str,
    "messages": ANY,
    "add_special_tokens": bool,
    "add_generation_prompt": bool,
    "return_token_strs": bool,
    "chat_template_kwargs": ANY,
}
DETOKENIZE_FIELDS = {"model": str, "tokens": ANY}


@dataclass
class TokenizeRequest:
    prompt: str | None  # text to encode, or None for messages
    messages: list[dict] | None
    add_special_tokens: bool
    add_generation_prompt: bool
    return_token_strs: bool
    template_kwargs: dict


def parse_tokenize(body: dict) -> TokenizeRequest:
    """/tokenize: either ``prompt`` (text) or ``messages`` (rendered by the chat template)."""
    _check(body, TOKENIZE_FIELDS)
    has_prompt, has_messages = body.get("prompt") is not None, body.get("messages") is not None
    if has_prompt == has_messages:
        raise bad("send exactly one of 'prompt' (text) and 'messages' (chat)", param="prompt")
    messages = _messages(body["messages"]) if has_messages else None
    if not has_messages:
        _valid_text(body["prompt"], "prompt")
    return TokenizeRequest(
        prompt=body.get("prompt"),
        messages=messages,
        # as vLLM: special tokens for a plain prompt; a rendered chat template already has them
        add_special_tokens=bool(body.get("add_special_tokens", not has_messages)),
        add_generation_prompt=bool(body.get("add_generation_prompt", True)),
        return_token_strs=bool(body.get("return_token_strs", False)),
        template_kwargs=chat_template_kwargs(body),
    )


def parse_detokenize(body: dict, vocab_size: int) -> list[int]:
    """/detokenize: the token ids to decode."""
    _check(body, DETOKENIZE_FIELDS)
    if "tokens" not in body:
        raise bad("'tokens' is required", param="tokens")
    return _check_token_ids(body["tokens"], "tokens", vocab_size)
