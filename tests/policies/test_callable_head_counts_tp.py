"""A head count no config attribute holds, said by a callable, is served right: Falcon-7B's
one shared KV head (``multi_query=True``) through ``dstp.load(policy=FILE)`` at TP=2 and 4
equals unsharded HF fp32 (KV head replicated on every rank). Falcon's attention does not go
through AttentionInterface, so this is the ``dstp.load`` path; the engine refuses it
(tests/model/test_unservable_models.py). The same launch first loads it without the
policy file: dstp derives a policy (an even cut of the fused q|k|v), which its proof on
a shrunk copy (``dstp.model.policy_proof``) refuses on every rank before any weight."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.launcher import run_ranks
from tests.helpers.tiny_models import save_random_model
from tests.model.test_unservable_models import FALCON_7B_POLICY

WORKER = """
import os
import sys
import torch
import dstp
from dstp.model.policy_proof import PolicyProofFailed

path, policy, out = sys.argv[1:4]
try:  # without the file, dstp derives a policy: wrong for one shared KV head, refused
    dstp.load(path)
    raise SystemExit("the derived policy was not refused")
except PolicyProofFailed as exc:
    with open(out + ".rank" + os.environ["RANK"] + ".refused", "w") as f:
        f.write(str(exc))
model = dstp.load(path, policy=policy)
ids = torch.tensor([[1, 17, 33, 5, 99, 42, 7, 64]])
with torch.inference_mode():
    logits = model(ids).logits.float()
if os.environ["RANK"] == "0":
    torch.save(logits, out)
"""


@pytest.mark.parametrize("tp", [2, 4])
def test_falcon_7b_one_kv_head_by_callable_matches_hf(tmp_path, tp):
    from transformers import AutoModelForCausalLM, FalconConfig

    config = FalconConfig(
        hidden_size=64,
        num_attention_heads=4,
        num_hidden_layers=2,
        multi_query=True,
        new_decoder_architecture=False,
        vocab_size=250,
        bos_token_id=1,
        eos_token_id=2,
    )
    path = save_random_model(config, tmp_path / "falcon")
    policy = tmp_path / "falcon_policy.py"
    policy.write_text(FALCON_7B_POLICY)
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    out = tmp_path / "logits.pt"
    procs = run_ranks(tp, [str(worker), str(path), str(policy), str(out)], timeout=300)
    assert all(p.returncode == 0 for p in procs), procs[0].stdout[-3000:]
    # every rank refused the derived policy with the same line, naming the attention
    refusals = {(tmp_path / f"logits.pt.rank{r}.refused").read_text() for r in range(tp)}
    assert len(refusals) == 1, refusals
    refusal = refusals.pop()
    assert refusal.startswith(f"derived policy 'auto:falcon' at TP={tp} fails"), refusal
    assert "raised in transformer.h.0.self_attention" in refusal
    got = torch.load(out)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.inference_mode():
        want = hf(torch.tensor([[1, 17, 33, 5, 99, 42, 7, 64]])).logits.float()
    assert (got - want).abs().max() < 1e-4
