"""Models dstp cannot serve are refused at load, naming why, before a weight is read.

Each checkpoint here is a config.json alone: reaching the weights would fail with a
different error (no safetensors file), so the refusal's own message proves it came first.
"""

from __future__ import annotations

import pytest
from dstp.policies import TPConfigError

import dstp
from dstp.engine.llm_engine import Engine, EngineConfig

TINY = dict(hidden_size=32, num_attention_heads=4, num_hidden_layers=1, vocab_size=100)


def _falcon(**kw):
    from transformers import FalconConfig

    return FalconConfig(**TINY, **kw)


def _bloom():
    from transformers import BloomConfig

    return BloomConfig(hidden_size=32, n_head=4, n_layer=1, vocab_size=100)


def _mpt():
    from transformers import MptConfig

    return MptConfig(d_model=32, n_heads=4, n_layers=1, vocab_size=100)  # alibi on by default


def _config_only(tmp_path, config):
    config.save_pretrained(tmp_path)
    assert not list(tmp_path.glob("*.safetensors"))
    return str(tmp_path)


@pytest.mark.parametrize(
    "config",
    [
        pytest.param(
            lambda: _falcon(new_decoder_architecture=False, multi_query=True), id="falcon-7b"
        ),
        pytest.param(
            lambda: _falcon(new_decoder_architecture=True, num_kv_heads=2), id="falcon-40b"
        ),
    ],
)
def test_engine_refuses_attention_outside_the_attention_interface(tmp_path, config):
    path = _config_only(tmp_path, config())
    with pytest.raises(
        TPConfigError,
        match="FalconForCausalLM does not route attention through transformers' AttentionInterface",
    ):
        Engine(EngineConfig(model=path, dtype="float32", num_blocks=8))


@pytest.mark.parametrize(
    ("config", "flag"),
    [
        (lambda: _falcon(alibi=True), r"alibi=True"),
        (_bloom, r"model_type='bloom'"),
        (_mpt, r"attn_config.alibi=True"),
    ],
    ids=["falcon-alibi", "bloom", "mpt"],
)
def test_alibi_models_are_refused_by_the_engine_and_by_load(tmp_path, config, flag):
    path = _config_only(tmp_path, config())
    with pytest.raises(TPConfigError, match=rf"uses ALiBi \({flag}.*does not serve ALiBi"):
        Engine(EngineConfig(model=path, dtype="float32", num_blocks=8))
    with pytest.raises(TPConfigError, match=rf"uses ALiBi \({flag}"):
        dstp.load(path)  # the HF forward over a rank's heads would add the wrong biases


FALCON_7B_POLICY = """
from dstp.policies import Col, Policy, Row, register

register(
    Policy(
        name="falcon_7b",
        architectures=("FalconForCausalLM",),
        model_types=("falcon",),
        layers={
            "transformer.h.*.self_attention.query_key_value": Col(("q", "kv", "kv")),
            "transformer.h.*.self_attention.dense": Row(("q",)),
            "transformer.h.*.mlp.dense_h_to_4h": Col(),
            "transformer.h.*.mlp.dense_4h_to_h": Row(),
        },
        embedding="transformer.word_embeddings",
        lm_head="lm_head",
        attention="transformer.h.*.self_attention",
        attention_attrs={"num_heads": "local_heads", "num_kv_heads": "local_kv_heads"},
        # one KV head shared by all queries: no config attribute says 1
        kv_heads_attr=lambda c: c.num_kv_heads if c.new_decoder_architecture or not c.multi_query else 1,
        head_dim_attr=None,
        divisible=(),
    )
)
"""


def test_inspect_says_whether_the_engine_can_serve_it(tmp_path, capsys, monkeypatch):
    import dstp.policies as policies

    import dstp.model.policy_source as source
    from dstp.__main__ import main

    # the file's registration must not outlive this test
    monkeypatch.setattr(policies, "_REGISTRY", list(policies._REGISTRY))
    monkeypatch.setattr(source, "_LOADED", {})
    monkeypatch.setattr(source, "_ORIGINS", {})

    policy = tmp_path / "falcon_policy.py"
    policy.write_text(FALCON_7B_POLICY)
    falcon = _config_only(
        tmp_path / "falcon", _falcon(new_decoder_architecture=False, multi_query=True)
    )
    alibi = _config_only(tmp_path / "alibi", _falcon(alibi=True))
    assert main(["inspect", "--model", falcon, "--tp", "2", "--policy", str(policy)]) == 0
    out = capsys.readouterr().out
    assert "engine: cannot serve it: FalconForCausalLM does not route attention" in out
    assert "heads per rank: 2/4 query, 1/1 KV (each KV head on 2 rank(s))" in out
    assert main(["inspect", "--model", alibi, "--tp", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dstp inspect: FalconConfig uses ALiBi (alibi=True)")
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
