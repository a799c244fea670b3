"""The scheduler alone, driven as the engine drives it: no model, no ranks.

Each step here is the engine's: schedule, mark the scheduled tokens computed
(``advance``), then append one token to each sequence that produced one, forking
``n > 1`` requests after their prefill and finishing at ``max_tokens``. After every
step the block accounting is checked against the sequences that hold blocks.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass

from dstp.engine.block_allocator import BlockAllocator
from dstp.engine.sampling import SampleState
from dstp.engine.sampling_params import SamplingParams
from dstp.engine.scheduler import Request, Scheduler, Sequence

TOKEN = 7  # every "sampled" token


def make(num_blocks=16, block_size=4, max_num_seqs=8, max_num_batched_tokens=64, caching=True):
    allocator = BlockAllocator(num_blocks, caching)
    return Scheduler(allocator, block_size, max_num_seqs, max_num_batched_tokens)


_ids = itertools.count()


def add(sched: Scheduler, prompt: list[int], max_tokens: int = 4, n: int = 1) -> Request:
    params = SamplingParams(max_tokens=max_tokens, n=n, temperature=0)
    request = Request(f"r{next(_ids)}", list(prompt), params, 0.0)
    sched.add(request, SampleState(params, request.prompt_ids, [], None))
    return request


def live_seqs(sched: Scheduler) -> list[Sequence]:
    return [s for r in sched.requests.values() for s in r.seqs if not s.finished]


def check_blocks(sched: Scheduler) -> None:
    """Reference counts are the holders' count, never negative; free blocks are unheld."""
    a = sched.allocator
    held = Counter(b for seq in live_seqs(sched) for b in seq.blocks)
    assert all(count >= 0 for count in a.refcount)
    assert {b: c for b, c in enumerate(a.refcount) if c} == dict(held)
    free = list(a.free) + list(a.evictable)
    assert len(free) == len(set(free)) and not set(free) & held.keys()
    assert a.num_free + len(held) == a.num_blocks


@dataclass
class Ran:
    """What one step ran: per sequence (seq, tokens fed, whether it sampled), and the copies."""

    seqs: list[tuple[Sequence, int, bool]]
    copies: list[tuple[int, int]]


def step(sched: Scheduler) -> Ran:
    schedule = sched.schedule()
    assert sum(item.num_tokens for item in schedule.seqs) <= sched.max_num_batched_tokens
    admitted = [seq for seq in sched.running if seq.index == 0]  # forks may exceed the limit
    assert len(admitted) <= sched.max_num_seqs
    ran = Ran([(i.seq, i.num_tokens, i.produces_token) for i in schedule.seqs], schedule.copies)
    for item in schedule.seqs:
        sched.advance(item)
    for seq, _, produced in ran.seqs:
        if produced:
            _sample(sched, seq)
    check_blocks(sched)
    return ran


def _sample(sched: Scheduler, seq: Sequence) -> None:
    request = seq.request
    targets = [seq]
    if request.params.n > 1 and not request.forked:
        states = [SampleState(request.params, request.prompt_ids, [], None)] * (
            request.params.n - 1
        )
        targets += sched.fork(seq, states)
    for target in targets:
        target.token_ids.append(TOKEN)
        if len(target.output_ids) >= request.params.max_tokens:
            sched.finish(target, "length")
    if request.finished:
        sched.pop_finished(request)


def run_all(sched: Scheduler, limit: int = 200) -> list[Ran]:
    schedules = []
    while sched.has_unfinished:
        schedules.append(step(sched))
        assert len(schedules) < limit, "the scheduler stopped making progress"
    assert sched.allocator.all_free()
    return schedules


# -- budgets -----------------------------------------------------------------------------------


def test_a_long_prompt_is_prefilled_in_budget_sized_chunks():
    sched = make(max_num_batched_tokens=8)
    request = add(sched, list(range(20)), max_tokens=2)
    sizes = [[(n, produced) for _, n, produced in ran.seqs] for ran in run_all(sched)]
    assert sizes == [[(8, False)], [(8, False)], [(4, True)], [(1, True)]]
    assert request.seqs[0].output_ids == [TOKEN, TOKEN]


