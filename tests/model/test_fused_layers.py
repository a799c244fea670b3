"""Fused decoder layers (dstp.model.fused_layers): swapped in by policy, equal to HF's, or not used.

At TP=1 in-process; TP 2 and 4 run through the launcher tests (test_tp_equivalence,
test_policies_equivalence), which load through dstp with fusion on and check the
count of fused layers each rank reports.
"""

from __future__ import annotations

import gc
import logging
import weakref
from dataclasses import replace

import pytest
import torch
from dstp.policies import GEMMA, LLAMA, MIXTRAL, QWEN3, LogitOp, TPConfigError, policy_for
from dstp.policies.base import FUSED_LAYER_NAMES, Policy

import dstp
from dstp.model import fused_layers
from dstp.model.fused_layers import FusedLlamaLayer, FusedParallelLayer, PackedColumnLinear
from tests.helpers.hf_reference import load_reference
from tests.helpers.policy_models import make_config
from tests.helpers.tiny_models import llama_config, save_random_model


def cpu_kernels_available() -> bool:
    from dstp.cpu import features

    return features.has_avx2_fma() or features.has_avx512_bf16()


IDS = [5, 9, 33, 7, 100, 3, 4, 200, 17, 8, 9, 10, 11, 12, 77, 1]
# Granite is a derived policy; its fused form is named here (residual/attention multipliers)
GRANITE = replace(
    LLAMA,
    name="granite",
    architectures=("GraniteForCausalLM",),
    model_types=("granite",),
    logits=(LogitOp("divide", "logits_scaling"),),
)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("fused")
    llama = llama_config(
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=256,
        attention_bias=True,
        mlp_bias=True,
        tie_word_embeddings=False,
    )
    paths = {"llama": save_random_model(llama, root / "llama")}
    for i, name in enumerate(("mistral", "qwen2", "qwen3", "granite", "gpt_neox"), start=1):
        paths[name] = save_random_model(make_config(name), root / name, seed=i)
    return paths


def _load(path, dtype=torch.float32, **kwargs):
    policy = GRANITE if path.name == "granite" else None
    return dstp.load(str(path), dtype, policy=policy, **kwargs)


def _logprobs(model, ids: torch.Tensor | None = None) -> torch.Tensor:
    ids = torch.tensor([IDS]) if ids is None else ids
    with torch.inference_mode():
        return torch.log_softmax(model(ids).logits.float(), dim=-1)


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "granite", "gpt_neox"]
FUSED = (FusedLlamaLayer, FusedParallelLayer)


def _layers(model) -> list:
    return list(getattr(model, model.base_model_prefix).layers)


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_layers_swap_in_and_match_hf_fp32(models, arch):
    fused = _load(models[arch])
    layers = _layers(fused)
    kind = FusedParallelLayer if arch == "gpt_neox" else FusedLlamaLayer
    assert fused.dstp.fused_layers == len(layers) == 2
    assert all(isinstance(layer, kind) for layer in layers)
    hf = _logprobs(load_reference(models[arch]))
    assert (_logprobs(fused) - hf).abs().max().item() <= 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_off_keeps_hf_layers_and_hf_outputs(models, arch):
    plain = _load(models[arch], fused_layers=False)
    assert plain.dstp.fused_layers == 0
    assert not any(isinstance(layer, FUSED) for layer in _layers(plain))
    hf = load_reference(models[arch])
    assert torch.equal(_logprobs(plain), _logprobs(hf))


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_fused_generate_matches_hf(models, arch):
    """HF's generate (DynamicCache through ``cache.update``) runs the fused layers too."""
    fused = _load(models[arch])
    fused.generation_config.eos_token_id = None  # as load_reference's
    hf = load_reference(models[arch])
    ids = torch.tensor([IDS[:6]])
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        assert torch.equal(fused.generate(ids, **kwargs), hf.generate(ids, **kwargs))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_bf16_as_close_to_hf_fp32_as_hf_bf16(models, arch):
    """Over 64 random tokens (a handful is noise): the mean error within 10 % of HF's own
    bf16, the worst within 1.5x (measured: mean within 1 %, in fp32-summing kernels' path)."""
    fused = _load(models[arch], torch.bfloat16)
    assert fused.dstp.fused_layers == 2
    hf = load_reference(models[arch])
    ids = torch.randint(0, 250, (1, 64), generator=torch.Generator().manual_seed(0))
    want = _logprobs(hf, ids)
    ours = (_logprobs(fused, ids) - want).abs()
    theirs = (_logprobs(hf.to(torch.bfloat16), ids) - want).abs()
    assert ours.mean() <= 1.1 * theirs.mean(), (ours.mean(), theirs.mean())
    assert ours.max() <= 1.5 * theirs.max(), (ours.max(), theirs.max())


