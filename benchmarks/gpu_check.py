"""`make gpu-check`: dstp's device path checked and measured on one GPU, in one command.

Each check returns a record (status, figures, seconds); the run writes
``results.json`` and ``results.md`` under ``--out`` and prints a summary. It
exits 1 if any check failed. Without CUDA (and ``--device cuda``, the
default) every check is recorded as skipped and it exits 0. ``--device cpu
--quick`` runs the correctness checks on CPU with tiny models, so the script
itself is tested where no GPU is.

    python benchmarks/gpu_check.py                  # on a GPU machine, < 8 min
    python benchmarks/gpu_check.py --device cpu --quick --only tp1_logits,engine
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
STORIES = REPO / "dstp" / "assets" / "stories260k"
NEW_TOKENS = 32


@dataclass
class Record:
    name: str
    status: str = "passed"  # passed | failed | skipped
    detail: str = ""
    figures: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class Context:
    device: torch.device
    quick: bool
    workdir: Path
    out: Path  # what a check writes for the run's reader (profiles), beside results.md

    def tiny_model(self) -> Path:
        """A small random Llama (GQA), written once per run."""
        path = self.workdir / "tiny-llama"
        if not (path / "config.json").exists():
            from transformers import AutoModelForCausalLM, LlamaConfig

            config = LlamaConfig(
                hidden_size=128,
                intermediate_size=256,
                num_hidden_layers=2,
                num_attention_heads=8,
                num_key_value_heads=4,
                vocab_size=512,
                max_position_embeddings=512,
            )
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            with torch.no_grad():
                for p in model.parameters():
                    p.normal_(0.0, 0.2)
            model.save_pretrained(path)
        return path

    def models(self) -> dict[str, Path]:
        return {"tiny-llama": self.tiny_model(), "stories260k": STORIES}


def _hf(path: Path, dtype: torch.dtype, device: torch.device):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()


def _prompt(vocab: int, n: int = 12, seed: int = 0) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=gen).tolist()


def _greedy_hf(model, prompt: list[int], new: int) -> list[int]:
    ids = torch.tensor([prompt], device=model.device)
    out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    return out[0, len(prompt) :].tolist()


# -- checks ------------------------------------------------------------------------------


def check_tp1_logits(ctx: Context, rec: Record) -> None:
    """dstp.load vs unsharded HF on the same device: fp32 logits; bf16 logprobs as close to
    HF's fp32 as HF's own bf16 (64 tokens: mean within 10 %, worst within 1.5x)."""
    import dstp

    for name, path in ctx.models().items():
        ref = _hf(path, torch.float32, ctx.device)
        prompt = _prompt(ref.config.vocab_size)
        ids = torch.tensor([prompt], device=ctx.device)
        ours = dstp.load(str(path), torch.float32)
        with torch.inference_mode():
            err = (ours(ids).logits.float() - ref(ids).logits.float()).abs().max().item()
        rec.figures[f"{name}_fp32_max_abs_err"] = err
        if err > 1e-3:
            raise AssertionError(f"{name}: fp32 logits differ by {err:.2e} (> 1e-3)")
        ref16, ours16 = _hf(path, torch.bfloat16, ctx.device), dstp.load(str(path), torch.bfloat16)
        long = torch.tensor([_prompt(ref.config.vocab_size, n=64, seed=1)], device=ctx.device)
        want = _logprobs(ref, long)
        mine, theirs = (_logprobs(ours16, long) - want).abs(), (_logprobs(ref16, long) - want).abs()
        for who, gap in (("dstp", mine), ("hf", theirs)):
            rec.figures[f"{name}_bf16_{who}_mean_err"] = gap.mean().item()
            rec.figures[f"{name}_bf16_{who}_max_err"] = gap.max().item()
        rec.figures[f"{name}_bf16_same_greedy_tokens"] = _common_prefix(
            _greedy_hf(ours16, prompt, NEW_TOKENS), _greedy_hf(ref16, prompt, NEW_TOKENS)
        )  # a figure: near-ties in bf16 logits make greedy paths part early either way
        # The GPU contract (the same cuBLAS GEMMs); on CPU dstp's kernels round differently
        # from HF's (tests/model/test_fused_layers.py bounds them), so it is a figure there.
        further = mine.mean() > 1.1 * theirs.mean() or mine.max() > 1.5 * theirs.max()
        if further and ctx.device.type == "cuda":
            raise AssertionError(f"{name}: bf16 logprobs further from HF fp32 than HF's bf16")


def _logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return torch.log_softmax(model(ids).logits.float(), dim=-1)


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))


def check_engine(ctx: Context, rec: Record) -> None:
    """32 concurrent requests equal HF generate; a prefix-cache hit; a preemption."""
    from dstp.engine.llm_engine import Engine, EngineConfig
    from dstp.engine.sampling_params import SamplingParams

    path = ctx.tiny_model()
    ref = _hf(path, torch.float32, ctx.device)
    prompts = [_prompt(512, n=8 + i % 9, seed=i) for i in range(32)]
    params = SamplingParams(max_tokens=16, min_tokens=16, temperature=0)  # as min_new_tokens
    want = [_greedy_hf(ref, p, 16) for p in prompts]
    engine = Engine(EngineConfig(str(path), dtype="float32"))
    got = [list(r.outputs[0].token_ids) for r in engine.generate(prompts, params)]
    if got != want:
        raise AssertionError(
            f"{sum(g != w for g, w in zip(got, want, strict=True))} of 32 differ from HF"
        )
    shared = prompts[0] * 4  # two blocks of 16 the second request finds cached
    engine.generate([shared], params)
    engine.generate([shared + [7]], params)
    stats = engine.stats()
    rec.figures["prefix_cache_hits"] = stats["prefix_cache_hits"]
    if stats["prefix_cache_hits"] < 1:
        raise AssertionError("no prefix-cache hit for a repeated 48-token prefix")
    small = Engine(EngineConfig(str(path), dtype="float32", num_blocks=12))
    got = [list(r.outputs[0].token_ids) for r in small.generate(prompts, params)]
    rec.figures["preemptions"] = small.stats()["num_preemptions"]
    if got != want or rec.figures["preemptions"] < 1:
        raise AssertionError(
            f"small cache: preemptions {rec.figures['preemptions']}, same={got == want}"
        )


def check_tp2_one_device(ctx: Context, rec: Record) -> None:
    """Two ranks share the device over gloo: the multi-rank code with device tensors."""
    out = ctx.workdir / "tp2"
    out.mkdir(exist_ok=True)
    path = ctx.tiny_model()
    worker = [sys.executable, str(REPO / "benchmarks" / "gpu_check_worker.py"), str(path), str(out)]
    env = dict(os.environ, DSTP_DIST_BACKEND="gloo", MASTER_ADDR="127.0.0.1")
    env["MASTER_PORT"] = str(29500 + os.getpid() % 1000)
    if ctx.device.type == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    procs = [
        subprocess.Popen(
            worker,
            env=dict(env, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2"),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    logs = [_output_within(p, TP2_TIMEOUT_S) for p in procs]
    if any(p.returncode for p in procs):
        raise AssertionError("a TP=2 rank failed:\n" + logs[0][-2000:] + logs[1][-2000:])
    ref = _hf(path, torch.float32, ctx.device)
    ids = torch.tensor([_prompt(512)], device=ctx.device)
    with torch.inference_mode():
        want = ref(ids).logits.float().cpu()
    got = torch.load(out / "logits.pt")
    err = (got - want).abs().max().item()
    rec.figures["tp2_vs_hf_max_abs_err"] = err
    if err > 1e-3:
        raise AssertionError(f"TP=2 logits differ from HF's by {err:.2e}")


TP2_TIMEOUT_S = 90  # the worker dumps its stacks at 75 s (gpu_check_worker.py)


def _output_within(proc: subprocess.Popen, timeout_s: float) -> str:
    """The process's output; killed (and its output so far kept) past ``timeout_s``."""
    try:
        return proc.communicate(timeout=timeout_s)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        return f"(killed after {timeout_s} s)\n" + proc.communicate()[0]


