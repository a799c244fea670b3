"""The generation endpoints: parse, hand the request to the engine loop, shape its outputs.

Completions, chat and the native /generate differ only in the JSON they answer with
(one small class each); submitting, waiting, streaming and failing are written once,
in ``Serving``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from itertools import accumulate

from flask import Response

from dstp.engine.outputs import CompletionOutput, RequestOutput, TokenLogprob
from dstp.engine.sampling_params import InvalidRequest
from dstp.engine.structured import GrammarCompiler
from dstp.server.chat_output import ChatReader, ChoiceStream
from dstp.server.defaults import SamplingDefaults
from dstp.server.engine_loop import (
    EngineLoop,
    EngineUnavailable,
    QueueFull,
    RequestFailed,
    RequestGroup,
)
from dstp.server.protocol import (
    APIError,
    ParsedRequest,
    bad,
    internal_error,
    parse_chat,
    parse_completion,
    parse_detokenize,
    parse_generate,
    parse_tokenize,
    retry_later,
    unknown_model,
)
from dstp.server.reasoning import THINK_END, ReasoningParser, get_reasoning_parser
from dstp.server.request_log import log_received
from dstp.server.tool_use import ToolSettings

DONE = "data: [DONE]\n\n"


@dataclass
class ServerConfig:
    model_name: str  # the id /v1/models reports and requests may name
    max_model_len: int
    vocab_size: int
    api_key: str | None = None
    max_body_bytes: int = 4 * 1024 * 1024
    retry_after_s: int = 1
    model_aliases: tuple[str, ...] = ()  # other accepted "model" values (e.g. the path)
    model_description: str | None = None  # shown in /v1/models (what a built-in model is)
    tp_size: int = 1
    log_requests: bool = False  # --enable-log-requests
    max_log_len: int | None = None  # --max-log-len: prompt tokens and characters logged
    block_size: int = 1  # KV tokens per block: metrics count prefix-cache tokens as vLLM
    sampling_defaults: SamplingDefaults = field(default_factory=SamplingDefaults)
    tools: ToolSettings = field(default_factory=ToolSettings)  # --tool-call-parser, auto choice
    reasoning_parser: str | None = None  # --reasoning-parser
    eos_ids: frozenset[int] = frozenset()  # the engine's: grammars allow EOS where they end


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

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self._require()
        with self._lock:
            return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def token_strs(self, ids: list[int]) -> list[str]:
        self._require()
        with self._lock:
            return list(self.tokenizer.convert_ids_to_tokens(ids))

    def render_chat(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        add_special_tokens: bool = False,
        **template_kwargs,
    ) -> list[int]:
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
                    messages,
                    add_generation_prompt=add_generation_prompt,
                    tokenize=False,
                    **template_kwargs,
                )
                return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))
        except Exception as exc:  # jinja raise_exception(): e.g. roles not alternating
            raise bad(f"chat template rejected the messages: {exc}", param="messages") from None

    @functools.cached_property
    def special_ids(self) -> dict[str, int]:
        """Added (special) tokens' text -> id: a grammar names markers such as Mistral's
        [TOOL_CALLS] by id, since llguidance never matches a special token's text."""
        if self.tokenizer is None:
            return {}
        with self._lock:
            return dict(self.tokenizer.get_added_vocab())

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


def sse(obj: object) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'), ensure_ascii=False)}\n\n"


def usage(outs: list[RequestOutput | None], prompts: list[ParsedRequest]) -> dict:
    """Token counts over every prompt (``outs``: the latest output per prompt, None if none
    yet)."""
    completion = sum(len(c.token_ids) for out in outs if out is not None for c in out.outputs)
    prompt = sum(len(p.prompt_token_ids) for p in prompts)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


class GenerationFailed(Exception):
    """The engine ended this request alone (finish_reason "error"); it logged the cause."""

    def api_error(self) -> APIError:
        return APIError(500, str(self), type="server_error", code="generation_failed")