def test_no_extra_parameter_memory(models):
    fused = _load(models["llama"])
    plain = _load(models["llama"], fused_layers=False)
    assert fused.dstp.parameter_bytes() == plain.dstp.parameter_bytes()
    names = [name for name, _ in fused.named_parameters()]
    assert not [n for n in names if n.endswith(("q_proj.weight", "gate_proj.weight"))]
    extra_buffers = sum(b.numel() * b.element_size() for b in fused.buffers()) - sum(
        b.numel() * b.element_size() for b in plain.buffers()
    )
    table = fused.model.rotary_emb
    assert isinstance(table, fused_layers.RotaryTable)
    # each layer's rotary sign row (head_dim), and the cos/sin table (positions x head_dim)
    assert table.table.shape == (256, 8)
    assert extra_buffers == 2 * 8 * 4 + table.table.numel() * 4


def test_each_replaced_layer_is_freed_as_it_is_swapped(models, monkeypatch):
    """HF's separate q/k/v and gate/up weights are freed when their layer is swapped.

    Not at the next cyclic GC (so the test runs with it off): a loaded parameter that
    kept its TP layer's bound ``weight_loader`` was a reference cycle, and the list of
    HF's layers kept every one until the last was swapped. Both left a 1B model's
    load 1.2 GB more resident than without fused layers (benchmarks/FINDINGS.md).
    """
    dropped: list[list[weakref.ref]] = []  # per layer: HF's weights the fused layer does not use
    build_and_probe = fused_layers._build_and_probe

    def recording(build, layer, rotary):
        fused, reason = build_and_probe(build, layer, rotary)
        released = tuple(f"self_attn.{n}_proj." for n in "qkv")  # by release_hf_weights
        used = fused.named_parameters() if fused is not None else ()
        kept = {id(p) for name, p in used if not name.startswith(released)}
        dropped.append([weakref.ref(p) for p in layer.parameters() if id(p) not in kept])
        if len(dropped) > 1:  # the layer swapped before this one is gone already
            assert not [ref for ref in dropped[-2] if ref() is not None]
        return fused, reason

    monkeypatch.setattr(fused_layers, "_build_and_probe", recording)
    gc.disable()
    try:
        model = _load(models["llama"], torch.bfloat16)
        assert model.dstp.fused_layers == len(dropped) == 2
        assert len(dropped[-1]) == 10  # q/k/v and gate/up, weights and biases
        assert not [ref for refs in dropped for ref in refs if ref() is not None]
    finally:
        gc.enable()


@pytest.mark.parametrize("arch", ["qwen3", "gpt_neox"])
def test_the_engine_runs_fused_layers_through_the_paged_attention(models, arch):
    """The engine's ``dstp_paged`` attention reaches the fused layers through HF's seam."""
    from dstp.engine.llm_engine import Engine, EngineConfig
    from dstp.engine.sampling_params import SamplingParams

    path = models[arch]
    engine = Engine(EngineConfig(model=str(path), dtype="float32", num_blocks=64))
    assert engine.runner.sharded.fused_layers == 2
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=0)
    prompts = [IDS[:5], IDS[3:14], IDS[:2]]
    hf = load_reference(path)
    for prompt, result in zip(prompts, engine.generate(prompts, params), strict=True):
        out = result.outputs[0]
        ids = torch.tensor([prompt + out.token_ids])
        with torch.inference_mode():
            rows = torch.log_softmax(hf(ids).logits[0, len(prompt) - 1 : -1].float(), dim=-1)
        for row, token, lp in zip(rows, out.token_ids, out.logprobs, strict=True):
            assert int(row.argmax()) == token
            assert abs(lp.logprob - row[token].item()) <= 1e-4