def check_server(ctx: Context, rec: Record) -> None:
    """The server on stories260k: completion, streaming, chat (400: no template), /metrics."""
    import requests

    from tests.helpers.launcher import free_port

    port = free_port()
    env = dict(os.environ, DS_ACCELERATOR="cpu") if ctx.device.type == "cpu" else dict(os.environ)
    cmd = [sys.executable, str(REPO / "launch" / "serve.py"), "--port", str(port)]
    log = open(ctx.workdir / "server.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc)
        body = {"prompt": "Once upon a time", "max_tokens": 24, "temperature": 0}
        text = requests.post(f"{url}/v1/completions", json=body, timeout=60).json()
        text = text["choices"][0]["text"]
        stream = requests.post(f"{url}/v1/completions", json={**body, "stream": True}, timeout=60)
        events = [line[6:] for line in stream.text.splitlines() if line.startswith("data: ")]
        if events[-1] != "[DONE]":
            raise AssertionError("the stream did not end with [DONE]")
        pieces = [json.loads(e)["choices"] for e in events[:-1]]
        streamed = "".join(c[0]["text"] for c in pieces if c)
        if streamed != text:
            raise AssertionError(f"streamed {streamed!r} != {text!r}")
        chat = requests.post(
            f"{url}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
            timeout=60,
        )
        if chat.status_code != 400:
            raise AssertionError(f"chat without a template answered {chat.status_code}, not 400")
        metrics = requests.get(f"{url}/metrics", timeout=10).text
        if "dstp:num_requests_running" not in metrics:
            raise AssertionError("/metrics lacks dstp:num_requests_running")
        rec.detail = repr(text[:40])
    except Exception as exc:  # the server's own words, before the temporary folder goes
        log.flush()
        tail = (ctx.workdir / "server.log").read_text(errors="replace")[-3000:]
        raise AssertionError(f"{exc}\n--- the server's log, its end:\n{tail}") from exc
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()


def _wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float = 240) -> None:
    import requests

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited with {proc.returncode}")
        try:
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except requests.RequestException:  # not listening yet, or busy starting
            pass
        time.sleep(1)
    raise AssertionError("the server did not become healthy")


