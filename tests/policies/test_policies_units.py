"""Policy validation, the automatic policy, DeepSpeed injection_policy, plan and inspect."""

from __future__ import annotations

import json

import pytest
import torch
from dstp.policies import (
    LLAMA,
    Col,
    Experts,
    TPConfigError,
    derive_policy,
    from_injection_policy,
    policy_for,
    to_injection_policy,
)

from tests.helpers.policy_models import make_config
from tests.helpers.tiny_models import llama_config

LLAMA_70B = dict(
    architectures=["LlamaForCausalLM"],
    model_type="llama",
    hidden_size=8192,
    num_hidden_layers=80,
    num_attention_heads=64,
    num_key_value_heads=8,
    intermediate_size=28672,
    vocab_size=128256,
    max_position_embeddings=131072,
    torch_dtype="bfloat16",
    tie_word_embeddings=False,
)


@pytest.fixture(scope="module")
def llama():
    return llama_config(num_attention_heads=8, num_key_value_heads=2, vocab_size=100)


# -- validation ---------------------------------------------------------------
def test_invalid_tp_lists_the_valid_sizes(llama):
    with pytest.raises(TPConfigError, match=r"TP=3.*Valid TP sizes for this model: \[1, 2, 4, 8\]"):
        LLAMA.validate(llama, 3)
    assert LLAMA.validate(llama, 8).kv_replicas == 4


def test_mha_policies_do_not_report_kv_heads_separately():
    config = make_config("gpt2")
    problems = policy_for(config).problems(config, 3)
    assert problems == ["num_attention_heads=4 is not divisible by TP=3"]


def test_unknown_part_and_bad_experts_are_refused():
    with pytest.raises(TPConfigError, match="unknown part 'heads'"):
        Col(("heads",))
    with pytest.raises(TPConfigError, match="Experts.unfused"):
        Experts(unfused={"w1": ("{e}.w1.weight",)})


# -- automatic policy ---------------------------------------------------------
def test_auto_policy_reproduces_llama_from_tp_plan_and_from_graph(llama):
    from_plan = derive_policy(llama)
    llama.base_model_tp_plan = {}
    from_graph = derive_policy(llama)
    for derived in (from_plan, from_graph):
        assert dict(derived.layers) == dict(LLAMA.layers)
        assert derived.attention == LLAMA.attention
        assert dict(derived.attention_attrs) == dict(LLAMA.attention_attrs)
        assert (derived.embedding, derived.lm_head) == (LLAMA.embedding, LLAMA.lm_head)
    assert "base_model_tp_plan" in from_plan.doc and "module graph" in from_graph.doc


def test_graph_policy_for_an_architecture_without_one():
    policy = policy_for(make_config("gpt_neo"))
    assert policy.name == "auto:gpt_neo"
    assert policy.layers["transformer.h.*.attn.attention.q_proj"] == Col(("q",))
    assert policy.layers["transformer.h.*.mlp.c_proj"].__class__.__name__ == "Row"
    assert policy.attention_attrs == {"num_heads": "local_heads"}
    assert policy.attn_implementation == "eager"  # GPT-Neo has no sdpa path


def test_graph_refuses_an_ambiguous_fused_projection():
    config = make_config("gpt_neox")
    config.base_model_tp_plan = {}
    with pytest.raises(TPConfigError, match=r"q:3"):
        derive_policy(config)


def test_unknown_architecture_points_to_the_docs():
    from transformers import CLIPConfig

    with pytest.raises(TPConfigError, match="docs/writing-a-policy.md"):
        policy_for(CLIPConfig())


# -- DeepSpeed injection_policy -----------------------------------------------
def test_injection_policy_round_trip(llama):
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    exported = to_injection_policy(LLAMA, llama)
    assert exported == {LlamaDecoderLayer: ("self_attn.o_proj", "mlp.down_proj")}
    imported = from_injection_policy(llama, exported)
    assert dict(imported.layers) == dict(LLAMA.layers)
    by_name = from_injection_policy(
        llama, {"LlamaDecoderLayer": ("self_attn.o_proj", "mlp.down_proj")}
    )
    assert dict(by_name.layers) == dict(LLAMA.layers)


