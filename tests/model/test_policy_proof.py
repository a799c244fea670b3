"""A derived policy is proven on a shrunk copy of the model against HF before it is used.

The proof (``dstp.model.policy_proof``) runs every rank's sharded forward in one process
(one thread per rank, collectives summing / concatenating as the TP group would) and
compares each full-width module output with HF's. A right derived policy passes at TP 2
and 4 (KV heads split and replicated); a wrong one is refused, naming the module that
differs or raised, by the proof, by ``dstp inspect`` and at load on every rank, before
any weight is read. (The derived policies of the launcher tests, Starcoder2, Granite,
Cohere, GPT-Neo and the derived Llama and OLMo2, pass this proof at load on real ranks
in tests/policies/test_policies_equivalence.py, Starcoder2's at TP 2 and 4, where
Falcon-7B's is refused at load by every rank too.)
"""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch
from dstp.policies import Col, derive_policy

from dstp.model.policy_proof import (
    PolicyProofFailed,
    SimulatedTP,
    _shrunk_heads,
    is_derived,
    prove_policy,
    shrink_config,
)
from tests.helpers.policy_models import make_config


def _falcon_7b():
    """One KV head shared by all queries (``multi_query``), in no config attribute: the
    derived policy cuts the fused q|k|v projection evenly, which is wrong."""
    from transformers import FalconConfig

    return FalconConfig(
        hidden_size=64,
        num_attention_heads=4,
        num_hidden_layers=2,
        multi_query=True,
        new_decoder_architecture=False,
        vocab_size=250,
    )


def _wrong_phi3():
    """Phi-3's fused gate|up projection cut as one block: rank 0 gets all the gate rows,
    rank 1 all the up rows. Shapes fit, nothing raises; only the numbers are wrong."""
    from dstp.policies import PHI3

    layers = dict(PHI3.layers)
    layers["model.layers.*.mlp.gate_up_proj"] = Col(("even",))
    return dataclasses.replace(PHI3, name="auto:phi3", layers=layers)


@pytest.mark.parametrize(
    ("heads", "kv", "tp", "want"),
    [
        (32, 32, 4, (8, 8)),  # MHA: two heads per rank
        (64, 8, 8, (16, 8)),  # GQA, KV split one per rank, two queries each
        (32, 8, 4, (16, 8)),  # GQA, two KV heads per rank
        (4, 2, 4, (4, 2)),  # KV heads replicated on two ranks each
        (8, 1, 4, (8, 1)),  # MQA: one KV head on every rank
    ],
)
def test_shrunk_heads_keep_the_layout(heads, kv, tp, want):
    small_heads, small_kv = _shrunk_heads(heads, kv, tp)
    assert (small_heads, small_kv) == want
    assert small_heads % tp == 0 and small_heads % small_kv == 0
    split = kv % tp == 0
    assert (small_kv % tp == 0) == split and (tp % small_kv == 0) == (kv <= tp)


def test_shrink_keeps_the_class_and_cuts_per_layer_lists():
    config = make_config("qwen2_moe")  # 3 layers, mlp_only_layers=[1]
    config.num_hidden_layers = 6
    config.layer_types = ["full_attention"] * 6
    config.mlp_only_layers = [1, 5]
    config.vocab_size, config.eos_token_id = 1000, 999
    policy = derive_policy(config)
    small, changes = shrink_config(config, policy, 2)
    assert type(small) is type(config) and small.num_hidden_layers == 4
    assert small.layer_types == ["full_attention"] * 4 and small.mlp_only_layers == [1]
    assert small.vocab_size == 129 and small.eos_token_id == 128
    assert config.num_hidden_layers == 6 and config.vocab_size == 1000  # the original is kept
    assert changes["hidden_size"] == small.hidden_size


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("arch", ["starcoder2", "granite"])
def test_a_right_derived_policy_passes(arch, tp):
    config = make_config(arch)
    policy = derive_policy(config)
    assert is_derived(policy)
    proof = prove_policy(config, policy, tp)
    assert proof.tp == tp and proof.compared >= 10 and proof.max_logit_error < 1e-4


