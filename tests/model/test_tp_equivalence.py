"""TP = 1, 2, 4 give the unsharded Hugging Face model's logits and greedy tokens.

Each TP size is one launch of the worker over every model (the TP=2 launch uses the
real ``deepspeed`` launcher). TP=2 and TP=4 share their launches with
tests/policies/test_policies_equivalence.py (tests/helpers/shared_launch.py), so the
suite pays one start-up per TP size for both.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import shared_launch
from tests.helpers.launcher import run_ranks
from tests.helpers.tiny_models import STORIES, build_variants

PROMPT = [[1, 17, 33, 5, 99, 42, 7, 64]]
NEW_TOKENS = 32


def build_entries(root):
    """This module's job entries, loaded with ``dstp.load`` as users call it."""
    paths = {**build_variants(root), "stories260k": STORIES}
    return {
        name: {"path": str(path), "policy": "load", "prompt": PROMPT, "new_tokens": NEW_TOKENS}
        for name, path in paths.items()
    }


shared_launch.register(__name__, build_entries)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return {
        name: Path(entry["path"])
        for name, entry in shared_launch.entries(__name__, tmp_path_factory).items()
    }


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


def _run(tp: int, models, tmp_path, request) -> Path:
    """Where the worker wrote ``tp``'s results: TP=1 here, TP=2 and 4 in the shared launch."""
    if tp > 1:
        run = shared_launch.launch(tp, request)
        run.check()
        # DeepSpeed never removes its shared-memory all-reduce segments; dstp must
        assert not run.leaked_shm, f"shared-memory segments left behind: {run.leaked_shm}"
        return run.out
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
    for proc in run_ranks(1, ["tests/helpers/workers/tp_forward.py", str(job), str(tmp_path)]):
        assert proc.returncode == 0, proc.stdout[-3000:]
    leaked = _shm_segments() - before
    assert not leaked, f"shared-memory segments left behind: {sorted(leaked)}"
    return tmp_path


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_tp_matches_hf(tp, models, references, tmp_path, request):
    out = _run(tp, models, tmp_path, request)
    for name in models:
        got = load_file(out / f"{name}.safetensors")
        ref_logits, ref_greedy = references[name]
        err = (got["logits"] - ref_logits).abs().max().item()
        assert err < 1e-4, f"{name} at TP={tp}: logits differ by {err}"
        assert got["greedy"].tolist() == ref_greedy.tolist(), (
            f"{name} at TP={tp}: greedy tokens differ"
        )
        # every rank holds only its shard: total parameter bytes shrink with TP
        per_rank = [
            json.loads((out / f"{name}.rank{r}.json").read_text())["param_bytes"] for r in range(tp)
        ]
        assert len(set(per_rank)) == 1
        # with fusion on by default every layer runs dstp's fused Llama layer, at every TP
        ranks = [json.loads((out / f"{name}.rank{r}.json").read_text()) for r in range(tp)]
        assert [r["fused_layers"] for r in ranks] == [ranks[0]["num_layers"]] * tp, name
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
