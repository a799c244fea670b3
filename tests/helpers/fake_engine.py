"""A deterministic stand-in for ``dstp.engine.llm_engine.Engine`` for HTTP-layer tests.

It implements ``dstp.engine.protocol.EngineClient`` as the engine does (request
checks, one token per running sequence per step, block accounting, stop strings
held back while they may still match, EOS and stop token ids, logprobs, n samples,
running totals on the final output only) with a trivial "model": the next token is
a function of the sequence so far, so tests can compute the exact expected text
with ``FakeEngine.reference``. tests/engine/test_engine_client_contract.py runs the
same assertions against it and the real engine.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

from dstp.engine.detokenizer import find_stop, partial_stop_len
from dstp.engine.outputs import CompletionOutput, RequestOutput, TokenLogprob
from dstp.engine.sampling_params import InvalidRequest, SamplingParams, check_request
from dstp.engine.structured import GrammarCompiler, GrammarState

LETTERS = "abcdefghijklmnopqrstuvwxyz "


@dataclass
class _Seq:
    index: int
    out: list[int] = field(default_factory=list)
    text: str = ""
    sent_tokens: int = 0
    sent_text: int = 0
    finish: str | None = None
    stop_reason: str | int | None = None
    grammar: GrammarState | None = None  # structured outputs: the real engine's matcher


@dataclass
class _Req:
    rid: str
    prompt: list[int]
    params: SamplingParams
    seqs: list[_Seq]
    blocks: int = 0
    running: bool = False  # stepped at least once (before that it waits, as in the engine)


class FakeEngine:
    def __init__(
        self,
        tokenizer,
        *,
        max_model_len: int = 256,
        block_size: int = 4,
        num_blocks: int = 4096,
        step_delay_s: float = 0.0,
        eos_id: int = 1,
    ) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.model_name = "fake-model"
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.free_blocks = num_blocks
        self.step_delay_s = step_delay_s
        self.eos_id = eos_id
        self.eos_ids = frozenset({eos_id})
        self.tp = SimpleNamespace(rank=0, size=1, is_driver=True)
        self.vocab_size = len(tokenizer)
        self.letter_ids = [tokenizer.convert_tokens_to_ids(c if c != " " else "Ġ") for c in LETTERS]
        self.requests: dict[str, _Req] = {}
        self.aborted: list[str] = []
        self.received: dict[str, SamplingParams] = {}  # request id -> the params it came with
        self._pending_final: list[RequestOutput] = []
        self.dead: str | None = None  # set to make heartbeat/step raise (a rank "died")
        self.shut_down = False
        self.thread_ids: set[int] = set()  # which threads called us (must be one)
        self.num_steps = 0
        self._grammars: GrammarCompiler | None = None

    # -- the "model" ----------------------------------------------------------------
    def next_token(self, prompt: list[int], out: list[int], index: int, params) -> int:
        if (
            not params.ignore_eos
            and len(out) >= max(params.min_tokens, 1)
            and sum(prompt) % 5 == 0
            and len(out) == 3
        ):
            return self.eos_id
        return self.letter_ids[(sum(prompt) + 3 * len(out) + index) % len(LETTERS)]

    def reference(
        self, prompt: list[int], params: SamplingParams
    ) -> list[tuple[str, list[int], str]]:
        """(text, token_ids, finish_reason) per sample, as step() will produce them."""
        results = []
        for index in range(params.n):
            out: list[int] = []
            text, finish = "", "length"
            while True:
                tok = self.next_token(prompt, out, index, params)
                out.append(tok)
                if tok == self.eos_id or self._stops_on(tok, out, params):
                    finish = "stop"
                    break
                text = self.tokenizer.decode([t for t in out if t != self.eos_id])
                hit = find_stop(text, 0, params.stop)
                if hit is not None:
                    text = text[: hit[0]]
                    finish = "stop"
                    break
                if len(out) >= params.max_tokens or len(prompt) + len(out) >= self.max_model_len:
                    break
            results.append((text, out, finish))
        return results

    @staticmethod
    def _stops_on(token: int, out: list[int], params: SamplingParams) -> bool:
        """A stop token id ends a sample once min_tokens are out (the engine masks it before)."""
        return token in params.stop_token_ids and len(out) > params.min_tokens

    # -- engine API -------------------------------------------------------------------
    def _touch(self) -> None:
        self.thread_ids.add(threading.get_ident())

    def check_request(
        self, prompt_token_ids: list[int], params: SamplingParams, max_model_len: int | None = None
    ) -> None:
        """The engine's checks, in its order and with its messages."""
        check_request(
            prompt_token_ids,
            params,
            self.vocab_size,
            max_model_len or self.max_model_len,
            self.eos_ids,
        )
        self._grammar(params)

    def _grammar(self, params: SamplingParams) -> GrammarState | None:
        """The real engine's compiler and matcher: the same refusals, and constrained output."""
        if params.structured_outputs is None:
            return None
        if self._grammars is None:
            self._grammars = GrammarCompiler(self.tokenizer, self.vocab_size, self.eos_ids)
        return self._grammars.matcher(params.structured_outputs)

    def _constrained(self, token: int, s: _Seq) -> int:
        """``token`` if the grammar allows it, else the first token it allows."""
        matcher = s.grammar.matcher
        if matcher.validate_tokens([token]) == 1:
            return token
        forced = matcher.compute_ff_tokens()
        if forced:
            return forced[0]
        mask = int.from_bytes(matcher.compute_bitmask(), "little")
        return (mask & -mask).bit_length() - 1  # the lowest allowed id

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> None:
        self._touch()
        if request_id in self.requests:
            raise InvalidRequest(f"request id {request_id!r} is already in use")
        self.check_request(prompt_token_ids, params)
        self.received[request_id] = params
        seqs = [_Seq(i, grammar=self._grammar(params)) for i in range(params.n)]
        req = _Req(request_id, list(prompt_token_ids), params, seqs)
        need = math.ceil(len(prompt_token_ids) / self.block_size) * params.n
        req.blocks = need
        self.free_blocks -= need
        self.requests[request_id] = req

    def abort(self, request_id: str) -> None:
        self._touch()
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        self.aborted.append(request_id)
        self.free_blocks += req.blocks
        for s in req.seqs:
            s.finish = s.finish or "abort"
        self._pending_final.append(self._output(req))

    def has_unfinished(self) -> bool:
        self._touch()
        return bool(self.requests) or bool(self._pending_final)

    def step(self) -> list[RequestOutput]:
        self._touch()
        if self.dead:
            raise RuntimeError(self.dead)
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        outputs, self._pending_final = self._pending_final, []
        for req in list(self.requests.values()):
            req.running = True
            for s in req.seqs:
                if s.finish:
                    continue
                tok = self.next_token(req.prompt, s.out, s.index, req.params)
                if s.grammar is not None:
                    tok = self._constrained(tok, s)
                    if tok not in self.eos_ids:
                        s.grammar.accept(tok)
                s.out.append(tok)
                total = len(req.prompt) + len(s.out)
                if total % self.block_size == 1:
                    req.blocks += 1
                    self.free_blocks -= 1
                if tok == self.eos_id and not req.params.ignore_eos:
                    s.finish = "stop"
                    continue
                if self._stops_on(tok, s.out, req.params):
                    s.finish, s.stop_reason = "stop", tok
                    continue
                s.text = self.tokenizer.decode(s.out)
                hit = find_stop(s.text, 0, req.params.stop)
                if hit is not None:
                    s.text = s.text[: hit[0]]
                    s.finish, s.stop_reason = "stop", hit[1]
                elif s.grammar is not None and s.grammar.complete:
                    s.finish = "stop"
                elif len(s.out) >= req.params.max_tokens or total >= self.max_model_len:
                    s.finish = "length"
            out = self._output(req)
            if out.finished:
                del self.requests[req.rid]
                self.free_blocks += req.blocks
            outputs.append(out)
        self.num_steps += 1
        return outputs

    def _output(self, req: _Req) -> RequestOutput:
        """As the engine reports: running totals (token_ids, logprobs) on the final output
        only, and text that may still become a stop string held back until it cannot."""
        done = all(s.finish for s in req.seqs)
        comps = []
        for s in req.seqs:
            logprobs = None
            if req.params.logprobs is not None:
                logprobs = [
                    TokenLogprob(t, -0.25, {t: -0.25, self.letter_ids[0]: -2.0}) for t in s.out
                ]
            visible = (
                len(s.text) if s.finish else len(s.text) - partial_stop_len(s.text, req.params.stop)
            )
            comps.append(
                CompletionOutput(
                    index=s.index,
                    token_ids=list(s.out) if done else [],
                    text=s.text[:visible],
                    new_token_ids=s.out[s.sent_tokens :],
                    delta_text=s.text[s.sent_text : visible],
                    logprobs=logprobs if done else None,
                    finish_reason=s.finish,
                    stop_reason=s.stop_reason,
                    new_logprobs=logprobs[s.sent_tokens :] if logprobs is not None else None,
                )
            )
            s.sent_tokens, s.sent_text = len(s.out), visible
        return RequestOutput(req.rid, req.prompt, comps, done)

    def running_request_ids(self) -> set[str]:
        return {rid for rid, req in self.requests.items() if req.running}

    def heartbeat(self) -> None:
        self._touch()
        if self.dead:
            raise RuntimeError(self.dead)

    def stats(self) -> dict:
        return {
            "num_running": len(self.requests),
            "num_waiting": 0,
            "kv_blocks_total": self.num_blocks,
            "kv_blocks_free": self.free_blocks,
            "kv_usage": 1 - self.free_blocks / self.num_blocks,
            "prefix_cache_queries": 10,
            "prefix_cache_hits": 4,
            "num_preemptions": 0,
        }

    def shutdown(self) -> None:
        self.shut_down = True
