"""Supervised mode against the in-process one (issue 25 item 1): the decode step at TP=2 under
32 streams, with the HTTP threads on rank 0's GIL and off it.

    python benchmarks/supervised.py [--model PATH | --mid] [--dtype float32] [--reps 1]
                                    [--bursts 6] [--streams 32] [--max-tokens 128]
                                    [--modes inprocess,supervised] [--timeout 600]
                                    [--workdir runs/bench/supervised] [--json FILE]

Two TP=2 servers on the same model, up at once on 127.0.0.1 (free ports):

* ``inprocess``: ``deepspeed --num_gpus 2 launch/serve.py --model M``: global rank 0 runs the
  HTTP threads (tokenizer, detokenizer, SSE) and the engine loop in one process, one GIL.
* ``supervised``: ``python launch/serve.py --model M --tensor-parallel-size 2`` with no
  launcher environment: a front-end process owns HTTP and runs the ranks under the deepspeed
  launcher itself; rank 0 runs only the engine.

Each is waited for (``/health``; "ready s" counts from its start, the two loading side by
side) and warmed up (``--streams`` concurrent requests of 16 tokens). Then ``--bursts``
measured bursts per server, alternating between the two (A B B A A B ...), so that load from
elsewhere on the machine hits both alike; the idle one only heartbeats meanwhile. A burst is
``--streams`` concurrent streaming ``/v1/completions`` clients (fixed distinct prompts,
``temperature=0``, ``ignore_eos``, ``max_tokens``), and yields:

* ``ITL``: the server's ``dstp:inter_token_latency_seconds`` histogram over the measured
  requests only (scraped before and after): in-process it is taken by the engine loop at
  each step, supervised by the front-end as the job's outputs arrive, so under a full batch
  it is the decode step time as the server sees it; mean from sum/count, p50 interpolated
  within the (coarse) buckets;
* ``gap``: client-side gaps between consecutive SSE chunks that carry text (mean and p50):
  what a client sees, including the HTTP threads' delay (text held back by the detokenizer,
  e.g. a random model's partial UTF-8, merges chunks and so lengthens gaps);
* ``tok/s``: completion tokens (``usage``) of all streams over the wall time from the first
  request sent to the last stream ended.

Printed: every burst, then per mode the median over its bursts. ``--reps``: start the pair
again that many times. At the end each server's process group gets SIGTERM (SIGKILL after
60 s), and every process seen under it (the supervised job runs in a session of its own) is
checked gone; any left is SIGKILLed by pid and reported, and the exit status is then 1.

``--mid``: instead of ``--model``, a random bf16 Llama (hidden 1024, 8 layers, 16 heads, 8 KV
heads, intermediate 2816; 93M parameters) with stories260k's 512-token tokenizer, written
once by ``benchmarks/checkpoint.py`` under ``--workdir``, so the step is not pure overhead.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.checkpoint import LlamaShape, ensure_checkpoint  # noqa: E402
from benchmarks.launch import free_port  # noqa: E402

DEEPSPEED = str(Path(sys.executable).with_name("deepspeed"))
STORIES = REPO / "dstp" / "assets" / "stories260k"
MID = LlamaShape(1024, 8, 16, 8, 2816, 512, tie_word_embeddings=True, max_position_embeddings=2048)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)
NAME = "bench"
ITL = "dstp:inter_token_latency_seconds"
SUBJECTS = ["Lily", "Ben", "Tim", "Sue", "the dog", "a little bird", "the king", "Mom"]
PLACES = ["the park", "the sea", "a big tree", "the shop"]
PROMPTS = [
    f"Once upon a time, {s} went to {p}. One day" for s in SUBJECTS for p in PLACES
]  # 32 distinct prompts


def mid_checkpoint(workdir: Path) -> Path:
    """The random bf16 mid-size Llama, with stories260k's tokenizer (same vocabulary size)."""
    import torch

    path = ensure_checkpoint(workdir / "models", MID, torch.bfloat16)
    for name in TOKENIZER_FILES:
        if not (path / name).exists():
            shutil.copy(STORIES / name, path / name)
    return path


