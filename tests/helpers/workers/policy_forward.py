"""Rank worker: shard each model with a chosen policy source, record logits and greedy tokens.

Usage: policy_forward.py JOB.json OUT_DIR. Each job entry names a checkpoint
and where its policy comes from: "registry" (policy_for), "auto" (derived from
base_model_tp_plan), "graph" (derived from the module graph, TP plan ignored),
"deepspeed" (a DeepSpeed injection_policy in the job), "load" (``dstp.load(path)``,
as users call it) or "file" (``dstp.load(path, policy=entry["file"])``). An entry may
carry its own "prompt" and "new_tokens" (default: the job's), and
"refused_without_policy": first ``dstp.load(path)`` must be refused by the derived
policy's proof (its message goes to OUT_DIR/<name>.rank<r>.refused). Rank 0 writes
OUT_DIR/<name>.safetensors; every rank writes OUT_DIR/<name>.rank<r>.json.
"""

import json
import os
import sys
from pathlib import Path

import torch
from dstp.policies import derive_policy, from_injection_policy, policy_for
from safetensors.torch import save_file

import dstp
from dstp.distributed import init_tp, shutdown
from dstp.model.inject import shard_model
from dstp.model.loading import load_config

argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
job = json.loads(Path(argv[0]).read_text())
out = argv[1]
rank = int(os.environ.get("RANK", 0))
tp = init_tp()


def choose_policy(entry: dict):
    config = load_config(entry["path"])
    source = entry.get("policy", "registry")
    if source == "registry":
        return policy_for(config)
    if source == "auto":
        return derive_policy(config)
    if source == "graph":
        config.base_model_tp_plan = {}
        return derive_policy(config)
    if source == "deepspeed":
        return from_injection_policy(config, {k: tuple(v) for k, v in entry["injection"].items()})
    raise ValueError(f"unknown policy source {source!r}")


def load(name: str, entry: dict):
    """(the HF model, its ShardedModel) as the entry's policy source loads it."""
    if entry.get("refused_without_policy"):
        from dstp.model.policy_proof import PolicyProofFailed

        try:
            dstp.load(entry["path"])
            raise SystemExit(f"{name}: the derived policy was not refused")
        except PolicyProofFailed as exc:
            Path(f"{out}/{name}.rank{rank}.refused").write_text(str(exc))
    source = entry.get("policy", "registry")
    if source in ("load", "file"):
        model = dstp.load(entry["path"], policy=entry.get("file"))
        return model, model.dstp
    sharded = shard_model(entry["path"], tp, torch.float32, policy=choose_policy(entry))
    return sharded.model, sharded


for name, entry in job["models"].items():
    model, sharded = load(name, entry)
    ids = torch.tensor(entry.get("prompt", job["prompt"]), dtype=torch.long)
    new_tokens = entry.get("new_tokens", job["new_tokens"])
    with torch.inference_mode():
        logits = model(ids).logits.float()
        greedy = model.generate(
            ids,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    info = {
        "param_bytes": sharded.parameter_bytes(),
        "policy": sharded.policy.name,
        "fused_layer": sharded.policy.fused_layer,  # the policy's fused form, if any
        "fused_layers": sharded.fused_layers,  # decoder layers swapped for it
        "num_layers": getattr(sharded.config, "num_hidden_layers", None),
    }
    Path(f"{out}/{name}.rank{rank}.json").write_text(json.dumps(info))
    if rank == 0:
        save_file(
            {"logits": logits.contiguous(), "greedy": greedy.contiguous()},
            f"{out}/{name}.safetensors",
        )
print("worker done", flush=True)
shutdown(exit_code=0)  # leave the group together; skip gloo's racy C++ teardown
