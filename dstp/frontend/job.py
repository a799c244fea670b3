"""The engine job: the ranks, started by the ``deepspeed`` launcher, killed and reaped whole.

The launcher runs in its own session, so one ``killpg`` reaches it and every rank it
started on this host. Ranks on other hosts (a ``--hostfile`` job, started over pdsh/ssh)
are outside that session: the launcher is first asked to stop them (SIGTERM, on which
DeepSpeed's multi-node runner runs ``pkill`` of its launch command on every host). Ranks
die with the front-end three ways: the launcher gets SIGKILL when the front-end dies
(``PR_SET_PDEATHSIG``), the job's rank 0 stops when its link to the front-end closes (and
the launcher then ends the others), and the front-end kills the session on every exit path
it controls.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

import psutil

log = logging.getLogger("dstp")

PR_SET_PDEATHSIG = 1
REMOTE_STOP_S = 10.0  # DeepSpeed's runner: SIGTERM -> pdsh pkill on every host, then 1 s sleep


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _libc_prctl():
    with contextlib.suppress(OSError, AttributeError):
        return ctypes.CDLL(None, use_errno=True).prctl
    return None


# bound here, in the parent: the child between fork and exec must not load libraries or
# import (other threads of the front-end may hold the locks that would take)
_PRCTL = _libc_prctl()


def _die_with_parent() -> None:
    """In the launcher's child process: SIGKILL when the front-end dies, however it dies."""
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGKILL)


def chosen_master_port(launcher_args: Sequence[str]) -> int | None:
    """The ``--master_port`` the user gave the launcher (every start then reuses it), if any."""
    for i, arg in enumerate(launcher_args):
        if arg == "--master_port" and i + 1 < len(launcher_args):
            return int(launcher_args[i + 1])
        if arg.startswith("--master_port="):
            return int(arg.split("=", 1)[1])
    return None


def launcher_command(
    num_ranks: int, master_port: int, launcher_args: Sequence[str], serve_argv: Sequence[str]
) -> list[str]:
    """``deepspeed --num_gpus N --master_port P [launcher args] --module dstp serve ARGS``
    (``--master_port`` only when the launcher args do not name one)."""
    has_hosts = any(a.startswith(("--hostfile", "--include", "--exclude")) for a in launcher_args)
    ranks = [] if has_hosts else ["--num_gpus", str(num_ranks)]
    port = [] if chosen_master_port(launcher_args) else ["--master_port", str(master_port)]
    return [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        *ranks,
        *port,
        *launcher_args,
        "--module",
        "dstp",
        "serve",
        *serve_argv,
    ]


class EngineJob:
    """One start of the engine ranks; :meth:`kill` ends all of them and cleans up after."""

    def __init__(
        self,
        num_ranks: int,
        launcher_args: Sequence[str],
        serve_argv: Sequence[str],
        env: dict[str, str],
    ) -> None:
        self.master_port = chosen_master_port(launcher_args) or free_port()
        self.ranks: dict[int, psutil.Process] = {}  # filled by record_ranks()
        self.command = launcher_command(num_ranks, self.master_port, launcher_args, serve_argv)
        self._env_file = _deepspeed_env_file(env)  # the ranks on other nodes read it
        full_env = {
            **os.environ,
            **env,
            "DS_ENV_FILE": self._env_file,
            "PYTHONUNBUFFERED": "1",
        }
        self.multi_node = any(a.startswith("--hostfile") for a in launcher_args)
        self.process = subprocess.Popen(
            self.command, env=full_env, start_new_session=True, preexec_fn=_die_with_parent
        )
        log.info(
            "engine job started (launcher pid %d, master port %d): %s",
            self.process.pid,
            self.master_port,
            " ".join(self.command[2:]),
        )

    def record_ranks(self) -> None:
        """Note the pid of every local rank (once the job serves), to name the dead later."""
        self.ranks = {}
        for child in psutil.Process(self.process.pid).children(recursive=True):
            try:
                rank = child.environ().get("RANK")
            except psutil.Error:
                continue
            if rank is not None:
                self.ranks[int(rank)] = child
        log.info(
            "engine job's local ranks: %s",
            ", ".join(f"rank {r} pid {p.pid}" for r, p in sorted(self.ranks.items())) or "none",
        )

    def dead_ranks(self, wait_s: float = 0.0) -> list[int]:
        """The local ranks that no longer run (a crashed node's ranks are not seen here),
        waiting up to ``wait_s`` for one: a killed process closes its sockets (the link's
        end) a moment before it shows as dead."""
        deadline = time.monotonic() + wait_s
        while True:
            dead = []
            for rank, proc in sorted(self.ranks.items()):
                try:
                    if proc.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
                        dead.append(rank)
                except psutil.NoSuchProcess:
                    dead.append(rank)
            if dead or time.monotonic() >= deadline:
                return dead
            time.sleep(0.01)

    def exited(self) -> int | None:
        return self.process.poll()

    def wait(self, timeout_s: float) -> int | None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            return self.process.wait(timeout_s)
        return None

    def kill(self) -> None:
        """Stop the ranks on other hosts, SIGKILL the launcher's session (every local rank),
        reap it, remove what it left."""
        if self.multi_node:
            self._stop_remote_ranks()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(10)
        _wait_session_gone(self.process.pid, 10.0)
        removed = remove_shm_segments(self.master_port)
        if removed:
            log.info("removed %d shared-memory segment(s) the engine job left", removed)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._env_file)

    def _stop_remote_ranks(self) -> None:
        """SIGTERM to the multi-node launcher, which kills the job's launch processes (and so
        their ranks) on every host before it exits; SIGKILL would leave them running."""
        if self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGTERM)
        if self.wait(REMOTE_STOP_S) is None:
            log.warning(
                "the launcher did not stop the job's ranks on other hosts within %.0f s: "
                "check them for leftover processes",
                REMOTE_STOP_S,
            )


def _deepspeed_env_file(env: dict[str, str]) -> str:
    """A private DeepSpeed environment file (``DS_ENV_FILE``) with the front-end's address
    and key: DeepSpeed's multi-node runner exports it to every node."""
    fd, path = tempfile.mkstemp(prefix="dstp-job-", suffix=".env")
    with os.fdopen(fd, "w") as f:
        f.writelines(f"{k}={v}\n" for k, v in env.items())
    return path


def _wait_session_gone(session: int, timeout_s: float) -> None:
    """Until no process of the session is left (its ranks are reaped by init or the launcher)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(session, 0)
        except ProcessLookupError:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(session, signal.SIGKILL)
        time.sleep(0.05)


def remove_shm_segments(master_port: int) -> int:
    """Remove DeepSpeed's shared-memory all-reduce segments of a job on ``master_port``
    (a rank killed before its start-up barrier leaves its segment behind)."""
    pattern = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*_{master_port}_*"
    removed = 0
    for path in glob.glob(pattern):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            removed += 1
    return removed
