"""Start N ranks the way users do: plain processes with the launcher's
environment variables, or the real ``deepspeed`` command."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEEPSPEED = str(Path(sys.executable).with_name("deepspeed"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"})
    env.update(extra)
    return env


def run_ranks(
    n: int, args: list[str], timeout: float = 300, **env: str
) -> list[subprocess.CompletedProcess]:
    """N processes with RANK/WORLD_SIZE/... set, as torchrun or deepspeed would."""
    port = str(free_port())
    procs = []
    for rank in range(n):
        rank_env = _env(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(n),
            LOCAL_WORLD_SIZE=str(n),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            **env,
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, *args],
                env=rank_env,
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    results = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, ""))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return results


def run_deepspeed(
    n: int,
    args: list[str],
    timeout: float = 300,
    launcher_args: list[str] | None = None,
    **env: str,
) -> subprocess.CompletedProcess:
    """The real ``deepspeed --num_gpus N`` launcher on this host."""
    cmd = [
        DEEPSPEED,
        "--num_gpus",
        str(n),
        "--master_port",
        str(free_port()),
        *(launcher_args or []),
        *args,
    ]
    return subprocess.run(
        cmd, env=_env(**env), cwd=REPO, capture_output=True, text=True, timeout=timeout
    )