def test_the_proof_caught_a_missing_embedding_scale():
    """BioGPT scales its embedding by ``embed_scale``; the derivation once missed it (the
    proof named ``biogpt.embed_tokens``): the derived policy now carries the scale."""
    from transformers import BioGptConfig

    config = BioGptConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        vocab_size=300,
    )
    policy = derive_policy(config)
    assert policy.embedding_scale == "embed_scale"
    assert prove_policy(config, policy, 2).max_logit_error < 1e-4
    unscaled = dataclasses.replace(policy, embedding_scale=None)
    with pytest.raises(PolicyProofFailed, match=r"module biogpt\.embed_tokens differs first"):
        prove_policy(config, unscaled, 2)


def test_a_policy_that_crashes_is_refused_naming_the_module():
    config = _falcon_7b()
    policy = derive_policy(config)
    assert prove_policy(config, policy, 1).max_logit_error == 0  # nothing split: nothing wrong
    with pytest.raises(PolicyProofFailed) as caught:
        prove_policy(config, policy, 2)
    message = str(caught.value)
    assert message.startswith("derived policy 'auto:falcon' at TP=2 fails on a shrunk copy")
    assert "raised in transformer.h.0.self_attention: RuntimeError" in message
    assert "--policy" in message


def test_a_policy_with_wrong_numbers_is_refused_naming_the_layer():
    from transformers import Phi3Config

    config = Phi3Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=250,
        pad_token_id=None,
    )
    with pytest.raises(PolicyProofFailed, match=r"module model\.layers\.0\.mlp\.down_proj differs"):
        prove_policy(config, _wrong_phi3(), 2)
    from dstp.policies import PHI3

    assert prove_policy(config, PHI3, 2).max_logit_error < 1e-4  # the right split passes


def test_simulated_collectives_sum_and_concatenate_in_rank_order():
    ranks = SimulatedTP.ranks(3)
    out: list = [None] * 3

    def run(r: int) -> None:
        g = ranks[r]
        summed = g.all_reduce(torch.full((2,), float(r + 1)))
        gathered = g.all_gather(torch.tensor([[float(r)]]), dim=-1)
        out[r] = (summed, gathered, g.gather_to_driver(torch.tensor([r]), dim=0))

    threads = [threading.Thread(target=run, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r, (summed, gathered, driver) in enumerate(out):
        assert summed.tolist() == [6.0, 6.0] and gathered.tolist() == [[0.0, 1.0, 2.0]]
        assert (driver.tolist() if r == 0 else driver) == ([0, 1, 2] if r == 0 else None)


# -- at inspect and at load ---------------------------------------------------------
def test_inspect_shows_the_proof_and_refuses_a_wrong_derived_policy(tmp_path, capsys):
    from dstp.__main__ import main

    make_config("starcoder2").save_pretrained(tmp_path / "starcoder2")
    assert main(["inspect", "--model", str(tmp_path / "starcoder2"), "--tp", "4"]) == 0
    out = capsys.readouterr().out
    assert "proof: the derived policy equals HF at TP=4 on a shrunk copy of the model" in out
    _falcon_7b().save_pretrained(tmp_path / "falcon")
    assert main(["inspect", "--model", str(tmp_path / "falcon"), "--tp", "2"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
    assert captured.err.startswith("dstp inspect: derived policy 'auto:falcon' at TP=2 fails")
    assert "transformer.h.0.self_attention" in captured.err


def test_load_refuses_on_every_rank_before_reading_a_weight(tmp_path):
    """shard_model on two ranks (threads of a simulated group): the driver proves, both
    ranks raise its message. The folder holds config.json only: the refusal came first.

    The derived policy is passed in (as a caller may): deriving builds a meta model, which
    patches torch globally and must not run in two threads at once (ranks are processes).
    """
    from dstp.model.inject import shard_model

    _falcon_7b().save_pretrained(tmp_path)
    assert not list(tmp_path.glob("*.safetensors"))
    policy = derive_policy(_falcon_7b())
    ranks = SimulatedTP.ranks(2)
    errors: list = [None, None]

    def load(r: int) -> None:
        try:
            shard_model(str(tmp_path), ranks[r], torch.float32, policy=policy)
        except Exception as exc:
            errors[r] = exc

    threads = [threading.Thread(target=load, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(isinstance(e, PolicyProofFailed) for e in errors), errors
    assert str(errors[0]) == str(errors[1])
    assert "raised in transformer.h.0.self_attention" in str(errors[0])