def test_injection_policy_errors(llama):
    with pytest.raises(TPConfigError, match="no list of GPT2Block"):
        from_injection_policy(llama, {"GPT2Block": ("attn.c_proj",)})
    with pytest.raises(TPConfigError, match="fused MoE experts"):
        to_injection_policy(policy_for(make_config("mixtral")), make_config("mixtral"))


# -- fused expert checkpoints ---------------------------------------------------
def test_stacked_source_reads_the_fused_tensor_lazily():
    from dstp.model.stacked_source import StackedSource

    w1 = [torch.randn(6, 4) for _ in range(3)]
    w3 = [torch.randn(6, 4) for _ in range(3)]
    fused = torch.stack([torch.cat([a, b]) for a, b in zip(w1, w3, strict=True)])
    source = StackedSource([[a, b] for a, b in zip(w1, w3, strict=True)])
    assert source.shape == tuple(fused.shape)
    assert torch.equal(source[:, 4:9], fused[:, 4:9])  # spans both components
    assert torch.equal(source[:, :, 1:3], fused[:, :, 1:3])
    assert torch.equal(source[:], fused)


def test_local_config_view_overrides_and_reads_through(llama):
    from dstp.model.inject import LocalConfigView

    view = LocalConfigView(llama, {"num_attention_heads": 2})
    assert view.num_attention_heads == 2 and view.hidden_size == llama.hidden_size
    llama._attn_implementation = "eager"
    assert view._attn_implementation == "eager"


# -- planner ------------------------------------------------------------------
def _llama_70b():
    from transformers import LlamaConfig

    return LlamaConfig(**{k: v for k, v in LLAMA_70B.items() if k != "model_type"})


def test_plan_recommends_4_or_8_for_llama_70b_on_80gib(tmp_path):
    from dstp.__main__ import main

    (tmp_path / "config.json").write_text(json.dumps(LLAMA_70B))
    from dstp.model.loading import load_config
    from dstp.tools.planner import make_plan

    plan = make_plan(load_config(str(tmp_path / "config.json")), 80)
    assert plan.recommended in (4, 8)
    by_tp = {o.tp: o for o in plan.options}
    assert not by_tp[1].fits_weights and not by_tp[2].fits_kv
    # 70.6e9 parameters in bf16 on one rank; a quarter (plus replicated norms) at TP=4
    assert 140e9 < by_tp[1].weight_bytes < 142e9
    assert by_tp[4].weight_bytes == pytest.approx(by_tp[1].weight_bytes / 4, rel=1e-3)
    assert by_tp[4].kv_bytes_per_token == 80 * 2 * 2 * 128 * 2
    assert "num_attention_heads=64 is not divisible by TP=24" in plan.invalid[24]
    assert main(["plan", "--model", str(tmp_path), "--device-memory", "80"]) == 0


@pytest.mark.parametrize("arch", ["mixtral", "gpt2", "phi3", "gemma"])
def test_planned_bytes_match_the_built_shards(arch):
    from dstp.model.inject import swap_modules
    from dstp.model.meta_model import meta_model
    from dstp.tools.inspection import virtual_tp
    from dstp.tools.planner import parameter_bytes_per_rank

    config = make_config(arch)
    policy = policy_for(config)
    planned = parameter_bytes_per_rank(meta_model(config), policy, config, 4, 4)
    model = meta_model(config)
    swap_modules(model, policy, policy.validate(config, 4), virtual_tp(0, 4), torch.float32)
    built = sum(p.numel() * 4 for p in model.parameters())  # tied weights counted once
    if config.tie_word_embeddings:
        built -= model.get_output_embeddings().weight.numel() * 4  # separate until loaded
    assert planned == built