def _finish_reason_or_raise(reason: str | None, request_id: str) -> str | None:
    if reason == "abort":  # ended by the server (shutdown), not by its client
        raise RequestFailed("request aborted by the server")
    if reason == "error":
        raise GenerationFailed(
            f"generation failed for request {request_id} (the other requests carry on); "
            "the server log has the details"
        )
    return reason


@dataclass
class Piece:
    """What one choice reports: its whole result (``final``) or what is new since the last
    event; ``offset`` is where ``text`` starts in the completion."""

    final: bool
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    offset: int

    @classmethod
    def of(cls, c: CompletionOutput, final: bool) -> Piece:
        if final:
            return cls(True, c.text, c.token_ids, c.logprobs, 0)
        start = len(c.text) - len(c.delta_text)
        return cls(False, c.delta_text, c.new_token_ids, c.new_logprobs, start)


# -- response shapes, one class per endpoint family --------------------------------------
class _Shape:
    """How one endpoint answers; ``news`` is the output field whose being non-empty (or a
    finish reason) makes a streamed choice worth sending."""

    news = "delta_text"

    def __init__(self, group: RequestGroup, prompts: list[ParsedRequest], tok, model: str) -> None:
        self.group, self.prompts, self.tok, self.model = group, prompts, tok, model
        self.parsed = prompts[0]  # what every prompt shares: stream, n, options
        self.created = int(time.time())
        self.live_usage: dict | None = None  # set while streaming with continuous usage

    def index(self, slot: int, c: CompletionOutput) -> int:
        """OpenAI's choice index: prompt by prompt, n choices each."""
        return slot * self.parsed.params.n + c.index

    def choice(self, slot: int, c: CompletionOutput, piece: Piece, reason: str | None) -> dict:
        raise NotImplementedError

    def answer(self, outs: list[RequestOutput], choices: list[dict]) -> dict:
        return self.envelope(self.kind, choices, usage(outs, self.prompts))

    def preamble(self) -> Iterator[dict]:
        return iter(())

    def events(self, choices: Iterator[dict]) -> Iterator[dict]:
        """One SSE chunk per choice (OpenAI's framing)."""
        for choice in choices:
            yield self.envelope(self.chunk_kind, [choice])

    def usage_event(self, use: dict) -> dict | None:
        return self.envelope(self.chunk_kind, [], use) if self.parsed.include_usage else None

    def envelope(self, kind: str, choices: list[dict], use: dict | None = None) -> dict:
        """The OpenAI response object around ``choices`` (one SSE chunk, or a whole answer)."""
        rid = self.group.request_id  # it starts with the endpoint's prefix
        obj = {"id": rid, "object": kind, "created": self.created, "model": self.model}
        obj["choices"] = choices
        if use is None and kind == self.chunk_kind:
            use = self.live_usage  # stream_options.continuous_usage_stats
        if use is not None:
            obj["usage"] = use
        return obj


class _Completions(_Shape):
    path, prefix, kind, chunk_kind = (
        "/v1/completions",
        "cmpl-",
        "text_completion",
        "text_completion",
    )

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.echo = [""] * len(self.prompts)
        if self.parsed.echo:  # the prompt as the client sent it (token ids: their plain decode)
            self.echo = [p.prompt_text or self.tok.decode(p.prompt_token_ids) for p in self.prompts]

    def choice(self, slot: int, c: CompletionOutput, piece: Piece, reason: str | None) -> dict:
        text = self.echo[slot] + piece.text if piece.final else piece.text
        logprobs = None
        if piece.logprobs is not None:
            tokens = [self.tok.token(e.token_id) for e in piece.logprobs]
            offsets = list(accumulate(map(len, tokens), initial=piece.offset))[:-1]
            logprobs = {
                "tokens": tokens,
                "token_logprobs": [e.logprob for e in piece.logprobs],
                "top_logprobs": [
                    {self.tok.token(t): lp for t, lp in e.top.items()} for e in piece.logprobs
                ],
                "text_offset": offsets,
            }
        index = self.index(slot, c)
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}

    def preamble(self) -> Iterator[dict]:
        if self.parsed.echo:
            n = self.parsed.params.n
            for slot, echo in enumerate(self.echo):
                for i in range(n):
                    choice = {"index": slot * n + i, "text": echo}
                    choice |= {"logprobs": None, "finish_reason": None}
                    yield self.envelope(self.chunk_kind, [choice])


