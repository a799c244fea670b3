"""How much memory each rank's KV cache gets, when the user does not say.

vLLM's contract on CUDA: the weights, the largest step's activations and the
KV cache together use ``--gpu-memory-utilization`` of the device, so the
cache gets what is left after loading and one profiled forward of
``max_num_batched_tokens`` tokens. On CPU there is no device to fill: the
cache takes what ``max_num_seqs`` sequences of ``max_model_len`` tokens need,
at most a quarter of the host's available memory per local rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dstp.worker.attention.backends.sdpa import decode_group_size, decode_seq_bytes
from dstp.worker.step_plan import StepPlan

CPU_MEMORY_FRACTION = 0.25  # of the host's available memory, shared by its local ranks


@dataclass(frozen=True)
class KVBudget:
    nbytes: int
    reason: str  # how it was chosen, for the start-up log and warnings
    fix: str  # the flag that gives more


def explicit(gib: float) -> KVBudget:
    return KVBudget(int(gib * 2**30), f"--kv-cache-memory {gib:g} GiB", "--kv-cache-memory")


# The sampler's transient bytes per logit of a row, at its peak (top-p over whole rows,
# dstp/engine/sampling/filters.py): the fp32 logits (4), their scaled copy (4) and the top-p
# rows' gathered copy (4), their scaled weights (4), int64 masses (8) and one int32
# histogram index (4) at a time, the drop masks (2), rounded up.
SAMPLER_BYTES_PER_LOGIT = 32


@dataclass(frozen=True)
class WorstStep:
    """Transient device bytes of the largest steps the profiled one does not reach.

    The profile runs ``max_num_batched_tokens`` fresh prefill tokens; a later step can
    also decode ``max_num_seqs`` sequences at ``max_model_len`` (their K/V gathered and
    padded to the longest), continue a prefill of a whole chunk against the full context
    (a dense mask), and sample every sequence's row. Each is one layer's (or the
    sampler's) transient, freed before the next, so they are bounds, not sums over layers.
    """

    decode_gather: int  # K/V of a decode group at max_model_len, and their fp32 scores
    prefill_mask: int  # the largest continued chunk's mask [G * chunk, ctx] and its context K/V
    sampler: int  # max_num_seqs rows x vocabulary at SAMPLER_BYTES_PER_LOGIT
    detail: tuple[str, str, str] = ("", "", "")  # each term's shape, for the log

    @property
    def attention(self) -> int:
        """A layer decodes and continues prefills one after the other: the larger counts."""
        return max(self.decode_gather, self.prefill_mask)

    @property
    def nbytes(self) -> int:
        return self.attention + self.sampler

    def describe(self) -> str:
        decode, mask, sampler = self.detail
        return (
            f"{_gib(self.decode_gather)} batched decode ({decode}), "
            f"{_gib(self.prefill_mask)} continued-prefill mask ({mask}), "
            f"{_gib(self.sampler)} sampler ({sampler}); the larger attention term counts"
        )


def _gib(nbytes: int) -> str:
    if nbytes >= 2**30:
        return f"{nbytes / 2**30:.2f} GiB"
    return f"{nbytes / 2**20:.1f} MiB"


def worst_step(
    *,
    max_num_seqs: int,
    max_model_len: int,
    max_num_batched_tokens: int,
    block_size: int,
    local_heads: int,
    local_kv_heads: int,
    k_head_dim: int,
    v_head_dim: int,
    dtype_bytes: int,
    vocab_size: int,
    explicit_scores: bool = False,
) -> WorstStep:
    """The :class:`WorstStep` of one rank (its heads), by byte accounting of the SDPA
    backend's decode and continued-prefill paths and of the sampler. ``explicit_scores``:
    the model soft-caps or windows its attention, so a continued prefill computes its
    scores explicitly (backends/sdpa.py ``_masked_prefill``) instead of SDPA with a mask."""
    kv_dims = k_head_dim + v_head_dim
    # decode (backends/sdpa.py _decode_batch): K and V of the decoding sequences gathered
    # block by block to the longest context, then [H, D, ctx] fp32 scores, two at once
    # (the scores and their masked / softmaxed copy); sequences go in groups under
    # DECODE_GROUP_BYTES, so one group is the transient
    ctx = -(-max_model_len // block_size) * block_size
    seq_bytes = decode_seq_bytes(
        ctx, local_kv_heads, local_heads, k_head_dim, v_head_dim, dtype_bytes
    )
    group = decode_group_size(max_num_seqs, seq_bytes)
    # continued prefill (_continued_prefill): a chunk of q tokens against the full context;
    # the bool mask [q, ctx], repeated per query head of a KV head [G * q, ctx], and SDPA's
    # additive copy of it in the model's dtype (made through a negated bool copy); plus the
    # context's K and V gathered
    chunk = min(max_num_batched_tokens, max_model_len)
    groups = max(1, local_heads // max(1, local_kv_heads))
    mask = chunk * max_model_len * (1 + groups * (2 + dtype_bytes))
    context = max_model_len * local_kv_heads * kv_dims * dtype_bytes
    if explicit_scores:
        # _masked_prefill: the bool [chunk, ctx] allowed mask, fp32 [H, chunk, ctx] scores and
        # their masked / softmaxed copy, the probabilities in the model's dtype, and K and V
        # repeated to every query head
        scores = local_heads * chunk * max_model_len * (2 * 4 + dtype_bytes)
        expanded = local_heads * max_model_len * kv_dims * dtype_bytes
        mask = max(mask, chunk * max_model_len + scores + expanded)
    rows = max_num_seqs * vocab_size * SAMPLER_BYTES_PER_LOGIT
    return WorstStep(
        decode_gather=group * seq_bytes,
        prefill_mask=mask + context,
        sampler=rows,
        detail=(
            f"{group} of {max_num_seqs} seqs at a time x {ctx} tokens",
            f"{groups} x {chunk} x {max_model_len}",
            f"{max_num_seqs} rows x {vocab_size}",
        ),
    )


def device_budget(
    total: int,
    in_use: int,
    activation_peak: int,
    utilization: float,
    worst: WorstStep | None = None,
    graph_pool: int = 0,
) -> KVBudget:
    """What ``utilization`` of the device leaves after what is in use, the profiled step's
    peak, the worst step's transients beyond it (:class:`WorstStep`) and ``graph_pool``,
    what CUDA graphs keep for good (their pool holds the largest decode shape's
    intermediates between replays, beside what eager steps allocate)."""
    extra = worst.nbytes if worst is not None else 0
    nbytes = max(0, int(total * utilization) - in_use - activation_peak - extra - graph_pool)
    reason = (
        f"--gpu-memory-utilization {utilization:g} of {total / 2**30:.1f} GiB, less "
        f"{in_use / 2**30:.2f} GiB in use and a {activation_peak / 2**30:.2f} GiB activation peak"
    )
    if worst is not None:
        reason += f" and the worst step's {worst.describe()}"
    if graph_pool:
        reason += f", and {_gib(graph_pool)} kept by --cuda-graphs (the largest decode shape)"
    return KVBudget(nbytes, reason, "--gpu-memory-utilization (or --kv-cache-memory)")


def host_budget(
    available: int, local_ranks: int, wanted_tokens: int, bytes_per_token: int
) -> KVBudget:
    """What the wanted tokens need, capped at this rank's share of the available memory."""
    share = int(available * CPU_MEMORY_FRACTION) // max(1, local_ranks)
    needed = wanted_tokens * bytes_per_token
    if needed <= share:
        reason = f"{wanted_tokens} tokens (max_num_seqs x max_model_len)"
    else:
        reason = (
            f"{CPU_MEMORY_FRACTION:.0%} of {available / 2**30:.1f} GiB available memory "
            f"over {local_ranks} local rank(s)"
        )
    return KVBudget(min(needed, share), reason, "--kv-cache-memory or --num-kv-blocks")


def available_host_memory() -> int:
    import psutil

    return psutil.virtual_memory().available


def profile_plan(num_tokens: int, max_len: int, max_seqs: int, block_size: int) -> StepPlan:
    """The largest step the scheduler can send: fresh prefills filling ``num_tokens``.

    Sequences are at most ``max_len`` tokens (a model's position limit) and
    their blocks are numbered from 0, for a scratch cache of
    :func:`profile_blocks` blocks.
    """
    lengths = []
    while sum(lengths) < num_tokens and len(lengths) < max_seqs:
        lengths.append(min(max_len, num_tokens - sum(lengths)))
    positions = torch.cat([torch.arange(n) for n in lengths])
    starts = torch.tensor([0, *lengths]).cumsum(0)
    widths = [-(-n // block_size) for n in lengths]
    first_block = torch.tensor([0, *widths]).cumsum(0)
    tables = torch.zeros((len(lengths), max(widths)), dtype=torch.long)
    for i, width in enumerate(widths):
        tables[i, :width] = torch.arange(width) + first_block[i]
    seq_of_token = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    slots = (first_block[seq_of_token] * block_size) + positions
    return StepPlan(
        input_ids=torch.zeros(len(positions), dtype=torch.long),
        positions=positions,
        slot_mapping=slots,
        query_starts=starts,
        context_lens=torch.tensor(lengths),
        block_tables=tables,
        sample_rows=starts[1:] - 1,
        copies=torch.zeros((0, 2), dtype=torch.long),
    )


def profile_blocks(plan: StepPlan) -> int:
    return int(plan.block_tables.max()) + 1


# -- the start-up probe ---------------------------------------------------------------
# (new tokens, tokens already cached) of two sequences in each of three steps: fresh
# prefills, then a prefill continuation beside a decode, then a batch of two decodes.
# Every branch of the paged path a first request can take, on a few tokens.
PROBE_STEPS = (((4, 0), (3, 0)), ((2, 4), (1, 3)), ((1, 6), (1, 4)))
PROBE_MAX_LEN = 8  # tokens a probe sequence reaches (7), rounded up


def probe_plans(block_size: int, vocab_size: int) -> list[StepPlan]:
    """The start-up probe's steps, each sampling every sequence's last token, over a
    scratch cache of :func:`probe_blocks` blocks (each sequence its own blocks)."""
    width = -(-PROBE_MAX_LEN // block_size)  # blocks per sequence
    tables = torch.arange(2 * width).reshape(2, width)
    plans = []
    for step in PROBE_STEPS:
        positions = torch.cat([torch.arange(done, done + new) for new, done in step])
        seq_of_token = torch.repeat_interleave(torch.arange(2), torch.tensor([n for n, _ in step]))
        slots = tables[seq_of_token, positions // block_size] * block_size + positions % block_size
        starts = torch.tensor([0, *[n for n, _ in step]]).cumsum(0)
        plans.append(
            StepPlan(
                input_ids=(positions * 7 + seq_of_token * 3 + 1) % vocab_size,
                positions=positions,
                slot_mapping=slots,
                query_starts=starts,
                context_lens=torch.tensor([new + done for new, done in step]),
                block_tables=tables.clone(),
                sample_rows=starts[1:] - 1,
                copies=torch.zeros((0, 2), dtype=torch.long),
            )
        )
    return plans


def probe_blocks(block_size: int) -> int:
    return 2 * -(-PROBE_MAX_LEN // block_size)
