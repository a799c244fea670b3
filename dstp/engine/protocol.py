"""``EngineClient``: what the server asks of an engine (after vLLM's ``engine/protocol.py``).

The engine loop (dstp/server/engine_loop.py) and the serving layer talk to one of three
engines: :class:`dstp.engine.llm_engine.Engine` (one TP group), ``ReplicatedEngine``
(several groups behind rank 0) and the tests' fake. This protocol is that contract in
one place; tests/engine/test_engine_client_contract.py checks that the three behave
alike under it. Every method runs on one thread (the engine loop's): engines are not
thread-safe.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from dstp.engine.outputs import RequestOutput
from dstp.engine.sampling_params import SamplingParams


@runtime_checkable
class EngineClient(Protocol):
    """Requests in, :class:`RequestOutput` s out, one ``step`` at a time."""

    tokenizer: Any  # a Hugging Face tokenizer, or None for a model without one
    model_name: str
    max_model_len: int  # prompt + output tokens a request may reach
    vocab_size: int  # prompt and stop token ids lie in [0, vocab_size)
    eos_ids: frozenset[int]  # the ids that end a request unless ignore_eos

    def check_request(
        self, prompt_token_ids: list[int], params: SamplingParams, max_model_len: int | None = None
    ) -> None:
        """Raise ``InvalidRequest`` (naming the parameter) for what ``add_request`` would
        refuse: an empty prompt, ids outside the vocabulary, a prompt that leaves no room
        in the context, parameters out of range for this model. Adds nothing."""

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> None:
        """Queue a request: ``check_request``'s refusals, and an id already in use, raise
        ``InvalidRequest``. Its outputs come from later ``step`` calls."""

    def abort(self, request_id: str) -> None:
        """End a request and free its blocks; a later ``step`` reports it once more, finished
        with ``finish_reason`` "abort". Unknown or finished ids are ignored."""

    def has_unfinished(self) -> bool:
        """Whether ``step`` has anything to do (running, waiting, or aborts to report)."""

    def step(self) -> list[RequestOutput]:
        """Advance every running request by one step; an output for each that moved. A
        request's last output has ``finished`` set and a ``finish_reason`` per sample;
        after it the request id is free again. Raises only when the engine itself failed
        (a rank died): one request's failure finishes it with ``finish_reason`` "error"."""

    def running_request_ids(self) -> set[str]:
        """Ids of the requests in the running batch (admitted, not waiting): the loop
        ends their queue time. Those on another replica need not be listed: their queue
        time ends at their first output."""

    def heartbeat(self) -> None:
        """Prove every rank is alive while idle; raises if one is gone."""

    def stats(self) -> dict[str, Any]:
        """Scheduler and KV cache gauges (``num_running``, ``num_waiting``, ``kv_blocks_total``,
        ``kv_blocks_free``, ``kv_usage``, ``prefix_cache_queries``, ``prefix_cache_hits``,
        ``num_preemptions``) for /metrics and the stats log."""

    def shutdown(self) -> None:
        """Release the other ranks; the engine takes no more requests."""