class _Chat(_Shape):
    path, prefix, kind, chunk_kind = (
        "/v1/chat/completions",
        "chatcmpl-",
        "chat.completion",
        "chat.completion.chunk",
    )

    def __init__(self, *args, reader: ChatReader | None = None) -> None:
        super().__init__(*args)
        self.reader = reader or ChatReader()
        self._streams: dict[int, ChoiceStream] = {}  # per choice index, while streaming

    def choice(self, slot: int, c: CompletionOutput, piece: Piece, reason: str | None) -> dict:
        index = self.index(slot, c)
        out: dict = {"index": index}
        if self.reader.plain:
            text = {"content": piece.text} if piece.text or piece.final else {}
            called = False
        elif piece.final:
            text, called = self.reader.message(piece.text)
        else:
            stream = self._streams.setdefault(index, self.reader.stream())
            text = stream.step(piece.text, final=reason is not None)
            called = bool(stream.tool_calls)
        if piece.final:
            out["message"] = {"role": "assistant", **text}
        else:
            out["delta"] = text
        if called and reason is not None:
            reason = "tool_calls"
        out["logprobs"] = None
        if piece.logprobs is not None:
            out["logprobs"] = {
                "content": [
                    {**self._item(e.token_id, e.logprob), "top_logprobs": self._top(e)}
                    for e in piece.logprobs
                ]
            }
        out["finish_reason"] = reason
        return out

    def _item(self, token_id: int, lp: float) -> dict:
        s = self.tok.token(token_id)
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

    def _top(self, e: TokenLogprob) -> list[dict]:
        return [self._item(t, lp) for t, lp in e.top.items()]

    def preamble(self) -> Iterator[dict]:
        for i in range(self.parsed.params.n):
            first = {"role": "assistant", "content": ""}
            choice = {"index": i, "delta": first, "logprobs": None, "finish_reason": None}
            yield self.envelope(self.chunk_kind, [choice])


class _Generate(_Shape):
    """Native: token ids in and out, one event per step with every choice that moved."""

    path, news = "/generate", "new_token_ids"

    def choice(self, slot: int, c: CompletionOutput, piece: Piece, reason: str | None) -> dict:
        entries = piece.logprobs if piece.final or piece.token_ids else None
        logprobs = None
        if entries is not None:
            logprobs = [
                {"token_id": e.token_id, "logprob": e.logprob, "top": _str_keys(e.top)}
                for e in entries
            ]
        if not piece.final:
            return {
                "index": c.index,
                "new_token_ids": piece.token_ids,
                "delta_text": piece.text,
                "finish_reason": reason,
                "logprobs": logprobs,
            }
        return {
            "index": c.index,
            "token_ids": piece.token_ids,
            "text": piece.text,
            "finish_reason": reason,
            "stop_reason": c.stop_reason,
            "logprobs": logprobs,
        }

    def answer(self, outs: list[RequestOutput], choices: list[dict]) -> dict:
        return {
            "request_id": self.group.request_id,
            "prompt_token_ids": outs[0].prompt_token_ids,
            "outputs": choices,
            "usage": usage(outs, self.prompts),
        }

    def events(self, choices: Iterator[dict]) -> Iterator[dict]:
        outputs = list(choices)
        if outputs:
            yield {"request_id": self.group.request_id, "outputs": outputs}

    def usage_event(self, use: dict) -> dict:
        return {"request_id": self.group.request_id, "usage": use}


def _str_keys(top: dict[int, float]) -> dict[str, float]:
    return {str(t): lp for t, lp in top.items()}


