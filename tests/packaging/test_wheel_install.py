"""An installed wheel starts the server: build it (``pip wheel --no-deps``), install it into a
fresh venv (``--system-site-packages``, so torch / deepspeed / transformers come from here),
and run ``deepspeed --num_gpus 2 --module dstp serve`` from a folder outside the repository,
on a hub id found in a Hugging Face cache laid out by the test (``HF_HUB_OFFLINE=1``).

Slow-ish (~30-50 s on 2 cores): one wheel build, one TP=2 server start.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.helpers.hub_cache import lay_out_hub_cache, stories_files
from tests.helpers.launcher import REPO, free_port

SOURCES = ["dstp", "policies", "setup.py", "setup.cfg", "pyproject.toml", "README.md"]


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 120) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """A venv holding the dstp wheel built from this tree; the clean env to run it with."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"  # a copy: building in the tree would write build/ and egg-info there
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "*.so")
    for name in SOURCES:
        item = REPO / name
        if item.is_dir():
            shutil.copytree(item, src / name, ignore=ignore)
        else:
            shutil.copy(item, src / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update({"PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    pip = [sys.executable, "-m", "pip"]
    _run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(src)],
        tmp,
        env,
    )
    (wheel,) = (tmp / "dist").glob("dstp-*.whl")
    _run(
        [
            sys.executable,
            "-m",
            "venv",
            "--system-site-packages",
            "--without-pip",
            str(tmp / "venv"),
        ],
        tmp,
        env,
    )
    python = tmp / "venv" / "bin" / "python"
    _run([*pip, "--python", str(python), "install", "--no-deps", str(wheel)], tmp, env)
    run_dir = tmp / "elsewhere"  # not the repository: `import dstp` must find the wheel
    run_dir.mkdir()
    return {"python": python, "bin": python.parent, "env": env, "cwd": run_dir, "tmp": tmp}


def test_wheel_holds_the_package(venv):
    out = _run(
        [
            str(venv["python"]),
            "-c",
            "import dstp, dstp.server.serve, dstp.model.hub, dstp.worker.attention, dstp.policies, dstp.model.default_model as d;"
            "print(dstp.__file__); print(d.STORIES.locate() / 'model.safetensors')",
        ],
        venv["cwd"],
        venv["env"],
    )
    package, weights = out.split()
    assert Path(package).is_relative_to(venv["tmp"] / "venv"), package
    assert Path(weights).is_file()  # the built-in model ships in the wheel
    version = _run([str(venv["bin"] / "dstp"), "--version"], venv["cwd"], venv["env"])
    assert version.startswith("dstp ")


def test_deepspeed_module_serves_from_the_wheel(venv):
    cache = venv["tmp"] / "hf-cache"
    lay_out_hub_cache(cache, "dstp-test/stories", stories_files())
    port = free_port()
    env = {**venv["env"], "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env["TOKENIZERS_PARALLELISM"] = "false"
    cmd = [
        str(venv["python"]),  # the venv's deepspeed launcher: its ranks run the venv's python
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        "--module",
        "dstp",
        "serve",
        "--model",
        "dstp-test/stories",
        "--download-dir",
        str(cache),
        "--dtype",
        "float",
        "-tp",
        "2",
        "--port",
        str(port),
        "--num-kv-blocks",
        "64",
        "--heartbeat-interval",
        "0.5",
    ]
    log_path = venv["tmp"] / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=venv["cwd"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log_path.read_text()[-4000:]
            assert time.monotonic() < deadline, log_path.read_text()[-4000:]
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except OSError:  # not listening yet, or still loading
                pass
            time.sleep(0.5)
        assert requests.get(f"{url}/health", timeout=10).json()["tp_size"] == 2
        models = requests.get(f"{url}/v1/models", timeout=10).json()["data"]
        assert models[0]["id"] == "dstp-test/stories"
        got = requests.post(
            f"{url}/v1/completions",
            json={
                "model": "dstp-test/stories",
                "prompt": "Once upon a time",
                "max_tokens": 12,
                "temperature": 0,
            },
            timeout=60,
        )
        assert got.status_code == 200, got.text
        assert "Lily" in got.json()["choices"][0]["text"], got.text
        text = log_path.read_text()
        assert "using the cached snapshot" in text and "Traceback" not in text, text[-4000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