# -- the server ---------------------------------------------------------------------------------
class Server:
    """One TP=2 server in its own session; ``stop()`` ends it and checks nothing is left."""

    def __init__(self, mode: str, model: Path, dtype: str, log_path: Path) -> None:
        self.mode = mode
        self.port = free_port()
        serve = ["--model", str(model), "--served-model-name", NAME, "--dtype", dtype]
        serve += ["--host", "127.0.0.1", "--port", str(self.port)]
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
        env.update({"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"})
        if mode == "inprocess":
            cmd = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port())]
            cmd += ["launch/serve.py", *serve]
        elif mode == "supervised":
            cmd = [sys.executable, "launch/serve.py", *serve, "--tensor-parallel-size", "2"]
        else:
            raise ValueError(mode)
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.seen: dict[int, psutil.Process] = {}
        self.spawned = time.monotonic()

    def _note_tree(self) -> None:
        """Remember every process under the server (the supervised job has its own session)."""
        try:
            root = psutil.Process(self.proc.pid)
            for p in [root, *root.children(recursive=True)]:
                self.seen.setdefault(p.pid, p)
        except psutil.Error:
            pass

    def request(self, method: str, path: str, body: dict | None = None, timeout: float = 10):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            payload = json.dumps(body).encode() if body is not None else None
            headers = {"Content-Type": "application/json"} if body is not None else {}
            conn.request(method, path, payload, headers)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def wait_healthy(self, timeout_s: float) -> float:
        """Seconds from the server's start to its first healthy answer."""
        started = self.spawned
        while time.monotonic() - started < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.mode} server exited {self.proc.returncode}")
            try:
                if self.request("GET", "/health", timeout=2)[0] == 200:
                    self._note_tree()
                    return time.monotonic() - started
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{self.mode} server not healthy after {timeout_s:.0f} s")

    def metrics(self) -> dict[str, float]:
        from tests.helpers.server_helpers import parse_metrics

        status, body = self.request("GET", "/metrics")
        assert status == 200, status
        return parse_metrics(body.decode())

    def stop(self) -> list[str]:
        """SIGTERM to the process group, then make sure every process seen under it is gone;
        returns what had to be SIGKILLed (empty: a clean stop)."""
        self._note_tree()
        leftovers = []
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                leftovers.append(f"server pid {self.proc.pid} ignored SIGTERM for 60 s")
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        deadline = time.monotonic() + 30
        alive = []
        while time.monotonic() < deadline:
            alive = []
            for p in self.seen.values():
                try:
                    if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                        alive.append(p)
                except psutil.NoSuchProcess:
                    pass
            if not alive:
                break
            time.sleep(0.5)
        for p in alive:
            try:
                leftovers.append(f"pid {p.pid} {' '.join(p.cmdline())[:80]}")
                p.kill()
            except psutil.Error:
                pass
        self._log.close()
        return leftovers


# -- the clients ----------------------------------------------------------------------------------
def stream(port: int, prompt: str, max_tokens: int, timeout: float, out: dict) -> None:
    """One streaming completion; ``out``: chunk arrival times, completion tokens, error."""
    body = {
        "model": NAME,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    times: list[float] = []
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(
            "POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"}
        )
        resp = conn.getresponse()
        if resp.status != 200:
            out["error"] = f"{resp.status}: {resp.read()[:200]!r}"
            return
        while True:
            line = resp.readline()
            if not line:
                break
            if not line.startswith(b"data: "):
                continue
            now = time.perf_counter()
            data = line[6:].strip()
            if data == b"[DONE]":
                break
            event = json.loads(data)
            if any(c.get("text") for c in event.get("choices", [])):
                times.append(now)
            if event.get("usage"):
                out["tokens"] = event["usage"]["completion_tokens"]
    except Exception as exc:  # noqa: BLE001 (reported in the table)
        out["error"] = repr(exc)
    finally:
        conn.close()
        out["times"] = times
        out["end"] = time.perf_counter()


