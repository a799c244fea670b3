"""What every rank runs: its shard of the model, its KV heads' cache, the forward of a step.

Rank 0's engine turns scheduled requests into a :class:`StepPlan` and
broadcasts it; every rank, rank 0 included, hands the plan to
:meth:`ModelRunner.execute`, which runs the Hugging Face model's own forward
over this rank's shards and cache. A follower rank runs this and nothing
else: no tokenizer, scheduler or server.
"""

from __future__ import annotations

import logging
import time
import traceback
from pathlib import Path

import torch

from dstp.cpu import gemm as cpu_gemm
from dstp.cpu import kernels as cpu_kernels
from dstp.distributed import TPGroup
from dstp.engine.config import EngineConfig, context_length
from dstp.model.inject import shard_model
from dstp.policies import TPConfigError
from dstp.worker import attention, kv_budget
from dstp.worker.cuda_graphs import DecodeGraphs
from dstp.worker.decode_buckets import BucketedDecode
from dstp.worker.kv_budget import KVBudget
from dstp.worker.kv_cache import CacheShape, PagedKVCache, v_head_dim
from dstp.worker.step_inputs import StepUploader
from dstp.worker.step_plan import Command, StepPlan, receive

log = logging.getLogger("dstp")


class StartupProbeFailed(TPConfigError):
    """The start-up probe's steps failed: this model would fail on its first request."""

    def __init__(self, reason: str) -> None:
        super().__init__(
            f"start-up probe failed: {reason}; this model would fail on its first request, so "
            "dstp refuses to serve it (docs/writing-a-policy.md, 'Can the engine serve this?')"
        )


def _where(exc: BaseException) -> str:
    """``Type: message (file:line)`` of the innermost frame: the reason, on one line."""
    frames = traceback.extract_tb(exc.__traceback__)
    place = f" ({Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    message = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {message}{place}"


