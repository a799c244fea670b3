"""Decode steps as CUDA graphs (``--cuda-graphs``), checked on a CPU.

A CUDA graph replays the captured kernels on the captured addresses, whatever Python
would do now. :class:`ReplayingApi` holds the engine to that contract: its capture runs
the forward and records every tensor it reads that the forward did not make (weights,
the cache, the bucket's buffers); each replay runs it again and fails if it reads any
other memory, then writes into the captured output, as a graph does. Over it the engine
must give the eager buckets' tokens. The real capture ran on an H200 (benchmarks/FINDINGS.md).
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dstp.engine.llm_engine import Engine, EngineConfig
from dstp.engine.outputs import CompletionOutput
from dstp.engine.sampling_params import SamplingParams
from dstp.worker import model_runner
from dstp.worker.cuda_graphs import DecodeGraphs
from tests.helpers.decode_steps import Sequences, serve_staggered
from tests.helpers.tiny_models import llama_config, save_random_model

BLOCK = 4
MAX_LEN = 64


class _ExternalReads(TorchDispatchMode):
    """The storages an op reads that no earlier op of this run made."""

    def __init__(self) -> None:
        super().__init__()
        self.made: set[int] = set()
        self.read: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for arg in torch.utils._pytree.tree_leaves((args, kwargs)):
            if isinstance(arg, torch.Tensor) and arg.untyped_storage().data_ptr() not in self.made:
                self.read.add(arg.untyped_storage().data_ptr())
        out = func(*args, **(kwargs or {}))
        for res in torch.utils._pytree.tree_leaves(out):
            if isinstance(res, torch.Tensor):
                self.made.add(res.untyped_storage().data_ptr())
        return out


class ReplayingApi:
    """A CUDA graph's contract on a CPU: replay reads what capture read, into one output."""

    def __init__(self, fail_at_capture: int | None = None) -> None:
        self.fail_at_capture = fail_at_capture
        self.captured: list[int] = []  # output rows of each capture, in order
        self.replays = 0

    def capture(self, forward, pool):
        if len(self.captured) == self.fail_at_capture:
            raise RuntimeError("operation not permitted when stream is capturing")
        with _ExternalReads() as reads:
            output = forward().clone()
        self.captured.append(output.shape[0])
        return (forward, output, reads.read), output, (pool or 0) + 1

    def replay(self, graph) -> None:
        forward, output, captured_reads = graph
        with _ExternalReads() as reads:
            fresh = forward()
        assert reads.read == captured_reads, "a replay would read memory the capture did not"
        output.copy_(fresh)
        self.replays += 1


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    config = llama_config(num_attention_heads=8, num_key_value_heads=2, vocab_size=256)
    return save_random_model(config, tmp_path_factory.mktemp("graphs") / "llama")


def _engine(path, **kwargs) -> Engine:
    config = EngineConfig(
        model=str(path),
        dtype="float32",
        max_model_len=MAX_LEN,
        max_num_seqs=4,
        block_size=BLOCK,
        num_blocks=4 * (MAX_LEN // BLOCK),
        **kwargs,
    )
    return Engine(config)


def _with_api(monkeypatch, api: ReplayingApi) -> None:
    """The runner gets graphs over ``api`` whatever its device (CPU here)."""
    monkeypatch.setattr(
        model_runner.ModelRunner, "_decode_graphs", lambda self, config: DecodeGraphs(api)
    )


def _serve(engine: Engine) -> dict[str, CompletionOutput]:
    """The staggered requests of the bucket tests, with ``logprobs`` so the sampled rows'
    logits are compared, not only their ids."""
    return serve_staggered(engine, SamplingParams(max_tokens=10, temperature=0, logprobs=2))


def _same(got: dict[str, CompletionOutput], want: dict[str, CompletionOutput]) -> None:
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].token_ids == want[key].token_ids, key
        for mine, theirs in zip(got[key].logprobs, want[key].logprobs, strict=True):
            assert mine.top.keys() == theirs.top.keys()
            torch.testing.assert_close(
                [mine.logprob, *mine.top.values()], [theirs.logprob, *theirs.top.values()]
            )


def test_replayed_graphs_serve_the_eager_buckets_tokens(llama, monkeypatch):
    """Captured at start-up, largest bucket first, over the serving cache (the probe's
    steps run eagerly); every later decode-only step replays; tokens and logprobs are
    the eager buckets'."""
    want = _serve(_engine(llama, bucket_decode=True))
    api = ReplayingApi()
    _with_api(monkeypatch, api)
    engine = _engine(llama, cuda_graphs=True)
    graphs = engine.runner.decode.graphs
    assert api.captured == [4, 2, 1] and graphs.shapes == ((1, 16), (2, 16), (4, 16))
    assert graphs.failure is None and api.replays == 0  # the probe ran over its own cache
    _same(_serve(engine), want)
    assert api.replays == 19  # every decode-only step of this pattern


