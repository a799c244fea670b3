"""Start-up and shutdown: torchrun, the built-in random model, SIGTERM mid-request, --help."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from pathlib import Path

import openai
import pytest
import requests

from dstp.server.cli import build_parser
from tests.launcher import free_port
from tests.server_helpers import ServerProcess, rank_pids, wait_until

TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


def test_help_explains_every_flag():
    parser = build_parser()
    text = parser.format_help()
    for action in parser._actions:
        assert action.help and len(action.help) > 10, action.option_strings
        assert action.option_strings[0] in text
    assert "--local_rank" in text and "deepspeed" in text


def test_cli_has_serve_with_the_same_flags():
    from dstp.cli import build_parser as cli_parser

    args = cli_parser().parse_args(["serve", "--port", "0", "--dtype", "float32"])
    assert args.port == 0 and args.host == "127.0.0.1" and args.model is None


@pytest.fixture(scope="module")
def torchrun_default(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lifecycle")
    port = free_port()
    cmd = [
        TORCHRUN,
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        "launch/serve.py",  # no --model: the built-in random model
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--kv-cache-memory",
        "0.05",
    ]
    proc = ServerProcess(cmd, port, tmp / "server.log", env={"DSTP_CACHE": str(tmp / "cache")})
    try:
        yield proc
    finally:
        proc.stop()
        shutil.rmtree(tmp / "cache", ignore_errors=True)


def test_default_model_under_torchrun(torchrun_default):
    server = torchrun_default
    server.wait_healthy()
    log = server.log(100000)
    assert "RANDOMLY INITIALISED" in log
    card = requests.get(f"{server.url}/v1/models", timeout=10).json()["data"][0]
    assert card["id"] == "dstp-default-random-llama"
    assert "RANDOM" in card["description"]
    assert requests.get(f"{server.url}/health", timeout=10).json()["tp_size"] == 2
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=60)
    got = client.chat.completions.create(
        model="dstp-default-random-llama",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=5,
        extra_body={"ignore_eos": True},
    )
    assert got.usage.completion_tokens == 5


def test_sigterm_fails_in_flight_and_stops_every_rank(torchrun_default):
    server = torchrun_default
    server.wait_healthy()
    ranks = rank_pids(server.proc.pid)
    assert sorted(ranks) == [0, 1], ranks
    resp = requests.post(
        f"{server.url}/v1/completions",
        json={"prompt": "a", "max_tokens": 1500, "ignore_eos": True, "stream": True},
        stream=True,
        timeout=60,
    )
    lines = resp.iter_lines()
    assert next(lines).startswith(b"data: ")
    t0 = time.monotonic()
    os.kill(server.proc.pid, signal.SIGTERM)  # as a job scheduler would
    tail = [line for line in lines if line]  # must end, not hang (timeout=60 above)
    assert tail, "stream ended without a final event"
    assert b'"error"' in tail[-1], tail[-3:]
    code = server.wait_exit(60)
    assert code is not None, server.log()
    assert wait_until(lambda: not any(_alive(p) for p in ranks.values()), 30)
    print(f"stopped in {time.monotonic() - t0:.1f} s; torchrun exit code {code}")


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_default_tokenizer_is_local_and_round_trips():
    from dstp.default_model import CHAT_TEMPLATE, build_tokenizer

    tok = build_tokenizer()  # built with `tokenizers`, no download
    text = "héllo wörld 🌍 <tag>\n\ttabs"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id and tok.decode(ids, skip_special_tokens=True) == text
    assert tok.chat_template == CHAT_TEMPLATE
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert chat == "<s><|user|>\nhi<|end|>\n<|assistant|>\n"
