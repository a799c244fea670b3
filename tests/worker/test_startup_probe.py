"""The start-up probe: every rank prefills, continues and decodes a few tokens through the
paged KV cache before the server says healthy, so a model that would fail on its first
request fails at start-up, naming why. In-process engines at TP=1 on stories260K."""

from __future__ import annotations

import pytest
import torch

import dstp.worker.attention as attention
from dstp.engine.llm_engine import Engine, EngineConfig, SamplingParams
from dstp.worker.model_runner import ModelRunner, StartupProbeFailed
from tests.helpers.tiny_models import STORIES


def _engine() -> Engine:
    return Engine(EngineConfig(model=str(STORIES), dtype="float32", num_blocks=16))


def test_probe_runs_every_branch_on_a_scratch_cache_and_leaves_nothing(monkeypatch):
    steps = []
    execute = ModelRunner.execute

    def counting(self, plan):
        steps.append(sorted(plan.batched_decode_seqs()))
        return execute(self, plan)

    monkeypatch.setattr(ModelRunner, "execute", counting)
    engine = _engine()
    # fresh prefills, a continuation beside a decode, then a batch of two decodes
    assert steps == [[], [1], [0, 1]]
    cache = engine.runner.cache
    assert not cache.keys.any() and not cache.values.any()  # the real cache never written
    outs = engine.generate(["Once upon a time"], SamplingParams(max_tokens=4, temperature=0))
    assert len(outs[0].outputs[0].token_ids) == 4
    engine.shutdown()


class _FailsOnDecode:
    """The device's real backend, except that a step with a decode raises (a kernel that
    cannot take this model's decode, as a first request would find)."""

    def __init__(self, real):
        self.real = real

    def __getattr__(self, name):
        return getattr(self.real, name)

    def forward(self, query, key, value, k_cache, v_cache, step, layer):
        if step.decode_seqs:
            raise RuntimeError("decode kernel: head size 24 is not supported")
        return self.real.forward(query, key, value, k_cache, v_cache, step, layer)


def test_a_model_whose_first_decode_would_crash_fails_at_start_up(monkeypatch):
    real = attention.backend_for
    monkeypatch.setattr(attention, "backend_for", lambda device: _FailsOnDecode(real(device)))
    with pytest.raises(StartupProbeFailed) as err:
        _engine()
    message = str(err.value)
    assert message.startswith(
        "start-up probe failed: a prefill continuation beside a decode raised RuntimeError: "
        "decode kernel: head size 24 is not supported (test_startup_probe.py:"
    )
    assert "would fail on its first request" in message and "\n" not in message


def test_attention_that_never_reaches_the_paged_cache_is_refused(monkeypatch):
    """A module whose forward bypasses AttentionInterface: the layers it never reached."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    monkeypatch.setattr(attention, "paged_attention", sdpa_attention_forward)
    with pytest.raises(
        StartupProbeFailed, match=r"attention of layer\(s\) \[0, 1, 2, 3, 4\] never"
    ):
        _engine()


def test_nan_logits_fail_the_probe(monkeypatch):
    execute = ModelRunner.execute

    def nan(self, plan):
        logits = execute(self, plan)
        return None if logits is None else torch.full_like(logits, float("nan"))

    monkeypatch.setattr(ModelRunner, "execute", nan)
    with pytest.raises(StartupProbeFailed, match="a prefill gave NaN logits"):
        _engine()
