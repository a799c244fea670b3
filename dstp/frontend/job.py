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
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
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
        self._deaths: DeathWatch | None = None
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
        self._deaths = DeathWatch(self.ranks)
        log.info(
            "engine job's local ranks: %s",
            ", ".join(f"rank {r} pid {p.pid}" for r, p in sorted(self.ranks.items())) or "none",
        )

    def first_dead(self, wait_s: float = 0.0) -> list[int]:
        """The local rank(s) that died first (a crashed node's ranks are not seen here),
        waiting up to ``wait_s`` for one: a killed process closes its sockets (the link's
        end) a moment before it shows as dead."""
        return self._deaths.first(wait_s) if self._deaths is not None else []

    def exited(self) -> int | None:
        return self.process.poll()

    def wait(self, timeout_s: float) -> int | None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            return self.process.wait(timeout_s)
        return None

    def kill(self) -> None:
        """Stop the ranks on other hosts, SIGKILL the launcher's session (every local rank),
        reap it, remove what it left."""
        if self._deaths is not None:
            self._deaths.stop()
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


class DeathWatch:
    """Which local ranks died first, told apart from those that then fail on the dead one's
    closed sockets a few milliseconds later: a thread sleeps on every rank's pidfd and wakes
    at the first exit (a 0.1 s poll often saw the killed rank and its peer dead together).
    Where pidfds are refused (Linux < 5.3, some seccomp profiles) it polls every 10 ms."""

    POLL_S = 0.01

    def __init__(self, ranks: dict[int, psutil.Process]) -> None:
        self._dead: list[int] = []
        self._seen = threading.Event()
        self._wake_r, self._wake_w = os.pipe()  # stop() ends the wait
        self._thread = threading.Thread(
            target=self._watch, args=(dict(ranks),), name="dstp-rank-deaths", daemon=True
        )
        self._thread.start()

    def first(self, wait_s: float = 0.0) -> list[int]:
        self._seen.wait(wait_s)
        return list(self._dead)

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        self._thread.join(5.0)
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _watch(self, ranks: dict[int, psutil.Process]) -> None:
        pidfds: dict[int, int] = {}
        gone = []
        try:
            for rank, proc in ranks.items():
                try:
                    pidfds[os.pidfd_open(proc.pid)] = rank
                except ProcessLookupError:
                    gone.append(rank)
        except (OSError, AttributeError):  # no pidfds here
            self._close(pidfds)
            self._poll(ranks)
            return
        try:
            if not gone:
                ready = self._readable([*pidfds, self._wake_r], None)
                gone = [pidfds[fd] for fd in ready if fd in pidfds]
            self._record(gone)
        finally:
            self._close(pidfds)

    def _poll(self, ranks: dict[int, psutil.Process]) -> None:
        while not self._readable([self._wake_r], self.POLL_S):
            gone = [rank for rank, proc in ranks.items() if not _running(proc)]
            if gone:
                self._record(gone)
                return

    @staticmethod
    def _readable(fds: list[int], timeout_s: float | None) -> list[int]:
        """poll(2), not select(2): a busy server's descriptors run past select's 1024."""
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        timeout_ms = None if timeout_s is None else timeout_s * 1000
        return [fd for fd, _ in poller.poll(timeout_ms)]

    def _record(self, gone: list[int]) -> None:
        if gone:
            self._dead = sorted(gone)
            self._seen.set()

    @staticmethod
    def _close(pidfds: dict[int, int]) -> None:
        for fd in pidfds:
            os.close(fd)


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.NoSuchProcess:
        return False


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
