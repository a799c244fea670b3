"""``--policy FILE_OR_MODULE``: a user's own policy file, imported before the model is built.

The policy file is the complete example in docs/writing-a-policy.md ("Serve your own
policy"), written out by the test: a renamed copy of Llama's split. Bad values fail in the
flag check with one line (in-process), and under the real launcher on every rank without a
traceback; the example served at TP=2 by ``deepspeed`` is the policy the log names, and its
greedy tokens and logprobs equal Hugging Face's unsharded fp32 model.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from dstp.server.cli import FlagError, build_parser, check_args, check_policy_choice
from tests.helpers.launcher import DEEPSPEED, REPO, free_port, run_deepspeed
from tests.helpers.tiny_models import llama_config, save_random_model

GUIDE = REPO / "docs" / "writing-a-policy.md"


def docs_example() -> str:
    """The python block of the guide's "Serve your own policy" section."""
    section = GUIDE.read_text().split("## Serve your own policy", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture
def fresh_registry(monkeypatch):
    """The policy registry and --policy's import cache as they are, restored afterwards."""
    import dstp.policies as policies

    import dstp.model.policy_source as source

    monkeypatch.setattr(policies, "_REGISTRY", list(policies._REGISTRY))
    monkeypatch.setattr(source, "_LOADED", {})
    monkeypatch.setattr(source, "_ORIGINS", {})


@pytest.fixture(scope="module")
def policy_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("policy") / "my_policy.py"
    path.write_text(docs_example())
    return path


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    config = llama_config(num_attention_heads=4, num_key_value_heads=2, vocab_size=251)
    return save_random_model(config, tmp_path_factory.mktemp("llama") / "tiny", seed=3)


def parse(*argv: str):
    return build_parser().parse_args(list(argv))


# -- in-process: the flag check ---------------------------------------------------------
def test_docs_example_wins_over_the_builtin_llama(fresh_registry, policy_file):
    from dstp.policies import policy_for

    from dstp.model.policy_source import describe

    args = parse("--policy", str(policy_file))
    check_args(args, 1)
    assert [p.name for p in args.policies] == ["my_llama"]
    config = llama_config()
    chosen = check_policy_choice(args, config)
    assert chosen is args.policies[0] and policy_for(config) is chosen
    assert describe(chosen, config).startswith(f"policy 'my_llama' from --policy {policy_file}")


def test_a_registered_policy_wins_over_a_derived_one(fresh_registry, tmp_path):
    """Cohere has no built-in policy (derived from its TP plan): a module registering one for
    CohereForCausalLM by dotted name is the one used."""
    from dstp.policies import policy_for
    from transformers import CohereConfig

    package = tmp_path / "userpolicies"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "cohere_policy.py").write_text(
        "from dstp.policies import LogitOp, register\n"
        "from dstp.policies.llama import llama_like\n"
        "register(llama_like('my_cohere', 'CohereForCausalLM', 'cohere', 'mine',\n"
        "                    logits=(LogitOp('multiply', 'logit_scale'),)))\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        config = CohereConfig(num_attention_heads=4, num_key_value_heads=2)
        assert policy_for(config).name.startswith("auto:")
        args = parse("--policy", "userpolicies.cohere_policy")
        check_args(args, 1)
        assert check_policy_choice(args, config).name == "my_cohere" == policy_for(config).name
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("userpolicies.cohere_policy", None)
        sys.modules.pop("userpolicies", None)


BAD_FILES = {
    "raises": ("from dstp.policies import register\nregister(Col())\n", "importing it failed: NameError: name 'Col' is not defined (line 2 of"),
    "syntax": ("def (:\n", "importing it failed: SyntaxError"),
    "nothing": ("from dstp.policies import Col  # registers nothing\n", "registered no policy: call dstp.policies.register(policy)"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_policy_files_fail_the_flag_check_in_one_line(fresh_registry, tmp_path, case):
    text, message = BAD_FILES[case]
    path = tmp_path / f"{case}.py"
    path.write_text(text)
    with pytest.raises(FlagError) as info:
        check_args(parse("--policy", str(path)), 1)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert str(info.value).startswith(f"--policy {path}")


@pytest.mark.parametrize(
    "value, message",
    [
        ("./no/such_policy.py", "no such file; pass a .py file that calls"),
        ("no_such_package.policies", "no such file or module"),
    ],
)
def test_missing_files_and_modules_name_the_fix(fresh_registry, value, message):
    with pytest.raises(FlagError, match=message) as info:
        check_args(parse("--policy", value), 1)
    assert "\n" not in str(info.value) and "writing-a-policy.md" in str(info.value)


def test_a_policy_for_another_architecture_is_refused_naming_the_one_used(
    fresh_registry, policy_file
):
    from transformers import Qwen2Config

    args = parse("--policy", str(policy_file))
    check_args(args, 1)
    with pytest.raises(FlagError) as info:
        check_policy_choice(args, Qwen2Config(num_attention_heads=4, num_key_value_heads=2))
    text = str(info.value)
    assert "registered 'my_llama' (LlamaForCausalLM), none of them for this model" in text
    assert "dstp would use 'qwen2'" in text and "\n" not in text


def test_import_dstp_reaches_policies_register():
    """In a fresh interpreter: ``import dstp`` alone, no ``import dstp.policies`` first."""
    code = (
        "import sys, dstp\n"
        "assert 'dstp.policies' not in sys.modules\n"
        "from dstp.policies.llama import LLAMA\n"
        "import dataclasses\n"
        "p = dstp.policies.register(dataclasses.replace(LLAMA, name='x'))\n"
        "assert dstp.policies.registered()[0] is p\n"
        "print('ok')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_dstp_load_takes_a_policy_file(fresh_registry, policy_file, tiny_llama):
    import torch
    from transformers import AutoModelForCausalLM

    import dstp

    model = dstp.load(str(tiny_llama), policy=str(policy_file))
    assert model.dstp.policy.name == "my_llama"
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 17, 42, 99, 5, 250]])
    with torch.inference_mode():
        assert torch.allclose(model(ids).logits, hf(ids).logits, atol=1e-4)
    with pytest.raises(ValueError, match="policy= ./missing.py: no such file"):
        dstp.load(str(tiny_llama), policy="./missing.py")


# -- the real launcher ------------------------------------------------------------------
def test_bad_policy_stops_every_rank_with_one_line(tmp_path, tiny_llama):
    bad = tmp_path / "bad_policy.py"
    bad.write_text("import dstp\nraise RuntimeError('boom')\n")
    args = ["launch/serve.py", "--model", str(tiny_llama), "--port", "0", "--policy", str(bad)]
    proc = run_deepspeed(2, args, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    want = f"--policy {bad}: importing it failed: RuntimeError: boom (line 2 of {bad})"
    # Every rank checks the flag; the launcher kills the others once the first exits,
    # so which ranks get to log it is a race: one line from any rank, no traceback.
    assert re.search(rf"\[dstp rank[01]\] ERROR {re.escape(want)}; fix the file", out), out
    assert "Traceback" not in out, out[-3000:]


def test_served_with_policy_is_the_one_used_and_equals_hf(tmp_path, policy_file, tiny_llama):
    import torch

    from tests.helpers.hf_reference import greedy_continuations, load_reference, logprob_rows
    from tests.helpers.server_helpers import ServerProcess

    port = free_port()
    cmd = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), "launch/serve.py"]
    cmd += ["--model", str(tiny_llama), "--dtype", "float32", "--port", str(port)]
    cmd += ["--num-kv-blocks", "32", "--heartbeat-interval", "0.5", "--policy", str(policy_file)]
    server = ServerProcess(cmd, port, tmp_path / "server.log")
    prompts = [[1, 17, 42, 99, 5], [1, 200, 3, 3, 150, 77, 12]]
    try:
        hf = load_reference(tiny_llama)  # while the server boots
        want = greedy_continuations(hf, prompts, 8)
        server.wait_healthy()
        log = server.log(tail=200_000)
        for rank in (0, 1):
            assert f"[dstp rank{rank}] INFO policy 'my_llama' from --policy {policy_file}" in log
        assert "with policy 'my_llama' at TP=2" in log
        for prompt, tokens in zip(prompts, want, strict=True):
            body = {"prompt_token_ids": prompt, "max_tokens": 8, "temperature": 0, "logprobs": 4}
            body["ignore_eos"] = True
            got = requests.post(f"{server.url}/generate", json=body, timeout=60).json()
            out = got["outputs"][0]
            assert out["token_ids"] == tokens
            rows = logprob_rows(hf, prompt, tokens)
            for row, entry in zip(rows, out["logprobs"], strict=True):
                assert abs(entry["logprob"] - row[entry["token_id"]].item()) < 1e-4
                top = torch.topk(row, 4)
                assert sorted(int(t) for t in entry["top"]) == sorted(top.indices.tolist())
                for token, logprob in entry["top"].items():
                    assert abs(logprob - row[int(token)].item()) < 1e-4
    finally:
        server.stop()