class ModelRunner:
    def __init__(self, config: EngineConfig, tp: TPGroup) -> None:
        self.tp = tp
        started = time.perf_counter()
        cpu_gemm.set_compute_dtype(config.cpu_compute_dtype)
        attention.register()
        self.sharded = shard_model(
            config.model,
            tp,
            config.dtype_on(tp.device),
            attn_implementation=attention.ATTN_IMPLEMENTATION,
            allow_pickle=config.allow_pickle,
            trust_remote_code=config.trust_remote_code,
            fused_layers=config.fused_layers,
        )
        self.model = self.sharded.model
        self.base_model = getattr(self.model, self.model.base_model_prefix)
        self.lm_head = self.model.get_submodule(self.sharded.policy.lm_head)
        self.vocab_size: int = self.lm_head.vocab_size  # token ids a prompt may use
        self.logit_ops = self.sharded.policy.logit_ops(self.sharded.config)
        self.block_size = config.block_size
        self.attention_backend = attention.backend_for(tp.device)
        self.uploader = StepUploader(tp.device)
        self.scratch_block = config.fixed_shape_decode or self._graphs_why_not(config) is None
        self.decode: BucketedDecode | None = None  # made once the context is known
        self.num_blocks, self.cache = self._make_cache(config)
        self.max_model_len = self._context_limit(config)
        self.decode = self._bucketed_decode(config)
        tp.agree(lambda: self.run_startup_probe(config))
        if self.decode is not None:  # every bucket compiled / captured before serving
            tp.agree(lambda: self.decode.warm_up(self.cache, self.attention_backend, self.uploader))
        if tp.is_driver:
            self._log_layout(time.perf_counter() - started)

    def _cache_shape(self, config: EngineConfig) -> CacheShape:
        heads, model_config = self.sharded.heads, self.sharded.config
        return CacheShape(
            num_layers=model_config.num_hidden_layers,
            local_kv_heads=heads.local_kv_heads,
            k_head_dim=heads.head_dim,
            v_head_dim=v_head_dim(self.sharded.policy, model_config, heads.head_dim),
            block_size=config.block_size,
            dtype=config.dtype_on(self.tp.device),
        )

    def _make_cache(self, config: EngineConfig) -> tuple[int, PagedKVCache]:
        shape = self._cache_shape(config)
        if config.num_blocks:
            self.kv_budget = KVBudget(0, "--num-kv-blocks", "--num-kv-blocks")
            num_blocks = config.num_blocks
        else:
            self.kv_budget = self._kv_budget(config, shape)
            num_blocks = shape.blocks_for(self.kv_budget.nbytes)
        num_blocks = self.tp.min_over_ranks(num_blocks)  # ranks' devices may differ
        return num_blocks, self.tp.agree(lambda: self._new_cache(shape, num_blocks))

    def _new_cache(self, shape: CacheShape, num_blocks: int) -> PagedKVCache:
        """A cache (the step's, or a probe's scratch one), with the scratch block bucketed
        decode steps pad into where they are on."""
        return PagedKVCache(shape, num_blocks, self.tp.device, self.scratch_block)

    def _bucketed_decode(self, config: EngineConfig) -> BucketedDecode | None:
        """Fixed-shape decode steps (``--compile-decode``, ``--cuda-graphs``), or None: the
        packed path."""
        if not self.scratch_block:
            return None
        backend = config.compile_decode
        if backend is not None and self.tp.size > 1:
            if self.tp.is_driver:
                log.warning(
                    "--compile-decode compiles at TP=1 only for now (the row-parallel "
                    "layers' all-reduce is a graph break): decode steps run at padded "
                    "buckets, uncompiled"
                )
            backend = None
        base_model = self.base_model

        def forward(input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            return base_model(
                input_ids=input_ids.unsqueeze(0),
                position_ids=positions.unsqueeze(0),
                use_cache=False,
            ).last_hidden_state[0]

        return BucketedDecode(
            forward,
            max_num_seqs=config.max_num_seqs,
            max_model_len=self.max_model_len,
            block_size=config.block_size,
            device=self.tp.device,
            compile_backend=backend,
            graphs=self._decode_graphs(config),
        )

    def _decode_graphs(self, config: EngineConfig) -> DecodeGraphs | None:
        """CUDA graphs for the decode buckets (``--cuda-graphs``) where they can run."""
        why_not = self._graphs_why_not(config)
        if why_not is None:
            if self.tp.size > 1 and self.tp.is_driver:
                log.warning(
                    "--cuda-graphs at TP=%d: each rank captures its NCCL all-reduces inside the "
                    "graphs, which no machine dstp was tested on has run yet (a capture that "
                    "fails leaves that rank's decode eager)",
                    self.tp.size,
                )
            return DecodeGraphs.for_device(self.tp.device)
        if config.cuda_graphs is True and self.tp.is_driver:
            log.warning("--cuda-graphs: %s; decode steps run at padded buckets, eagerly", why_not)
        return None

    def _graphs_why_not(self, config: EngineConfig) -> str | None:
        """Why decode will not be captured here (--enforce-eager, no CUDA, TP>1 unless
        asked for, an all-reduce that is not NCCL); None where it will."""
        if config.cuda_graphs is False:
            return "--enforce-eager"
        if self.tp.device.type != "cuda":
            return f"the device is {self.tp.device.type}, not CUDA"
        if self.tp.size > 1 and self.tp.comm_device.type != "cuda":
            return "the ranks all-reduce over gloo (sharing a GPU), which a graph cannot hold"
        if self.tp.size > 1 and config.cuda_graphs is not True:
            # NCCL inside a graph is untried: no multi-GPU machine has been lent
            return "at TP>1 they are captured only when asked for (--cuda-graphs)"
        return None

    def _kv_budget(self, config: EngineConfig, shape: CacheShape) -> KVBudget:
        if config.kv_cache_memory_gib is not None:
            return kv_budget.explicit(config.kv_cache_memory_gib)
        device = self.tp.device
        if device.type == "cuda":
            peak = self._profile_activation_peak(config)
            free, total = torch.cuda.mem_get_info(device)
            worst = self._worst_step(config, shape)
            if self.tp.is_driver:
                log.info(
                    "device memory per rank: %.2f GiB in use after loading, a %.2f GiB "
                    "profiled step of %d tokens, the worst step's %s",
                    (total - free) / 2**30,
                    peak / 2**30,
                    config.max_num_batched_tokens,
                    worst.describe(),
                )
            # The graphs' pool keeps one forward of the largest decode shape for good; its
            # largest term is that shape's attention gather.
            graphs = worst.decode_gather if self._graphs_why_not(config) is None else 0
            return kv_budget.device_budget(
                total, total - free, peak, config.gpu_memory_utilization, worst, graphs
            )
        wanted = config.max_num_seqs * self._wanted_len(config)
        return kv_budget.host_budget(
            kv_budget.available_host_memory(), self.tp.local_size, wanted, shape.bytes_per_token
        )

    def _worst_step(self, config: EngineConfig, shape: CacheShape) -> kv_budget.WorstStep:
        """The transients of the largest decode, continued prefill and sampling steps."""
        return kv_budget.worst_step(
            max_num_seqs=config.max_num_seqs,
            max_model_len=self._wanted_len(config),
            max_num_batched_tokens=config.max_num_batched_tokens,
            block_size=config.block_size,
            local_heads=self.sharded.heads.local_heads,
            local_kv_heads=shape.local_kv_heads,
            k_head_dim=shape.k_head_dim,
            v_head_dim=shape.v_head_dim,
            dtype_bytes=torch.empty((), dtype=shape.dtype).element_size(),
            vocab_size=self.vocab_size,
            explicit_scores=_softcaps_or_windows(self.model.config),
        )

    def _profile_activation_peak(self, config: EngineConfig) -> int:
        """Device memory the largest step allocates beyond what is already held (CUDA)."""
        torch.cuda.synchronize(self.tp.device)
        torch.cuda.reset_peak_memory_stats(self.tp.device)
        before = torch.cuda.memory_allocated(self.tp.device)
        self.run_profile_step(config)
        torch.cuda.synchronize(self.tp.device)
        peak = torch.cuda.max_memory_allocated(self.tp.device) - before
        torch.cuda.empty_cache()
        return peak

    def run_profile_step(self, config: EngineConfig) -> torch.Tensor | None:
        """One forward of ``max_num_batched_tokens`` fresh tokens over a scratch cache."""
        plan = kv_budget.profile_plan(
            config.max_num_batched_tokens,
            self._wanted_len(config),
            config.max_num_seqs,
            config.block_size,
        )
        scratch = self._new_cache(self._cache_shape(config), kv_budget.profile_blocks(plan))
        kept, self.cache = getattr(self, "cache", None), scratch
        try:
            return self.execute(plan)
        finally:
            self.cache = kept

    def run_startup_probe(self, config: EngineConfig) -> None:
        """Prefill, continue and decode a few tokens through the paged path (every rank, on a
        scratch cache) before the server says healthy: a model that would fail on its first
        request fails here, naming why (:class:`StartupProbeFailed`).

        Every layer's attention must reach the paged cache: a module whose forward bypasses
        ``AttentionInterface`` would otherwise run on without the cache and answer wrongly.
        """
        num_layers = self.cache.shape.num_layers
        scratch = self._new_cache(
            self._cache_shape(config), kv_budget.probe_blocks(config.block_size)
        )
        reached: set[int] = set()
        read_layer = scratch.layer

        def layer(index: int) -> tuple[torch.Tensor, torch.Tensor]:
            reached.add(index)
            return read_layer(index)

        scratch.layer = layer  # type: ignore[method-assign]
        kept, self.cache = self.cache, scratch
        what = "a prefill"
        try:
            for what, plan in zip(
                ("a prefill", "a prefill continuation beside a decode", "a batch of decodes"),
                kv_budget.probe_plans(config.block_size, self.vocab_size),
                strict=True,
            ):
                logits = self.execute(plan)
                if logits is not None and bool(torch.isnan(logits).any()):
                    raise StartupProbeFailed(f"{what} gave NaN logits")
        except StartupProbeFailed:
            raise
        except Exception as exc:
            raise StartupProbeFailed(f"{what} raised {_where(exc)}") from exc
        finally:
            self.cache = kept
        missing = sorted(set(range(num_layers)) - reached)
        if missing:
            raise StartupProbeFailed(
                f"the attention of layer(s) {missing[:8]} never reached dstp's paged KV cache "
                "(its forward bypasses transformers' AttentionInterface)"
            )

    def _wanted_len(self, config: EngineConfig) -> int:
        """The model's context, or the user's (see :func:`context_length`)."""
        trained = getattr(self.sharded.config, "max_position_embeddings", None)
        return context_length(config.max_model_len, trained)

    def _context_limit(self, config: EngineConfig) -> int:
        """The model's (or the user's) context, cut to what the KV cache holds, never silently."""
        capacity = self.num_blocks * config.block_size
        wanted = self._wanted_len(config)
        if capacity < wanted and self.tp.is_driver:
            log.warning(
                "max_model_len cut from %d to %d tokens: that is what the KV cache holds "
                "(%d blocks x %d tokens per rank, sized by %s); raise %s to serve the full "
                "context",
                wanted,
                capacity,
                self.num_blocks,
                config.block_size,
                self.kv_budget.reason,
                self.kv_budget.fix,
            )
        return min(wanted, capacity)

    def _log_layout(self, seconds: float) -> None:
        heads, shape = self.sharded.heads, self.cache.shape
        if self.tp.device.type == "cpu" and shape.dtype == torch.bfloat16:
            paths = cpu_kernels.describe_paths()
            log.info("CPU bf16 linears: %s", "; ".join(f"{k}: {v}" for k, v in paths.items()))
        log.info(
            "KV cache per rank: %d blocks x %d tokens = %d tokens, %.1f KiB per token, %.2f GiB "
            "(%d of %d KV heads per rank, head dims K %d V %d; sized by %s); max_model_len=%d; "
            "ready in %.1fs",
            self.num_blocks,
            shape.block_size,
            self.num_blocks * shape.block_size,
            shape.bytes_per_token / 1024,
            self.cache.nbytes / 2**30,
            heads.local_kv_heads,
            heads.num_kv_heads,
            shape.k_head_dim,
            shape.v_head_dim,
            self.kv_budget.reason,
            self.max_model_len,
            seconds,
        )

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> torch.Tensor | None:
        """This rank's share of the forward; returns the sampled rows' logits on rank 0.

        The plan stays on the host; its arrays reach the device in one upload,
        and nothing in the forward reads a device value back.
        """
        if plan.copies.numel():
            self.cache.copy_blocks(plan.copies)
        sampled = None
        if self.decode is not None:  # decode-only steps at a padded bucket, fixed shapes
            sampled = self.decode.run(plan, self.cache, self.attention_backend, self.uploader)
        if sampled is None:
            sampled = self._packed_forward(plan)
        logits = self.lm_head.logits_on_driver(sampled)
        if logits is not None:
            for op, value in self.logit_ops:  # what HF's *ForCausalLM.forward does after its head
                logits = op.apply(logits, value)
        return logits

    def _packed_forward(self, plan: StepPlan) -> torch.Tensor:
        """The step's tokens packed as they come; the sampled rows' hidden states."""
        inputs = self.uploader.upload(plan, self.block_size)
        metadata = attention.AttentionMetadata.build(
            plan, inputs, self.cache, self.attention_backend
        )
        with attention.step_context(metadata):
            hidden = self.base_model(
                input_ids=inputs.input_ids.unsqueeze(0),
                position_ids=inputs.positions.unsqueeze(0),
                use_cache=False,
            ).last_hidden_state
        return hidden[0].index_select(0, inputs.sample_rows)

    def run_follower(self) -> None:
        """Other ranks: execute rank 0's plans until it says shut down."""
        while True:
            command, plan = receive(self.tp)
            if command == Command.SHUTDOWN:
                return
            if command == Command.STEP:
                self.execute(plan)


def _softcaps_or_windows(config) -> bool:
    """Whether the model's attention may soft-cap or window (Gemma 2, Mistral, Qwen2 with a
    sliding window...): its continued prefills then compute explicit scores. Read from the
    config, so a model that declares a window it does not use is counted on the safe side."""
    text = config.get_text_config()
    return any(
        getattr(text, name, None) is not None
        for name in ("attn_logit_softcapping", "sliding_window")
    )
