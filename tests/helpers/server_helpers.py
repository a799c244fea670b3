"""Shared bits for the server tests: in-process servers, metrics parsing, SSE reading."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
import urllib.request
from dataclasses import dataclass

_METRIC = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")


_MODEL_LABEL = re.compile(r'model_name="[^"]*",?')


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value} without the ``model_name`` label that every
    ``dstp:`` sample carries (``dstp:num_requests_running``); raises on a malformed line."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            assert re.match(r"^# (HELP|TYPE) \S+ .+$", line) or not line, line
            continue
        m = _METRIC.match(line)
        assert m, f"malformed metrics line: {line!r}"
        labels = _MODEL_LABEL.sub("", m.group(2) or "")
        values[m.group(1) + ("" if labels == "{}" else labels)] = float(m.group(3))
    return values


def sse_events(lines) -> list[object]:
    """Data payloads of an SSE stream ('[DONE]' kept as a string; comment lines, the
    server's keep-alives while nothing moves, skipped as the SSE standard says)."""
    events = []
    for raw in lines:
        line = raw.decode() if isinstance(raw, bytes) else raw
        if not line.startswith("data: "):
            assert line == "" or line == ": keep-alive", f"unexpected SSE line {line!r}"
            continue
        data = line[len("data: ") :]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


@dataclass
class InProcessServer:
    """The production WSGI server (waitress) for a Flask app, in a background thread."""

    server: object
    url: str
    _stop: threading.Event
    _thread: threading.Thread

    @classmethod
    def start(
        cls, app, threads: int = 48, max_body_bytes: int = 4 << 20, **limits
    ) -> InProcessServer:
        """``threads``: size it as production does, ``http_threads(admission limit)``;
        ``limits``: make_wsgi_server's keyword arguments (read / idle timeouts)."""
        from dstp.server.wsgi import make_wsgi_server, pump_once

        server = make_wsgi_server(app, "127.0.0.1", 0, threads, max_body_bytes, **limits)
        stop = threading.Event()

        def loop() -> None:
            while not stop.is_set():
                pump_once(server, 0.05)

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        return cls(server, f"http://127.0.0.1:{server.effective_port}", stop, thread)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.server.close()


def open_stream(url: str, body: dict, events: int = 3) -> socket.socket:
    """POST a streamed completion on a raw socket and read ``events`` SSE events; the caller
    closes the socket (a client that disconnects mid-stream)."""
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(
        f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    got = b""
    while got.count(b"data: ") < events:
        chunk = sock.recv(4096)
        assert chunk
        got += chunk
    return sock


def wait_until(predicate, timeout_s: float = 10.0, interval_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()


def get_json(url: str, timeout: float = 10.0) -> tuple[int, object]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


# -- real server processes -------------------------------------------------------------
class ServerProcess:
    """A launcher command (deepspeed / torchrun / python) serving HTTP on ``port``."""

    def __init__(self, cmd: list[str], port: int, log_path, env: dict | None = None) -> None:
        import os
        import subprocess

        from tests.helpers.launcher import REPO

        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        full_env = dict(os.environ)
        full_env.update({"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"})
        full_env.update(env or {})
        self._log = open(log_path, "w")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # so a cleanup can end the whole tree
        )

    @classmethod
    def stories_tp2(cls, model_dir, log_path, *flags: str) -> ServerProcess:
        """``deepspeed --num_gpus 2 launch/serve.py`` on a stories260k folder, fp32, as 'stories'."""
        from tests.helpers.launcher import DEEPSPEED, free_port

        port = free_port()
        cmd = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), "launch/serve.py"]
        cmd += ["--model", str(model_dir), "--served-model-name", "stories", "--dtype", "float32"]
        cmd += ["--port", str(port), "--heartbeat-interval", "0.5", *flags]
        return cls(cmd, port, log_path)

    def log(self, tail: int = 4000) -> str:
        self._log.flush()
        return open(self.log_path).read()[-tail:]

    def wait_healthy(self, timeout_s: float = 240.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                status, _ = get_json(f"{self.url}/health", timeout=2)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"server not healthy after {timeout_s:.0f} s:\n{self.log()}")

    def wait_exit(self, timeout_s: float) -> int | None:
        import subprocess

        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        """End the launcher's whole process group (only what this test started)."""
        import os
        import signal

        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            if self.wait_exit(30) is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        else:
            import contextlib

            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # stragglers of a dead launcher
        self._log.close()


def rank_pids(launcher_pid: int) -> dict[int, int]:
    """{local rank: pid} of serve.py processes under a launcher (from their --local_rank / env)."""
    import psutil

    ranks = {}
    for child in psutil.Process(launcher_pid).children(recursive=True):
        try:
            cmd = child.cmdline()
            env_rank = child.environ().get("RANK")
        except psutil.Error:
            continue
        if any(part.endswith("serve.py") for part in cmd) and env_rank is not None:
            ranks[int(env_rank)] = child.pid
    return ranks


def with_chat_template(src, dst, template: str):
    """A copy of checkpoint ``src`` (weights symlinked) whose tokenizer has ``template``."""
    import shutil
    from pathlib import Path

    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.name == "tokenizer_config.json":
            cfg = json.loads(item.read_text())
            cfg["chat_template"] = template
            (dst / item.name).write_text(json.dumps(cfg))
        elif item.suffix in (".safetensors", ".bin"):
            (dst / item.name).symlink_to(item)
        else:
            shutil.copy(item, dst / item.name)
    return dst


SIMPLE_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


# -- in-process servers with the fake engine -----------------------------------------------
API_KEY = "sk-test-123"  # the ``strict`` server's (tests/server/conftest.py)


def serve_fake(engine, **config):
    """(engine loop, InProcessServer) for a fake engine, named 'fake-model'; ``config``:
    ServerConfig fields, and ``loop``: EngineLoop keyword arguments."""
    from dstp.server.app import create_app
    from dstp.server.engine_loop import EngineLoop
    from dstp.server.limits import http_threads
    from dstp.server.serving import ServerConfig

    loop = EngineLoop(engine, heartbeat_interval_s=0.2, **config.pop("loop", {}))
    loop.start()
    cfg = ServerConfig(
        model_name="fake-model",
        max_model_len=engine.max_model_len,
        vocab_size=engine.vocab_size,
        block_size=engine.block_size,
        eos_ids=engine.eos_ids,
        **config,
    )
    server = InProcessServer.start(
        create_app(loop, engine.tokenizer, cfg),
        threads=http_threads(loop.max_queued_requests),  # sized as in production
        max_body_bytes=cfg.max_body_bytes,
    )
    return loop, server


def openai_client(url: str, key: str = "unused", timeout: float = 30):
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=timeout)


def encode(engine, text: str) -> list[int]:
    return engine.tokenizer.encode(text)


def chat_ids(engine, messages) -> list[int]:
    """The ids the chat template renders for ``messages`` (what the server sends the engine)."""
    text = engine.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    return engine.tokenizer.encode(text, add_special_tokens=False)