def _wrong_rotate(x, cos, signed_sin):
    """HF's rotary with the sign of ``rotate_half`` lost: a subtle, plausible bug."""
    return x * cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * signed_sin.abs()


def test_a_layer_the_probe_rejects_keeps_hf_and_says_why(models, monkeypatch, caplog):
    monkeypatch.setattr(fused_layers, "rotate", _wrong_rotate)
    with caplog.at_level(logging.WARNING, logger="dstp"):
        model = _load(models["llama"])
    assert model.dstp.fused_layers == 0
    assert not any(isinstance(layer, FusedLlamaLayer) for layer in model.model.layers)
    assert "keep HF's forward" in caplog.text and "relative error" in caplog.text
    assert not isinstance(model.model.rotary_emb, fused_layers.RotaryTable)
    hf = load_reference(models["llama"])
    assert torch.equal(_logprobs(model), _logprobs(hf))


def test_a_layer_of_another_form_keeps_hf_and_says_why(tmp_path, caplog):
    config = llama_config(num_attention_heads=4, num_key_value_heads=2, hidden_act="gelu")
    path = save_random_model(config, tmp_path / "gelu")
    with caplog.at_level(logging.WARNING, logger="dstp"):
        model = _load(path)
    assert model.dstp.fused_layers == 0
    assert "not the fused form" in caplog.text and "not SiLU" in caplog.text


def test_packed_linear_is_the_concatenated_shards():
    from dstp.distributed import TPGroup
    from dstp.model.layers import ColumnParallelLinear, Partition

    tp = TPGroup(0, 1, 0, 1, torch.device("cpu"), None, False)
    linears = []
    for out in (8, 4, 4):
        linear = ColumnParallelLinear(6, Partition(out, ((0, out),)), True, tp, device="cpu")
        with torch.no_grad():
            linear.weight.normal_()
            linear.bias.normal_()
        linears.append(linear)
    packed = PackedColumnLinear.pack(linears)
    x = torch.randn(3, 6)
    assert packed.sizes == (8, 4, 4)
    assert torch.allclose(packed(x), torch.cat([lin(x) for lin in linears], dim=-1))


def test_policies_name_known_fused_layers():
    assert set(fused_layers.FUSED_LAYERS) == set(FUSED_LAYER_NAMES)
    with pytest.raises(TPConfigError, match="fused_layer"):
        replace(LLAMA, fused_layer="nope")
    for config in (llama_config(), *(make_config(n) for n in ("mistral", "qwen2", "qwen3"))):
        assert policy_for(config).fused_layer == "llama"
    assert LLAMA.fused_layer == QWEN3.fused_layer == "llama"
    # llama_like families of another layer form do not inherit Llama's fused layer
    assert GEMMA.fused_layer is None and MIXTRAL.fused_layer is None
    assert Policy("x", ("X",), ("x",), {}).fused_layer is None


def test_rotary_table_only_where_it_is_hf_rotary(models, tmp_path, monkeypatch):
    """Positions past the trained context, or a rope that changes with length, keep HF's module
    (the fused layers then sign their sin themselves) and still match HF."""
    from dstp.engine.config import ALLOW_LONG_ENV

    config = llama_config(
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
    )
    dynamic = save_random_model(config, tmp_path / "dynamic")
    with monkeypatch.context() as env:
        env.setenv(ALLOW_LONG_ENV, "1")
        long_context = _load(models["llama"])
    for path, model in ((dynamic, _load(dynamic)), (models["llama"], long_context)):
        assert model.dstp.fused_layers == 2
        assert not isinstance(model.model.rotary_emb, fused_layers.RotaryTable)
        assert not any(layer.signed_sin for layer in model.model.layers)
        hf = load_reference(path)
        assert (_logprobs(model) - _logprobs(hf)).abs().max().item() <= 1e-4
    table = _load(models["llama"]).model.rotary_emb
    assert isinstance(table, fused_layers.RotaryTable)
    assert table.inner.rope_type == "default"


