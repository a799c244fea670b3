"""GPU ranks' device set-up, checked with a stand-in accelerator and the fake CUDA stubs:
one GPU per local rank under NCCL (else a start-up error naming the fix), a CPU thread
cap, and every thread that runs CUDA work on its rank's device."""

from __future__ import annotations

import os
import threading
from types import SimpleNamespace

import pytest
import torch

from dstp import distributed
from dstp.distributed import DeviceLayoutError, bind_thread_device
from dstp.model.default_model import build_tokenizer
from dstp.server.engine_loop import EngineLoop
from tests.helpers.fake_cuda import fake_cuda
from tests.helpers.fake_engine import FakeEngine


class _Accelerator:
    def __init__(self, count: int) -> None:
        self.count, self.bound = count, []

    def device_name(self, index: int | None = None) -> str:
        return "cuda" if index is None else f"cuda:{index}"

    def device_count(self) -> int:
        return self.count

    def set_device(self, index: int) -> None:
        self.bound.append(index)


@pytest.fixture
def threads(monkeypatch):
    """torch.set_num_threads calls, on a host of 64 cores."""
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    monkeypatch.setattr(distributed, "_usable_cores", lambda: list(range(64)))
    monkeypatch.delenv("DSTP_THREADS", raising=False)
    return calls


def test_each_local_rank_gets_its_gpu_and_a_share_of_the_cores(threads):
    accel = _Accelerator(8)
    device = distributed._bind_device(accel, rank=11, local_rank=3, local_size=8, backend="nccl")
    assert device == torch.device("cuda:3") and accel.bound == [3]
    assert threads == [8]  # 64 cores over 8 local ranks, not 64 threads each


def test_the_thread_cap_follows_dstp_threads(threads, monkeypatch):
    monkeypatch.setenv("DSTP_THREADS", "3")
    distributed._bind_device(_Accelerator(2), rank=0, local_rank=0, local_size=2, backend="nccl")
    assert threads == [3]


@pytest.mark.parametrize("local_rank", [0, 3])
def test_more_local_ranks_than_gpus_under_nccl_is_a_start_up_error(threads, local_rank):
    """On every local rank: one with a GPU of its own would otherwise wait for the others
    in the rendezvous until the process group's timeout."""
    accel = _Accelerator(2)
    with pytest.raises(DeviceLayoutError) as error:
        distributed._bind_device(accel, rank=local_rank, local_rank=local_rank, local_size=4)
    message = str(error.value)
    assert "4 ranks on this host but it shows 2 GPU(s)" in message
    assert "--include localhost:0,1" in message and "CUDA_VISIBLE_DEVICES" in message
    assert accel.bound == []  # nothing bound: NCCL would fail later with a duplicate GPU


def test_gloo_may_share_a_gpu(threads, caplog):
    accel = _Accelerator(2)
    device = distributed._bind_device(accel, rank=3, local_rank=3, local_size=4, backend="gloo")
    assert device == torch.device("cuda:1") and accel.bound == [1]
    assert "rank 3 on device 1, shared over gloo" in caplog.text


def test_bind_thread_device_sets_the_threads_cuda_device():
    with fake_cuda(total_gib=0.001) as card:
        worker = threading.Thread(
            target=bind_thread_device, args=(torch.device("cuda:3"),), name="worker"
        )
        worker.start()
        worker.join()
        bind_thread_device(torch.device("cpu"))  # nothing to set on the CPU
    assert card.set_device_calls == [("worker", 3)]


def test_the_engine_thread_runs_on_its_ranks_gpu():
    engine = FakeEngine(build_tokenizer())
    engine.tp = SimpleNamespace(rank=0, size=1, is_driver=True, device=torch.device("cuda:5"))
    with fake_cuda(total_gib=0.001) as card:
        loop = EngineLoop(engine, heartbeat_interval_s=0.1)
        loop.start()
        loop.stop()
    assert ("dstp-engine", 5) in card.set_device_calls


class _Joined(Exception):
    """Stops _join_world at its first join, with what it was joined with."""


@pytest.mark.parametrize("gpus, binds_itself", [(1, True), (2, False)])
def test_ranks_sharing_a_gpu_join_without_binding_one(monkeypatch, gpus, binds_itself):
    """Two local ranks over gloo on one GPU: DeepSpeed would pass device_id=cuda:1 to
    init_process_group, which does not exist (rank 1 failed so on an H200, rank 0 then
    waited in the rendezvous); dstp joins first, with no device. With a GPU each it
    leaves the join, device binding and all, to DeepSpeed."""
    import deepspeed
    import torch.distributed as tdist

    def joined(*args, **kwargs):
        raise _Joined(("torch", args, kwargs))

    def deepspeed_joined(**kwargs):
        raise _Joined(("deepspeed", (), kwargs))

    monkeypatch.setattr(tdist, "init_process_group", joined)
    monkeypatch.setattr(deepspeed, "init_distributed", deepspeed_joined)
    # _join_world sets MASTER_PORT and LOCAL_SIZE defaults: kept out of this process's env,
    # where every later rank would inherit them (a TP=4 rank told LOCAL_SIZE=2 by it crashed
    # in DeepSpeed's shared-memory all-reduce)
    monkeypatch.setattr(os, "environ", dict(os.environ))
    with pytest.raises(_Joined) as first:
        distributed._join_world(_Accelerator(gpus), "gloo", 1, 2, timeout_s=30)
    who, args, kwargs = first.value.args[0]
    assert who == ("torch" if binds_itself else "deepspeed")
    if binds_itself:
        assert args == ("gloo",) and "device_id" not in kwargs
