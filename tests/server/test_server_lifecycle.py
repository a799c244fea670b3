"""Start-up and shutdown: torchrun, the built-in models, SIGTERM mid-request, --help."""

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
from tests.helpers.launcher import free_port
from tests.helpers.server_helpers import ServerProcess, rank_pids, wait_until

TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


def test_help_explains_every_flag():
    parser = build_parser()
    text = parser.format_help()
    for action in parser._actions:
        assert action.help and len(action.help) > 10, action.option_strings
        assert action.option_strings[0] in text
    assert "--local_rank" in text and "deepspeed" in text


def test_cli_has_serve_with_the_same_flags():
    from dstp.__main__ import build_parser as cli_parser

    args = cli_parser().parse_args(["serve", "--port", "0", "--dtype", "float32"])
    assert args.port == 0 and args.host == "127.0.0.1" and args.model is None


def test_cli_version(capsys):
    from dstp import __version__
    from dstp.__main__ import main

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"dstp {__version__}"


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
        "launch/serve.py",  # no --model: the built-in stories260K
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
    """No --model: the built-in stories260K answers "Once upon a time" with HF's own story."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dstp.model.default_model import STORIES

    server = torchrun_default
    path = STORIES.locate()
    tok = AutoTokenizer.from_pretrained(path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    prompt = tok.encode("Once upon a time")
    with torch.inference_mode():
        hf_ids = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)[0]
    story = tok.decode(hf_ids, skip_special_tokens=True)

    server.wait_healthy()
    assert "stories260K" in server.log(100000)
    card = requests.get(f"{server.url}/v1/models", timeout=10).json()["data"][0]
    assert card["id"] == "stories260k" and "TinyStories" in card["description"]
    assert requests.get(f"{server.url}/health", timeout=10).json()["tp_size"] == 2
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=60)
    got = client.completions.create(
        model="stories260k", prompt="Once upon a time", max_tokens=24, temperature=0
    )
    assert "Once upon a time" + got.choices[0].text == story
    with pytest.raises(openai.BadRequestError, match="no chat template"):
        client.chat.completions.create(
            model="stories260k", messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )


def test_builtin_models_resolve(tmp_path, monkeypatch):
    from dstp.model.default_model import RANDOM, STORIES, resolve_model

    path, builtin = resolve_model(None)
    assert builtin is STORIES and (Path(path) / "model.safetensors").is_file()
    assert (Path(path) / "LICENSE").is_file() and (Path(path) / "README.md").is_file()
    monkeypatch.setenv("DSTP_CACHE", str(tmp_path))
    path, builtin = resolve_model("random")
    assert builtin is RANDOM and Path(path).parent == tmp_path
    assert (Path(path) / "config.json").is_file()
    assert resolve_model("/models/llama") == ("/models/llama", None)


def test_sigterm_fails_in_flight_and_stops_every_rank(torchrun_default):
    server = torchrun_default
    server.wait_healthy()
    ranks = rank_pids(server.proc.pid)
    assert sorted(ranks) == [0, 1], ranks
    resp = requests.post(
        f"{server.url}/v1/completions",
        json={"prompt": "a", "max_tokens": 500, "ignore_eos": True, "stream": True},
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
    from dstp.model.default_model import CHAT_TEMPLATE, build_tokenizer

    tok = build_tokenizer()  # built with `tokenizers`, no download
    text = "héllo wörld 🌍 <tag>\n\ttabs"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id and tok.decode(ids, skip_special_tokens=True) == text
    assert tok.chat_template == CHAT_TEMPLATE
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert chat == "<s><|user|>\nhi<|end|>\n<|assistant|>\n"
