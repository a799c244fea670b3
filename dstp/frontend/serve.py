"""``dstp serve`` outside a launcher: the front-end process and its engine job.

The front-end owns the HTTP port, the tokenizer (chat templates, /tokenize), the metrics
and the journal; the ranks run as an engine job under the ``deepspeed`` launcher, which
the front-end starts with the same serve flags. HTTP threads therefore never share a GIL
with rank 0's engine loop.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import threading
import time

from dstp.engine.loop import Liveness
from dstp.frontend.engine import SupervisedEngine
from dstp.frontend.job import EngineJob
from dstp.frontend.wire import FrontendListener
from dstp.replicas.transport import Link

log = logging.getLogger("dstp")


def serve_argv(argv: list[str]) -> list[str]:
    """The serve flags of this command line (after ``serve`` for ``dstp serve``), which
    the engine job's ranks get unchanged."""
    args = argv[1:]
    if "serve" in args and args.index("serve") < next(
        (i for i, a in enumerate(args) if a.startswith("--")), len(args)
    ):
        args = args[args.index("serve") + 1 :]
    return args


def run_frontend(args: argparse.Namespace, bind, serve) -> int:
    """Start the engine job, then serve HTTP through ``serve`` (the in-process server's
    own loop: signals, pump, shutdown). ``bind`` opens the port first."""
    from dstp.engine.tokenizer import load_tokenizer
    from dstp.model.default_model import resolve_model
    from dstp.server.wsgi import LazyApp

    model, builtin = resolve_model(args.model)
    lazy = LazyApp()
    server = bind(args, lazy)  # before the ranks load: a taken port fails in seconds
    if server is None:
        return 1
    starter = JobStarter(args, serve_argv(sys.argv))
    log.info(
        "supervised mode: this front-end serves HTTP and starts TP=%d engine ranks with the "
        "deepspeed launcher (restarted up to %d times if one dies)",
        args.tensor_parallel_size,
        args.max_restarts,
    )
    try:
        engine = SupervisedEngine(
            starter,
            load_tokenizer(model, args.trust_remote_code),
            tp_size=args.tensor_parallel_size,
            max_restarts=args.max_restarts,
            liveness=Liveness(args.rank_timeout, args.step_timeout),
        )
    except (ConnectionError, TimeoutError, OSError) as exc:
        log.error("the engine job did not start: %s", exc)
        server.close()
        return 1
    return serve(args, engine, server, lazy, model, builtin)


START_TIMEOUT_S = 900.0  # a cold start builds DeepSpeed's shm op (about a minute) and loads


class JobStarter:
    """Starts engine jobs with this server's flags: :meth:`spawn` runs the launcher (on a
    thread that outlives the job: its parent-death signal follows that thread), and
    :meth:`connect` waits for the job's rank 0 (on any thread)."""

    def __init__(self, args: argparse.Namespace, argv: list[str]) -> None:
        self.args, self.argv = args, argv
        self.launcher_args = shlex.split(args.launcher_args)
        self._listeners: dict[int, FrontendListener] = {}

    def spawn(self) -> EngineJob:
        listener = FrontendListener(_listen_host(self.launcher_args))
        try:
            job = EngineJob(
                self.args.tensor_parallel_size, self.launcher_args, self.argv, listener.env()
            )
        except BaseException:
            listener.close()
            raise
        self._listeners[id(job)] = listener
        return job

    def connect(self, job: EngineJob) -> Link:
        listener = self._listeners.pop(id(job))
        try:
            link = _accept(listener, job)
            job.record_ranks()
            return link
        except BaseException:
            job.kill()
            raise
        finally:
            listener.close()


def _listen_host(launcher_args: list[str]) -> str:
    """127.0.0.1 unless the job may run on other hosts (a hostfile)."""
    if any(a.startswith("--hostfile") for a in launcher_args):
        import socket

        return socket.gethostbyname(socket.gethostname())
    return "127.0.0.1"


def _accept(listener: FrontendListener, job: EngineJob) -> Link:
    """The job's rank 0 link, unless the job exits or takes too long first."""
    result: list[Link | BaseException] = []

    def accept() -> None:
        try:
            result.append(listener.accept())
        except BaseException as exc:  # the listener closed, or a bad Hello
            result.append(exc)

    thread = threading.Thread(target=accept, name="dstp-job-accept", daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while thread.is_alive():
        thread.join(0.2)
        code = job.exited()
        if code is not None and thread.is_alive():
            raise ConnectionError(f"the engine job exited with code {code} before it served")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the engine job did not connect within {START_TIMEOUT_S:.0f} s")
    if isinstance(result[0], BaseException):
        raise ConnectionError(f"the engine job's rank 0 could not connect: {result[0]}")
    return result[0]
