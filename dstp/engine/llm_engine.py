"""The continuous-batching engine: requests in, tokens and text out (rank 0).

Rank 0 owns the scheduler, sampling and detokenising. Each :meth:`Engine.step`
it schedules, turns the schedule into a :class:`StepPlan`, broadcasts it and
runs its own share of the forward through the :class:`ModelRunner`, then
samples the gathered logits. The other ranks only run their model runner
(:meth:`Engine.run_follower`).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence as Seq

import torch

from dstp.distributed import init_tp
from dstp.engine.block_allocator import BlockAllocator
from dstp.engine.config import EngineConfig
from dstp.engine.detokenizer import Detokenizer, find_stop, partial_stop_len
from dstp.engine.outputs import CompletionOutput, RequestOutput, ResumedChoice
from dstp.engine.sampling import NothingToDraw, Picks, SampleState, make_generator, sample
from dstp.engine.sampling_params import InvalidRequest, SamplingParams, check_request
from dstp.engine.scheduler import Request, Schedule, Scheduler, Sequence
from dstp.engine.structured import GrammarCompiler, GrammarState, MaskJob, compiler_for
from dstp.engine.tokenizer import load_tokenizer
from dstp.worker.model_runner import ModelRunner
from dstp.worker.step_plan import Command, StepPlan, send_command, send_plan

log = logging.getLogger("dstp")

__all__ = ["Engine", "EngineConfig"]


class Engine:
    """Every rank builds one; rank 0 drives requests through it, the others follow."""

    def __init__(self, config: EngineConfig) -> None:
        _ = config.torch_dtype  # an unknown dtype fails before anything loads
        self.config = config
        self.tp = init_tp(config.tensor_parallel_size)  # None: the whole world
        self.runner = ModelRunner(config, self.tp)
        self.vocab_size = self.runner.vocab_size
        self.max_model_len = self.runner.max_model_len
        self.model_name = config.model_name or config.model
        self.tokenizer = None
        self.scheduler: Scheduler | None = None
        if self.tp.is_driver:
            self._init_driver()
        self.num_steps = 0
        self._aborted: list[Request] = []  # reported (finish_reason "abort") by the next step

    def _init_driver(self) -> None:
        """Rank 0's request side: tokenizer, detokenizer, stop ids and the scheduler."""
        config = self.config
        self.tokenizer = load_tokenizer(config.model, config.trust_remote_code)
        self.detokenizer = Detokenizer(self.tokenizer)
        self.eos_ids = _eos_ids(self.runner.model, self.tokenizer)
        self.grammars: GrammarCompiler | None = None  # built on the first constrained request
        allocator = BlockAllocator(self.runner.num_blocks, config.enable_prefix_caching)
        self.scheduler = Scheduler(
            allocator, config.block_size, config.max_num_seqs, config.max_num_batched_tokens
        )

    # -- requests (rank 0) ---------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        resume: Seq[ResumedChoice] = (),
    ) -> None:
        """Queue a request; with ``resume``, continue its listed choices from their emitted
        tokens instead (a replay: the outputs report only what comes after them)."""
        sched = self._driver_scheduler()
        if request_id in sched.requests:
            raise InvalidRequest(f"request id {request_id!r} is already in use")
        grammar = self._checked(prompt_token_ids, params)
        request = Request(request_id, list(prompt_token_ids), params, time.monotonic())
        stop_ids = frozenset(params.stop_token_ids) | (
            frozenset() if params.ignore_eos else self.eos_ids
        )
        if resume:
            self._resume(request, stop_ids, grammar, resume)
            return
        generator = make_generator(params.seed, 0)
        sched.add(
            request, SampleState(params, request.prompt_ids, [], generator, stop_ids, grammar)
        )

    def _resume(
        self,
        request: Request,
        stop_ids: frozenset[int],
        grammar: GrammarState | None,
        choices: Seq[ResumedChoice],
    ) -> None:
        """Queue the choices with their emitted tokens; rebuild each one's text, grammar and
        what was reported, as the lost engine had them."""
        params, prompt = request.params, request.prompt_ids
        _check_resumed(choices, params, len(prompt), self.vocab_size, self.max_model_len)
        queued = []
        for choice in choices:
            matcher = grammar.fork() if grammar is not None else None
            if matcher is not None:
                matcher.replay([t for t in choice.output_ids if t not in stop_ids])
            generator = make_generator(params.seed, choice.index)
            sample = SampleState(params, prompt, [], generator, stop_ids, matcher)
            queued.append((choice.index, list(choice.output_ids), sample))
        self.scheduler.resume(request, queued)
        for seq, choice in zip(request.seqs, choices, strict=True):
            seq.text_stream = self.detokenizer.stream(prompt)
            seq.text = "".join(seq.text_stream.step(t) for t in choice.output_ids)
            seq.visible_text = len(seq.text) - partial_stop_len(seq.text, params.stop)
            seq.sent_text = seq.visible_text
            seq.sent_tokens = len(choice.output_ids)
            seq.logprobs = list(choice.logprobs or [])

    def check_request(
        self, prompt_token_ids: list[int], params: SamplingParams, max_model_len: int | None = None
    ) -> None:
        """What :meth:`add_request` rejects (``InvalidRequest``), without adding it (a
        router checks here before handing the request to another replica, passing the
        shortest context of its replicas as ``max_model_len``)."""
        self._checked(prompt_token_ids, params, max_model_len)

    def _checked(
        self, prompt_token_ids: list[int], params: SamplingParams, max_model_len: int | None = None
    ) -> GrammarState | None:
        """The admission rule, then the request's fresh matcher (an invalid constraint is
        refused here; compiled once per text, cached)."""
        check_request(
            prompt_token_ids,
            params,
            self.vocab_size,
            max_model_len or self.max_model_len,
            self.eos_ids,
        )
        return self._grammar(params)

    def _grammar(self, params: SamplingParams) -> GrammarState | None:
        """A fresh matcher for the request's constraint, or None (``InvalidRequest`` if the
        constraint does not compile or the model has no tokenizer to match text with)."""
        spec = params.structured_outputs
        if spec is None:
            return None
        if self.grammars is None:
            self.grammars = compiler_for(self.tokenizer, self.vocab_size, self.eos_ids)
        return self.grammars.matcher(spec)

    def abort(self, request_id: str) -> None:
        request = self._driver_scheduler().abort(request_id)
        if request is not None:
            self._aborted.append(request)

    def has_unfinished(self) -> bool:
        return self._driver_scheduler().has_unfinished or bool(self._aborted)

    def running_request_ids(self) -> set[str]:
        return {seq.request.request_id for seq in self._driver_scheduler().running}

    def stats(self) -> dict[str, float]:
        stats = self._driver_scheduler().stats()
        stats["num_steps"] = self.num_steps
        return stats

    def _driver_scheduler(self) -> Scheduler:
        if self.scheduler is None:
            raise RuntimeError("requests go to rank 0; other ranks run run_follower()")
        return self.scheduler

    # -- the step --------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, run one forward on every rank, sample; outputs of requests that moved."""
        sched = self._driver_scheduler()
        outputs = [self._output(r) for r in self._aborted]
        for request in self._aborted:
            sched.pop_finished(request)
        self._aborted = []
        schedule = sched.schedule()
        if schedule.empty:
            return outputs
        plan = self._plan(schedule)
        send_plan(self.tp, plan)
        masks = MaskJob(  # grammar masks, computed while the forward runs
            [item.seq.sample.grammar for item in schedule.seqs if item.produces_token],
            self.vocab_size,
        )
        logits = self.runner.execute(plan)
        outputs += self._process(schedule, logits, masks)
        self.num_steps += 1
        return outputs

    def heartbeat(self) -> None:
        """A no-op round over every rank; raises if one is gone."""
        send_command(self.tp, Command.HEARTBEAT)

    def shutdown(self) -> None:
        if self.tp.is_driver and self.tp.size > 1:
            send_command(self.tp, Command.SHUTDOWN)

    def run_follower(self) -> None:
        """Other ranks: execute rank 0's plans until it says shut down."""
        self.runner.run_follower()

    # -- convenience ---------------------------------------------------------------
    def generate(
        self, prompts: Seq[str] | Seq[list[int]], params: SamplingParams | list[SamplingParams]
    ) -> list[RequestOutput]:
        """Run prompts to completion (rank 0); results in prompt order."""
        return generate_to_completion(self, prompts, params)

    # -- internals -------------------------------------------------------------------
    def _plan(self, schedule: Schedule) -> StepPlan:
        bs = self.config.block_size
        ids, positions, slots, starts, ctx, rows = [], [], [], [0], [], []
        tables = []
        for item in schedule.seqs:
            seq, n = item.seq, item.num_tokens
            first = seq.num_computed
            ids += seq.token_ids[first : first + n]
            pos = range(first, first + n)
            positions += pos
            slots += [seq.blocks[p // bs] * bs + p % bs for p in pos]
            starts.append(starts[-1] + n)
            ctx.append(first + n)
            tables.append(seq.blocks)
            if item.produces_token:
                rows.append(starts[-1] - 1)
        width = max(len(t) for t in tables)
        lt = torch.long
        return StepPlan(
            torch.tensor(ids, dtype=lt),
            torch.tensor(positions, dtype=lt),
            torch.tensor(slots, dtype=lt),
            torch.tensor(starts, dtype=lt),
            torch.tensor(ctx, dtype=lt),
            torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=lt),  # one tensor
            torch.tensor(rows, dtype=lt),
            torch.tensor(schedule.copies, dtype=lt).view(-1, 2),
        )

    def _process(
        self, schedule: Schedule, logits: torch.Tensor | None, masks: MaskJob
    ) -> list[RequestOutput]:
        sched = self.scheduler
        sampled = [item.seq for item in schedule.seqs if item.produces_token]
        for item in schedule.seqs:
            sched.advance(item)
        if not sampled:
            return []
        draws = []
        for seq in sampled:
            seq.sample.output_ids = seq.output_ids
            fork = seq.request.params.n > 1 and not seq.request.forked
            draws.append(seq.request.params.n if fork else 1)
        states = [seq.sample for seq in sampled]
        picks = sample(logits, states, draws, masks.result())  # on the logits' device
        now = time.monotonic()
        touched: dict[str, Request] = {}
        for i, (seq, tokens) in enumerate(zip(sampled, picks, strict=True)):
            request = seq.request
            touched[request.request_id] = request
            if request.finished:  # an earlier row of this request failed it
                continue
            try:
                if isinstance(tokens, NothingToDraw) and seq.sample.grammar is not None:
                    for target in self._samples(seq, draws[i]):  # the grammar allows only
                        sched.finish(target, "stop")  # what min_tokens holds back: it ends
                    continue
                if isinstance(tokens, Exception):
                    raise tokens
                self._take(seq, tokens)
            except Exception as exc:  # this request's own failure: the others go on
                self._fail_request(request, exc)
                continue
            if request.first_token_time is None:
                request.first_token_time = now
        outputs = []
        for request in touched.values():
            if request.finished:
                request.finish_time = now
            out = self._output(request)
            outputs.append(out)
            if out.finished:
                sched.pop_finished(request)
        return outputs

    def _take(self, seq: Sequence, tokens: Picks) -> None:
        """Append a row's sampled tokens; several fork the request into its ``n`` samples."""
        for target, (token, logprob) in zip(self._samples(seq, len(tokens)), tokens, strict=True):
            self._append(target, token, logprob)

    def _samples(self, seq: Sequence, draws: int) -> list[Sequence]:
        """The sequences a row's ``draws`` tokens go to: ``seq``, and its forks when the
        request's ``n`` samples split here."""
        targets = [seq]
        if draws > 1:
            request, p = seq.request, seq.request.params
            grammar = seq.sample.grammar  # each sample continues from the same grammar state
            states = [
                SampleState(
                    p,
                    request.prompt_ids,
                    [],
                    make_generator(p.seed, i),
                    seq.sample.stop_ids,
                    grammar.fork() if grammar is not None else None,
                )
                for i in range(1, p.n)
            ]
            targets += self.scheduler.fork(seq, states)
        return targets

    def _fail_request(self, request: Request, exc: BaseException) -> None:
        log.error(
            "request %s failed on its own and is ended; the engine carries on",
            request.request_id,
            exc_info=exc,
        )
        request.error = f"{type(exc).__name__}: {exc}"
        self.scheduler.finish_request(request, "error")

    def _append(self, seq: Sequence, token: int, logprob) -> None:
        sched = self.scheduler
        seq.token_ids.append(token)
        if logprob is not None:
            seq.logprobs.append(logprob)
        params = seq.request.params
        if seq.text_stream is None:
            seq.text_stream = self.detokenizer.stream(seq.request.prompt_ids)
        grammar = seq.sample.grammar
        if grammar is not None and token not in seq.sample.stop_ids:
            grammar.accept(token)
        stop = self._extend_text(seq, seq.text_stream.step(token))
        if stop is not None:
            sched.finish(seq, "stop", stop)
        elif token in seq.sample.stop_ids:  # the sampler masks these before min_tokens
            sched.finish(seq, "stop", token if token in params.stop_token_ids else None)
        elif grammar is not None and grammar.complete:  # only EOS could follow
            sched.finish(seq, "stop")
        elif len(seq.token_ids) - seq.num_prompt >= params.max_tokens or (
            len(seq.token_ids) >= self.max_model_len
        ):
            sched.finish(seq, "length")
        if seq.finished and stop is None:
            self._extend_text(seq, seq.text_stream.flush())  # held-back partial characters
        seq.visible_text = len(seq.text) - partial_stop_len(seq.text, params.stop)

    @staticmethod
    def _extend_text(seq: Sequence, piece: str) -> str | None:
        """Add decoded text; cut it at a stop string and return that string, if one ends here."""
        if not piece:
            return None
        start = len(seq.text)
        seq.text += piece
        hit = find_stop(seq.text, start, seq.request.params.stop)
        if hit is None:
            return None
        seq.text = seq.text[: hit[0]]
        return hit[1]

    def _output(self, request: Request) -> RequestOutput:
        """What moved since the last output; running totals only once the request is done."""
        want_logprobs = request.params.logprobs is not None
        done = request.finished
        completions = []
        for seq in request.seqs:
            visible = len(seq.text) if seq.finished else seq.visible_text
            first_new = seq.num_prompt + seq.sent_tokens
            new_logprobs = seq.logprobs[seq.sent_tokens :] if want_logprobs else None
            completions.append(
                CompletionOutput(
                    index=seq.index,
                    token_ids=seq.output_ids if done else [],
                    text=seq.text if visible == len(seq.text) else seq.text[:visible],
                    new_token_ids=seq.token_ids[first_new:],
                    delta_text=seq.text[seq.sent_text : visible],
                    logprobs=seq.logprobs if want_logprobs and done else None,
                    finish_reason=seq.finish_reason,
                    stop_reason=seq.stop_reason,
                    new_logprobs=new_logprobs,
                )
            )
            seq.sent_tokens = len(seq.token_ids) - seq.num_prompt
            seq.sent_text = visible
        return RequestOutput(
            request.request_id,
            request.prompt_ids,
            completions,
            done,
            num_cached_tokens=request.num_cached_tokens,
            arrival_time=request.arrival_time,
            first_token_time=request.first_token_time,
            finish_time=request.finish_time,
            error=request.error,
        )


def _check_resumed(
    choices: Seq[ResumedChoice], params: SamplingParams, prompt_len: int, vocab: int, max_len: int
) -> None:
    """A replay names distinct choices of the request, each with room left to generate."""
    indexes = [c.index for c in choices]
    if len(set(indexes)) != len(indexes) or not all(0 <= i < params.n for i in indexes):
        raise InvalidRequest(f"resumed choices {indexes} are not distinct choices of n={params.n}")
    for c in choices:
        if not all(0 <= t < vocab for t in c.output_ids):
            raise InvalidRequest(f"choice {c.index}'s resumed tokens lie outside the vocabulary")
        if len(c.output_ids) >= params.max_tokens or prompt_len + len(c.output_ids) >= max_len:
            raise InvalidRequest(f"choice {c.index} has no tokens left to generate")


def _eos_ids(model: torch.nn.Module, tokenizer) -> frozenset[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        eos = getattr(source, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, list):
            ids.update(e for e in eos if isinstance(e, int))
    if not ids and tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


def generate_to_completion(
    engine, prompts: Seq[str] | Seq[list[int]], params: SamplingParams | list[SamplingParams]
) -> list[RequestOutput]:
    """Add every prompt to ``engine`` (an Engine or anything with its request methods) and
    step until all finish; results in prompt order."""
    params_list = params if isinstance(params, list) else [params] * len(prompts)
    ids = []
    for prompt, p in zip(prompts, params_list, strict=True):
        token_ids = engine.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        request_id = uuid.uuid4().hex
        engine.add_request(request_id, token_ids, p)
        ids.append(request_id)
    final: dict[str, RequestOutput] = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    return [final[i] for i in ids]
