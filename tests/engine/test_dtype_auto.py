"""``--dtype auto`` on GPUs: a float32 (or undeclared) checkpoint is served in 16 bits."""

from __future__ import annotations

import json

import pytest
import torch

from dstp.engine.config import EngineConfig, describe_dtype, resolve_dtype
from dstp.engine.llm_engine import Engine
from tests.helpers.fake_cuda import fake_cuda_rank
from tests.helpers.tiny_models import STORIES


@pytest.fixture
def checkpoint(tmp_path):
    def declaring(**config):
        (tmp_path / "config.json").write_text(json.dumps(config))
        return tmp_path

    return declaring


def test_auto_serves_a_float32_checkpoint_in_bfloat16_on_cuda(checkpoint, monkeypatch):
    fp32 = checkpoint(torch_dtype="float32")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", fp32, "cuda") == "bfloat16"
    assert resolve_dtype("auto", fp32, "cpu") == "float32"  # the CPU keeps the checkpoint's
    assert resolve_dtype("float32", fp32, "cuda") == "float32"  # asked for: kept
    assert resolve_dtype("auto", checkpoint(), "cuda") == "bfloat16"  # none declared
    assert resolve_dtype("auto", checkpoint(torch_dtype="float16"), "cuda") == "float16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto", fp32, "cuda") == "float16"  # a GPU without bf16 (V100)


def test_the_log_says_why(checkpoint, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    fp32 = checkpoint(torch_dtype="float32")
    line = describe_dtype("auto", fp32, "cuda")
    assert line.startswith("--dtype auto: bfloat16 on cuda (the checkpoint is float32")
    assert "--dtype float32 keeps it" in line
    assert describe_dtype("auto", fp32, "cpu") == "--dtype auto: float32 (the checkpoint's)"


def test_the_engine_loads_in_bfloat16_on_a_fake_gpu():
    """stories260K declares float32; on the fake card its weights and cache are bf16."""
    with fake_cuda_rank(total_gib=0.02):
        config = EngineConfig(
            model=str(STORIES),
            dtype="auto",
            max_model_len=32,
            max_num_seqs=2,
            max_num_batched_tokens=32,
        )
        runner = Engine(config).runner
        assert {p.dtype for p in runner.model.parameters()} == {torch.bfloat16}
        assert runner.cache.keys.dtype == torch.bfloat16
