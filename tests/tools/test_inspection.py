"""``dstp inspect``: every distinct decoder block, ``--policy``, and one-line refusals."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers.launcher import REPO


@pytest.fixture
def fresh_registry(monkeypatch):
    """The policy registry and --policy's import cache as they are, restored afterwards."""
    import dstp.policies as policies

    import dstp.model.policy_source as source

    monkeypatch.setattr(policies, "_REGISTRY", list(policies._REGISTRY))
    monkeypatch.setattr(source, "_LOADED", {})
    monkeypatch.setattr(source, "_ORIGINS", {})


def test_block_groups_and_ranges():
    from dstp.tools.inspection import block_groups, block_ranges

    dense = [("self_attn.q_proj", "Col", (8, 4)), ("mlp.up_proj", "Col", (8, 4))]
    moe = [("self_attn.q_proj", "Col", (8, 4)), ("mlp.experts.gate_up_proj", "experts", (2, 8, 4))]
    kinds = {0: dense, 1: moe, 2: moe, 3: dense, 4: moe}
    rows = [("embed", "Emb", (5, 4))]
    rows += [(f"m.layers.{i}.{n}", k, s) for i, block in kinds.items() for n, k, s in block]
    groups = block_groups(rows)
    assert [blocks for blocks, _ in groups] == [[0, 3], [1, 2, 4]]
    assert [r[0] for r in groups[1][1]] == ["m.layers.1.self_attn.q_proj", "m.layers.1.mlp.experts.gate_up_proj"]  # fmt: skip
    assert block_ranges([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8"


def test_dense_then_moe_layers_show_both_groups(tmp_path, capsys):
    """Qwen2-MoE with ``mlp_only_layers=[0]``: a dense block 0, then MoE blocks 1-2."""
    from transformers import Qwen2MoeConfig

    from dstp.__main__ import main

    Qwen2MoeConfig(
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        mlp_only_layers=[0],
        vocab_size=250,
        max_position_embeddings=128,
    ).save_pretrained(tmp_path)
    assert main(["inspect", "--model", str(tmp_path), "--tp", "2"]) == 0
    out = capsys.readouterr().out
    assert "3 blocks in 2 distinct group(s)" in out
    assert " block 0 (1 of 3):" in out and " blocks 1-2 (2 of 3):" in out
    dense, moe = out.split(" blocks 1-2 (2 of 3):")
    assert "model.layers.0.mlp.down_proj" in dense and "RowParallelLinear        (64, 64)" in dense
    assert "model.layers.1.mlp.experts.gate_up_proj" in moe and "(4, 32, 64)" in moe
    assert "model.layers.2." not in out  # block 2 is shown by block 1


def test_same_blocks_are_one_group(tmp_path, capsys):
    from dstp.__main__ import main
    from tests.helpers.policy_models import make_config

    make_config("mixtral").save_pretrained(tmp_path)
    assert main(["inspect", "--model", str(tmp_path), "--tp", "2"]) == 0
    out = capsys.readouterr().out
    assert "2 blocks in 1 distinct group(s)" in out and " blocks 0-1 (2 of 2):" in out


def _inspect(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dstp", "inspect", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_no_policy_is_one_line_without_a_traceback(tmp_path):
    """Mamba has no attention: no policy, none derivable."""
    from transformers import MambaConfig

    MambaConfig(hidden_size=64, num_hidden_layers=2, vocab_size=250).save_pretrained(tmp_path)
    proc = _inspect("--model", str(tmp_path), "--tp", "2")
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("dstp inspect: no injection policy for architecture")
    assert "docs/writing-a-policy.md" in lines[0] and "--policy FILE" in lines[0]


def test_an_architecture_transformers_does_not_know_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "no_such_model"}')
    proc = _inspect("--model", str(tmp_path), "--tp", "2")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith(f"dstp inspect: cannot read the config of {tmp_path}: ")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_inspect_with_policy_uses_it(fresh_registry, tmp_path, capsys):
    """The guide's example policy file (as test_policy_flag serves it) on a Llama config."""
    from dstp.__main__ import main
    from tests.helpers.tiny_models import llama_config
    from tests.server.test_policy_flag import docs_example

    policy = tmp_path / "my_policy.py"
    policy.write_text(docs_example())
    model = tmp_path / "llama"
    llama_config(num_attention_heads=4, num_key_value_heads=2).save_pretrained(model)
    argv = ["inspect", "--model", str(model), "--tp", "2", "--policy", str(policy)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert (
        f"policy: policy 'my_llama' from --policy {policy}, registered for LlamaForCausalLM" in out
    )
    assert "model.layers.0.self_attn.k_proj" in out and "(16, 64)" in out
    assert "decoder layers: Hugging Face's own" in out  # the guide's policy names no fused form
    # the same file for a Qwen2 model: refused in one line naming the policy dstp would use
    qwen = tmp_path / "qwen2"
    from transformers import Qwen2Config

    Qwen2Config(num_attention_heads=4, num_key_value_heads=2).save_pretrained(qwen)
    assert main(["inspect", "--model", str(qwen), "--tp", "2", "--policy", str(policy)]) == 2
    err = capsys.readouterr().err
    assert "none of them for this model" in err and "'qwen2'" in err
    assert main(["inspect", "--model", str(qwen), "--tp", "2", "--policy", "nope.py"]) == 2
    assert "--policy nope.py: no such file" in capsys.readouterr().err


def test_inspect_names_the_fused_layer_form(tmp_path, capsys):
    from dstp.__main__ import main
    from tests.helpers.policy_models import make_config

    make_config("qwen3").save_pretrained(tmp_path)
    assert main(["inspect", "--model", str(tmp_path), "--tp", "2"]) == 0
    assert "decoder layers: dstp's fused 'llama' form" in capsys.readouterr().out
