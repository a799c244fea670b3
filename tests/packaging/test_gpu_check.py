"""`make gpu-check` skips cleanly without CUDA, and its checks run (on CPU) where none is."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers.launcher import REPO


def _run(tmp_path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--out", str(out), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (out / "results.md").exists(), proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc, json.loads((out / "results.json").read_text())


def test_without_cuda_every_check_is_skipped(tmp_path):
    import torch

    if torch.cuda.is_available():
        return  # on a GPU machine the real run is `make gpu-check`
    proc, results = _run(tmp_path)
    assert proc.returncode == 0
    assert {c["status"] for c in results["checks"]} == {"skipped"}
    assert len(results["checks"]) == 10


def test_the_correctness_checks_pass_on_cpu(tmp_path):
    proc, results = _run(tmp_path, "--device", "cpu", "--quick", "--only", "tp1_logits,engine")
    statuses = {c["name"]: c["status"] for c in results["checks"]}
    assert proc.returncode == 0 and statuses == {"tp1_logits": "passed", "engine": "passed"}, (
        proc.stdout[-3000:]
    )
    engine = next(c for c in results["checks"] if c["name"] == "engine")
    assert engine["figures"]["preemptions"] >= 1 and engine["figures"]["prefix_cache_hits"] >= 1


def test_the_step_profile_is_written(tmp_path):
    """The profile a lent GPU's run leaves for its reader (on CPU: the tiny model, host
    ops and dstp's Python, no kernels)."""
    proc, results = _run(tmp_path, "--device", "cpu", "--quick", "--only", "step_profile")
    (check,) = results["checks"]
    assert proc.returncode == 0 and check["status"] == "passed", proc.stdout[-3000:]
    assert check["figures"]["step_ms"] > 0
    profile = (tmp_path / "out" / "step_profile.txt").read_text()
    assert "ms a step (batch 1" in profile and "Self CPU" in profile
    assert "llm_engine.py" in profile  # cProfile's part: dstp's own functions


def test_the_graph_figure_reads_what_the_engine_captured():
    """The checks that read an engine's CUDA graphs run on CUDA only; what they read of
    ``DecodeGraphs`` is checked here (a rename once broke them unseen)."""
    from types import SimpleNamespace

    import torch

    from benchmarks.gpu_check import Record, _captured_shapes
    from dstp.worker.cuda_graphs import DecodeGraphs

    class Recording:
        def capture(self, forward, pool):
            return None, forward(), pool

        def replay(self, graph):
            pass

    graphs = DecodeGraphs(Recording())
    engine = SimpleNamespace(runner=SimpleNamespace(decode=SimpleNamespace(graphs=graphs)))
    rec = Record("speed")
    assert _captured_shapes(engine, rec) == 0 and rec.figures["graph_shapes"] == 0
    graphs.capture_all(((1, 16), (2, 16)), object(), lambda shape: lambda: torch.zeros(shape))
    assert _captured_shapes(engine, rec) == 2 and rec.figures["graph_shapes"] == 2
    assert rec.figures["graph_capture_s"] == graphs.capture_seconds > 0


def test_the_triton_decode_check_runs_on_the_fake_card(tmp_path):
    """``triton_decode`` is CUDA-only: on the fake card (the op's values are the
    reference's) its whole body runs, and ``_triton_decode`` switches the backend."""
    import torch

    from benchmarks.gpu_check import Context, Record, _triton_decode, check_triton_decode
    from dstp.worker.attention.backends import backend_for, cuda, sdpa
    from tests.helpers.fake_cuda import fake_cuda_rank

    rec = Record("triton_decode")
    with fake_cuda_rank(total_gib=0.5):
        device = torch.device("cuda:0")
        check_triton_decode(Context(device, True, tmp_path, tmp_path), rec)
        with _triton_decode("0"):
            assert backend_for(device) is sdpa.BACKEND
        assert backend_for(device) is cuda.BACKEND
    # on the fake card the op computes SDPA's decode in the caches' dtype; the check's
    # yardstick is the same in fp32
    assert 0 <= rec.figures["max_abs_diff_vs_sdpa"] < 2e-2