# -- the handlers --------------------------------------------------------------------------
class Serving:
    """Turns a parsed request into the engine loop's work and its outputs into answers."""

    def __init__(self, loop: EngineLoop, tokenizer, config: ServerConfig) -> None:
        self.loop, self.config = loop, config
        self.tok = TokenizerAccess(tokenizer)
        self.accepted_models = {config.model_name, *config.model_aliases}
        self._grammars: GrammarCompiler | None = None  # built on the first constrained request
        self._grammar_lock = threading.Lock()

    def check_model(self, body: dict) -> dict:
        model = body.get("model")
        if isinstance(model, str) and model not in self.accepted_models:
            raise unknown_model(model, self.config.model_name)
        return body

    def completions(self, body: dict, probe: Callable[[], bool] | None):
        cfg = self.config
        prompts = parse_completion(
            body, self.tok.encode, cfg.vocab_size, cfg.max_model_len, cfg.sampling_defaults
        )
        return self._respond(_Completions, prompts, probe, _Completions.prefix)

    def chat(self, body: dict, probe: Callable[[], bool] | None):
        cfg = self.config
        parsed = parse_chat(
            body,
            self.tok.render_chat,
            cfg.max_model_len,
            cfg.sampling_defaults,
            cfg.tools,
            self.tok.special_ids,
        )
        reasoning = self._reasoning_parser(body)
        reader = ChatReader(reasoning, parsed.tool_use and parsed.tool_use.parser)
        if reasoning is not None and reasoning.enable_thinking:
            self._constrain_after_thinking(parsed)
        return self._respond(partial(_Chat, reader=reader), [parsed], probe, _Chat.prefix)

    def _constrain_after_thinking(self, parsed: ParsedRequest) -> None:
        """Structured output applies to the answer, after ``</think>`` (vLLM's rule), where
        the tokenizer has it as one token (Qwen3's and DeepSeek-R1's do); elsewhere the
        constraint applies from the first token."""
        spec = parsed.params.structured_outputs
        end = self.tok.special_ids.get(THINK_END)
        if spec is not None and end is not None:
            parsed.params.structured_outputs = dataclasses.replace(spec, after_token=end)

    def _reasoning_parser(self, body: dict) -> ReasoningParser | None:
        """``--reasoning-parser``, unless the template was told not to think."""
        name = self.config.reasoning_parser
        if name is None:
            return None
        kwargs = body.get("chat_template_kwargs") or {}
        return get_reasoning_parser(
            name, enable_thinking=kwargs.get("enable_thinking", True) is not False
        )

    def generate(self, body: dict, probe: Callable[[], bool] | None):
        cfg = self.config
        parsed = parse_generate(body, cfg.vocab_size, cfg.max_model_len, cfg.sampling_defaults)
        return self._respond(_Generate, [parsed], probe)

    def tokenize(self, body: dict) -> dict:
        """vLLM's /tokenize: the ids the model would see for a prompt or chat messages."""
        req = parse_tokenize(body)
        if req.messages is not None:
            ids = self.tok.render_chat(
                req.messages,
                req.add_generation_prompt,
                req.add_special_tokens,
                **req.template_kwargs,
            )
        else:
            ids = self.tok.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        return {
            "count": len(ids),
            "max_model_len": self.config.max_model_len,
            "tokens": ids,
            "token_strs": self.tok.token_strs(ids) if req.return_token_strs else None,
        }

    def detokenize(self, body: dict) -> dict:
        """vLLM's /detokenize: the tokenizer's plain decode of token ids."""
        ids = parse_detokenize(body, self.config.vocab_size)
        self.tok._require()
        return {"prompt": self.tok.decode(ids)}

    def _respond(
        self, shape_class, prompts: list[ParsedRequest], probe, id_prefix: str = ""
    ) -> dict | Response:
        group = self._submit(prompts, id_prefix)
        shape = shape_class(group, prompts, self.tok, self.config.model_name)
        if prompts[0].stream:
            events = _guarded(_stream(shape, group, probe), f"stream of {shape.path}")
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return Response(events, mimetype="text/event-stream", headers=headers)
        outs = self._wait(group, probe)
        choices = [
            shape.choice(slot, c, Piece.of(c, True), c.finish_reason)
            for slot, out in enumerate(outs)
            for c in sorted(out.outputs, key=lambda c: c.index)
        ]
        return shape.answer(outs, choices)

    def _submit(self, prompts: list[ParsedRequest], id_prefix: str) -> RequestGroup:
        retry_s = self.config.retry_after_s
        self._check_constraint(prompts[0])
        try:
            group = self.loop.submit_many(
                [(p.prompt_token_ids, p.params) for p in prompts], id_prefix=id_prefix
            )
            if self.config.log_requests:
                for handle, p in zip(group.handles, prompts, strict=True):
                    log_received(handle.request_id, p, self.tok.decode, self.config.max_log_len)
            return group
        except InvalidRequest as exc:
            raise bad(str(exc), param=exc.param) from None
        except QueueFull as exc:
            raise retry_later(429, str(exc), retry_s) from None
        except EngineUnavailable as exc:
            raise retry_later(503, str(exc), retry_s) from None

    def _check_constraint(self, parsed: ParsedRequest) -> None:
        """A constraint that does not compile is a 400 here, before the engine sees it; one
        that does is then in the process-wide cache, so the engine thread does not stall on
        compiling it (the same tokenizer and EOS ids make the same grammar)."""
        spec = parsed.params.structured_outputs
        if spec is None:
            return
        with self._grammar_lock:
            if self._grammars is None:
                self.tok._require()
                cfg = self.config
                self._grammars = GrammarCompiler(self.tok.tokenizer, cfg.vocab_size, cfg.eos_ids)
        try:
            self._grammars.matcher(spec, parsed.constraint_param or "structured_outputs")
        except InvalidRequest as exc:
            raise bad(str(exc), param=exc.param) from None

    @staticmethod
    def _wait(group: RequestGroup, probe) -> list[RequestOutput]:
        try:
            outs = group.result(disconnected=probe)
            if outs is None:  # client gone; nobody reads this answer
                raise APIError(499, "client closed the request")
            for out in outs:
                for c in out.outputs:
                    _finish_reason_or_raise(c.finish_reason, out.request_id)
        except RequestFailed as exc:
            raise APIError(503, str(exc), type="service_unavailable") from None
        except GenerationFailed as exc:
            raise exc.api_error() from None
        return outs


