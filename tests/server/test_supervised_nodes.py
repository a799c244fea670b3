"""Supervised mode across two (simulated) nodes: the front-end's engine job runs under
DeepSpeed's multi-node runner, ``--launcher-args "--hostfile H ..."`` with two hosts of one
rank each, so rank 1 is the second node's.

tests/helpers/simulated_nodes.py stands in for pdsh/ssh (none is on the test machines): each
host's launch command runs here in a session and login environment of its own, as an ssh
login on another machine would, so the front-end's kill of the launcher's session does not
reach it and the front-end's address and key must travel in DeepSpeed's environment file.
One server (stories260k, fp32, TP=2), in order:
1. a reference run of the 14 requests (tests/helpers/supervised.py, 80 tokens at most);
2. rank 1 (second node) SIGKILLed with all 14 in flight: each answers as in the reference;
3. rank 1 hung (SIGSTOP) while idle: the front-end finds it silent, the launcher stops the
   job on every host (its pdsh ``pkill``: the hung rank gets its SIGTERM), and the
   restarted job serves the reference's answers.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import time

import pytest

from tests.helpers import simulated_nodes
from tests.helpers.launcher import free_port
from tests.helpers.server_helpers import ServerProcess, wait_until
from tests.helpers.supervised import (
    MODEL,
    engine_ranks,
    in_flight_then,
    rank_killer,
    recovered,
    run_all,
    same_as,
)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("two_nodes")
    simulated_nodes.install(root / "bin")
    (root / "nodes").mkdir()
    hostfile = root / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    port = free_port()
    launcher = f"--hostfile {hostfile} --master_addr 127.0.0.1 --no_ssh_check"
    cmd = [sys.executable, "launch/serve.py", "--model", str(model_dir), "--dtype", "float32"]
    cmd += ["--served-model-name", MODEL, "--tensor-parallel-size", "2", "--port", str(port)]
    cmd += ["--launcher-args", launcher, "--heartbeat-interval", "0.5", "--rank-timeout", "10"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env["PATH"] = f"{root / 'bin'}:{env['PATH']}"
    env[simulated_nodes.STATE_ENV] = str(root / "nodes")
    proc = ServerProcess(cmd, port, root / "server.log", env=env)
    try:
        proc.wait_healthy(600)
        yield proc
    finally:
        proc.stop()
        for sessions in (root / "nodes").glob("*.sessions"):  # whatever a failure left
            for sid in sessions.read_text().split():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(int(sid), signal.SIGKILL)


LONG = 80  # tokens: enough to be in flight at the kill (gloo across "nodes" is slow)


@pytest.fixture(scope="module")
def reference(server):
    return run_all(server.url, long=LONG)


def test_each_node_runs_its_ranks_apart(server, reference):
    for name, result in reference.items():
        assert not isinstance(result, Exception), f"{name}: {result!r}"
    ranks = engine_ranks(server.proc.pid)
    assert sorted(ranks) == [0, 1], ranks
    sessions = {rank: os.getsid(p.pid) for rank, p in ranks.items()}
    assert len(set(sessions.values())) == 2, sessions  # one per node
    assert os.getsid(server.proc.pid) not in sessions.values()
    assert "ranks span several hosts" in server.log(200_000)


def test_second_node_rank_killed_mid_flight_loses_nothing(server, reference):
    kills = {}

    kill_rank = rank_killer(server, 1)

    def kill():
        kills["at"] = kill_rank()
        kills["recovery_s"] = recovered(server, kills["at"])

    results = run_all(server.url, long=LONG, during=in_flight_then(server, 14, kill))
    same_as(reference, results)
    log = server.log(400_000)
    assert "replayed 14 request(s)" in log, log[-3000:]
    assert re.search(r"engine job failed \(rank\(s\) 1 died;", log), log[-3000:]
    print(f"\ntwo simulated nodes: recovery after SIGKILL of rank 1 {kills['recovery_s']:.1f} s")


def test_hung_rank_on_second_node_is_stopped_everywhere(server, reference):
    hung = engine_ranks(server.proc.pid)[1]
    hung.send_signal(signal.SIGSTOP)  # alive but silent: no socket closes, no exit code
    recovery_s = recovered(server, time.monotonic())
    # only the launcher's stop reaches the second node (its session is not the launcher's):
    # its launch process SIGTERMs the hung rank (pending while it is stopped; DeepSpeed's
    # launch SIGKILLs what SIGTERM did not end 30 s later)
    assert wait_until(lambda: sigterm_pending(hung.pid), 60, 0.2), server.log()
    after = run_all(server.url, long=LONG, only=("greedy", "seeded", "stream_n2", "chat"))
    same_as({name: reference[name] for name in after}, after)
    print(f"\ntwo simulated nodes: recovery from a hung rank 1 {recovery_s:.1f} s")


def sigterm_pending(pid: int) -> bool:
    """Whether a (stopped) process has a SIGTERM waiting for it."""
    with open(f"/proc/{pid}/status") as status:
        pending = next(line for line in status if line.startswith("ShdPnd:"))
    return bool(int(pending.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
