"""A derived policy is proven before it is used: on a shrunk copy of the model, against HF.

dstp derives a policy (``policies/auto.py``) for an architecture that has none from
shapes and names alone, and a wrong guess (a fused projection cut the wrong way, a head
count no attribute states) would load and then serve wrong numbers or crash on the
first request. So before a derived policy is used, at ``dstp inspect`` and at load,
:func:`prove_policy`:

1. shrinks the model's own config (:func:`shrink_config`): the same class and
   architecture, the head layout kept relative to the TP size (MHA, GQA with KV heads
   split, KV heads replicated when the model has fewer than the TP size), tiny widths,
   a few layers (per-layer lists cut to match), a small vocabulary no TP size divides;
2. builds the unsharded HF model from it with seeded random weights, the oracle;
3. builds one sharded copy per rank exactly as loading does (``swap_modules`` and
   ``materialize`` with the policy, each rank's slice of the oracle's weights), and runs
   their forwards side by side in one process, one thread per rank, whose
   all-reduces and all-gathers sum and concatenate the ranks' tensors as the real
   TP group would (:class:`SimulatedTP`);
4. compares every module whose output is full width on both sides (the row-parallel
   layers after their all-reduce, attention and MLP modules, norms, decoder blocks)
   in the order they ran, then the logits (within 1e-3 of their largest magnitude: a
   wrong split is off by about that magnitude, another summation order by ~1e-6 of it),
   and refuses the policy at the first one that differs, naming it (or the module
   that raised).

It costs about a second for a small model on one CPU core; a result is remembered per
(config, TP size, policy) within a process.
"""

from __future__ import annotations

import copy
import logging
import threading
import traceback
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dstp.distributed import TPGroup
from dstp.policies import Policy, TPConfigError

log = logging.getLogger("dstp")

PROMPT_LEN = 12
HEAD_DIM = 16
LAYERS = 4
STD = 0.2  # as the tests' random checkpoints: logits far from alike
BARRIER_TIMEOUT_S = 120.0

# per-layer switches a shrunk config must keep consistent with its layer count
_LAYER_INDEX_LISTS = ("mlp_only_layers",)
_FIRST_K_LAYERS = ("first_k_dense_replace",)
_EXPERT_COUNTS = ("num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts")
_EXPERTS_PER_TOKEN = ("num_experts_per_tok", "moe_top_k", "num_experts_per_token")
_WIDTH_NAMES = ("intermediate_size", "ffn_dim", "ffn_hidden_size")
_DROP = ("quantization_config",)
_ROTARY_DIMS = ("rotary_dim", "rotary_emb_dim", "rope_dim")


class PolicyProofFailed(TPConfigError):
    """A derived policy gives other numbers than HF on the shrunk model (or crashes)."""


@dataclass
class Proof:
    """What the proof ran and found."""

    tp: int
    shrunk: str  # the shrunk config, in words
    max_logit_error: float
    compared: int  # module outputs compared


def is_derived(policy: Policy) -> bool:
    """A policy dstp derived (``auto:...``), not a built-in or registered one."""
    from dstp.policies import registered

    return policy.name.startswith("auto:") and all(p is not policy for p in registered())


