"""The CUDA path run on a fake CUDA device (tests/helpers/fake_cuda.py), on a CPU-only torch.

A real TP=1 engine on stories260K loads, sizes its KV cache from the stubbed
``torch.cuda.mem_get_info``, runs its start-up probe, prefills, decodes and samples with
every device tensor on "cuda:0"; an op mixing a cuda tensor with a host one raises (as
CUDA would), and every host<->device movement is counted per step. The fake tensors
carry real CPU shadows, so the tokens are the CPU engine's.
"""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from dstp.engine.llm_engine import Engine, EngineConfig
from dstp.engine.sampling_params import SamplingParams
from dstp.worker import kv_budget
from dstp.worker.step_plan import StepPlan
from tests.helpers.fake_cuda import DeviceMixError, fake_cuda, fake_cuda_rank, shadow
from tests.helpers.tiny_models import STORIES, stories_decode_heavy

CARD_GIB = 0.02  # a small card: the fake tensors' shadows are real host memory
WORST_CARD_GIB = 0.05
UTILIZATION = 0.9
PROMPT = "Once upon a time"
# A decode step moves: the step's metadata (one upload), the sampler's per-row values
# (one packed upload, dstp/engine/sampling/packed.py) and the sampled ids (one read).
MAX_DECODE_UPLOADS = 2
MAX_DECODE_SYNCS = 1


# -- the harness itself (before the engine's module-wide block: blocks do not nest) --
def test_mixing_is_refused_like_cuda():
    with fake_cuda(total_gib=0.001):
        on_card = torch.ones(4, device="cuda:3")
        assert (on_card + torch.tensor(2.0)).device == torch.device("cuda:3")  # a 0-d scalar
        with pytest.raises(RuntimeError, match="same device"):
            _ = on_card + torch.ones(4)
        with pytest.raises(DeviceMixError, match="generator"):
            on_card.exponential_(generator=torch.Generator())


def test_transfers_are_counted_by_kind():
    with fake_cuda(total_gib=0.001) as device:
        host = torch.arange(6)
        pinned = torch.empty(6, dtype=torch.long, pin_memory=True)
        assert pinned.is_pinned() and not host.is_pinned()
        on_card = host.to("cuda", non_blocking=True)  # pageable: a hidden sync on CUDA
        pinned.copy_(host)
        on_card.copy_(pinned, non_blocking=True)
        assert on_card.tolist() == list(range(6))
        assert int(on_card.sum()) == 15
        _ = on_card.cpu()
        _ = on_card[torch.tensor([1, 2])]
        assert device.transfers.snapshot() == {
            "upload": 2,
            "implicit_upload": 1,
            "pageable_non_blocking": 1,
            "download": 1,
            "sync": 2,
        }


def test_a_data_dependent_shape_is_a_sync_unless_its_size_is_given():
    with fake_cuda(total_gib=0.001) as device:
        sizes, values = torch.tensor([1, 2]).to("cuda:0"), torch.arange(2).to("cuda:0")
        device.transfers.reset()
        assert values.repeat_interleave(sizes).shape == (3,)  # CUDA reads sizes back
        assert device.transfers["sync"] == 1
        assert values.repeat_interleave(sizes, output_size=3).tolist() == [0, 1, 1]
        assert device.transfers["sync"] == 2  # the tolist, not the repeat


def test_memory_counts_live_device_storage():
    with fake_cuda(total_gib=0.001) as device:
        a = torch.empty(1024, device="cuda")
        view = a[:10]
        assert device.allocated == 4096
        del a
        assert device.allocated == 4096  # the view keeps the storage
        del view
        assert device.allocated == 0 and device.peak == 4096
        assert torch.cuda.mem_get_info() == (device.total_bytes, device.total_bytes)