def burst(port: int, n: int, max_tokens: int, timeout: float) -> tuple[list[dict], float]:
    outs: list[dict] = [{} for _ in range(n)]
    threads = [
        threading.Thread(
            target=stream, args=(port, PROMPTS[i % len(PROMPTS)], max_tokens, timeout, outs[i])
        )
        for i in range(n)
    ]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 30)
    return outs, time.perf_counter() - started


def histogram_delta(before: dict, after: dict, name: str) -> dict:
    """count, sum and interpolated p50 of a histogram's observations between two scrapes."""
    count = after.get(f"{name}_count", 0) - before.get(f"{name}_count", 0)
    total = after.get(f"{name}_sum", 0) - before.get(f"{name}_sum", 0)
    buckets = []
    for key, value in after.items():
        if key.startswith(f"{name}_bucket{{le="):
            le = re.search(r'le="([^"]+)"', key).group(1)
            bound = float("inf") if le == "+Inf" else float(le)
            buckets.append((bound, value - before.get(key, 0)))
    buckets.sort()
    p50 = None
    if count > 0:
        lower, below = 0.0, 0.0
        for bound, cum in buckets:
            if cum >= count / 2:
                if bound == float("inf"):
                    p50 = lower
                else:
                    share = (count / 2 - below) / max(cum - below, 1e-9)
                    p50 = lower + share * (bound - lower)
                break
            lower, below = bound, cum
    return {"count": count, "mean": total / count if count else None, "p50": p50}


def measure(server: Server, args, burst_no: int) -> dict:
    """One measured burst of ``--streams`` streams against a warm server."""
    row: dict = {"mode": server.mode, "burst": burst_no}
    try:
        before = server.metrics()
        outs, wall = burst(server.port, args.streams, args.max_tokens, args.timeout)
        after = server.metrics()
        errors = [o["error"] for o in outs if "error" in o]
        if errors:
            raise RuntimeError(f"{len(errors)} stream(s) failed: {errors[:3]}")
        gaps = [b - a for o in outs for a, b in zip(o["times"], o["times"][1:], strict=False)]
        itl = histogram_delta(before, after, ITL)
        tokens = sum(o.get("tokens", 0) for o in outs)
        row.update(
            itl_mean_ms=1e3 * itl["mean"] if itl["mean"] is not None else None,
            itl_p50_ms=1e3 * itl["p50"] if itl["p50"] is not None else None,
            itl_count=itl["count"],
            gap_mean_ms=1e3 * statistics.fmean(gaps) if gaps else None,
            gap_p50_ms=1e3 * statistics.median(gaps) if gaps else None,
            tokens=tokens,
            wall_s=wall,
            tok_s=tokens / wall,
        )
    except Exception as exc:  # noqa: BLE001 (one failed burst does not end the others)
        row["error"] = repr(exc)
    return row


def run_servers(modes: list[str], model: Path, args, rep: int) -> tuple[list[dict], list[str]]:
    """Start one server per mode (all up at once), warm each, then ``--bursts`` measured bursts
    alternating between them (A B A B ...: load from elsewhere hits both alike); stop all."""
    servers = []
    rows: list[dict] = []
    leftovers: list[str] = []
    try:
        for mode in modes:
            servers.append(Server(mode, model, args.dtype, args.workdir / f"{mode}-{rep}.log"))
        for server in servers:
            server.start_s = server.wait_healthy(args.timeout)
            print(f"{server.mode} ready after {server.start_s:.1f} s", flush=True)
        for server in servers:
            warm, _ = burst(server.port, args.streams, 16, args.timeout)
            errors = [o["error"] for o in warm if "error" in o]
            if errors:
                raise RuntimeError(f"{server.mode} warm-up failed: {errors[:3]}")
        for b in range(1, args.bursts + 1):
            for server in servers if b % 2 else servers[::-1]:
                row = measure(server, args, b)
                row.update(rep=rep, start_s=server.start_s)
                rows.append(row)
                print(json.dumps(row), flush=True)
    except Exception as exc:  # noqa: BLE001 (reported; the servers are stopped below)
        rows.append({"mode": "all", "rep": rep, "burst": 0, "error": repr(exc)})
    finally:
        for server in servers:
            leftovers += server.stop()
    return rows, leftovers