# -- inspect ------------------------------------------------------------------
def test_inspect_shows_policy_shapes_and_bytes(tmp_path, capsys):
    from dstp.__main__ import main

    make_config("phi3").save_pretrained(tmp_path)
    assert main(["inspect", "--model", str(tmp_path), "--tp", "2"]) == 0
    out = capsys.readouterr().out
    assert "explicit policy 'phi3'" in out
    assert "model.layers.0.self_attn.qkv_proj" in out and "(64, 64)" in out  # (2 q + 2 x 1 kv) x 16
    assert "model.layers.1." not in out
    assert "parameter bytes per rank" in out
    assert main(["inspect", "--model", str(tmp_path), "--tp", "3"]) == 1
    out = capsys.readouterr().out
    assert "TP=3 is invalid" in out and "valid TP sizes: [1, 2, 4]" in out


def test_logit_steps_are_validated_and_applied():
    from types import SimpleNamespace

    import torch
    from dstp.policies import LogitOp, TPConfigError
    from dstp.policies.llama import LLAMA, llama_like
    from transformers import GraniteConfig

    with pytest.raises(TPConfigError, match="not one of"):
        LogitOp("exp", "logit_scale")
    config = GraniteConfig(num_attention_heads=4, num_key_value_heads=2, logits_scaling=4.0)
    typo = llama_like("x", "X", "x", "", logits=(LogitOp("divide", "logit_scaling"),))
    with pytest.raises(TPConfigError, match="logit_scaling"):
        typo.validate(config, 2)
    steps = (LogitOp("divide", "logits_scaling"), LogitOp("softcap", "final_logit_softcapping"))
    policy = llama_like("x", "X", "x", "", logits=steps)
    config.final_logit_softcapping = None  # None: a no-op, as in HF
    ((op, value),) = policy.logit_ops(config)
    assert (op.kind, value) == ("divide", 4.0)
    config.final_logit_softcapping = 2.0
    logits = torch.tensor([-40.0, 0.0, 12.0])
    for op, value in policy.logit_ops(config):
        logits = op.apply(logits, value)
    assert torch.allclose(logits, torch.tanh(torch.tensor([-10.0, 0.0, 3.0]) / 2) * 2)
    assert LLAMA.logit_ops(config) == []
    odd = SimpleNamespace(logits_scaling="inv_sqrt_d_model", final_logit_softcapping=None)
    with pytest.raises(TPConfigError, match="need numbers"):  # a string, as MPT allows
        policy.logit_ops(odd)


def test_derived_policies_take_the_models_logit_steps():
    from dstp.policies import derive_policy

    from tests.helpers.policy_models import make_config

    kinds = {
        name: [(op.kind, op.attr) for op in derive_policy(make_config(name)).logits]
        for name in ("granite", "cohere", "starcoder2")
    }
    assert kinds == {
        "granite": [("divide", "logits_scaling")],
        "cohere": [("multiply", "logit_scale")],
        "starcoder2": [],
    }


def test_derived_logit_steps_follow_the_models_forward():
    """The operator comes from HF's code, and an attribute its forward ignores is no step."""
    from dstp.policies.auto import logit_steps
    from transformers import HyperCLOVAXConfig, MptConfig

    from dstp.model.meta_model import meta_model

    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, vocab_size=64)
    hcx = HyperCLOVAXConfig(**small, num_attention_heads=4, logits_scaling=0.5)
    assert [(s.kind, s.attr) for s in logit_steps(meta_model(hcx), hcx)] == [
        ("multiply", "logits_scaling")  # HyperCLOVA X multiplies where Granite divides
    ]
    mpt = MptConfig(d_model=64, n_heads=4, n_layers=1, vocab_size=64, logit_scale=3.0)
    assert logit_steps(meta_model(mpt), mpt) == ()  # MptForCausalLM never reads it