def check_speed(ctx: Context, rec: Record) -> None:
    """Llama-3.2-1B shape, bf16: prefill 1k, decode batch 1 / 8 / 64 and the 64-request
    workload, each eager (packed steps) and with CUDA graphs (``cuda_graphs``)."""
    if ctx.quick:
        raise SkipCheck("--quick")
    from benchmarks import workload
    from benchmarks.checkpoint import LLAMA_1B, ensure_checkpoint
    from dstp.engine.llm_engine import Engine, EngineConfig
    from dstp.engine.sampling_params import SamplingParams

    path = ensure_checkpoint(REPO / "runs" / "bench" / "models", LLAMA_1B)
    vocab = LLAMA_1B.vocab_size
    prompt = _prompt(vocab, n=1024)
    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    runs = (("dstp", False, "1"), ("dstp_graphs", True, "1"), ("dstp_graphs_sdpa", True, "0"))
    for label, graphs, triton in runs:
        with _triton_decode(triton):
            engine = Engine(EngineConfig(str(path), dtype="bfloat16", cuda_graphs=graphs))
        rec.detail += f"{label}: {engine.runner.attention_backend.name}; "
        if graphs and not _captured_shapes(engine, rec):
            rec.detail += f"capture failed: {engine.runner.decode.graphs.failure}"[:300]
        engine.generate([prompt], one)
        start = _synced_clock(ctx)
        engine.generate([prompt[::-1]], one)
        rec.figures[f"{label}_prefill_1k_s"] = _synced_clock(ctx) - start
        for batch in (1, 8, 64):
            rate = workload.run_engine_decode(engine, batch, 32, 32, vocab)["tok_s"]
            rec.figures[f"{label}_decode_b{batch}_tok_s"] = rate
        spec = {"num_requests": 64, "seed": 0}  # prompts 32-512, outputs 64-128
        rec.figures[f"{label}_workload_tok_s"] = workload.run_engine(engine, spec, vocab)[
            "output_tok_s"
        ]
        engine.shutdown()
        del engine
        _release_device_memory(ctx)
    weights = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    bandwidth = _read_bandwidth(ctx.device)
    rec.figures["hbm_read_gb_s"] = bandwidth / 1e9
    for label, _, _ in runs:
        rec.figures[f"{label}_decode_b1_roofline_fraction"] = (
            rec.figures[f"{label}_decode_b1_tok_s"] * weights / bandwidth
        )
    _hf_speed(ctx, path, vocab, rec)


