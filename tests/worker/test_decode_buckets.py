"""Decode steps at padded batch buckets over preallocated buffers (issue 22, item 3).

Bucket choice; a padded step gives every real row the logits of the unpadded step, bit for
bit, and writes no block but its own tokens' slots and the scratch block; the buffers are
allocated once; and the decode forward at each bucket compiles under
``torch.compile(fullgraph=True, dynamic=False)``, equals eager, and is not recompiled by
later steps of the same bucket.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from dstp.engine.llm_engine import Engine, EngineConfig
from dstp.worker.decode_buckets import bucket_for, bucket_sizes, compiled_forward, width_sizes
from dstp.worker.step_plan import StepPlan
from tests.helpers.decode_steps import Sequences, serve_staggered
from tests.helpers.policy_models import build_architectures
from tests.helpers.tiny_models import llama_config, save_random_model

BLOCK = 4
MAX_LEN = 64
WIDTH = MAX_LEN // BLOCK  # the one table width at this length (width_sizes)


def test_bucket_sizes_are_vllms_capture_sizes():
    assert bucket_sizes(1) == (1,)
    assert bucket_sizes(3) == (1, 2, 3)
    assert bucket_sizes(8) == (1, 2, 4, 8)
    assert bucket_sizes(40) == (1, 2, 4, 8, 16, 24, 32, 40)
    assert bucket_sizes(64)[-3:] == (48, 56, 64)
    assert bucket_sizes(30) == (1, 2, 4, 8, 16, 24, 30)  # max_num_seqs itself is the last


def test_bucket_for_takes_the_smallest_that_holds_the_batch():
    sizes = bucket_sizes(30)
    assert [bucket_for(n, sizes) for n in (1, 2, 3, 5, 8, 9, 17, 24, 25, 30)] == [
        1, 2, 4, 8, 8, 16, 24, 24, 30, 30,
    ]  # fmt: skip
    assert bucket_for(31, sizes) is None


# -- a runner over a tiny model, plans made by hand ------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("buckets")
    config = llama_config(num_attention_heads=8, num_key_value_heads=2, vocab_size=256)
    paths = {"llama": save_random_model(config, root / "llama")}
    # Gemma 2: soft-capped, windowed attention (the decode path's masks)
    paths.update(build_architectures(root, ["gemma2"]))
    return paths


def _engine(path, dtype: str, max_num_seqs: int = 8, **kwargs) -> Engine:
    return Engine(
        EngineConfig(
            model=str(path),
            dtype=dtype,
            max_model_len=MAX_LEN,
            max_num_seqs=max_num_seqs,
            block_size=BLOCK,
            num_blocks=4 * (MAX_LEN // BLOCK),
            bucket_decode=True,
            **kwargs,
        )
    )


def _cache_state(runner) -> list[torch.Tensor]:
    return [runner.cache.keys.clone(), runner.cache.values.clone()]


def _first_rows(plan: StepPlan, n: int) -> StepPlan:
    """The decode plan of ``plan``'s first ``n`` sequences."""
    width = -(-int(plan.context_lens[:n].max()) // BLOCK)
    return StepPlan(
        input_ids=plan.input_ids[:n],
        positions=plan.positions[:n],
        slot_mapping=plan.slot_mapping[:n],
        query_starts=plan.query_starts[: n + 1],
        context_lens=plan.context_lens[:n],
        block_tables=plan.block_tables[:n, :width],
        sample_rows=plan.sample_rows[:n],
        copies=plan.copies,
    )


# Bit-exact bucketed == unbucketed is not what a BLAS gives: MKL's (and oneDNN's) GEMM
# rounds a row differently depending on how many rows the call has (F.linear of 2 rows
# vs the same 2 rows among 8 differ in the last bit, fp32 and bf16 alike), so a step
# at 8 rows cannot reproduce a step at 5 bit for bit, padded or not. What padding must
# never do, change a real row, is checked exactly: n real rows padded to bucket b give
# the logits those rows get beside b - n other real sequences in an unpadded step of b.
# Against the unbucketed step of n rows the logits agree to GEMM rounding.
CLOSE = {"float32": dict(rtol=1e-5, atol=1e-5), "bfloat16": dict(rtol=0.05, atol=0.05)}


@pytest.mark.parametrize(
    ("model", "dtype"), [("llama", "float32"), ("llama", "bfloat16"), ("gemma2", "float32")]
)
def test_padding_never_changes_a_real_row(models, model, dtype, monkeypatch):
    """Batches of 3, 5, 6 and 7 (buckets 4 and 8), three steps each, crossing block
    boundaries: each real row's logits equal, bit for bit, its logits in a step of
    ``bucket`` real sequences; the cache changes only at the step's own slots (and the
    scratch block the padding rows write to); the unbucketed step agrees to rounding.

    AMX is hidden: the LM head runs on the sampled rows alone (n, not the bucket), and with
    AMX bf16 linears change kernel at 4 rows (kernels.AMX_ROW_LIMIT), so n and ``bucket``
    rows of it would round differently for a reason that is not the padding's."""
    from dstp.cpu import features as cpu_features

    flags = cpu_features.flags() - {"amx_bf16"}
    monkeypatch.setattr(cpu_features, "flags", lambda: flags)
    engine = _engine(models[model], dtype)
    runner = engine.runner
    bucketed, scratch = runner.decode, runner.cache.scratch_block
    assert scratch == runner.num_blocks  # one block past what the allocator hands out
    for n, seed in ((3, 0), (5, 1), (6, 2), (7, 3)):
        bucket = bucket_for(n, bucketed.sizes)
        seqs = Sequences(bucket, runner.num_blocks, runner.vocab_size, seed)
        runner.execute(seqs.prefill())
        for _ in range(3):
            full = seqs.decode()
            plan = _first_rows(full, n)
            before = _cache_state(runner)
            padded = runner.execute(plan)
            after = _cache_state(runner)
            padding = bucketed.buffers.inputs((bucket, WIDTH)).slot_mapping[n:]
            assert padding.numel() == bucket - n and padding.eq(scratch * BLOCK).all()
            beside_others = runner.execute(full)  # bucket real rows: no padding
            assert torch.equal(padded, beside_others[:n]), (model, dtype, n)
            written = torch.zeros(before[0].shape[2], dtype=torch.bool)
            written[plan.slot_mapping] = True
            written[scratch * BLOCK : (scratch + 1) * BLOCK] = True
            for old, new in zip(before, after, strict=True):
                assert torch.equal(old[:, :, ~written], new[:, :, ~written]), "a block was written"
                assert not torch.equal(old[:, :, plan.slot_mapping], new[:, :, plan.slot_mapping])
            runner.decode = None
            unpadded = runner.execute(plan)
            runner.decode = bucketed
            assert padded.shape == unpadded.shape == (n, runner.vocab_size)
            torch.testing.assert_close(padded, unpadded, **CLOSE[dtype])
            assert torch.equal(padded.argmax(-1), unpadded.argmax(-1))


def test_buffers_are_allocated_once(models):
    engine = _engine(models["llama"], "float32")
    runner = engine.runner
    buffers = runner.decode.buffers
    flat = buffers.flat.data_ptr()
    seen = {}
    seqs = Sequences(5, runner.num_blocks, runner.vocab_size, 7)
    runner.execute(seqs.prefill())
    for _ in range(4):
        runner.execute(seqs.decode())
        inputs = buffers.inputs((8, WIDTH))
        now = {
            name: getattr(inputs, name).data_ptr()
            for name in ("input_ids", "positions", "slot_mapping", "context_lens", "block_tables")
        }
        now["valid"] = inputs.valid.data_ptr()
        assert seen in ({}, now)
        seen = now
        assert buffers.flat.data_ptr() == flat
        assert runner.decode._metadata[8, WIDTH].decode_blocks is inputs.block_tables
    assert buffers.width == MAX_LEN // BLOCK
    assert buffers.flat.numel() == 8 * (5 + MAX_LEN // BLOCK)


def test_only_decode_only_steps_take_the_buckets(models):
    engine = _engine(models["llama"], "float32")
    runner = engine.runner

    def bucketed(plan: StepPlan) -> bool:
        args = (runner.cache, runner.attention_backend, runner.uploader)
        return runner.decode.run(plan, *args) is not None

    seqs = Sequences(3, runner.num_blocks, runner.vocab_size, 4)
    prefill = seqs.prefill()
    assert not bucketed(prefill)
    runner.execute(prefill)
    decode = seqs.decode()
    assert bucketed(decode)
    mixed = Sequences(2, runner.num_blocks, runner.vocab_size, 5).prefill()
    mixed.query_starts = torch.tensor([0, 1, int(mixed.num_tokens)])  # a decode, a prefill
    assert not bucketed(mixed)
    nine = Sequences(9, runner.num_blocks, runner.vocab_size, 6)
    nine.lens.fill_(1)
    assert not bucketed(nine.decode())  # past the largest bucket (max_num_seqs 8)


class CountingBackend:
    """A torch.compile backend that counts the graphs it is given and runs them as traced."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        self.graphs += 1
        return gm.forward


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_compiled_decode_at_each_bucket_equals_eager_and_compiles_once(models, dtype):
    """fullgraph=True, dynamic=False: a graph break or a data-dependent shape would raise.
    Buckets 1, 2 and 4: the compiled forward gives the eager logits exactly; a second
    round of steps at the same buckets compiles nothing."""
    engine = _engine(models["llama"], dtype, max_num_seqs=4)
    runner = engine.runner
    bucketed = runner.decode
    counter = CountingBackend()
    eager = bucketed.forward
    compiled = compiled_forward(eager, counter)
    groups = {n: Sequences(n, runner.num_blocks, runner.vocab_size, 10 + n) for n in (1, 2, 3)}
    for seqs in groups.values():
        runner.execute(seqs.prefill())
    for round_ in range(3):
        for n, seqs in groups.items():
            plan = seqs.decode()
            bucketed.forward = compiled
            got = runner.execute(plan)
            bucketed.forward = eager
            want = runner.execute(plan)
            assert torch.equal(got, want), (dtype, n, round_)
        if round_ == 0:
            assert counter.graphs == 3  # one per bucket: 1, 2, 4
    assert counter.graphs == 3  # later steps at the same buckets: no recompilation


def test_inductor_writes_the_cache_in_place(models):
    """The compiled step allocates no buffer a layer of the cache would fill: written as
    ``index_copy_`` on a layer's view, inductor copied that layer's whole cache every step
    (on an H200 the first 3.8 GiB copy ran out of memory). Bucket 1, the eager logits."""
    engine = _engine(models["llama"], "float32", max_num_seqs=1)
    runner = engine.runner
    bucketed = runner.decode
    eager = bucketed.forward
    seqs = Sequences(1, runner.num_blocks, runner.vocab_size, 30)
    runner.execute(seqs.prefill())
    plan = seqs.decode()
    bucketed.forward = compiled_forward(eager, "inductor")
    got, codes = run_and_get_code(runner.execute, plan)
    bucketed.forward = eager
    assert torch.allclose(got, runner.execute(plan), atol=1e-5, rtol=0)
    layer = runner.cache.keys[0].numel()
    shapes = [s for code in codes for s in re.findall(r"empty_strided_\w+\(\(([\d, ]+)\)", code)]
    sizes = [math.prod(int(d) for d in s.split(",") if d.strip()) for s in shapes]
    assert sizes and max(sizes) < layer, (max(sizes), layer)


def test_aot_eager_decode_equals_eager(models):
    """AOTAutograd's functionalized graph (dstp's kernels as custom ops with fake
    implementations, the cache write made functional and copied back): bf16, buckets 1
    and 4, the eager logits bit for bit."""
    engine = _engine(models["llama"], "bfloat16", max_num_seqs=4)
    runner = engine.runner
    bucketed = runner.decode
    eager = bucketed.forward
    compiled = compiled_forward(eager, "aot_eager")
    groups = {n: Sequences(n, runner.num_blocks, runner.vocab_size, 20 + n) for n in (1, 3)}
    for seqs in groups.values():
        runner.execute(seqs.prefill())
    for n, seqs in groups.items():
        plan = seqs.decode()
        bucketed.forward = compiled
        got = runner.execute(plan)
        bucketed.forward = eager
        assert torch.equal(got, runner.execute(plan)), n


def test_compile_decode_serves_the_eager_tokens(models):
    """``compile_decode`` end to end: every bucket compiled at start-up (padding rows
    alone, writing the scratch block only), the start-up probe's decode batch compiled
    too; then requests arriving while others decode (prefills between decode steps,
    batches of 1 to 4). The tokens are the uncompiled engine's, and Dynamo made one graph
    per bucket and cache, none while serving: the packed steps in between do not
    invalidate them."""
    from torch._dynamo.utils import counters

    from dstp.engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=12, temperature=0)
    runs = []
    for extra in ({}, {"compile_decode": "eager"}):
        graphs = counters["stats"]["unique_graphs"]
        engine = _engine(models["llama"], "float32", max_num_seqs=4, **extra)
        if extra:  # every bucket compiled at start-up, by steps that wrote the scratch block only
            cache, decode = engine.runner.cache, engine.runner.decode
            assert {key[0] for key in decode.compile_seconds if key[1] == cache.num_blocks} == {
                (1, WIDTH), (2, WIDTH), (4, WIDTH),
            }  # fmt: skip
            for data in (cache.keys, cache.values):
                assert not data[:, :, : cache.scratch_block * BLOCK].any()
                assert data[:, :, cache.scratch_block * BLOCK :].any()
            at_start = dict(decode.compile_seconds)
        done = {key: out.token_ids for key, out in serve_staggered(engine, params).items()}
        assert len(done) == 6 and all(len(ids) == 12 for ids in done.values())
        runs.append(done)
        if extra:
            compiled = engine.runner.decode.compile_seconds
            assert compiled == at_start  # nothing compiled while serving
            assert counters["stats"]["unique_graphs"] - graphs == len(compiled)
    assert runs[0] == runs[1]


def test_a_bucketed_decode_step_on_the_fake_card_uploads_once_and_reads_nothing(models):
    """The CUDA path on tests/helpers/fake_cuda.py: a bucketed decode step's inputs reach
    the card in one copy into the preallocated buffer (pinned, so non-blocking), nothing is
    read back in the runner, and no host tensor meets a device one (it would raise)."""
    from tests.helpers.fake_cuda import fake_cuda_rank, shadow

    with fake_cuda_rank(total_gib=0.05) as device:
        engine = _engine(models["llama"], "float32", gpu_memory_utilization=0.9)
        runner = engine.runner
        assert runner.cache.keys.device.type == "cuda"
        flat = runner.decode.buffers.flat
        assert flat.device.type == "cuda"
        seqs = Sequences(5, runner.num_blocks, runner.vocab_size, 3)
        runner.execute(seqs.prefill())
        for _ in range(3):
            plan = seqs.decode()
            device.transfers.reset()
            logits = runner.execute(plan)
            counts, sites = device.transfers.snapshot(), device.transfers.sites
            assert counts["upload"] == 1 and "step_inputs.py" in sites["upload"][0], sites
            assert counts["pageable_non_blocking"] == counts["implicit_upload"] == 0, sites
            assert counts["download"] == counts["sync"] == 0, sites
            assert logits.shape == (5, runner.vocab_size)
            assert runner.decode.buffers.flat is flat
        inputs = runner.decode.buffers.inputs((8, WIDTH))
        assert shadow(inputs.slot_mapping)[5:].eq(runner.cache.scratch_block * BLOCK).all()


def test_buckets_at_tp2_give_the_packed_tokens(models, tmp_path):
    """Two ranks (gloo): every rank pads the same plan the same way, so the row-parallel
    all-reduces line up; ``compile_decode`` at TP>1 runs the buckets uncompiled (the
    all-reduce is a graph break). Greedy tokens and logprobs are the packed path's."""
    import json

    from tests.helpers.launcher import run_ranks

    prompts = [[5, 6, 7, 8, 9], [9, 10], [11, 12, 13], [3] * 11, [40, 41]]
    base = dict(
        model=str(models["llama"]),
        dtype="float32",
        max_model_len=MAX_LEN,
        max_num_seqs=8,
        block_size=BLOCK,
        num_blocks=64,
    )
    params = [dict(max_tokens=9, temperature=0, logprobs=1)] * len(prompts)
    scenarios = {
        name: {"engine": dict(base, **extra), "prompts": prompts, "params": params}
        for name, extra in (
            ("packed", {}),
            ("buckets", {"bucket_decode": True}),
            ("compile_at_tp2", {"compile_decode": "eager"}),
        )
    }
    job, out = tmp_path / "job.json", tmp_path / "out.json"
    job.write_text(json.dumps({"scenarios": scenarios}))
    for proc in run_ranks(2, ["tests/helpers/workers/engine_run.py", str(job), str(out)]):
        assert proc.returncode == 0, proc.stdout[-3000:]
    results = json.loads(out.read_text())
    want = results["packed"]["outputs"]
    for name in ("buckets", "compile_at_tp2"):
        got = results[name]["outputs"]
        assert [o[0]["token_ids"] for o in got] == [o[0]["token_ids"] for o in want], name
        for g, w in zip(got, want, strict=True):
            for (gid, glp, _), (wid, wlp, _) in zip(
                g[0]["logprobs"], w[0]["logprobs"], strict=True
            ):
                assert gid == wid and abs(glp - wlp) < 1e-4, name
        assert results[name]["all_blocks_free"]


def test_width_sizes_double_from_16_blocks_to_the_full_table():
    assert width_sizes(5) == (5,)
    assert width_sizes(16) == (16,)
    assert width_sizes(40) == (16, 32, 40)
    assert width_sizes(256) == (16, 32, 64, 128, 256)


def test_a_step_is_padded_to_the_width_of_its_longest_context(models, monkeypatch):
    """At a 256-token limit (64 blocks of 4) a step of short contexts gathers 16 blocks a
    row, not 64; once a context passes 64 tokens its step moves to 32. Tokens and
    logprobs are the packed path's, at every width."""
    from dstp.engine.sampling_params import SamplingParams
    from dstp.worker.decode_buckets import BucketedDecode

    shapes = []
    shape_for = BucketedDecode.shape_for

    def spy(self, plan):
        shapes.append(shape_for(self, plan))
        return shapes[-1]

    monkeypatch.setattr(BucketedDecode, "shape_for", spy)
    prompts = [[5 + i] * (10 + 25 * i) for i in range(3)]  # 10, 35 and 60 tokens
    params = SamplingParams(max_tokens=12, temperature=0, logprobs=1, ignore_eos=True)
    runs = []
    for bucketed in (False, True):
        config = EngineConfig(
            model=str(models["llama"]),
            dtype="float32",
            max_model_len=256,
            block_size=BLOCK,
            num_blocks=64,
            bucket_decode=bucketed,
        )
        runs.append([r.outputs[0] for r in Engine(config).generate(prompts, params)])
    assert {w for _, w in filter(None, shapes)} == {16, 32}
    for packed, padded in zip(*runs, strict=True):
        assert padded.token_ids == packed.token_ids
        torch.testing.assert_close(
            [lp.logprob for lp in padded.logprobs], [lp.logprob for lp in packed.logprobs]
        )
