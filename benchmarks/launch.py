"""Start one benchmark configuration's ranks the way users run them.

TP runs are N plain processes with the launcher's environment (RANK,
LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, LOCAL_SIZE, MASTER_ADDR,
MASTER_PORT), exactly what ``deepspeed --num_gpus N`` sets on one host, minus
the launcher's own start-up time. Each configuration runs alone, so ranks of
two 2.5 GB models never share the machine's memory or cores.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_config(plan: dict, tp: int, timeout_s: float, env: dict[str, str] | None = None) -> int:
    """Run ``python -m benchmarks.worker`` on ``tp`` ranks; 0 when every rank succeeded.

    Output goes to ``<out>/<config>.log``. A configuration that overruns
    ``timeout_s`` has its process groups killed (ours only) and counts as failed.
    """
    out = Path(plan["out"])
    plan_path = out / f"{plan['config']}.plan.json"
    plan_path.write_text(json.dumps(plan, indent=1))
    log = (out / f"{plan['config']}.log").open("w")
    port = str(free_port())
    procs = []
    for rank in range(tp):
        rank_env = dict(os.environ)
        rank_env.update({"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"})
        if tp > 1:
            rank_env.update(
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                WORLD_SIZE=str(tp),
                LOCAL_WORLD_SIZE=str(tp),
                LOCAL_SIZE=str(tp),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
            )
        rank_env.update(env or {})
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "benchmarks.worker", str(plan_path)],
                cwd=REPO,
                env=rank_env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, killable as one
            )
        )
    deadline = time.monotonic() + timeout_s
    codes: list[int | None] = [None] * tp
    try:
        while any(c is None for c in codes):
            for i, proc in enumerate(procs):
                codes[i] = proc.poll()
                if codes[i] not in (None, 0):  # one rank died: the others would hang
                    raise RuntimeError(f"rank {i} exited with {codes[i]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{plan['config']} ran past {timeout_s:.0f}s")
            time.sleep(0.5)
    except (RuntimeError, TimeoutError) as exc:
        print(f"  {plan['config']}: {exc}; see {log.name}", flush=True)
        return 1
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()
    return 0
