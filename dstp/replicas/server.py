"""The engine loop of another replica's driver rank: commands from global rank 0's link,
outputs back over it (:class:`~dstp.engine.loop.StepLoop`, as on the HTTP rank)."""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import TYPE_CHECKING, Any

from dstp.engine.loop import Liveness, StepLoop
from dstp.engine.outputs import CompletionOutput, RequestOutput
from dstp.engine.protocol import EngineClient
from dstp.engine.sampling_params import SamplingParams
from dstp.replicas.transport import Abort, Add, Alive, Bye, Failed, Link, Outputs, Shutdown

if TYPE_CHECKING:
    from dstp.engine.llm_engine import Engine

log = logging.getLogger("dstp")

ALIVE_INTERVAL_S = 0.5  # a replica reports at least this often


class RankZeroGone(ConnectionError):
    """The link to global rank 0 closed: nobody routes to this replica any more."""


class ReplicaServer(StepLoop):
    """Adds and aborts arrive in batches; each step's outputs and stats go back as one
    message; idle, it heartbeats its own followers and reports their stats."""

    def __init__(self, engine: EngineClient, link: Link, heartbeat_interval_s: float) -> None:
        super().__init__(engine, Liveness(), heartbeat_interval_s)
        self.link = link

    def take(self, timeout_s: float) -> list[Any]:
        try:
            return self.link.receive(timeout_s)
        except (EOFError, OSError) as exc:
            raise RankZeroGone(repr(exc)) from exc

    def apply(self, command: Any) -> bool:
        if isinstance(command, Shutdown):
            return False
        rejected = [e for e in map(self._apply_item, command.items) if e is not None]
        if rejected:  # answered at once: rank 0 counts them against this replica's load
            self.link.send(Outputs(rejected, self.engine.stats()))
        return True

    def stepped(self, outputs: list[RequestOutput], started: float) -> None:
        self.link.send(Outputs(outputs, self.engine.stats()))

    def beat(self) -> None:
        self.link.send(Alive(None, self.engine.stats()))

    def _apply_item(self, item: Add | Abort) -> RequestOutput | None:
        """Apply one add or abort; an add the engine refuses becomes an error output."""
        if isinstance(item, Abort):
            with contextlib.suppress(KeyError):
                self.engine.abort(item.request_id)
            return None
        try:
            resume = {"resume": item.resume} if item.resume else {}
            self.engine.add_request(item.request_id, item.prompt, item.params, **resume)
        except Exception as exc:  # rank 0 checked it; answer with an error output
            log.exception("add_request failed for %s", item.request_id)
            return _error_output(item.request_id, item.prompt, item.params, exc)
        return None


def serve_replica(
    engine: Engine,
    link: Link,
    heartbeat_interval_s: float = 1.0,
    alive_interval_s: float = ALIVE_INTERVAL_S,
) -> int:
    """Run this replica for global rank 0 until it says shut down; the exit code.

    A thread reports liveness (and how long the current call has run) every
    ``alive_interval_s``, so rank 0 tells a long step from a hung rank. A failure is
    reported to rank 0, naming this replica.
    """
    name = engine.tp.describe()
    server = ReplicaServer(engine, link, heartbeat_interval_s)
    stop = threading.Event()
    reporter = threading.Thread(
        target=_report_alive,
        args=(server, stop, alive_interval_s),
        name="dstp-replica-alive",
        daemon=True,
    )
    reporter.start()
    try:
        server.run_steps()
        log.info("%s: released by global rank 0", name)
        engine.shutdown()
        with contextlib.suppress(OSError):
            link.send(Bye())
        return 0
    except RankZeroGone as exc:
        log.error("%s: global rank 0 is gone (%s); stopping", name, exc)
        with contextlib.suppress(Exception):
            engine.shutdown()  # release this replica's followers
        return 1
    except BaseException as exc:  # a collective or the shared forward failed
        log.error("%s failed: %r; stopping", name, exc, exc_info=exc)
        with contextlib.suppress(Exception):
            link.send(Failed(f"{type(exc).__name__}: {exc}"))
        return 1
    finally:
        stop.set()


def _report_alive(server: ReplicaServer, stop: threading.Event, interval_s: float) -> None:
    while not stop.wait(interval_s):
        try:
            server.link.send(Alive(server.liveness.current()))
        except OSError:
            return


def _error_output(
    request_id: str, prompt: list[int], params: SamplingParams, exc: BaseException
) -> RequestOutput:
    return RequestOutput(
        request_id,
        prompt,
        [CompletionOutput(i, [], "", finish_reason="error") for i in range(params.n)],
        True,
        error=f"{type(exc).__name__}: {exc}",
    )
