"""Experiment: peak RSS of reading one TP=2 rank's slices, one mmap vs one per tensor.

    python benchmarks/load_rss.py CHECKPOINT_DIR

The first-round measurement behind FINDINGS.md section 2. dstp's first loader
kept one ``safe_open`` handle (one mmap of the whole file) while it read every
slice; today's loader maps nothing (``pread`` into the parameters). Every page a slice touches, plus the kernel's
fault-around neighbours, stays mapped and counts in the rank's RSS until the
handle is dropped. Re-opening the file per tensor unmaps each tensor's pages
as soon as its slice is copied. Each mode runs in a fresh process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "embed_tokens", "lm_head")
ROW = ("o_proj", "down_proj")


def _slice(handle, name: str, rank: int, size: int) -> torch.Tensor:
    sl = handle.get_slice(name)
    shape = sl.get_shape()
    if any(k in name for k in COLUMN):
        n = shape[0] // size
        return sl[rank * n : (rank + 1) * n]
    if any(k in name for k in ROW):
        n = shape[1] // size
        return sl[:, rank * n : (rank + 1) * n]
    return sl[:]


def read_rank(path: Path, per_tensor: bool, rank: int = 0, size: int = 2) -> dict:
    from safetensors import safe_open

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.memory import PeakSampler

    file = str(next(path.glob("*.safetensors")))
    kept = []
    with PeakSampler() as sampler:
        shared = None if per_tensor else safe_open(file, framework="pt")
        names = list((shared or safe_open(file, framework="pt")).keys())
        for name in names:
            handle = safe_open(file, framework="pt") if per_tensor else shared
            kept.append(_slice(handle, name, rank, size).clone())
            del handle
    report = sampler.report()
    report["kept_gb"] = sum(t.numel() * t.element_size() for t in kept) / 1e9
    return {k: (v / 1e9 if k != "kept_gb" else v) for k, v in report.items()}


def main(path: str) -> None:
    for per_tensor in (False, True):
        code = (
            f"import json,sys; sys.path.insert(0, {str(Path(__file__).parent)!r});"
            f"from load_rss import read_rank; from pathlib import Path;"
            f"print(json.dumps(read_rank(Path({path!r}), {per_tensor})))"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        mode = "one handle per tensor" if per_tensor else "one handle for the file"
        print(f"{mode}: " + ", ".join(f"{k} {v:.2f} GB" for k, v in result.items()))


if __name__ == "__main__":
    main(sys.argv[1])