@contextlib.contextmanager
def _triton_decode(on: str) -> Iterator[None]:
    """Engines made inside take the Triton decode kernel (``"1"``, where its start-up
    check passes) or SDPA's gathers (``"0"``)."""
    from dstp.worker.attention.backends import cuda

    kept = os.environ.get("DSTP_TRITON_DECODE")
    os.environ["DSTP_TRITON_DECODE"] = on
    cuda._kernel_problem.cache_clear()
    try:
        yield
    finally:
        os.environ.pop("DSTP_TRITON_DECODE")
        if kept is not None:
            os.environ["DSTP_TRITON_DECODE"] = kept
        cuda._kernel_problem.cache_clear()


def check_triton_decode(ctx: Context, rec: Record) -> None:
    """The Triton paged decode kernel on the device: chosen by the CUDA backend (its
    start-up check passed), and equal to SDPA's decode in fp32 (the reference) over bf16
    and fp32 caches, GQA 4, contexts 1 to 4,096 across the key tiles and the key splits
    (batch 6 x 8 KV heads: 6 splits of 704 keys), soft-cap and window."""
    from dstp.worker.attention.backends import backend_for, cuda, triton_paged

    if ctx.device.type != "cuda":
        raise SkipCheck("CUDA only")
    cuda._kernel_problem.cache_clear()
    if backend_for(ctx.device) is not cuda.BACKEND:
        raise AssertionError(
            f"the kernel failed its start-up check: {cuda._kernel_problem(str(ctx.device))}"
        )
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for dtype, softcap, window in (
        (torch.bfloat16, 0.0, 0),
        (torch.float32, 0.0, 0),
        (torch.bfloat16, 30.0, 512),
    ):
        lens = torch.tensor([1, 63, 64, 65, 1000, 4096])
        block, width = 16, 256
        k_cache, v_cache = (torch.randn(8, 2048 * block, 64, generator=gen).to(dtype) for _ in "kv")
        tables = torch.stack([torch.randperm(2048, generator=gen)[:width] for _ in lens])
        q = torch.randn(32, len(lens), 64, generator=gen).to(dtype)
        args = [
            t.to(ctx.device) for t in (q, k_cache, v_cache, torch.arange(len(lens)), tables, lens)
        ]
        args += [block, 0.125, softcap, window]
        worst = max(worst, triton_paged.error_vs_reference(*args))
    rec.figures["max_abs_diff_vs_sdpa"] = worst
    if worst > 2e-2:
        raise AssertionError(f"the kernel differs from SDPA's decode by {worst:.3g}")


def _captured_shapes(engine, rec: Record) -> int:
    """How many decode shapes the engine captured as CUDA graphs (0 where capture failed),
    recorded as a figure."""
    rec.figures["graph_shapes"] = len(engine.runner.decode.graphs.shapes)
    rec.figures["graph_capture_s"] = engine.runner.decode.graphs.capture_seconds
    return rec.figures["graph_shapes"]


def _release_device_memory(ctx: Context) -> None:
    import gc

    gc.collect()
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()