def test_full_width_attention_norms_are_sharded_not_replicated():
    """OLMo2's q/k norms span heads * head_dim: the explicit and the derived policy shard
    them with their projections (per-head norms, Qwen3's, stay replicated)."""
    from dstp.policies import ShardedNorm, derive_policy

    olmo2 = make_config("olmo2")
    norms = {"model.layers.*.self_attn.q_norm": ("q",), "model.layers.*.self_attn.k_norm": ("kv",)}
    for policy in (policy_for(olmo2), derive_policy(olmo2)):
        got = {g: s.parts for g, s in policy.layers.items() if isinstance(s, ShardedNorm)}
        assert got == norms, policy.name
    qwen3 = derive_policy(make_config("qwen3"))
    assert not any(isinstance(s, ShardedNorm) for s in qwen3.layers.values())
    with pytest.raises(TPConfigError, match="norm over a split width"):
        to_injection_policy(policy_for(olmo2), olmo2)


def test_head_counts_may_be_literals_or_callables_of_the_config():
    """Falcon-7B's one shared KV head is in no config attribute: a callable says it."""
    import dataclasses

    from transformers import FalconConfig

    falcon_7b = FalconConfig(
        hidden_size=64,
        num_attention_heads=8,
        multi_query=True,  # one KV head for all queries; num_kv_heads still says 8
        new_decoder_architecture=False,
        vocab_size=100,
    )
    assert falcon_7b.num_kv_heads == 8
    by_attr = dataclasses.replace(LLAMA, kv_heads_attr="num_kv_heads", divisible=())
    assert by_attr.head_layout(falcon_7b, 2).num_kv_heads == 8  # what an attribute gives
    one_kv = dataclasses.replace(
        by_attr,
        kv_heads_attr=lambda c: (
            1 if c.multi_query and not c.new_decoder_architecture else c.num_kv_heads
        ),
    )
    layout = one_kv.validate(falcon_7b, 4)
    assert (layout.num_heads, layout.num_kv_heads, layout.head_dim) == (8, 1, 8)
    assert (layout.local_heads, layout.local_kv_heads, layout.kv_replicas) == (2, 1, 4)
    assert layout.quantity("kv_groups") == 2

    literal = dataclasses.replace(by_attr, heads_attr=8, kv_heads_attr=1, head_dim_attr=16)
    layout = literal.validate(falcon_7b, 2)
    assert (layout.num_heads, layout.num_kv_heads, layout.head_dim) == (8, 1, 16)
    # a callable head size returning None falls back to hidden_size / heads, as an absent attr
    fallback = dataclasses.replace(literal, head_dim_attr=lambda c: None)
    assert fallback.head_layout(falcon_7b, 2).head_dim == 8

    # problems name what the count is when no attribute holds it
    with pytest.raises(TPConfigError, match=r"query heads=8 is not divisible by TP=3"):
        literal.validate(falcon_7b, 3)
    three_kv = dataclasses.replace(by_attr, kv_heads_attr=3, heads_attr=12)
    with pytest.raises(TPConfigError, match=r"KV heads=3 and TP=2: one must divide"):
        three_kv.validate(falcon_7b, 2)
    assert one_kv.valid_tp_sizes(falcon_7b, limit=8) == [1, 2, 4, 8]

    # a bad value or a raising callable is a TPConfigError naming the field
    for bad, said in (
        (0, "gave 0"),
        ("7", "no integer '7' \\(the policy's kv_heads_attr\\)"),
        (lambda c: 2.5, "gave 2.5"),
        (lambda c: True, "gave True"),
        (lambda c: c.no_such_attribute, "callable raised AttributeError"),
    ):
        policy = dataclasses.replace(by_attr, kv_heads_attr=bad)
        with pytest.raises(TPConfigError, match=f"kv_heads_attr.*{said}|{said}"):
            policy.validate(falcon_7b, 2)
