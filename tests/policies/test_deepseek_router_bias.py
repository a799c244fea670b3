"""DeepSeek-V3's router bias is read from the checkpoint, not left at its zero init.

``e_score_correction_bias`` is a persistent buffer, not a parameter: a loader that
fills only parameters keeps the zeros its ``__init__`` made and routes tokens to other
experts than HF does. The tiny checkpoint here has a bias large enough to change
HF's routing (checked), and ``dstp.load`` at TP=2 must still match HF's logits.
"""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from tests.helpers.launcher import run_ranks
from tests.helpers.policy_models import make_config

PROMPT = [1, 17, 42, 99, 7, 3, 150, 64, 12, 201, 33, 5]


def _logits(model) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([PROMPT])).logits[0]


def test_router_bias_is_loaded_and_matches_hf_at_tp2(tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(make_config("deepseek_v3"), dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2)
    unbiased = _logits(model.eval())
    biases = [m.mlp.gate.e_score_correction_bias for m in model.model.layers[1:]]
    with torch.no_grad():
        for bias in biases:
            bias.copy_(torch.tensor([1.5, 0.5, -1.0, -1.0]))  # group 0 always wins
    want = _logits(model)
    assert (want - unbiased).abs().max() > 1e-2, "the bias must change HF's routing"
    model.save_pretrained(tmp_path / "model")

    job = tmp_path / "job.json"
    job.write_text(
        json.dumps({"models": {"v3": str(tmp_path / "model")}, "prompt": [PROMPT], "new_tokens": 1})
    )
    for proc in run_ranks(
        2, ["tests/helpers/workers/tp_forward.py", str(job), str(tmp_path)], timeout=300
    ):
        assert proc.returncode == 0, proc.stdout[-4000:]
    got = load_file(tmp_path / "v3.safetensors")["logits"][0]
    err = (got - want).abs().max().item()
    print(f"TP=2 deepseek_v3 with router bias: max |dlogit| {err:.2e}")
    assert err < 1e-4, err