# -- the shrunk config ---------------------------------------------------------------
def _shrunk_heads(heads: int, kv: int, tp: int) -> tuple[int, int]:
    """(query heads, KV heads) as few as keep the layout relative to ``tp``."""
    if kv == heads:  # MHA: two heads per rank
        return 2 * tp, 2 * tp
    groups = heads // kv
    if kv >= tp:  # KV heads split: one or two per rank, GQA kept
        kv_small = tp if kv % (2 * tp) else 2 * tp
        return kv_small * min(groups, 2), kv_small
    # fewer KV heads than ranks (MQA, or GQA with replication): each replicated tp/kv times
    per_kv = tp // kv  # ranks sharing one KV head; a rank holds >= 1 of its query heads
    return kv * per_kv * max(1, min(groups // per_kv, 2)), kv


def _set(config: Any, name: str, value: Any, changes: dict[str, Any]) -> None:
    if isinstance(getattr(type(config), name, None), property):
        prop = getattr(type(config), name)
        if prop.fset is None:  # computed from other attributes (Falcon's head_dim)
            return
    setattr(config, name, value)
    changes[name] = value


def shrink_config(config: Any, policy: Policy, tp: int) -> tuple[Any, dict[str, Any]]:
    """A tiny copy of ``config``: (the config, the attributes it changed).

    Head counts keep their relation to ``tp`` (see :func:`_shrunk_heads`); head size
    16 (or smaller where the model's is), hidden = heads x head size, MLP widths twice
    the hidden size, at most 4 layers (lists with one entry per layer cut to match,
    dense-layer indices kept inside), at most 4 experts with at most 2 per token, and a
    vocabulary of ``64 * tp + 1`` (no TP size > 1 divides it: the padded LM head shard).
    """
    full = policy.head_layout(config, tp)
    small = copy.deepcopy(config)
    changes: dict[str, Any] = {}
    for attr in _DROP:
        if hasattr(small, attr):
            delattr(small, attr)
    heads, kv = _shrunk_heads(full.num_heads, full.num_kv_heads, tp)
    head_dim = min(full.head_dim, HEAD_DIM)
    hidden = heads * head_dim
    _set(small, "hidden_size", hidden, changes)
    if isinstance(policy.heads_attr, str):
        _set(small, policy.heads_attr, heads, changes)
    if isinstance(policy.kv_heads_attr, str) and getattr(small, policy.kv_heads_attr, None):
        _set(small, policy.kv_heads_attr, kv, changes)
    if isinstance(policy.head_dim_attr, str) and getattr(small, policy.head_dim_attr, None):
        _set(small, policy.head_dim_attr, head_dim, changes)
    for name, value in list(vars(small).items()):
        if isinstance(value, bool) or not isinstance(value, int):
            continue
        if any(w in name for w in _WIDTH_NAMES) or name == "n_inner":
            _set(small, name, 2 * hidden, changes)
        elif name in _ROTARY_DIMS and 0 < head_dim < value:
            # rotary on part of each head (CodeGen's rotary_dim): the same share, even
            _set(small, name, max(2, value * head_dim // full.head_dim // 2 * 2), changes)
    layers = getattr(config, "num_hidden_layers", None)
    if isinstance(layers, int) and layers > LAYERS:
        _set(small, "num_hidden_layers", LAYERS, changes)
        for name, value in list(vars(small).items()):
            if isinstance(value, list | tuple) and len(value) == layers:
                _set(small, name, type(value)(value[:LAYERS]), changes)
        for name in _LAYER_INDEX_LISTS:
            value = getattr(small, name, None)
            if isinstance(value, list | tuple) and value:
                kept = [i for i in value if i < LAYERS] or [LAYERS - 1]
                _set(small, name, type(value)(kept), changes)
        for name in _FIRST_K_LAYERS:
            value = getattr(small, name, None)
            if isinstance(value, int) and value >= LAYERS:
                _set(small, name, LAYERS - 1, changes)
    _shrink_experts(small, changes)
    vocab = 64 * tp + 1
    if isinstance(getattr(small, "vocab_size", None), int) and small.vocab_size > vocab:
        _set(small, "vocab_size", vocab, changes)
        _fit_token_ids(small, vocab, changes)
    return small, changes


def _shrink_experts(config: Any, changes: dict[str, Any]) -> None:
    experts = None
    for name in _EXPERT_COUNTS:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 4:
            _set(config, name, 4, changes)
        experts = getattr(config, name, experts) if hasattr(config, name) else experts
    for name in _EXPERTS_PER_TOKEN:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 2:
            _set(config, name, 2, changes)
    groups = getattr(config, "n_group", None)
    if isinstance(groups, int) and isinstance(experts, int) and groups > 1:
        _set(config, "n_group", 2 if experts % 2 == 0 else 1, changes)
        if isinstance(getattr(config, "topk_group", None), int):
            _set(config, "topk_group", 1, changes)


def _fit_token_ids(config: Any, vocab: int, changes: dict[str, Any]) -> None:
    """Special token ids inside the shrunk vocabulary (an embedding's padding row must exist)."""
    for name, value in list(vars(config).items()):
        if not name.endswith("token_id"):
            continue
        if isinstance(value, int) and value >= vocab:
            _set(config, name, None if name == "pad_token_id" else vocab - 1, changes)
        elif isinstance(value, list) and any(isinstance(v, int) and v >= vocab for v in value):
            _set(config, name, [v for v in value if v < vocab] or [vocab - 1], changes)


def describe_changes(changes: dict[str, Any]) -> str:
    shown = {k: v for k, v in changes.items() if not isinstance(v, list | tuple)}
    return ", ".join(f"{k}={v}" for k, v in shown.items())


# -- one process standing in for the TP group -----------------------------------------
class _Hub:
    """Where the rank threads meet: each collective is one exchange of every rank's tensor."""

    def __init__(self, size: int) -> None:
        self.barrier = threading.Barrier(size, timeout=BARRIER_TIMEOUT_S)
        self.slots: list[torch.Tensor | None] = [None] * size

    def exchange(self, rank: int, tensor: torch.Tensor) -> list[torch.Tensor]:
        self.slots[rank] = tensor
        self.barrier.wait()
        parts = list(self.slots)
        self.barrier.wait()  # every rank has read before the next exchange writes
        return parts  # type: ignore[return-value]


@dataclass(frozen=True)
class SimulatedTP(TPGroup):
    """One rank of a TP group whose ranks are threads of this process.

    The collectives the TP layers use (``all_reduce``, ``all_gather``,
    ``gather_to_driver``) sum or concatenate every rank's tensor in rank order, as the
    real group does.
    """

    hub: Any = None

    @classmethod
    def ranks(cls, size: int) -> list[SimulatedTP]:
        hub = _Hub(size)
        cpu = torch.device("cpu")
        return [cls(r, size, r, size, cpu, None, False, hub=hub) for r in range(size)]

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return tensor
        parts = self.hub.exchange(self.rank, tensor.clone())
        total = parts[0].clone()
        for part in parts[1:]:
            total += part
        return tensor.copy_(total)

    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        if self.size == 1:
            return tensor
        return torch.cat(self.hub.exchange(self.rank, tensor.contiguous()), dim=dim)

    def gather_to_driver(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor | None:
        full = self.all_gather(tensor, dim)
        return full if self.is_driver else None

    def broadcast_host(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        if self.size > 1:
            tensor.copy_(self.hub.exchange(self.rank, tensor.clone())[src])
        return tensor

    def min_over_ranks(self, value: int) -> int:
        if self.size == 1:
            return value
        parts = self.hub.exchange(self.rank, torch.tensor([value]))
        return int(min(int(p[0]) for p in parts))

    def barrier(self) -> None:
        if self.size > 1:
            self.hub.barrier.wait()


class _MemoryCheckpoint:
    """The oracle's state dict where loading expects a checkpoint (``materialize``)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors
        self.path = "<shrunk copy>"

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[name]


# -- recording what each module returns ----------------------------------------------
def _first_tensor(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        logits = output.get("logits")
        if isinstance(logits, torch.Tensor):
            return logits
        output = list(output.values())
    if isinstance(output, list | tuple):
        for item in output:
            if isinstance(item, torch.Tensor):
                return item
    return None


@dataclass
class _Recorder:
    """Each module's first output tensor, in the order modules return, and the modules
    running now (where an exception came from)."""

    outputs: list[tuple[str, torch.Tensor]] = field(default_factory=list)
    stack: list[str] = field(default_factory=list)

    def attach(self, model: nn.Module) -> None:
        for name, module in model.named_modules():
            module.register_forward_pre_hook(self._enter(name))
            module.register_forward_hook(self._leave(name))

    def _enter(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any) -> None:
            self.stack.append(name)

        return hook

    def _leave(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self.stack and self.stack[-1] == name:
                self.stack.pop()
            tensor = _first_tensor(output)
            if tensor is not None:
                self.outputs.append((name, tensor.detach().clone()))

        return hook


def _seeded_oracle(config: Any, seed: int) -> nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        config, dtype=torch.float32, attn_implementation="eager"
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * STD)
    return model.eval()


def _sharded_copies(
    config: Any, policy: Policy, tp: int, state: dict[str, torch.Tensor]
) -> list[nn.Module]:
    """One model per rank, swapped and loaded as ``shard_model`` does (built one after the
    other: the meta build patches torch globally)."""
    from dstp.model.inject import materialize, swap_modules
    from dstp.model.meta_model import build_meta_model

    heads = policy.validate(config, tp)
    models = []
    for group in SimulatedTP.ranks(tp):
        model = build_meta_model(config, torch.float32, "eager")
        swap_modules(model, policy, heads, group, torch.float32)
        materialize(
            model, _MemoryCheckpoint(state), policy, group, torch.float32, config, progress=False
        )
        models.append(model.eval())
    return models


def _where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    place = f" ({frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}{place}"


def _run_ranks(models: list[nn.Module], ids: torch.Tensor) -> tuple[list[_Recorder], list]:
    """Every rank's forward in its own thread; (recorders, per-rank exception or None)."""
    recorders = [_Recorder() for _ in models]
    errors: list[BaseException | None] = [None] * len(models)

    def run(rank: int) -> None:
        try:
            with torch.inference_mode():
                models[rank](ids, use_cache=False)
        except BaseException as exc:  # reported below; the others stop at the barrier
            errors[rank] = exc
            for module in models[rank].modules():
                tp = getattr(module, "tp", None)
                if isinstance(tp, SimulatedTP):
                    tp.hub.barrier.abort()
                    break

    for recorder, model in zip(recorders, models, strict=True):
        recorder.attach(model)
    threads = [threading.Thread(target=run, args=(r,), daemon=True) for r in range(len(models))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return recorders, errors


def _logits(recorder: _Recorder) -> torch.Tensor | None:
    """What the whole model (module ``""``) returned: its logits."""
    return next((t for name, t in reversed(recorder.outputs) if name == ""), None)


def _tolerance(reference: torch.Tensor) -> float:
    """fp32 in another summation order differs by ~1e-6 of the values' size; a wrong split
    by about their size. 1e-3 of it leaves room for long recurrences (HRM's cycles)."""
    return 1e-3 * max(1.0, float(reference.abs().max()))


_CACHE: dict[tuple, Proof] = {}


def prove_policy(config: Any, policy: Policy, tp: int, seed: int = 0) -> Proof:
    """Run the proof (module docstring); a :class:`PolicyProofFailed` names what differs,
    and is all it raises: whatever else goes wrong is said as one."""
    try:
        key = (config.to_json_string(), tp, policy.name, repr(policy))
    except Exception:  # a config that does not serialise: prove it every time
        key = None
    if key is not None and key in _CACHE:
        return _CACHE[key]
    try:
        proof = _prove(config, policy, tp, seed)
    except PolicyProofFailed:
        raise
    except Exception as exc:
        raise PolicyProofFailed(
            f"derived policy {policy.name!r} could not be proven at TP={tp}: {_where(exc)}; "
            "write a policy for it (docs/writing-a-policy.md) and pass it with --policy"
        ) from exc
    if key is not None:
        _CACHE[key] = proof
    return proof


def _prove(config: Any, policy: Policy, tp: int, seed: int) -> Proof:
    prefix = f"derived policy {policy.name!r} at TP={tp}"
    try:
        small, changes = shrink_config(config, policy, tp)
        oracle = _seeded_oracle(small, seed)
    except Exception as exc:
        raise PolicyProofFailed(
            f"{prefix} cannot be proven: building a shrunk copy of the model failed "
            f"({_where(exc)}); write a policy for it (docs/writing-a-policy.md) and pass it "
            "with --policy"
        ) from exc
    shrunk = describe_changes(changes)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, small.vocab_size, (1, PROMPT_LEN), generator=generator)
    reference = _Recorder()
    reference.attach(oracle)
    try:
        with torch.inference_mode():
            want = oracle(ids, use_cache=False).logits
    except Exception as exc:
        raise PolicyProofFailed(
            f"{prefix} cannot be proven: HF's own forward of a shrunk copy of the model "
            f"({shrunk}) raised {_where(exc)}; write a policy for it "
            "(docs/writing-a-policy.md) and pass it with --policy"
        ) from exc
    state = {k: v.detach() for k, v in oracle.state_dict().items()}
    try:
        models = _sharded_copies(small, policy, tp, state)
    except Exception as exc:
        raise PolicyProofFailed(
            f"{prefix} does not fit a shrunk copy of the model ({shrunk}): {_where(exc)}"
        ) from exc
    recorders, errors = _run_ranks(models, ids)
    first = next(
        (
            (r, e)
            for r, e in enumerate(errors)
            if e is not None and not isinstance(e, threading.BrokenBarrierError)
        ),
        None,
    ) or next(((r, e) for r, e in enumerate(errors) if e is not None), None)
    if first is not None:
        rank, exc = first
        inside = recorders[rank].stack[-1] if recorders[rank].stack else "the model"
        raise PolicyProofFailed(
            f"{prefix} fails on a shrunk copy of the model ({shrunk}): rank {rank}'s forward "
            f"raised in {inside or 'the model'}: {_where(exc)}. The policy does not describe "
            "this architecture; write one (docs/writing-a-policy.md) and pass it with --policy"
        )
    compared = _compare(reference.outputs, recorders[0].outputs, prefix, shrunk)
    got = _logits(recorders[0])
    for rank, recorder in enumerate(recorders[1:], start=1):
        other = _logits(recorder)
        if got is None or other is None or other.shape != got.shape or not torch.equal(other, got):
            raise PolicyProofFailed(f"{prefix}: rank {rank}'s logits differ from rank 0's")
    err = float((got - want).abs().max()) if got is not None else float("inf")
    if got is None or got.shape != want.shape or err > _tolerance(want):
        raise PolicyProofFailed(
            f"{prefix} gives other logits than HF on a shrunk copy of the model ({shrunk}): "
            f"max |dlogit| {err:.2e}"
        )
    return Proof(tp, shrunk, err, compared)


def _compare(
    reference: list[tuple[str, torch.Tensor]],
    sharded: list[tuple[str, torch.Tensor]],
    prefix: str,
    shrunk: str,
) -> int:
    """Compare rank 0's full-width module outputs with HF's, call by call, in the order
    rank 0 produced them; the first that differs refuses the policy. Returns how many
    were compared."""
    want: dict[tuple[str, int], torch.Tensor] = {}
    seen: dict[str, int] = {}
    for name, tensor in reference:
        want[(name, seen.get(name, 0))] = tensor
        seen[name] = seen.get(name, 0) + 1
    seen.clear()
    compared = 0
    for name, tensor in sharded:
        call = seen.get(name, 0)
        seen[name] = call + 1
        ref = want.get((name, call))
        if (
            ref is None
            or ref.shape != tensor.shape
            or not ref.is_floating_point()
            or not ref.numel()
        ):
            continue  # a column-split activation: this rank holds a slice of it
        compared += 1
        err = float((tensor.float() - ref.float()).abs().max())
        if not err <= _tolerance(ref):
            where = f"module {name}" if name else "the model's output"
            raise PolicyProofFailed(
                f"{prefix} gives other numbers than HF on a shrunk copy of the model "
                f"({shrunk}): {where} differs first (max |d| {err:.2e}). The policy does not "
                "describe this layer; write one (docs/writing-a-policy.md) and pass it with "
                "--policy"
            )
    return compared


# -- at load: the driver proves, every rank learns the verdict ---------------------------
MESSAGE_BYTES = 4096


def prove_for_load(config: Any, policy: Policy, tp: TPGroup) -> None:
    """Prove a derived ``policy`` before any weight is read; on every rank of ``tp``.

    The group's driver runs the proof (the others wait: the proof itself stands in for
    every rank) and broadcasts its verdict, so a refusal stops every rank with the same
    :class:`PolicyProofFailed` naming the layer.
    """
    message = ""
    if tp.is_driver:
        try:
            proof = prove_policy(config, policy, tp.size)
            log.info(
                "derived policy %r proven at TP=%d on a shrunk copy of the model (%s): "
                "%d module outputs and the logits equal HF's (max |dlogit| %.1e)",
                policy.name,
                tp.size,
                proof.shrunk,
                proof.compared,
                proof.max_logit_error,
            )
        except PolicyProofFailed as exc:
            message = str(exc)
    if tp.size > 1:
        wire = torch.zeros(MESSAGE_BYTES, dtype=torch.uint8)
        if tp.is_driver and message:
            data = message.encode()[: MESSAGE_BYTES - 1]
            wire[: len(data)] = torch.tensor(list(data), dtype=torch.uint8)
        tp.broadcast_host(wire)
        data = bytes(wire.tolist())
        message = data[: data.index(0)].decode(errors="replace") if data[0] else ""
    if message:
        raise PolicyProofFailed(message)