def fmt(value, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[dict]) -> str:
    head = (
        "| mode | rep | burst | ITL mean ms | ITL p50 ms | gap mean ms | gap p50 ms "
        "| tokens | wall s | tok/s |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        if "error" in r:
            lines.append(
                f"| {r['mode']} | {r['rep']} | {r['burst']} | failed: {r['error'][:120]} |"
            )
            continue
        lines.append(
            f"| {r['mode']} | {r['rep']} | {r['burst']} | {fmt(r['itl_mean_ms'])} "
            f"| {fmt(r['itl_p50_ms'])} | {fmt(r['gap_mean_ms'])} | {fmt(r['gap_p50_ms'])} "
            f"| {r['tokens']} | {fmt(r['wall_s'], '.2f')} | {fmt(r['tok_s'])} |"
        )
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    """Per mode: the median over its bursts of each figure (and the range of tok/s)."""
    keys = ("start_s", "itl_mean_ms", "itl_p50_ms", "gap_mean_ms", "gap_p50_ms", "wall_s", "tok_s")
    head = (
        "| mode | ready s | bursts | ITL mean ms | ITL p50 ms | gap mean ms | gap p50 ms "
        "| wall s | tok/s (min-max) |"
    )
    lines = [head, "|" + "---|" * 9]
    for mode in dict.fromkeys(r["mode"] for r in rows if "error" not in r):
        ok = [r for r in rows if r["mode"] == mode and "error" not in r]
        med = {
            k: statistics.median(r[k] for r in ok if r[k] is not None)
            for k in keys
            if any(r[k] is not None for r in ok)
        }
        tps = [r["tok_s"] for r in ok]
        lines.append(
            f"| {mode} | {fmt(med.get('start_s'))} | {len(ok)} | {fmt(med.get('itl_mean_ms'))} | {fmt(med.get('itl_p50_ms'))} "
            f"| {fmt(med.get('gap_mean_ms'))} | {fmt(med.get('gap_p50_ms'))} "
            f"| {fmt(med.get('wall_s'), '.2f')} | {fmt(med.get('tok_s'), '.0f')} "
            f"({min(tps):.0f}-{max(tps):.0f}) |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=STORIES)
    parser.add_argument("--mid", action="store_true", help="the random bf16 mid-size Llama")
    parser.add_argument("--dtype", default=None, help="default: float32, bfloat16 with --mid")
    parser.add_argument("--modes", default="inprocess,supervised")
    parser.add_argument("--reps", type=int, default=1, help="server starts per mode")
    parser.add_argument("--bursts", type=int, default=6, help="measured bursts per start")
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--timeout", type=float, default=600, help="seconds per start / burst")
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "bench" / "supervised")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    model = mid_checkpoint(args.workdir) if args.mid else args.model
    args.dtype = args.dtype or ("bfloat16" if args.mid else "float32")
    modes = args.modes.split(",")
    print(f"model {model} ({args.dtype}), TP=2, {args.streams} streams x {args.max_tokens} tokens")
    rows, left = [], []
    for rep in range(1, args.reps + 1):
        got, gone = run_servers(modes, model, args, rep)
        rows += got
        left += gone
    print(table(rows))
    print()
    print(summary(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if left:
        print("left running after SIGTERM (killed):", *left, sep="\n  ")
    return 1 if left or any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