def _worst_plans(seqs: int, ctx: int, chunk: int, block_size: int) -> list[StepPlan]:
    """The two steps the profile does not run: ``seqs`` decodes at context ``ctx`` (all
    reading the same blocks: only the sizes matter), and a ``chunk``-token prefill that
    continues to ``ctx``."""
    lt = torch.long
    table = torch.arange(-(-ctx // block_size), dtype=lt)
    last = int(table[-1]) * block_size + (ctx - 1) % block_size
    decode = StepPlan(
        input_ids=torch.full((seqs,), 5, dtype=lt),
        positions=torch.full((seqs,), ctx - 1, dtype=lt),
        slot_mapping=torch.full((seqs,), last, dtype=lt),
        query_starts=torch.arange(seqs + 1, dtype=lt),
        context_lens=torch.full((seqs,), ctx, dtype=lt),
        block_tables=table.repeat(seqs, 1),
        sample_rows=torch.arange(seqs, dtype=lt),
        copies=torch.zeros((0, 2), dtype=lt),
    )
    positions = torch.arange(ctx - chunk, ctx, dtype=lt)
    continued = StepPlan(
        input_ids=torch.full((chunk,), 5, dtype=lt),
        positions=positions,
        slot_mapping=table[positions // block_size] * block_size + positions % block_size,
        query_starts=torch.tensor([0, chunk], dtype=lt),
        context_lens=torch.tensor([ctx], dtype=lt),
        block_tables=table[None],
        sample_rows=torch.tensor([chunk - 1], dtype=lt),
        copies=torch.zeros((0, 2), dtype=lt),
    )
    return [decode, continued]


def test_the_worst_steps_fit_on_a_card_the_budget_filled():
    """64 sequences decoding at 512 tokens (their gathered K/V and fp32 scores are ~10 MiB,
    the profiled 32-token step a fraction of that) and a continued prefill, on a card whose
    KV cache took what the budget left: each step's peak stays inside the utilization.
    Without the worst-step terms in the budget the decode step overflows it."""
    with fake_cuda_rank(total_gib=WORST_CARD_GIB) as device:
        config = stories_decode_heavy(gpu_memory_utilization=UTILIZATION)
        runner = Engine(config).runner
        assert runner.max_model_len == 512  # the cache holds one whole context
        limit = UTILIZATION * device.total_bytes
        for plan in _worst_plans(64, 512, 32, config.block_size):
            device.peak = device.allocated
            logits = runner.execute(plan)
            assert logits.shape[0] == plan.sample_rows.numel()
            assert device.peak <= limit, (device.peak / 2**20, limit / 2**20)


# -- a real engine on the fake card ---------------------------------------------------
@pytest.fixture(scope="module")
def run():
    """(engine, device state) inside one fake-CUDA block for the module's tests."""
    with fake_cuda_rank(total_gib=CARD_GIB) as device:
        config = EngineConfig(
            model=str(STORIES),
            dtype="float32",
            max_model_len=64,
            max_num_seqs=4,
            max_num_batched_tokens=64,
            gpu_memory_utilization=UTILIZATION,
        )
        device.built = device.transfers.snapshot()
        yield Engine(config), device


def _steps(engine, device):
    """Run the engine dry; the transfers of each step (and which kind of step it was)."""
    counts = []
    while engine.has_unfinished():
        device.transfers.reset()
        outputs = engine.step()
        counts.append((device.transfers.snapshot(), dict(device.transfers.sites), outputs))
    return counts


def test_the_engine_runs_on_cuda_and_gives_the_cpu_tokens(run):
    engine, device = run
    assert engine.runner.tp.device == torch.device("cuda:0")
    assert engine.runner.cache.keys.device.type == "cuda"  # cache on the (fake) card
    assert all(p.device.type == "cuda" for p in engine.runner.model.parameters())
    reason = engine.runner.kv_budget.reason  # the start-up log's "sized by"
    assert "--gpu-memory-utilization 0.9" in reason  # from the stubbed mem_get_info
    for term in (
        "activation peak",
        "batched decode (4 of 4 seqs at a time x 64 tokens)",
        "sampler (4 rows",
    ):
        assert term in reason
    assert "continued-prefill mask (2 x 64 x 64)" in reason
    out = engine.generate([PROMPT], SamplingParams(max_tokens=10, temperature=0))[0].outputs[0]
    # stories260K's greedy continuation, as on the CPU (README): the shadows' values
    assert out.text.startswith(", there was a little girl")


def test_a_decode_step_moves_one_upload_of_metadata_and_reads_once(run):
    engine, device = run
    engine.add_request(
        "greedy", engine.tokenizer.encode(PROMPT), SamplingParams(max_tokens=6, temperature=0)
    )
    steps = _steps(engine, device)
    assert len(steps) == 6  # a prefill, then five decode steps
    for counts, sites, _ in steps:
        assert counts["download"] == 0, sites
        assert counts["implicit_upload"] == 0, sites
        assert counts["pageable_non_blocking"] == 0, sites  # the metadata buffer is pinned
        assert counts["upload"] <= MAX_DECODE_UPLOADS, sites
        assert counts["sync"] <= MAX_DECODE_SYNCS, sites
        assert any("step_inputs.py" in s for s in sites["upload"])  # the one metadata upload


def test_a_mixed_batch_moves_no_more(run):
    """Sampled, penalised, logprob and seeded rows in one batch: still the metadata upload,
    the sampler's one packed upload and one read a step (dstp/engine/sampling/packed.py)."""
    engine, device = run
    mixed = [
        SamplingParams(max_tokens=4, temperature=0),
        SamplingParams(max_tokens=4, temperature=0.8, top_p=0.9, top_k=20, min_p=0.05),
        SamplingParams(max_tokens=4, temperature=0.7, presence_penalty=0.5, logprobs=2),
        SamplingParams(max_tokens=4, temperature=1.0, repetition_penalty=1.2, seed=5),
    ]
    for i, params in enumerate(mixed):
        engine.add_request(f"mixed{i}", engine.tokenizer.encode(PROMPT), params)
    steps = _steps(engine, device)
    assert len(steps) == 4
    for counts, sites, _ in steps:
        assert counts["download"] == counts["implicit_upload"] == 0, sites
        assert counts["pageable_non_blocking"] == 0, sites
        assert counts["upload"] <= MAX_DECODE_UPLOADS, sites
        assert counts["sync"] <= MAX_DECODE_SYNCS, sites


def test_the_run_stays_inside_the_utilization_of_the_card(run):
    engine, device = run
    for i in range(4):  # max_num_seqs sequences to the end of max_model_len (64)
        ids = [(7 * i + j) % 500 + 3 for j in range(62)]
        engine.add_request(f"full{i}", ids, SamplingParams(max_tokens=2, ignore_eos=True))
    steps = _steps(engine, device)
    assert steps[-1][2][0].outputs[0].finish_reason == "length"
    assert engine.runner.kv_budget.nbytes > 0
    assert device.peak <= UTILIZATION * device.total_bytes


def test_a_host_tensor_in_the_forward_fails(run, monkeypatch):
    """The harness catches a device mix: positions left on the host fail the step."""
    engine, _ = run
    upload = engine.runner.uploader.upload

    def positions_on_the_host(plan, block_size):
        inputs = upload(plan, block_size)
        inputs.positions = shadow(inputs.positions).clone()  # a real CPU tensor
        return inputs

    monkeypatch.setattr(engine.runner.uploader, "upload", positions_on_the_host)
    plan = kv_budget.probe_plans(engine.config.block_size, engine.vocab_size)[0]
    with pytest.raises(RuntimeError, match="same device"):
        engine.runner.execute(plan)


_RANDOM = frozenset({
    "exponential_", "uniform_", "normal_", "random_", "geometric_", "cauchy_", "log_normal_",
    "bernoulli", "bernoulli_", "multinomial", "rand", "randn", "randint", "randperm",
    "rand_like", "randn_like", "randint_like",
})  # fmt: skip


def _on_card(args, kwargs) -> bool:
    values = [*args, *kwargs.values()]
    return any(
        (isinstance(v, torch.Tensor) and v.device.type == "cuda")
        or (isinstance(v, (str, torch.device)) and torch.device(v).type == "cuda")
        for v in values
    )


class _RandomOnTheCard(TorchFunctionMode):
    """Records every random draw made for the card's tensors (its function's name)."""

    def __init__(self) -> None:
        super().__init__()
        self.draws: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in _RANDOM and _on_card(args, kwargs):
            self.draws.append(func.__name__)
        return func(*args, **kwargs)


def test_sampling_draws_no_random_numbers_on_the_card(run):
    """Seeded and unseeded rows draw by counter keys hashed on the card (draw.py): a seeded
    request repeats its tokens, and no generator draws for the card at all, so there is no
    per-row generator state to keep on the device (nor a host one for CUDA to refuse)."""
    engine, _ = run
    seeded = SamplingParams(max_tokens=3, temperature=1.0, seed=7)
    with _RandomOnTheCard() as watch:
        first, again = (engine.generate([PROMPT], seeded)[0].outputs[0] for _ in range(2))
        unseeded = engine.generate([PROMPT], SamplingParams(max_tokens=3, temperature=1.0))
    assert first.finish_reason == unseeded[0].outputs[0].finish_reason == "length"
    assert first.token_ids == again.token_ids
    assert watch.draws == []


def test_a_generator_drawing_on_the_card_is_caught(run, monkeypatch):
    """The check behind the test above can fail: the sampler's old way (each seeded slot's
    noise from its own generator on the card, one ``exponential_`` per slot) is seen."""
    from dstp.engine.sampling import draw

    def per_slot_generators(start: torch.Tensor) -> torch.Tensor:  # log(u) = -E
        noise = torch.empty(start.shape, dtype=torch.float64, device=start.device)
        for slot in range(len(start)):
            noise[slot].exponential_(generator=torch.Generator(start.device).manual_seed(slot))
        return noise.neg_()

    engine, _ = run
    monkeypatch.setattr(draw, "_log_uniform", per_slot_generators)
    params = SamplingParams(max_tokens=3, temperature=1.0, seed=7)
    with _RandomOnTheCard() as watch:
        out = engine.generate([PROMPT], params)[0].outputs[0]
    assert out.finish_reason == "length"
    assert watch.draws and set(watch.draws) == {"exponential_"}
