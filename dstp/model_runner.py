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

import torch

from . import attention
from .config import EngineConfig
from .distributed import TPGroup
from .inject import shard_model
from .kv_cache import CacheShape, PagedKVCache
from .step_inputs import StepUploader
from .step_plan import Command, StepPlan, receive

log = logging.getLogger("dstp")


class ModelRunner:
    def __init__(self, config: EngineConfig, tp: TPGroup) -> None:
        self.tp = tp
        started = time.perf_counter()
        attention.register()
        self.sharded = shard_model(
            config.model,
            tp,
            config.torch_dtype,
            attn_implementation=attention.ATTN_IMPLEMENTATION,
            allow_pickle=config.allow_pickle,
            trust_remote_code=config.trust_remote_code,
        )
        self.model = self.sharded.model
        self.base_model = getattr(self.model, self.model.base_model_prefix)
        self.lm_head = self.model.get_submodule(self.sharded.policy.lm_head)
        self.vocab_size: int = self.lm_head.vocab_size  # token ids a prompt may use
        self.logit_ops = self.sharded.policy.logit_ops(self.sharded.config)
        self.num_blocks, self.cache = self._make_cache(config)
        self.block_size = config.block_size
        self.attention_backend = attention.backend_for(tp.device)
        self.uploader = StepUploader(tp.device)
        self.max_model_len = self._context_limit(config)
        if tp.is_driver:
            self._log_layout(time.perf_counter() - started)

    def _make_cache(self, config: EngineConfig) -> tuple[int, PagedKVCache]:
        heads = self.sharded.heads
        shape = CacheShape(
            self.sharded.config.num_hidden_layers,
            heads.local_kv_heads,
            heads.head_dim,
            config.block_size,
            config.torch_dtype,
        )
        num_blocks = config.num_blocks or shape.blocks_for(int(config.kv_cache_memory_gib * 2**30))
        return num_blocks, self.tp.agree(lambda: PagedKVCache(shape, num_blocks, self.tp.device))

    def _context_limit(self, config: EngineConfig) -> int:
        """The model's (or the user's) context, cut to what the KV cache holds, never silently."""
        capacity = self.num_blocks * config.block_size
        wanted = getattr(self.sharded.config, "max_position_embeddings", None) or capacity
        if config.max_model_len:
            wanted = min(wanted, config.max_model_len)
        if capacity < wanted and self.tp.is_driver:
            log.warning(
                "max_model_len cut from %d to %d tokens: that is what the KV cache holds "
                "(%d blocks x %d tokens per rank); raise --kv-cache-memory or --num-kv-blocks "
                "to serve the full context",
                wanted,
                capacity,
                self.num_blocks,
                config.block_size,
            )
        return min(wanted, capacity)

    def _log_layout(self, seconds: float) -> None:
        heads, shape = self.sharded.heads, self.cache.shape
        log.info(
            "KV cache per rank: %d blocks x %d tokens = %d tokens, %.1f KiB per token, %.2f GiB "
            "(%d of %d KV heads per rank); max_model_len=%d; ready in %.1fs",
            self.num_blocks,
            shape.block_size,
            self.num_blocks * shape.block_size,
            shape.bytes_per_token / 1024,
            self.cache.nbytes / 2**30,
            heads.local_kv_heads,
            heads.num_kv_heads,
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
        logits = self.lm_head.logits_on_driver(hidden[0].index_select(0, inputs.sample_rows))
        if logits is not None:
            for op, value in self.logit_ops:  # what HF's *ForCausalLM.forward does after its head
                logits = op.apply(logits, value)
        return logits

    def run_follower(self) -> None:
        """Other ranks: execute rank 0's plans until it says shut down."""
        while True:
            command, plan = receive(self.tp)
            if command == Command.SHUTDOWN:
                return
            if command == Command.STEP:
                self.execute(plan)
