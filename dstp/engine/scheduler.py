"""Continuous batching: which tokens of which sequences run in the next step.

Rank 0 alone schedules. Each step it first serves running sequences (one
token per decode, a chunk per unfinished prefill), then admits waiting ones
while blocks, ``max_num_seqs`` and ``max_num_batched_tokens`` allow. Long
prompts are prefilled in chunks so decodes keep flowing. When a running
sequence needs a block and none is free, the newest running sequence is
preempted: its blocks are freed and it goes back to the front of the queue
to be recomputed later. Nothing is ever dropped.

A request with ``n > 1`` is prefilled once; its samples then fork, sharing
every block, and a shared partial block is copied before it is written
(copy-on-write).
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

from dstp.engine.block_allocator import BlockAllocator, chain_hash
from dstp.engine.detokenizer import TextStream
from dstp.engine.sampling import SampleState
from dstp.engine.sampling_params import SamplingParams


@dataclass(eq=False)  # identity: `in running` / `remove` compared every field, O(n^2) a step
class Sequence:
    """One sample of a request: its tokens, its blocks and how many are computed."""

    seq_id: int
    request: Request
    index: int
    token_ids: list[int]
    sample: SampleState
    num_computed: int = 0  # tokens whose K/V are in the cache
    blocks: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # of the leading full blocks
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    text: str = ""  # detokenised output so far (kept by the engine)
    text_stream: TextStream | None = None  # the engine's incremental detokeniser
    visible_text: int = 0  # characters of text that cannot be part of a stop string
    sent_tokens: int = 0  # output tokens already reported
    sent_text: int = 0  # characters of text already reported
    logprobs: list = field(default_factory=list)

    @property
    def num_prompt(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt :]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival_time: float
    seqs: list[Sequence] = field(default_factory=list)
    forked: bool = False
    num_cached_tokens: int = 0
    first_token_time: float | None = None
    finish_time: float | None = None
    error: str | None = None  # set when the request failed on its own (finish_reason "error")

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs) and (self.forked or self.params.n == 1)


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # new tokens fed this step

    @property
    def produces_token(self) -> bool:
        """Whether this step computes the sequence's last known token (so samples the next)."""
        return self.seq.num_computed + self.num_tokens == len(self.seq.token_ids)


@dataclass
class Schedule:
    seqs: list[ScheduledSeq]
    copies: list[tuple[int, int]]  # (src, dst) blocks to copy before the forward

    @property
    def empty(self) -> bool:
        return not self.seqs


