"""A model that would crash on its first request never serves: under the real launcher at
TP=2, every rank's start-up probe fails, each rank says why in one line, and the job ends
without /health ever being 200.

The crash is a real one (issue 26): OLMo2's q/k norms span the whole attention width, so a
policy that leaves them replicated (this file's, written as a user might) feeds a TP=2
rank's half-width projection into a full-width norm.
"""

from __future__ import annotations

import re

from tests.helpers.launcher import run_deepspeed
from tests.helpers.tiny_models import save_random_model

OLMO2_WITHOUT_SHARDED_NORMS = """
from dstp.policies import Col, Policy, Row, register

register(
    Policy(
        name="olmo2_replicated_norms",
        architectures=("Olmo2ForCausalLM",),
        model_types=("olmo2",),
        layers={
            "model.layers.*.self_attn.q_proj": Col(("q",)),
            "model.layers.*.self_attn.k_proj": Col(("kv",)),
            "model.layers.*.self_attn.v_proj": Col(("kv",)),
            "model.layers.*.self_attn.o_proj": Row(("q",)),
            "model.layers.*.mlp.gate_proj": Col(),
            "model.layers.*.mlp.up_proj": Col(),
            "model.layers.*.mlp.down_proj": Row(),
        },
        embedding="model.embed_tokens",
        lm_head="lm_head",
        attention="model.layers.*.self_attn",
        attention_attrs={"num_key_value_groups": "kv_groups"},
    )
)
"""


def test_a_model_whose_first_request_would_crash_stops_every_rank_at_start_up(tmp_path):
    from transformers import Olmo2Config

    config = Olmo2Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=250,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
    )
    model = save_random_model(config, tmp_path / "olmo2")
    policy = tmp_path / "olmo2_policy.py"
    policy.write_text(OLMO2_WITHOUT_SHARDED_NORMS)
    proc = run_deepspeed(
        2,
        ["launch/serve.py", "--model", str(model), "--policy", str(policy), "--port", "0"],
        timeout=400,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    said = re.findall(r"StartupProbeFailed: start-up probe failed: a prefill raised (.*)", out)
    # each rank names the real cause, the shapes, in one line (its own or the other's)
    assert len(said) == 2, out[-3000:]
    assert all(
        "The size of tensor a (64) must match the size of tensor b (32)" in line for line in said
    ), said
    assert "would fail on its first request" in said[0]
    assert "Traceback" not in out, out[-3000:]
    assert "serving on http" not in out.lower()