def test_decodes_go_first_and_a_new_prompt_takes_what_is_left():
    sched = make(max_num_batched_tokens=8)
    first = add(sched, [1, 2, 3], max_tokens=10)
    step(sched)  # its prefill: it decodes from now on
    second = add(sched, list(range(30, 50)), max_tokens=1)
    schedule = step(sched)
    assert [(seq.request, n) for seq, n, _ in schedule.seqs] == [(first, 1), (second, 7)]
    sched.abort(first.request_id)
    run_all(sched)


def test_max_num_seqs_bounds_the_running_set():
    sched = make(max_num_seqs=2)
    requests = [add(sched, [i, i + 1], max_tokens=3) for i in range(3)]
    step(sched)
    assert [s.request for s in sched.running] == requests[:2]
    assert [s.request for s in sched.waiting] == requests[2:]
    run_all(sched)
    assert all(len(r.seqs[0].output_ids) == 3 for r in requests)


# -- preemption ----------------------------------------------------------------------------------


def test_the_newest_sequence_is_preempted_and_recomputed_with_its_output():
    sched = make(num_blocks=4, block_size=4, caching=False)
    old, new = add(sched, [1] * 6, max_tokens=6), add(sched, [2] * 6, max_tokens=6)
    step(sched)  # both prefilled: 2 blocks each, every block in use
    step(sched)  # positions 6 and 7: still inside the second block
    step(sched)
    assert sched.num_preemptions == 0
    schedule = step(sched)  # position 8 needs a third block each: none is free
    assert sched.num_preemptions == 1
    assert [seq.request for seq, _, _ in schedule.seqs] == [old]
    victim = new.seqs[0]
    assert list(sched.waiting) == [victim] and victim.blocks == [] and victim.num_computed == 0
    assert victim.output_ids == [TOKEN] * 3  # kept, to be recomputed
    schedules = run_all(sched)
    recompute = next(item for ran in schedules for item in ran.seqs if item[0] is victim)
    assert recompute[1:] == (9, True)  # prompt + output again, in one chunk
    assert old.seqs[0].output_ids == new.seqs[0].output_ids == [TOKEN] * 6


def test_a_sequence_that_cannot_fit_alone_preempts_itself():
    sched = make(num_blocks=2, block_size=4, caching=False)
    lonely = add(sched, [3] * 7, max_tokens=4)
    step(sched)  # 7 tokens, 2 blocks: the 8th fits, the 9th would need a third
    step(sched)
    step(sched)
    assert sched.num_preemptions == 1 and list(sched.waiting) == lonely.seqs
    assert not sched.running and sched.allocator.all_free()
    sched.abort(lonely.request_id)  # it never fits: only an abort ends it
    assert not sched.has_unfinished


# -- prefix cache ----------------------------------------------------------------------------------


def test_a_repeated_prompt_reuses_the_cached_full_blocks():
    sched = make(block_size=4)
    prompt = list(range(100, 112))  # 3 full blocks
    add(sched, prompt, max_tokens=1)
    run_all(sched)
    again = add(sched, prompt, max_tokens=1)
    schedule = step(sched)
    # the last block is recomputed: its final token's logits are needed
    assert again.num_cached_tokens == 8 and schedule.seqs[0][1] == 4
    a = sched.allocator
    assert (a.queries, a.hits) == (4, 2)
    run_all(sched)


def test_a_waiting_prompt_counts_its_lookups_once_however_often_it_retries():
    sched = make(num_blocks=4, block_size=4)
    add(sched, list(range(12)), max_tokens=4)  # 2 blocks looked up; takes 3, then a 4th
    add(sched, list(range(100, 109)), max_tokens=1)  # 2 blocks looked up; waits for 3
    steps = run_all(sched)
    assert len(steps) > 2  # the second prompt retried admission several times
    assert (sched.allocator.queries, sched.allocator.hits) == (2 + 2, 0)


