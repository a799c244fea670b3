"""The sampler's host traffic per step, counted on the CPU (issue 22 item 2).

On a GPU every ``torch.tensor(list, device=...)`` is a blocking upload and every
``tolist/item/cpu/numpy`` a device-to-host wait. Here the logits live on the CPU,
where host and device are the same memory, so no copy can be observed; the
proxy is the *calls* on the sampler's path that would be transfers on a GPU:

* an upload: ``torch.tensor`` / ``torch.as_tensor`` given a ``device``, or
  ``Tensor.to(device, non_blocking=...)`` (how ``StepUploader`` sends its one
  packed buffer; the sampler moves nothing else to a device);
* a readback: ``Tensor.tolist/item/cpu/numpy``, or ``Tensor.to`` towards the CPU
  without ``non_blocking`` (on a GPU each of these waits for the device).

Tensor ops between tensors already on the device (what a GPU would run as
kernels) are not counted: they neither upload nor wait. The target is one
upload and one readback per step, whatever the batch holds: met on the path an
accelerator takes (step.py), checked here on the CPU and on the fake card of
tests/helpers/fake_cuda.py, which counts what torch itself moves and waits for.
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter

import pytest
import torch

from dstp.engine.sampling import SampleState, make_generator, packed, sample, step
from dstp.engine.sampling import state as sampling_state
from dstp.engine.sampling_params import SamplingParams
from tests.helpers.fake_cuda import fake_cuda


@contextlib.contextmanager
def counting():
    """Count uploads and readbacks (see the module docstring) while the block runs."""
    counts: Counter[str] = Counter()
    originals = {}

    def wrap(owner, name, kind_of):
        original = getattr(owner, name)
        originals[(owner, name)] = original

        def counted(*args, **kwargs):
            kind = kind_of(*args, **kwargs)
            if kind:
                counts[kind] += 1
            return original(*args, **kwargs)

        setattr(owner, name, counted)

    def to_kind(tensor, *args, **kwargs):
        if "non_blocking" in kwargs:
            return "upload"
        target = kwargs.get("device", args[0] if args else None)
        if isinstance(target, (str, torch.device)) and torch.device(target).type == "cpu":
            return "readback"
        return None

    wrap(torch, "tensor", lambda *a, **k: "upload" if k.get("device") is not None else None)
    wrap(torch, "as_tensor", lambda *a, **k: "upload" if k.get("device") is not None else None)
    for name in ("tolist", "item", "cpu", "numpy"):
        wrap(torch.Tensor, name, lambda *a, **k: "readback")
    wrap(torch.Tensor, "to", to_kind)
    try:
        yield counts
    finally:
        for (owner, name), original in originals.items():
            setattr(owner, name, original)


def mixed_batch(vocab: int) -> list[SampleState]:
    """Greedy, seeded, top-k / top-p / min-p, penalties, min_tokens and logprobs rows."""
    kinds = [
        dict(temperature=0),
        dict(temperature=0, repetition_penalty=1.3, logprobs=3),
        dict(temperature=0.8, top_p=0.9, seed=3),
        dict(temperature=0.9, top_k=40, repetition_penalty=1.2, frequency_penalty=0.5, seed=4),
        dict(temperature=1.0, min_p=0.05, presence_penalty=0.3),
        dict(temperature=1.0, top_p=0.95),  # a flat row: its nucleus outgrows the prefix
        dict(temperature=0.7, min_tokens=3, max_tokens=8, stop_token_ids=[5, 6], logprobs=0),
        dict(temperature=1.0, logprobs=2),
    ]
    gen = torch.Generator().manual_seed(0)
    states = []
    for kw in kinds:
        p = SamplingParams(**kw)
        prompt = torch.randint(vocab, (30,), generator=gen).tolist()
        states.append(SampleState(p, prompt, [], make_generator(p.seed, 0), frozenset({5, 6})))
    return states


def steps(
    vocab: int, count: bool, device: str = "cpu", transfers=None
) -> tuple[list[list[int]], list[Counter[str]]]:
    """Three steps of the mixed batch; each step's counts (of the proxy, or of ``transfers``:
    a fake card's, tests/helpers/fake_cuda.py)."""
    states = mixed_batch(vocab)
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(2)  # the unseeded rows' shared draw
    tokens, per_step = [], []
    for _ in range(3):
        logits = torch.randn(len(states), vocab, generator=gen) * 3
        logits[5] *= 0.01
        logits = logits.to(device)
        for state in states:
            state.output_ids = list(state.output_ids)
        if transfers is not None:
            transfers.reset()
        with counting() if count else contextlib.nullcontext(Counter()) as counts:
            picks = sample(logits, states)
        if transfers is not None:
            counts = Counter({k: v for k, v in transfers.snapshot().items() if v})
        assert all(isinstance(p, list) for p in picks), picks
        per_step.append(Counter(counts))
        drawn = [p[0][0] for p in picks]
        tokens.append(drawn)
        for state, token in zip(states, drawn, strict=True):
            state.output_ids = state.output_ids + [token]
    return tokens, per_step


@pytest.fixture
def accelerator_path(monkeypatch):
    """The path an accelerator takes (step.py), here on the CPU: every sampled row filtered
    over its whole row, so no mid-step read of which rows the prefix could not decide."""
    monkeypatch.setattr(step, "HOST_BRANCH", False)


def test_the_harness_does_not_change_the_draws():
    assert steps(4096, count=True)[0] == steps(4096, count=False)[0]


def test_one_upload_and_one_readback_per_step(accelerator_path):
    _, per_step = steps(4096, count=True)
    for counts in per_step:
        assert counts["upload"] == 1 and counts["readback"] == 1, per_step


def test_the_cpu_path_reads_which_rows_fall_back():
    """On the CPU with dstp's kernels every sampled row is filtered and drawn by one fused
    op (csrc/sampler_ops.cpp): one upload, one readback. Without them the prefix path stays
    (a whole-row sort costs ~15x there), and the read of which rows the prefix could not
    decide comes before the step's one readback."""
    reads = 1 if step.fused_ops(torch.device("cpu")) is not None else 2
    _, per_step = steps(4096, count=True)
    for counts in per_step:
        assert counts["upload"] == 1 and counts["readback"] == reads, per_step


def test_on_a_fake_card_one_upload_and_one_sync_per_step(accelerator_path, monkeypatch):
    """The same batch on tests/helpers/fake_cuda.py's card, which sees every transfer and
    sync torch makes (implicit uploads, pageable non-blocking copies, data-dependent shapes),
    gives the accelerator path's tokens on the CPU."""
    on_cpu, _ = steps(4096, count=False)
    # the sampler's per-device buffers (pinned host buffers, the output pool) made on this
    # card must not outlive its block: another block's card would not know them
    monkeypatch.setattr(packed, "_LOCAL", threading.local())
    monkeypatch.setattr(sampling_state, "_LOCAL", threading.local())
    with fake_cuda(total_gib=1) as card:
        on_card, per_step = steps(4096, count=False, device="cuda", transfers=card.transfers)
    for counts in per_step:
        assert counts == {"upload": 1, "sync": 1}, per_step
    assert on_card == on_cpu
