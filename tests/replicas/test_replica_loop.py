"""The replica's engine loop and rank 0's proxy, in one process over a pipe (no ranks).

``serve_replica`` runs the same :class:`~dstp.engine.loop.StepLoop` as the HTTP rank: a
batch of adds comes in, each step's outputs go back typed, a shutdown ends it with a
bye. Rank 0's :class:`RemoteReplica` names the replica when it goes silent or a step
overruns its deadline (one :class:`~dstp.engine.loop.Liveness` judges both).
"""

from __future__ import annotations

import queue
import threading
import time
from multiprocessing import Pipe
from types import SimpleNamespace

import pytest

from dstp.engine.loop import Call, Liveness
from dstp.engine.sampling_params import SamplingParams
from dstp.model.default_model import build_tokenizer
from dstp.replicas.proxy import RemoteReplica
from dstp.replicas.server import serve_replica
from dstp.replicas.transport import Add, Alive, Batch, Bye, Hello, Link, Outputs, Shutdown
from tests.helpers.fake_engine import FakeEngine


def _replica_engine() -> FakeEngine:
    engine = FakeEngine(build_tokenizer())
    engine.tp = SimpleNamespace(describe=lambda: "replica 1 (global rank 1)")
    return engine


def _receive_until(link: Link, done, timeout_s: float = 10.0) -> list:
    got, deadline = [], time.monotonic() + timeout_s
    while time.monotonic() < deadline and not done(got):
        got += link.receive(0.1)
    return got


def _finished(got: list) -> bool:
    """Both requests' final outputs arrived."""
    ended = {o.request_id for m in got if isinstance(m, Outputs) for o in m.outputs if o.finished}
    return ended == {"a", "b"}


def _said_bye(got: list) -> bool:
    return any(isinstance(m, Bye) for m in got)


def test_replica_loop_serves_a_batch_and_says_bye():
    mine, theirs = Pipe()
    engine = _replica_engine()
    codes: list[int] = []
    loop = threading.Thread(
        target=lambda: codes.append(serve_replica(engine, Link(theirs), 0.05, 0.05))
    )
    loop.start()
    rank0 = Link(mine)
    prompt = engine.tokenizer.encode("Once upon a time")
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    rank0.send(Batch([Add("a", prompt, params), Add("b", prompt, params)]))
    got = _receive_until(rank0, _finished)
    assert _finished(got), got
    outs = [m for m in got if isinstance(m, Outputs)]
    assert all(m.stats["kv_blocks_total"] == engine.num_blocks for m in outs)
    of_a = [o for m in outs for o in m.outputs if o.request_id == "a"]
    assert sum(len(c.new_token_ids) for o in of_a for c in o.outputs) == 5
    assert any(isinstance(m, Alive) for m in _receive_until(rank0, lambda g: len(g) > 2))
    rank0.send(Shutdown())
    assert _said_bye(_receive_until(rank0, _said_bye))
    loop.join(5)
    assert codes == [0] and engine.shut_down


def test_replica_loop_stops_when_rank_0_is_gone():
    mine, theirs = Pipe()
    codes: list[int] = []
    loop = threading.Thread(
        target=lambda: codes.append(serve_replica(_replica_engine(), Link(theirs), 0.05, 0.05))
    )
    loop.start()
    mine.close()
    loop.join(5)
    assert codes == [1]


def _wait_for(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)


def _proxy(liveness: Liveness) -> tuple[RemoteReplica, Link]:
    mine, theirs = Pipe()
    hello = Hello(replica=1, max_model_len=256, vocab_size=512, pid=0, stats={"num_running": 0})
    proxy = RemoteReplica(
        1, "replica 1 (global rank 1)", Link(mine, hello), queue.Queue(), liveness
    )
    return proxy, Link(theirs)


def test_proxy_names_a_silent_replica():
    proxy, _replica = _proxy(Liveness(heartbeat_timeout_s=2.0))
    proxy.check()  # just heard from
    time.sleep(2.5)
    with pytest.raises(RuntimeError, match=r"replica 1 \(global rank 1\) failed: silent for"):
        proxy.check()


def test_proxy_tells_a_long_step_from_a_hung_one():
    proxy, replica = _proxy(Liveness(heartbeat_timeout_s=2.0, step_timeout_s=5.0))
    replica.send(Alive(Call("step", 3.0)))  # a long step, within its deadline
    _wait_for(lambda: proxy.call is not None)
    proxy.check()
    replica.send(Alive(Call("heartbeat", 3.0)))  # a heartbeat that long: a rank hangs
    _wait_for(lambda: proxy.call is not None and proxy.call.what == "heartbeat")
    with pytest.raises(RuntimeError, match="engine heartbeat did not return within 2 s"):
        proxy.check()