class Scheduler:
    def __init__(
        self,
        allocator: BlockAllocator,
        block_size: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
    ) -> None:
        self.allocator = allocator
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self.num_preemptions = 0

    # -- requests ----------------------------------------------------------------
    def add(self, request: Request, sample: SampleState) -> None:
        seq = Sequence(next(self._ids), request, 0, list(request.prompt_ids), sample)
        request.seqs.append(seq)
        self.requests[request.request_id] = request
        self.waiting.append(seq)

    def resume(self, request: Request, choices: list[tuple[int, list[int], SampleState]]) -> None:
        """Queue ``request``'s unfinished choices, each (index, output ids, sampler state) with
        its outputs so far: prefilled with the prompt (as after a preemption), then continued.
        Choices that finished before are not listed; no fork will come."""
        for index, output_ids, sample in choices:
            seq = Sequence(
                next(self._ids), request, index, [*request.prompt_ids, *output_ids], sample
            )
            request.seqs.append(seq)
            self.waiting.append(seq)
        request.forked = True
        self.requests[request.request_id] = request

    def fork(self, parent: Sequence, samples: list[SampleState]) -> list[Sequence]:
        """Children of ``parent`` sharing all its blocks (after its prefill)."""
        children = []
        for i, sample in enumerate(samples, start=1):
            child = Sequence(
                next(self._ids),
                parent.request,
                i,
                list(parent.token_ids[: parent.num_prompt]),
                sample,
                num_computed=parent.num_computed,
                blocks=[self.allocator.share(b) for b in parent.blocks],
                block_hashes=list(parent.block_hashes),
            )
            parent.request.seqs.append(child)
            self.running.append(child)
            children.append(child)
        parent.request.forked = True
        return children

    def finish(self, seq: Sequence, reason: str, stop_reason: str | int | None = None) -> None:
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        self._free(seq)
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)

    def abort(self, request_id: str) -> Request | None:
        request = self.requests.get(request_id)
        if request is not None:
            self.finish_request(request, "abort")
        return request

    def finish_request(self, request: Request, reason: str) -> None:
        """End every unfinished sample of ``request`` (abort, error); no fork will come."""
        for seq in request.seqs:
            if not seq.finished:
                self.finish(seq, reason)
        request.forked = True

    def pop_finished(self, request: Request) -> None:
        self.requests.pop(request.request_id, None)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # -- blocks ------------------------------------------------------------------
    def _free(self, seq: Sequence) -> None:
        for block in reversed(seq.blocks):  # tail first, so prefixes stay cached longest
            self.allocator.release(block)
        seq.blocks = []

    def _blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        end = seq.num_computed + num_tokens
        new = max(0, -(-end // self.block_size) - len(seq.blocks))
        first = seq.num_computed // self.block_size
        cow = first < len(seq.blocks) and self.allocator.refcount[seq.blocks[first]] > 1
        return new + int(cow)

    def _reserve(self, seq: Sequence, num_tokens: int, copies: list[tuple[int, int]]) -> bool:
        """Give ``seq`` the blocks its next ``num_tokens`` slots need; False if they don't fit."""
        if self._blocks_needed(seq, num_tokens) > self.allocator.num_free:
            return False
        first = seq.num_computed // self.block_size
        if first < len(seq.blocks) and self.allocator.refcount[seq.blocks[first]] > 1:
            shared = seq.blocks[first]
            seq.blocks[first] = self.allocator.allocate()
            copies.append((shared, seq.blocks[first]))
            self.allocator.release(shared)
        end = seq.num_computed + num_tokens
        while len(seq.blocks) * self.block_size < end:
            seq.blocks.append(self.allocator.allocate())
        return True

    def _match_prefix(self, seq: Sequence) -> tuple[int, int]:
        """Reuse cached blocks for the leading full blocks of a fresh sequence; (blocks
        looked up, blocks found), for the hit rate once the sequence is admitted."""
        bs = self.block_size
        # keep at least one token to compute: its logits are needed
        full = (len(seq.token_ids) - 1) // bs
        hashes, prev = [], None
        for i in range(full):
            prev = chain_hash(prev, seq.token_ids[i * bs : (i + 1) * bs])
            hashes.append(prev)
        hits = 0
        for h in hashes:
            block = self.allocator.lookup(h)
            if block is None:
                break
            seq.blocks.append(self.allocator.share(block))
            hits += 1
        seq.block_hashes = hashes[:hits]
        seq.num_computed = hits * bs
        if seq.index == 0 and not seq.request.forked:
            seq.request.num_cached_tokens = seq.num_computed
        return len(hashes), hits

    def _preempt(self, seq: Sequence) -> None:
        self._free(seq)
        seq.num_computed = 0
        seq.block_hashes = []
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    # -- the step ------------------------------------------------------------------
    def schedule(self) -> Schedule:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        copies: list[tuple[int, int]] = []
        preempted = 0
        for seq in list(self.running):
            if seq not in self.running or budget == 0:
                continue
            n = min(len(seq.token_ids) - seq.num_computed, budget)
            while not self._reserve(seq, n, copies):
                victim = self.running[-1]
                self._preempt(victim)
                preempted += 1
                if victim is seq:
                    break
            else:
                scheduled.append(ScheduledSeq(seq, n))
                budget -= n
        while (
            self.waiting and budget > 0 and not preempted and len(self.running) < self.max_num_seqs
        ):
            seq = self.waiting[0]
            lookups = (0, 0)
            if seq.num_computed == 0 and not seq.blocks:
                lookups = self._match_prefix(seq)
            n = min(len(seq.token_ids) - seq.num_computed, budget)
            if not self._reserve(seq, n, copies):
                self._free(seq)
                seq.num_computed = 0
                seq.block_hashes = []
                break
            self.allocator.record_lookups(*lookups)  # once per admission, not per retry
            self.waiting.popleft()
            self.running.append(seq)
            scheduled.append(ScheduledSeq(seq, n))
            budget -= n
        return Schedule(scheduled, copies)

    def advance(self, item: ScheduledSeq) -> None:
        """After the forward: the step's tokens are cached; register newly full blocks."""
        seq = item.seq
        seq.num_computed += item.num_tokens
        bs = self.block_size
        while (len(seq.block_hashes) + 1) * bs <= seq.num_computed:
            i = len(seq.block_hashes)
            prev = seq.block_hashes[-1] if seq.block_hashes else None
            h = chain_hash(prev, seq.token_ids[i * bs : (i + 1) * bs])
            seq.block_hashes.append(h)
            self.allocator.register_full(seq.blocks[i], h)

    def stats(self) -> dict[str, float]:
        a = self.allocator
        return {
            "num_running": len(self.running),
            "num_waiting": len(self.waiting),
            "kv_blocks_total": a.num_blocks,
            "kv_blocks_free": a.num_free,
            "kv_usage": a.num_used / a.num_blocks,
            "prefix_cache_queries": a.queries,
            "prefix_cache_hits": a.hits,
            "prefix_cache_hit_rate": a.hit_rate,
            "num_preemptions": self.num_preemptions,
        }
