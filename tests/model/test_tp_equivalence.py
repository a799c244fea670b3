"""TP = 1, 2, 4 give the unsharded Hugging Face model's logits and greedy tokens.

Each TP size is one launch of the worker over every model (the TP=2 launch
uses the real ``deepspeed`` launcher), so the suite pays three start-ups.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.launcher import run_deepspeed, run_ranks
from tests.helpers.tiny_models import STORIES, build_variants

PROMPT = [[1, 17, 33, 5, 99, 42, 7, 64]]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    paths = build_variants(tmp_path_factory.mktemp("tiny"))
    paths["stories260k"] = STORIES
    return paths


@pytest.fixture(scope="module")
def references(models):
    from transformers import AutoModelForCausalLM

    refs = {}
    ids = torch.tensor(PROMPT)
    for name, path in models.items():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.inference_mode():
            logits = model(ids).logits
            greedy = model.generate(
                ids,
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                do_sample=False,
                pad_token_id=0,
            )
        refs[name] = (logits, greedy)
    return refs


def _shm_segments() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")}


def _run(tp: int, models, tmp_path):
    before = _shm_segments()
    job = tmp_path / "job.json"
    job.write_text(
        json.dumps(
            {
                "models": {k: str(v) for k, v in models.items()},
                "prompt": PROMPT,
                "new_tokens": NEW_TOKENS,
            }
        )
    )
    args = ["tests/helpers/workers/tp_forward.py", str(job), str(tmp_path)]
    if tp == 2:
        proc = run_deepspeed(2, args)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    else:
        for proc in run_ranks(tp, args):
            assert proc.returncode == 0, proc.stdout[-3000:]
    # DeepSpeed never removes its shared-memory all-reduce segments; dstp must
    leaked = _shm_segments() - before
    assert not leaked, f"shared-memory segments left behind: {sorted(leaked)}"


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_tp_matches_hf(tp, models, references, tmp_path):
    _run(tp, models, tmp_path)
    for name in models:
        got = load_file(tmp_path / f"{name}.safetensors")
        ref_logits, ref_greedy = references[name]
        err = (got["logits"] - ref_logits).abs().max().item()
        assert err < 1e-4, f"{name} at TP={tp}: logits differ by {err}"
        assert got["greedy"].tolist() == ref_greedy.tolist(), (
            f"{name} at TP={tp}: greedy tokens differ"
        )
        # every rank holds only its shard: total parameter bytes shrink with TP
        per_rank = [
            json.loads((tmp_path / f"{name}.rank{r}.json").read_text())["param_bytes"]
            for r in range(tp)
        ]
        assert len(set(per_rank)) == 1
        if tp > 1:
            total = sum(p.numel() * 4 for p in _hf_params(models[name]))
            assert per_rank[0] < total * (0.5 if tp == 2 else 0.4) + 4096, (
                name,
                per_rank[0],
                total,
            )


def _hf_params(path):
    from safetensors import safe_open

    tensors = []
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            tensors += [f.get_tensor(k) for k in f.keys()]  # noqa: SIM118
    return tensors