def check_cuda_graphs(ctx: Context, rec: Record) -> None:
    """``cuda_graphs``: every decode shape captured; 32 concurrent requests equal HF
    generate and the eager engine's logprobs."""
    if ctx.device.type != "cuda":
        raise SkipCheck("CUDA only")
    from dstp.engine.llm_engine import Engine, EngineConfig
    from dstp.engine.sampling_params import SamplingParams

    path = ctx.tiny_model()
    ref = _hf(path, torch.float32, ctx.device)
    prompts = [_prompt(512, n=8 + i % 9, seed=i) for i in range(32)]
    params = SamplingParams(max_tokens=16, min_tokens=16, temperature=0, logprobs=1)
    want = [_greedy_hf(ref, p, 16) for p in prompts]
    runs = {}
    for label, graphs in (("eager", False), ("graphs", True)):
        config = EngineConfig(
            str(path), dtype="float32", max_num_seqs=32, num_blocks=512, cuda_graphs=graphs
        )
        engine = Engine(config)
        if graphs and not _captured_shapes(engine, rec):
            raise AssertionError(f"no graphs captured: {engine.runner.decode.graphs.failure}")
        runs[label] = [r.outputs[0] for r in engine.generate(prompts, params)]
        engine.shutdown()
        del engine  # its KV cache, before the next engine sizes its own
        _release_device_memory(ctx)
    got = [list(o.token_ids) for o in runs["graphs"]]
    if got != want:
        raise AssertionError(f"{sum(g != w for g, w in zip(got, want, strict=True))} of 32 differ")
    gap = max(
        abs(a.logprob - b.logprob)
        for x, y in zip(runs["graphs"], runs["eager"], strict=True)
        for a, b in zip(x.logprobs, y.logprobs, strict=True)
    )
    rec.figures["graphs_vs_eager_max_logprob_diff"] = gap
    if gap > 1e-4:
        raise AssertionError(f"graph logprobs differ from eager ones by {gap:.2e}")


def _hf_speed(ctx: Context, path: Path, vocab: int, rec: Record) -> None:
    model = _hf(path, torch.bfloat16, ctx.device)
    ids = torch.tensor([_prompt(vocab, n=1024)], device=ctx.device)
    with torch.inference_mode():
        model(ids, logits_to_keep=1)
        start = _synced_clock(ctx)
        model(ids, logits_to_keep=1)
        rec.figures["hf_prefill_1k_s"] = _synced_clock(ctx) - start
    for batch in (1, 64):
        prompts = torch.randint(3, vocab, (batch, 32), device=ctx.device)
        model.generate(prompts, max_new_tokens=2, do_sample=False)  # warm, as dstp's is
        start = _synced_clock(ctx)
        model.generate(prompts, max_new_tokens=32, min_new_tokens=32, do_sample=False)
        rec.figures[f"hf_decode_b{batch}_tok_s"] = batch * 32 / (_synced_clock(ctx) - start)


class SkipCheck(Exception):
    """A check that does not apply here; its message says why."""


def check_sync_debug(ctx: Context, rec: Record) -> None:
    """Engine steps under torch.cuda.set_sync_debug_mode('warn'): the syncs it reports."""
    if ctx.device.type != "cuda":
        raise SkipCheck("CUDA only")
    from dstp.engine.llm_engine import Engine, EngineConfig
    from dstp.engine.sampling_params import SamplingParams

    engine = Engine(EngineConfig(str(ctx.tiny_model()), dtype="float32"))
    prompts = [_prompt(512, n=10, seed=i) for i in range(8)]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    engine.generate(prompts, params)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            engine.generate(prompts, params)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in seen if "synchroniz" in str(w.message)]
    rec.figures["syncs_over_run"] = len(syncs)
    rec.figures["engine_steps"] = 8
    rec.detail = "; ".join(sorted(set(syncs)))[:300]


def _synced_clock(ctx: Context) -> float:
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def _read_bandwidth(device: torch.device) -> float:
    data = torch.ones(1 << 30, dtype=torch.bfloat16, device=device)  # 2 GiB
    data.sum()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        data.sum()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return data.numel() * data.element_size() / best


