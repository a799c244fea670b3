"""``pdsh`` for simulated nodes: each host of ``-w`` is a shell on this machine.

DeepSpeed's multi-node runner starts a job with ``pdsh -S -f N -w host1,host2 CMD`` (pdsh
runs CMD over ssh on every host, ``%n`` replaced by the host's index and ``%h`` by its
name) and stops it with ``pdsh -w ... pkill -f <the launch command>``. This stand-in runs CMD
once per host here, as an ssh login would on a real node: in a session of its own (the
launcher's process group does not reach it, as it would not reach another machine) and with
a login's environment only (what the job needs must travel in CMD's exports, i.e. the
DeepSpeed environment file). ``-S``: the exit status is the largest of the hosts'.

A ``pkill`` sent to a host reaches only that host's processes, as on a cluster: here, the
sessions this stand-in started for that host (``pkill -s``), listed in ``$SIMULATED_NODES``
(a folder), so a job's stop command does not reach other jobs on this one machine.

Tests put it on ``PATH`` as ``pdsh`` with :func:`install`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

STATE_ENV = "SIMULATED_NODES"
LOGIN_ENV = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "TMPDIR", "TORCH_EXTENSIONS_DIR")


def install(folder: Path) -> Path:
    """Writes an executable ``pdsh`` into ``folder`` (put it first on ``PATH``)."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "pdsh"
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{Path(__file__).resolve()}" "$@"\n')
    script.chmod(0o755)
    return script


def parse(argv: list[str]) -> tuple[list[str], str]:
    """(hosts, the remote command line) from pdsh's arguments."""
    hosts: list[str] = []
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        flag = argv[i]
        if flag == "-w":
            hosts = argv[i + 1].split(",")
            i += 2
        elif flag in ("-f", "-l", "-R", "-t", "-u"):
            i += 2
        else:  # -S and other switches
            i += 1
    if not hosts or i >= len(argv):
        raise SystemExit("pdsh (simulated nodes): usage: pdsh [-S] [-f N] -w HOSTS COMMAND")
    return hosts, " ".join(argv[i:])


def _sessions_file(host: str) -> Path:
    return Path(os.environ[STATE_ENV]) / f"{host}.sessions"


def _on_host(command: str, n: int, host: str) -> str:
    """The command as ``host`` runs it: pdsh's substitutions, and a ``pkill`` kept to the
    sessions started on that host."""
    command = command.replace("%n", str(n)).replace("%h", host)
    if command.lstrip().startswith("pkill "):
        sessions = _sessions_file(host).read_text().split() if _sessions_file(host).exists() else []
        if not sessions:
            return "true"
        command = command.replace("pkill ", f"pkill -s {','.join(sessions)} ", 1)
    return command


def main(argv: list[str]) -> int:
    hosts, command = parse(argv)
    env = {k: os.environ[k] for k in LOGIN_ENV if k in os.environ}
    nodes = []
    for n, host in enumerate(hosts):
        node = subprocess.Popen(
            ["bash", "-c", _on_host(command, n, host)], env=env, start_new_session=True
        )
        with open(_sessions_file(host), "a") as f:
            f.write(f"{node.pid}\n")
        nodes.append(node)
    # pdsh's ssh connections end with pdsh; the remote commands run on (a kill is pkill's job)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, lambda *_: sys.exit(130))
    return max(node.wait() for node in nodes)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
