"""Every architecture with a policy, served by the engine (paged KV cache), equals HF.

The reference is HF greedy ``generate`` with EOS switched off (the engine's
``ignore_eos`` keeps EOS samplable; HF's ``min_new_tokens`` would mask it).

One launch per TP size runs all architectures. A small token budget forces
chunked prefill, so sliding windows (Mistral, Gemma 2) and soft-capping
(Gemma 2) are exercised on the paged path's cached-context branch too.
"""

from __future__ import annotations

import json

import pytest

from tests.hf_reference import greedy_continuations, load_reference
from tests.launcher import run_ranks
from tests.policy_models import ARCHITECTURES, build_architectures

# GPT-Neo's HF class predates the AttentionInterface: dstp.load serves it, the engine refuses it
NO_ATTENTION_BACKEND = {"gpt_neo"}

PROMPTS = [
    [1] + [(13 * i + 5 * j) % 240 + 3 for j in range(3 + 9 * i)] for i in range(4)
]  # 4..31 tokens
NEW = 12


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    names = [name for name in ARCHITECTURES if name not in NO_ATTENTION_BACKEND]
    return build_architectures(tmp_path_factory.mktemp("arch"), names)


@pytest.fixture(scope="module")
def hf_greedy(checkpoints):
    return {
        name: greedy_continuations(load_reference(path), PROMPTS, NEW)
        for name, path in checkpoints.items()
    }


@pytest.mark.parametrize("tp", [2, 4])
def test_engine_matches_hf_for_every_architecture(tp, checkpoints, hf_greedy, tmp_path):
    scenarios = {
        name: {
            "engine": {
                "model": str(path),
                "dtype": "float32",
                "num_blocks": 64,
                "block_size": 4,
                "max_num_batched_tokens": 16,
            },
            "prompts": PROMPTS,
            "params": [{"max_tokens": NEW, "temperature": 0.0, "ignore_eos": True}] * len(PROMPTS),
        }
        for name, path in checkpoints.items()
    }
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"scenarios": scenarios}))
    for proc in run_ranks(
        tp, ["tests/workers/engine_run.py", str(job), str(tmp_path / "out.json")], timeout=900
    ):
        assert proc.returncode == 0, proc.stdout[-4000:]
    results = json.loads((tmp_path / "out.json").read_text())
    mismatched = [
        name
        for name in checkpoints
        if [o[0]["token_ids"] for o in results[name]["outputs"]] != hf_greedy[name]
    ]
    assert not mismatched, f"TP={tp}: engine differs from HF for {mismatched}"
    assert all(r["all_blocks_free"] for r in results.values())


def test_engine_refuses_models_without_attention_backend(tmp_path):
    from dstp.policies import TPConfigError

    from dstp.engine import Engine, EngineConfig

    path = build_architectures(tmp_path, ["gpt_neo"])["gpt_neo"]
    with pytest.raises(TPConfigError, match="AttentionInterface.*dstp.load"):
        Engine(EngineConfig(model=str(path), dtype="float32", num_blocks=8))