def test_cached_prefixes_are_evicted_least_recently_used_first():
    sched = make(num_blocks=8, block_size=4)
    first, second = list(range(10, 19)), list(range(20, 29))  # 2 full blocks + 1 token each
    for prompt in (first, second):
        add(sched, prompt, max_tokens=1)
        run_all(sched)
    assert len(sched.allocator.evictable) == 4 and len(sched.allocator.free) == 4
    add(sched, list(range(40, 60)), max_tokens=1)  # 5 blocks: the 4 free, then 1 evicted...
    run_all(sched)
    assert add(sched, second, max_tokens=1).num_cached_tokens == 0  # (not scheduled yet)
    step(sched)  # ... and second's blocks, released after first's, are still there
    run_all(sched)
    assert sched.allocator.hits == 2
    again = add(sched, first, max_tokens=1)
    run_all(sched)
    assert again.num_cached_tokens == 0  # first's were evicted: the least recently used
    assert sched.allocator.hits == 2


def test_without_prefix_caching_nothing_is_reused():
    sched = make(caching=False)
    prompt = list(range(12))
    for _ in range(2):
        request = add(sched, prompt, max_tokens=1)
        run_all(sched)
        assert request.num_cached_tokens == 0


# -- n samples: forks and copy-on-write --------------------------------------------------------------


def test_forked_samples_share_full_blocks_and_copy_the_partial_one_on_write():
    sched = make(block_size=4)
    request = add(sched, list(range(6)), max_tokens=3, n=3)  # 1 full block + 2 tokens
    step(sched)  # prefill, then 3 samples sharing both blocks
    parent, *children = request.seqs
    assert len(request.seqs) == 3 and all(c.blocks == parent.blocks for c in children)
    full, partial = parent.blocks
    assert sched.allocator.refcount[full] == sched.allocator.refcount[partial] == 3
    schedule = step(sched)  # each writes position 6, inside the shared partial block
    assert len(schedule.copies) == 2 and all(src == partial for src, _ in schedule.copies)
    assert sched.allocator.refcount[full] == 3 and sched.allocator.refcount[partial] == 1
    assert len({s.blocks[1] for s in request.seqs}) == 3  # each its own copy now
    run_all(sched)
    assert all(len(s.output_ids) == 3 for s in request.seqs)


# -- freeing -------------------------------------------------------------------------------------


def test_abort_frees_running_and_waiting_sequences():
    sched = make(max_num_seqs=1)
    running, waiting = add(sched, list(range(9)), max_tokens=5), add(sched, [1, 2])
    step(sched)
    assert sched.allocator.num_used > 0
    for request in (running, waiting):
        assert sched.abort(request.request_id) is request
        assert all(s.finish_reason == "abort" for s in request.seqs)
    check_blocks(sched)
    assert not sched.has_unfinished and sched.allocator.all_free()
    assert sched.abort("unknown") is None


def test_finishing_frees_at_once():
    sched = make()
    request = add(sched, list(range(9)), max_tokens=100)
    step(sched)
    sched.finish(request.seqs[0], "stop", "x")
    assert (request.seqs[0].finish_reason, request.seqs[0].stop_reason) == ("stop", "x")
    assert sched.allocator.all_free() and not sched.has_unfinished


def test_a_busy_mix_ends_with_every_block_free():
    sched = make(num_blocks=12, block_size=4, max_num_seqs=4, max_num_batched_tokens=16)
    for i in range(10):
        add(sched, [i % 3] * (3 + 5 * (i % 4)), max_tokens=2 + i % 5, n=1 + i % 2)
    run_all(sched, limit=400)
    assert sched.num_preemptions > 0 and not sched.requests
    stats = sched.stats()
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"] and stats["num_running"] == 0


def test_sequences_and_requests_are_compared_by_identity():
    """The scheduler asks ``seq in running`` and removes by value for every sequence of a
    step; a dataclass's field-by-field ``__eq__`` made that O(n^2) field comparisons
    (~1.5 ms a step at 64 sequences, 2026-12-04), and two requests with the same
    prompt are still two requests."""
    request = Request("a", [1, 2], SamplingParams(), 0.0)
    twin = Request("a", [1, 2], SamplingParams(), 0.0)
    assert request != twin and request == request
    seq = Sequence(0, request, 0, [1, 2], None)
    assert seq != Sequence(0, request, 0, [1, 2], None)
    assert type(seq).__eq__ is object.__eq__