KEEPALIVE_S = 5.0  # an SSE comment after this long without an event
KEEPALIVE = ": keep-alive\n\n"  # clients ignore comment lines (the SSE standard)


def _stream(shape: _Shape, group: RequestGroup, probe) -> Iterator[str]:
    """The SSE events of one request: preamble, what each step added, usage, [DONE]."""
    latest: list[RequestOutput | None] = [None] * len(shape.prompts)
    continuous = shape.parsed.continuous_usage
    if continuous:
        shape.live_usage = usage(latest, shape.prompts)
    yield from map(sse, shape.preamble())
    for slot, out in group.outputs(disconnected=probe, idle_s=KEEPALIVE_S):
        if out is None:  # nothing for a while (e.g. the ranks restart): keep proxies open
            yield KEEPALIVE
            continue
        latest[slot] = out
        if continuous:
            shape.live_usage = usage(latest, shape.prompts)
        yield from map(sse, shape.events(_moved(shape, slot, out)))
    if not all(out is not None and out.finished for out in latest):
        return  # client went away
    final = shape.usage_event(usage(latest, shape.prompts))
    if final is not None:
        yield sse(final)
    yield DONE


def _moved(shape: _Shape, slot: int, out: RequestOutput) -> Iterator[dict]:
    """The choices this output advanced (new text or tokens, or a finish)."""
    for c in out.outputs:
        reason = _finish_reason_or_raise(c.finish_reason, out.request_id)
        if getattr(c, shape.news) or reason:  # not e.g. half a UTF-8 character so far
            yield shape.choice(slot, c, Piece.of(c, False), reason)


def _guarded(events: Iterator[str], where: str) -> Iterator[str]:
    """An SSE error event instead of a hang or a cut stream when something fails mid-stream."""
    try:
        yield from events
    except RequestFailed as exc:
        yield sse(APIError(503, str(exc), type="service_unavailable").body())
    except GenerationFailed as exc:
        yield sse(exc.api_error().body())
    except Exception:  # a bug: headers are sent, so the error goes in the stream
        yield sse(internal_error(where).body())