def check_step_profile(ctx: Context, rec: Record) -> None:
    """Where a batch-1 decode step's time goes with CUDA graphs: 32 steps under
    ``torch.profiler`` (host ops and device kernels) and ``cProfile`` (dstp's Python),
    written to ``step_profile.txt``; the figure is the mean step time. The 1B shape on a
    GPU, the tiny Llama with ``--quick``."""
    import cProfile
    import io
    import pstats

    from dstp.engine.llm_engine import Engine, EngineConfig
    from dstp.engine.sampling_params import SamplingParams

    path, vocab, dtype = _step_model(ctx)
    engine = Engine(EngineConfig(str(path), dtype=dtype, max_num_seqs=8, cuda_graphs=True))
    prompt = _prompt(vocab, n=32)
    engine.generate([prompt], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    params = SamplingParams(max_tokens=120, temperature=0, ignore_eos=True)
    engine.add_request("profiled", prompt, params)
    engine.step()  # the prefill
    for _ in range(4):  # warm decode steps
        engine.step()
    rec.figures["step_ms_unprofiled"] = _mean_step_ms(ctx, engine, 32)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if ctx.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    python = cProfile.Profile()
    start = _synced_clock(ctx)
    with torch.profiler.profile(activities=activities) as prof:
        python.enable()
        for _ in range(32):
            engine.step()
        python.disable()
    rec.figures["step_ms"] = (_synced_clock(ctx) - start) / 32 * 1e3
    engine.shutdown()
    averages = prof.key_averages()
    text = io.StringIO()
    text.write(
        f"{rec.figures['step_ms']:.2f} ms a step (batch 1, 32 steps, profilers on; "
        f"{rec.figures['step_ms_unprofiled']:.2f} ms off)\n\n"
    )
    text.write(averages.table(sort_by="self_cpu_time_total", row_limit=30) + "\n")
    if ctx.device.type == "cuda":
        text.write(averages.table(sort_by="self_cuda_time_total", row_limit=20) + "\n")
    pstats.Stats(python, stream=text).sort_stats("cumulative").print_stats(40)
    (ctx.out / "step_profile.txt").write_text(text.getvalue())
    rec.detail = "step_profile.txt"


def check_compiled_step(ctx: Context, rec: Record) -> None:
    """``--compile-decode inductor`` under ``--cuda-graphs`` against graphs alone, batch 1:
    start-up seconds, step time, device kernels a step, and the greedy logprobs' largest
    difference. One decode shape (max_num_seqs 1, max_model_len 256) bounds the compile.
    The 1B shape on a GPU, the tiny Llama with ``--quick``."""
    from dstp.engine.llm_engine import Engine, EngineConfig
    from dstp.engine.sampling_params import SamplingParams

    path, vocab, dtype = _step_model(ctx)
    prompt = _prompt(vocab, n=32)
    greedy = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True, logprobs=0)
    runs = {}
    for label, extra in (("graphs", {}), ("compiled_graphs", {"compile_decode": "inductor"})):
        start = time.perf_counter()
        config = EngineConfig(
            str(path), dtype=dtype, max_num_seqs=1, max_model_len=256, cuda_graphs=True
        )
        engine = Engine(dataclasses.replace(config, **extra))
        rec.figures[f"{label}_start_s"] = time.perf_counter() - start
        out = engine.generate([prompt], greedy)[0].outputs[0]
        runs[label] = [(t, p.logprob) for t, p in zip(out.token_ids, out.logprobs, strict=True)]
        engine.add_request("timed", prompt, dataclasses.replace(greedy, max_tokens=120))
        for _ in range(5):  # the prefill and warm decode steps
            engine.step()
        rec.figures[f"{label}_step_ms"] = _mean_step_ms(ctx, engine, 64)
        rec.figures[f"{label}_kernels_a_step"] = _kernels_a_step(ctx, engine, steps=8)
        engine.shutdown()
        del engine
        _release_device_memory(ctx)
    # bf16 roundings differ once inductor fuses ops, and a near-tie then picks another
    # token: the logprobs compare while the tokens agree
    pairs = zip(runs["graphs"], runs["compiled_graphs"], strict=True)
    agreed = list(itertools.takewhile(lambda pair: pair[0][0] == pair[1][0], pairs))
    rec.figures["same_tokens"] = len(agreed)
    rec.figures["max_logprob_diff"] = max((abs(a[1] - b[1]) for a, b in agreed), default=0.0)


