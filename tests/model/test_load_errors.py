"""Bad input fails with a clear error naming the problem and the fix, on every rank, with no hang."""

from __future__ import annotations

import shutil
import time
from types import SimpleNamespace

import pytest
import torch
from dstp.policies import TPConfigError, policy_for

import dstp
from dstp.model.loading import CheckpointError
from tests.helpers.launcher import run_ranks
from tests.helpers.tiny_models import llama_config, save_random_model


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return save_random_model(
        llama_config(num_attention_heads=4, num_key_value_heads=2, vocab_size=128),
        tmp_path_factory.mktemp("good") / "m",
        max_shard_size="40KB",
    )


def _fail_on_all_ranks(n: int, path: str, *expected: str, timeout: float = 120) -> str:
    start = time.monotonic()
    procs = run_ranks(n, ["tests/helpers/workers/load_only.py", path], timeout=timeout)
    assert time.monotonic() - start < timeout
    for rank, proc in enumerate(procs):
        assert proc.returncode != 0, f"rank {rank} should fail:\n{proc.stdout[-2000:]}"
        assert "ERROR" in proc.stdout, proc.stdout[-2000:]
    text = procs[0].stdout
    for fragment in expected:
        assert fragment in text, text[-2000:]
    return text


def test_heads_not_divisible_fails_before_reading_weights(tmp_path):
    path = save_random_model(
        llama_config(
            num_attention_heads=5, num_key_value_heads=5, hidden_size=40, intermediate_size=80
        ),
        tmp_path / "m",
    )
    (path / "model.safetensors").write_bytes(b"not a safetensors file")  # must never be opened
    _fail_on_all_ranks(  # 2 ranks, not 4: each rank start costs seconds on a small machine
        2,
        str(path),
        "TPConfigError",
        "num_attention_heads=5 is not divisible by TP=2",
        "Valid TP sizes for this model: [1, 5]",
    )


def test_kv_heads_neither_divide_nor_are_divided():
    config = llama_config(
        num_attention_heads=12, num_key_value_heads=3, hidden_size=48, intermediate_size=96
    )
    policy = policy_for(config)
    with pytest.raises(TPConfigError, match="num_key_value_heads=3 and TP=2"):
        policy.validate(config, 2)
    assert policy.validate(config, 6).kv_replicas == 2  # 3 KV heads, each on 2 of 6 ranks
    assert policy.valid_tp_sizes(config) == [1, 3, 6, 12]


def test_intermediate_not_divisible():
    config = llama_config(intermediate_size=130)
    with pytest.raises(TPConfigError, match="intermediate_size=130 is not divisible by TP=4"):
        policy_for(config).validate(config, 4)


def test_unknown_architecture_points_to_policy_docs():
    config = SimpleNamespace(architectures=["MysteryForCausalLM"], model_type="mystery")
    with pytest.raises(TPConfigError, match="writing-a-policy.md"):
        policy_for(config)


def test_missing_shard_on_one_rank_stops_every_rank(good, tmp_path):
    """Rank 1 sees a copy missing a shard file, rank 0 a good one: rank 1 names the file,
    rank 0 stops because another rank failed; both exit, neither hangs."""
    shutil.copytree(good, tmp_path / "view0")
    broken = shutil.copytree(good, tmp_path / "view1")
    victim = sorted(broken.glob("model-*.safetensors"))[1]
    victim.unlink()
    start = time.monotonic()
    procs = run_ranks(
        2, ["tests/helpers/workers/load_only.py", str(tmp_path / "view{rank}")], timeout=120
    )
    assert time.monotonic() - start < 120
    assert all(p.returncode != 0 and "ERROR" in p.stdout for p in procs), procs[0].stdout[-2000:]
    assert "another rank failed" in procs[0].stdout
    for fragment in ("CheckpointError", victim.name, "missing"):
        assert fragment in procs[1].stdout, procs[1].stdout[-2000:]


def test_corrupt_header(good, tmp_path):
    broken = shutil.copytree(good, tmp_path / "corrupt")
    victim = sorted(broken.glob("model-*.safetensors"))[0]
    victim.write_bytes(b"\xff" * 8 + b"garbage")
    with pytest.raises(CheckpointError, match="not a readable safetensors file.*re-download"):
        dstp.load(str(broken))


def test_pickle_checkpoint_refused_by_default_and_loadable_on_request(good, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(good / "config.json", pickled)
    state = {}
    for file in good.glob("*.safetensors"):
        state.update(load_file(file))
    torch.save(state, pickled / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle.*--allow-pickle"):
        dstp.load(str(pickled))
    model = dstp.load(str(pickled), allow_pickle=True)
    ref = AutoModelForCausalLM.from_pretrained(good, dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 20]])
    with torch.inference_mode():
        assert torch.allclose(model(ids).logits, ref(ids).logits, atol=1e-5)


def test_no_weights_at_all(tmp_path):
    path = tmp_path / "empty"
    llama_config().save_pretrained(path)
    with pytest.raises(CheckpointError, match="no \\*.safetensors files"):
        dstp.load(str(path))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_requested_dtype(good, dtype):
    model = dstp.load(str(good), dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}
    with torch.inference_mode():
        assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 128)
