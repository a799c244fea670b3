"""Every architecture with a policy, served by the engine (paged KV cache), equals HF.

The reference is HF greedy ``generate`` with EOS switched off (the engine's
``ignore_eos`` keeps EOS samplable; HF's ``min_new_tokens`` would mask it), and
HF's own forward for the logprobs: the chosen token's and the top alternatives'
must equal HF's ``log_softmax`` within 1e-4, so every step HF applies to the
logits after its LM head (Gemma 2's soft-capping, Granite's and Cohere's
scaling, in derived policies too) must be applied by the engine.

One launch per TP size runs all architectures at TP=2, and at TP=4 those whose layout
differs there (``TP4_ARCHITECTURES`` in tests/helpers/policy_models.py). A small token budget forces
chunked prefill, so sliding windows (Mistral, Gemma 2) and soft-capping
(Gemma 2) are exercised on the paged path's cached-context branch too.
"""

from __future__ import annotations

import json

import pytest

from tests.helpers.hf_reference import greedy_continuations, load_reference, logprob_rows
from tests.helpers.launcher import run_ranks
from tests.helpers.policy_models import at_tp, build_architectures, selected

# GPT-Neo's HF class predates the AttentionInterface: dstp.load serves it, the engine refuses it
NO_ATTENTION_BACKEND = {"gpt_neo"}

PROMPTS = [
    [1] + [(13 * i + 5 * j) % 240 + 3 for j in range(3 + 9 * i)] for i in range(4)
]  # 4..31 tokens
NEW = 12
TOP = 4


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    names = [name for name in selected() if name not in NO_ATTENTION_BACKEND]
    return build_architectures(tmp_path_factory.mktemp("arch"), names)


@pytest.fixture(scope="module")
def hf_greedy(checkpoints):
    """Per architecture: HF's greedy tokens and its log-softmax rows along them."""
    reference = {}
    for name, path in checkpoints.items():
        model = load_reference(path)
        tokens = greedy_continuations(model, PROMPTS, NEW)
        rows = [logprob_rows(model, p, t) for p, t in zip(PROMPTS, tokens, strict=True)]
        reference[name] = (tokens, rows)
    return reference


def logprob_errors(outputs: list, rows: list, name: str = "") -> list[str]:
    """Where the engine's logprobs (chosen token and top-k) differ from HF's by > 1e-4."""
    errors, overall = [], 0.0
    for i, (out, hf_rows) in enumerate(zip(outputs, rows, strict=True)):
        for step, ((token, logprob, top), hf) in enumerate(zip(out, hf_rows, strict=True)):
            want_top = hf.topk(TOP).values
            got_top = sorted(top.values(), reverse=True)
            worst = max(
                abs(logprob - float(hf[token])),
                *(abs(v - float(hf[int(t)])) for t, v in top.items()),
                *(abs(a - float(b)) for a, b in zip(got_top, want_top, strict=True)),
            )
            overall = max(overall, worst)
            if worst > 1e-4:
                errors.append(f"prompt {i} step {step}: off by {worst:.2e}")
    print(f"{name}: max |dlogprob| {overall:.2e}")  # shown with -s
    return errors


@pytest.mark.parametrize("tp", [2, 4])
def test_engine_matches_hf_for_every_architecture(tp, checkpoints, hf_greedy, tmp_path):
    checkpoints = {name: checkpoints[name] for name in at_tp(list(checkpoints), tp)}
    if not checkpoints:
        pytest.skip(f"DSTP_TEST_ARCHS chose no architecture that runs at TP={tp}")
    scenarios = {
        name: {
            "engine": {
                "model": str(path),
                "dtype": "float32",
                "num_blocks": 64,
                "block_size": 4,
                "max_num_batched_tokens": 16,
            },
            "prompts": PROMPTS,
            "params": [{"max_tokens": NEW, "temperature": 0.0, "ignore_eos": True, "logprobs": TOP}]
            * len(PROMPTS),
        }
        for name, path in checkpoints.items()
    }
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"scenarios": scenarios}))
    for proc in run_ranks(
        tp,
        ["tests/helpers/workers/engine_run.py", str(job), str(tmp_path / "out.json")],
        timeout=900,
    ):
        assert proc.returncode == 0, proc.stdout[-4000:]
    results = json.loads((tmp_path / "out.json").read_text())
    mismatched = [
        name
        for name in checkpoints
        if [o[0]["token_ids"] for o in results[name]["outputs"]] != hf_greedy[name][0]
    ]
    assert not mismatched, f"TP={tp}: engine differs from HF for {mismatched}"
    wrong_logprobs = {
        name: errors[:3]
        for name in checkpoints
        if (
            errors := logprob_errors(
                [o[0]["logprobs"] for o in results[name]["outputs"]],
                hf_greedy[name][1],
                f"TP={tp} {name}",
            )
        )
    }
    assert not wrong_logprobs, f"TP={tp}: logprobs differ from HF's: {wrong_logprobs}"
    assert all(r["all_blocks_free"] for r in results.values())


def test_engine_refuses_models_without_attention_backend(tmp_path):
    from dstp.policies import TPConfigError

    from dstp.engine.llm_engine import Engine, EngineConfig

    path = build_architectures(tmp_path, ["gpt_neo"])["gpt_neo"]
    with pytest.raises(TPConfigError, match="AttentionInterface.*dstp.load"):
        Engine(EngineConfig(model=str(path), dtype="float32", num_blocks=8))