def test_a_failed_capture_leaves_every_bucket_eager(llama, monkeypatch, caplog):
    want = _serve(_engine(llama, bucket_decode=True))
    api = ReplayingApi(fail_at_capture=1)
    _with_api(monkeypatch, api)
    with caplog.at_level(logging.WARNING, logger="dstp"):
        engine = _engine(llama, cuda_graphs=True)
    graphs = engine.runner.decode.graphs
    assert graphs.shapes == () and "not permitted when stream is capturing" in graphs.failure
    assert "CUDA graph capture failed, decode runs eagerly" in caplog.text
    _same(_serve(engine), want)
    assert api.replays == 0


def test_off_cuda_the_flag_runs_the_buckets_eagerly_and_says_so(llama, caplog):
    with caplog.at_level(logging.WARNING, logger="dstp"):
        engine = _engine(llama, cuda_graphs=True)
    assert engine.runner.decode is not None and engine.runner.decode.graphs is None
    assert "--cuda-graphs: the device is cpu, not CUDA" in caplog.text


@pytest.mark.parametrize("graphs", [None, False])
def test_on_cuda_graphs_are_the_default_and_enforce_eager_turns_them_off(
    llama, monkeypatch, graphs
):
    """On tests/helpers/fake_cuda.py's card, left to its default the runner pads decode
    steps and captures them; ``--enforce-eager`` (False) keeps the packed eager steps."""
    from tests.helpers.fake_cuda import fake_cuda_rank

    api = ReplayingApi()
    monkeypatch.setattr(DecodeGraphs, "for_device", classmethod(lambda cls, device: cls(api)))
    with fake_cuda_rank(total_gib=0.05):
        runner = _engine(llama, cuda_graphs=graphs).runner
    if graphs is None:
        assert runner.decode.graphs.shapes == ((1, 16), (2, 16), (4, 16))
        assert runner.cache.scratch_block is not None
    else:
        assert runner.decode is None and runner.cache.scratch_block is None
        assert api.captured == []


def test_off_cuda_the_default_keeps_packed_steps_silently(llama, caplog):
    with caplog.at_level(logging.WARNING, logger="dstp"):
        runner = _engine(llama).runner
    assert runner.decode is None and runner.cache.scratch_block is None
    assert "cuda-graphs" not in caplog.text


def test_a_replayed_step_on_the_fake_card_uploads_once_and_reads_nothing(llama, monkeypatch):
    """On tests/helpers/fake_cuda.py's card: a decode step that replays a graph still
    makes one upload (into the captured buffers) and no read back in the runner."""
    from tests.helpers.fake_cuda import fake_cuda_rank

    api = ReplayingApi()
    _with_api(monkeypatch, api)
    with fake_cuda_rank(total_gib=0.05) as device:
        runner = _engine(llama, cuda_graphs=True).runner
        seqs = Sequences(3, runner.num_blocks, runner.vocab_size, 3)
        runner.execute(seqs.prefill())
        for _ in range(3):
            device.transfers.reset()
            before = api.replays
            logits = runner.execute(seqs.decode())
            counts, sites = device.transfers.snapshot(), device.transfers.sites
            assert api.replays == before + 1 and logits.shape == (3, runner.vocab_size)
            assert counts["upload"] == 1 and "step_inputs.py" in sites["upload"][0], sites
            assert counts["download"] == counts["sync"] == 0, sites


def test_the_kv_budget_leaves_the_graphs_their_pool(monkeypatch):
    """On the fake card: with ``cuda_graphs`` the KV cache gets the largest decode shape's
    attention gather less (the graphs' pool keeps one forward of that shape for good)."""
    import gc

    from tests.helpers.fake_cuda import fake_cuda_rank
    from tests.helpers.tiny_models import stories_decode_heavy

    _with_api(monkeypatch, ReplayingApi())
    budgets = {}
    with fake_cuda_rank(total_gib=0.05):
        for graphs in (False, True):
            config = stories_decode_heavy(cuda_graphs=graphs)
            runner = Engine(config).runner
            budgets[graphs] = runner.kv_budget
            worst = runner._worst_step(config, runner._cache_shape(config))
            del runner
            gc.collect()
    assert "kept by --cuda-graphs" in budgets[True].reason
    assert "cuda-graphs" not in budgets[False].reason
    kept = budgets[False].nbytes - budgets[True].nbytes
    assert abs(kept - worst.decode_gather) < 2**20, (kept, worst.decode_gather)


@pytest.mark.parametrize(
    "asked, device, size, comm, why_not",
    [
        (None, "cuda:0", 1, "cuda:0", None),  # the default where graphs run
        (False, "cuda:0", 1, "cuda:0", "--enforce-eager"),
        (None, "cpu", 1, "cpu", "the device is cpu, not CUDA"),
        (None, "cuda:0", 2, "cuda:0", "at TP>1 they are captured only when asked for"),
        (True, "cuda:0", 2, "cuda:0", None),  # asked for: NCCL inside the graphs
        (True, "cuda:0", 2, "cpu", "the ranks all-reduce over gloo (sharing a GPU)"),
    ],
)
def test_where_decode_is_captured(asked, device, size, comm, why_not):
    from types import SimpleNamespace

    tp = SimpleNamespace(size=size, device=torch.device(device), comm_device=torch.device(comm))
    got = model_runner.ModelRunner._graphs_why_not(
        SimpleNamespace(tp=tp), EngineConfig(model="m", cuda_graphs=asked)
    )
    assert got == why_not or (why_not is not None and got.startswith(why_not)), got
