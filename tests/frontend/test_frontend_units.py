"""The supervised front-end's parts without a job: when it applies, the job's command line,
and the journal that replays requests (the real recovery: tests/server/test_supervised.py)."""

from __future__ import annotations

import argparse
import os
import resource
import signal
import subprocess
import sys
import time

import psutil
import pytest

from dstp.engine.outputs import CompletionOutput, RequestOutput, TokenLogprob
from dstp.engine.sampling_params import SamplingParams
from dstp.frontend import supervised
from dstp.frontend.job import DeathWatch, chosen_master_port, launcher_command
from dstp.frontend.journal import Journal
from dstp.frontend.serve import serve_argv


@pytest.mark.parametrize(
    ("env", "tp", "flag", "expected"),
    [
        ({}, 2, False, True),  # `dstp serve -tp 2` alone: vLLM users' command line
        ({}, 1, False, False),  # one process, in-process as before
        ({}, 1, True, True),
        ({}, None, False, False),  # no --tensor-parallel-size: the world, here 1
        ({}, None, True, True),
        ({"RANK": "0", "WORLD_SIZE": "2"}, 2, False, False),  # under deepspeed / torchrun
        ({"LOCAL_RANK": "0"}, 2, True, False),
    ],
)
def test_supervised_mode_applies_only_outside_a_launcher(monkeypatch, env, tp, flag, expected):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    args = argparse.Namespace(tensor_parallel_size=tp, supervise=flag)
    assert supervised(args) is expected


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["dstp", "serve", "--model", "m", "-tp", "2"], ["--model", "m", "-tp", "2"]),
        (["launch/serve.py", "--model", "m"], ["--model", "m"]),
        (["launch/serve.py", "--served-model-name", "serve"], ["--served-model-name", "serve"]),
    ],
)
def test_the_engine_job_gets_the_serve_flags_unchanged(argv, expected):
    assert serve_argv(argv) == expected


def test_the_launcher_command_passes_launcher_options_through():
    cmd = launcher_command(2, 29600, ["--include", "localhost:0,1"], ["--model", "m"])
    assert "--num_gpus" not in cmd  # deepspeed refuses --num_gpus beside --include
    assert cmd[cmd.index("--master_port") + 1] == "29600"
    assert cmd[-5:] == ["--module", "dstp", "serve", "--model", "m"]
    assert launcher_command(4, 1, [], [])[3:5] == ["--num_gpus", "4"]


@pytest.mark.parametrize("given", [["--master_port", "29777"], ["--master_port=29777"]])
def test_a_master_port_the_user_names_is_the_jobs(given):
    """Named in --launcher-args, the port is used as given (once) and is the one whose
    shared-memory segments a kill removes; otherwise each start draws a fresh one."""
    cmd = launcher_command(2, 29600, given, ["--model", "m"])
    assert "29600" not in cmd and sum(a.startswith("--master_port") for a in cmd) == 1
    assert chosen_master_port(given) == 29777 and chosen_master_port(["--include", "x"]) is None


def out(request_id, choices, finished=False):
    return RequestOutput(request_id, [1, 2], choices, finished)


def choice(index, ids, text, reason=None, logprobs=None):
    return CompletionOutput(
        index, [], text, new_token_ids=ids, delta_text=text, finish_reason=reason,
        new_logprobs=logprobs,
    )  # fmt: skip


def test_the_journal_replays_unfinished_choices_with_what_they_emitted():
    journal = Journal()
    journal.add("r", [1, 2], SamplingParams(n=2, max_tokens=10, logprobs=0))
    lp = [TokenLogprob(5, -0.5, {5: -0.5}), TokenLogprob(6, -0.7, {6: -0.7})]
    journal.observe(out("r", [choice(0, [5], "a", logprobs=lp[:1]), choice(1, [7], "b")]))
    journal.observe(out("r", [choice(0, [6], "c", "stop", lp[1:]), choice(1, [8], "")]))
    record = journal.requests["r"]
    assert [(c.index, c.output_ids) for c in record.resume()] == [(1, [7, 8])]
    record.replayed = True  # the new engine knows choice 1 only; choice 0 comes back here
    final = journal.observe(out("r", [choice(1, [9], "d", "length")], finished=True))
    assert [c.index for c in final.outputs] == [0, 1]
    first = final.outputs[0]
    assert (first.token_ids, first.text, first.finish_reason) == ([5, 6], "ac", "stop")
    assert [t.token_id for t in first.logprobs] == [5, 6]
    assert "r" not in journal


def test_a_request_without_tokens_is_simply_added_again_and_a_failed_one_says_why():
    journal = Journal()
    record = journal.add("r", [1], SamplingParams(n=2))
    assert record.resume() == []
    failed = record.failed("in flight across two consecutive engine failures")
    assert failed.finished and {c.finish_reason for c in failed.outputs} == {"error"}
    assert len(failed.outputs) == 2 and "two consecutive" in failed.error


FOLLOWER = """
import sys, time
deadline = time.monotonic() + 60
while time.monotonic() < deadline:  # exits ~1 ms after its peer dies, as a rank does
    with open(f"/proc/{sys.argv[1]}/stat") as stat:  # when a collective's socket closes
        if stat.read().rsplit(")", 1)[1].split()[0] == "Z":
            sys.exit(1)
    time.sleep(0.001)
"""


@pytest.fixture
def busy_descriptors():
    """1,100 open descriptors, as a server with many connections has: the watch's own are
    numbered past select(2)'s 1,024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < 1200")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    yield
    for fd in held:
        os.close(fd)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize("pidfds", [True, False])
def test_the_rank_that_died_first_is_named_not_the_peer_that_failed_after_it(
    monkeypatch, busy_descriptors, pidfds
):
    if not pidfds:  # the 10 ms poll where pidfds are refused
        monkeypatch.delattr(os, "pidfd_open", raising=False)
    killed = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    follower = subprocess.Popen([sys.executable, "-c", FOLLOWER, str(killed.pid)])
    time.sleep(0.5)  # both started
    watch = DeathWatch({0: psutil.Process(follower.pid), 1: psutil.Process(killed.pid)})
    try:
        assert watch.first() == []
        killed.send_signal(signal.SIGKILL)
        first = watch.first(wait_s=10.0)
        assert follower.wait(10) == 1  # the peer did die, after
        if pidfds:
            assert first == [1]
        else:  # a poll may see both; the killed rank is always named
            assert 1 in first
        assert watch.first() == first  # the first deaths stay what was seen
    finally:
        watch.stop()
        for proc in (killed, follower):
            proc.kill()
            proc.wait()