@pytest.mark.parametrize("arch, hf, fused", [("llama", 2, 2), ("gpt_neox", 2, 1)])
def test_all_reduces_per_layer(models, arch, hf, fused, monkeypatch):
    """One all-reduce per sub-layer; a parallel-residual layer sums both first and reduces once."""
    from dstp.distributed import TPGroup

    calls = []
    real = TPGroup.all_reduce
    monkeypatch.setattr(TPGroup, "all_reduce", lambda tp, t: calls.append(1) or real(tp, t))
    for on, per_layer in ((False, hf), (True, fused)):
        model = _load(models[arch], fused_layers=on)
        calls.clear()
        _logprobs(model)
        assert len(calls) == per_layer * 2, (on, len(calls))


@pytest.mark.skipif(
    not cpu_kernels_available(), reason="dstp's CPU kernels are not built here (no AVX2/AVX512)"
)
@pytest.mark.parametrize("shape", [(8, 256), (3, 5, 64), (1, 2048), (40, 200)])
def test_the_add_rms_norm_kernel_rounds_as_aten_add_then_hf_norm(shape):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from dstp.cpu import kernels as cpu_kernels

    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=generator) * 2).bfloat16()
    residual = (torch.randn(shape, generator=generator) * 3).bfloat16()
    norm = LlamaRMSNorm(shape[-1], eps=1e-5).bfloat16()
    with torch.no_grad():
        norm.weight.normal_(generator=generator)
        normed, summed = cpu_kernels.add_rms_norm_bf16(x, residual, norm.weight, 1e-5)
        assert torch.equal(summed, residual + x)
        assert torch.equal(normed, cpu_kernels.rms_norm_bf16(residual + x, norm.weight, 1e-5))
        assert (normed != norm(residual + x)).float().mean() <= 1e-3  # the mean's summation order


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_output_hidden_states_still_records_every_layer(models, arch):
    """HF records hidden states with hooks on instances of its layer class: a fused layer is one."""
    fused, hf = _load(models[arch]), load_reference(models[arch])
    ids = torch.tensor([IDS[:5]])
    with torch.inference_mode():
        ours = fused(ids, output_hidden_states=True).hidden_states
        theirs = hf(ids, output_hidden_states=True).hidden_states
    assert len(ours) == len(theirs) == 3
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(ours, theirs, strict=True))


def test_a_long_prefills_mlp_runs_in_pieces_that_fit_a_heap_block(models, monkeypatch):
    """On CPU a gate/up output past glibc's largest heap block would be mapped and faulted in
    afresh every layer (dstp.cpu.heap); the MLP then runs in equal row pieces, each under it,
    with its one all-reduce, and the outputs do not change. Here the block is shrunk so the
    16-token prefill takes pieces of 6, 6 and 4 rows."""
    from dstp.cpu import heap
    from dstp.distributed import TPGroup

    model = _load(models["llama"])
    layer = _layers(model)[0]
    whole = _logprobs(model)
    row_bytes = layer.gate_up_proj.weight.shape[0] * 4  # fp32
    monkeypatch.setattr(heap, "LARGEST_HEAP_BLOCK", heap.ALIGNMENT_ROOM + 6 * row_bytes)
    assert heap.rows_per_block(16, row_bytes) == 6
    gate_ups = {id(each.gate_up_proj) for each in _layers(model)}
    pieces, reduces = [], []
    real_forward, real_reduce = type(layer.gate_up_proj).forward, TPGroup.all_reduce

    def forward(linear, x):
        if id(linear) in gate_ups:  # the packed q/k/v projection is the same class
            pieces.append(x.shape[0])
        return real_forward(linear, x)

    monkeypatch.setattr(type(layer.gate_up_proj), "forward", forward)
    monkeypatch.setattr(
        TPGroup, "all_reduce", lambda tp, t: reduces.append(1) or real_reduce(tp, t)
    )
    pieced = _logprobs(model)
    assert pieces == [6, 6, 4] * 2 and len(reduces) == 2 * 2  # two layers
    assert torch.allclose(pieced, whole, atol=1e-6)
    assert (pieced - _logprobs(load_reference(models["llama"]))).abs().max().item() <= 1e-4