def _step_model(ctx: Context) -> tuple[Path, int, str]:
    """The model, vocabulary size and dtype a step-time check runs: the 1B shape in bf16
    on a GPU, the tiny Llama in fp32 with ``--quick``."""
    if ctx.quick:
        return ctx.tiny_model(), 512, "float32"
    from benchmarks.checkpoint import LLAMA_1B, ensure_checkpoint

    path = ensure_checkpoint(REPO / "runs" / "bench" / "models", LLAMA_1B)
    return path, LLAMA_1B.vocab_size, "bfloat16"


def _mean_step_ms(ctx: Context, engine, steps: int) -> float:
    """The mean wall time of ``steps`` engine steps, the device's work included."""
    start = _synced_clock(ctx)
    for _ in range(steps):
        engine.step()
    return (_synced_clock(ctx) - start) / steps * 1e3


def _kernels_a_step(ctx: Context, engine, steps: int) -> float:
    """Device kernels launched a step (graph replays counted by the kernels inside them),
    over ``steps`` engine steps; 0 off CUDA."""
    if ctx.device.type != "cuda":
        return 0.0
    activities = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return len(kernels) / steps


CHECKS: dict[str, Callable[[Context, Record], None]] = {
    "tp1_logits": check_tp1_logits,
    "engine": check_engine,
    "tp2_one_device": check_tp2_one_device,
    "server": check_server,
    "speed": check_speed,
    "sync_debug": check_sync_debug,
    "cuda_graphs": check_cuda_graphs,
    "step_profile": check_step_profile,
    "compiled_step": check_compiled_step,
    "triton_decode": check_triton_decode,
}


# -- running and reporting --------------------------------------------------------------------


def run(names: list[str], device: str, quick: bool, out: Path) -> list[Record]:
    records = []
    have_device = device == "cpu" or torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as tmp:
        out.mkdir(parents=True, exist_ok=True)
        ctx = Context(torch.device(device), quick, Path(tmp), out)
        for name in names:
            rec = Record(name)
            started = time.perf_counter()
            if not have_device:
                rec.status, rec.detail = "skipped", "no CUDA device"
            else:
                try:
                    CHECKS[name](ctx, rec)
                except SkipCheck as why:
                    rec.status, rec.detail = "skipped", str(why)
                except Exception as exc:  # a check's failure is its record, not the run's end
                    why = f"{type(exc).__name__}: {exc}"
                    # whole, with any rank logs, and where it was raised
                    print(f"{name} failed:\n{traceback.format_exc()}", flush=True)
                    rec.status, rec.detail = "failed", why[:500]
            # The check's engines go: the next check (or the server) sizes its KV cache from
            # what is free, and a cache left cached in this process would leave it none.
            _release_device_memory(ctx)
            rec.seconds = round(time.perf_counter() - started, 2)
            records.append(rec)
            print(f"{rec.name:16} {rec.status:8} {rec.seconds:7.1f}s  {rec.detail}", flush=True)
    _write(records, device, out)
    return records


def _write(records: list[Record], device: str, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    where = (
        torch.cuda.get_device_name() if device == "cuda" and torch.cuda.is_available() else device
    )
    meta = {"device": where, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M")}
    (out / "results.json").write_text(
        json.dumps({**meta, "checks": [asdict(r) for r in records]}, indent=1)
    )
    lines = [f"gpu-check on {where}, torch {meta['torch']}, {meta['date']}", ""]
    lines += ["| check | status | seconds | figures / detail |", "|---|---|---|---|"]
    for r in records:
        figures = ", ".join(f"{k} {v:.4g}" for k, v in r.figures.items())
        lines.append(f"| {r.name} | {r.status} | {r.seconds} | {figures or r.detail} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print(f"results: {out}/results.md")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="tiny models only: no speed line")
    parser.add_argument("--only", default=",".join(CHECKS), help="comma list of checks")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n]
    unknown = sorted(set(names) - set(CHECKS))
    if unknown:
        parser.error(f"unknown check(s) {unknown}; choose from {sorted(CHECKS)}")
    out = args.out or REPO / "runs" / "gpu-check" / time.strftime("%Y%m%d-%H%M%S")
    records = run(names, args.device, args.quick, out)
    return 1 if any(r.status == "failed" for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
