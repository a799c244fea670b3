"""Counting a whole engine step's shape on the CPU: kernel-launching ops and host readbacks.

Issue 22's method, shared by benchmarks/step_shape.py (the table) and
tests/worker/test_step_shape.py (the bounds). A random bf16 Llama (hidden 256) serves 8
requests decoding together with temperature, top-p, top-k, repetition penalty and seeds;
over ``STEPS`` decode steps (after the prefill and one warm decode):

* ops: every op a ``TorchDispatchMode`` sees that would launch a kernel on a GPU (not
  views, not bare allocations, not metadata), plus each call into dstp's CPU kernel
  extension (a pybind call is one kernel, and the mode sees only the ATen ops around
  it). Those inside the model's forward are counted apart, so the decoder layer's share
  is (8-layer forward - 4-layer forward) / 4 and the rest of the step is the step's
  ops less 8 layers' worth.
* readbacks: calls that make the host wait for a device value when the tensor lives on
  a GPU: ``Tensor.tolist``, ``.item()`` (and ``int()``, ``float()``, ``bool()`` of a
  tensor: the mode's ``_local_scalar_dense``), ``.cpu()``, ``.numpy()``, ``.to("cpu")``
  (the literal form), on a tensor that would live on the device (see ``ShapeCounter``).
  A dispatch mode does not see most of them on the CPU (they return the tensor itself,
  or read its storage directly), so they are patched on ``torch.Tensor`` for the step.
* list uploads: ``torch.tensor(data, device=...)`` with a device, a blocking copy of
  Python data to the device (the sampler's one packed upload is not one of these).

Every readback and list upload is kept with the line of dstp that made it.
"""

from __future__ import annotations

import collections
import contextlib
import os
import tempfile
import traceback
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

STEPS = 5
BATCH = 8
HIDDEN = 256

# ops that create a view, an empty tensor or only read metadata: no kernel on a GPU
NOT_KERNELS = frozenset({
    "view", "_unsafe_view", "reshape", "alias", "as_strided", "expand", "permute",
    "transpose", "t", "unsqueeze", "squeeze", "select", "slice", "narrow", "split",
    "split_with_sizes", "unbind", "chunk", "detach", "empty", "empty_like",
    "empty_strided", "new_empty", "new_empty_strided", "lift_fresh", "view_as_real",
    "view_as_complex", "_reshape_alias", "sym_size", "sym_stride", "sym_numel",
    "is_same_size", "_has_compatible_shallow_copy_type", "dim", "size", "stride",
    "detach_", "item",
    "_local_scalar_dense",  # a readback (counted as one), not a kernel
})  # fmt: skip
# ops that hand back their input, or a view of it, when there is nothing to copy (a kernel
# only when they copy)
VIEW_IF_THEY_CAN = frozenset({
    "to", "contiguous", "resolve_conj", "resolve_neg", "type_as", "flatten", "reshape_as",
    "view_as",
})  # fmt: skip


def _aliases(out: object, args: tuple) -> bool:
    """Whether ``out`` is a tensor sharing its first argument's memory (no copy made)."""
    first = args[0] if args else None
    if not isinstance(out, torch.Tensor) or not isinstance(first, torch.Tensor):
        return False
    return out.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()


READBACK_METHODS = ("tolist", "cpu", "numpy", "to")  # item(): _local_scalar_dense, below


@dataclass
class StepCounts:
    """What one counter saw while active, summed over its steps."""

    ops: collections.Counter = field(default_factory=collections.Counter)
    readbacks: collections.Counter = field(default_factory=collections.Counter)  # by site
    uploads: collections.Counter = field(default_factory=collections.Counter)  # by site

    @property
    def num_ops(self) -> int:
        return sum(self.ops.values())

    @property
    def num_readbacks(self) -> int:
        return sum(self.readbacks.values())

    @property
    def num_uploads(self) -> int:
        return sum(self.uploads.values())


def _site(skip: int = 3) -> str:
    """The innermost line of dstp (else of anything) that led here."""
    frames = traceback.extract_stack()[:-skip]
    for frame in reversed(frames):
        if f"{os.sep}dstp{os.sep}" in frame.filename and "step_counts" not in frame.filename:
            path = frame.filename[frame.filename.rindex(f"{os.sep}dstp{os.sep}") + 1 :]
            return f"{path}:{frame.lineno} {frame.name}"
    frame = frames[-1]
    return f"{Path(frame.filename).name}:{frame.lineno} {frame.name}"


class ShapeCounter(TorchDispatchMode):
    """Counts a step's ops and readbacks while ``active``; the forward's apart.

    A readback counts only on a tensor that would live on the device: a model weight, a
    step upload's result, one made inside the model's forward, or one made by an op with
    such a tensor among its inputs (tracked by identity, weakly). The engine's host arrays (the plan's positions, lengths, block tables...)
    are read on the host on a GPU too, so reading them is no wait and is not counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.active = False
        self.in_forward = False
        self.step = StepCounts()
        self.forward = StepCounts()
        self._device: dict[int, weakref.ref] = {}  # id -> the tensor (ids are reused: checked)

    def mark(self, tensor: object) -> None:
        """``tensor`` lives on the device (a model weight, an upload's result)."""
        if isinstance(tensor, torch.Tensor):
            self._device[id(tensor)] = weakref.ref(tensor)

    def on_device(self, tensor: object) -> bool:
        if not isinstance(tensor, torch.Tensor):
            return False
        ref = self._device.get(id(tensor))
        return ref is not None and ref() is tensor

    def op(self, name: str) -> None:
        if self.active:
            self.step.ops[name] += 1
            if self.in_forward:
                self.forward.ops[name] += 1

    def readback(self, tensor: object, what: str) -> None:
        if self.active and self.on_device(tensor):
            self.step.readbacks[f"{what} at {_site()}"] += 1

    def upload(self) -> None:
        if self.active:
            self.step.uploads[f"torch.tensor at {_site()}"] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name == "_local_scalar_dense":
            self.readback(args[0], "item/int/float/bool")
        out = func(*args, **kwargs)
        if name not in NOT_KERNELS and not (name in VIEW_IF_THEY_CAN and _aliases(out, args)):
            self.op(name)
        inputs = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
        inputs += [t for a in args if isinstance(a, (list, tuple)) for t in a if self.on_device(t)]
        if self.active and (self.in_forward or any(self.on_device(t) for t in inputs)):
            for t in out if isinstance(out, (list, tuple)) else (out,):
                self.mark(t)
        return out


class _CountedKernels:
    """dstp's CPU kernel extension with each call counted as one op (its outputs on the
    device: the kernels run only on model tensors)."""

    def __init__(self, ops: object, counter: ShapeCounter) -> None:
        self._ops, self._counter = ops, counter

    def __getattr__(self, name: str):
        attr = getattr(self._ops, name)
        if not callable(attr):
            return attr

        def counted(*args, **kwargs):
            self._counter.op(f"dstp.{name}")
            out = attr(*args, **kwargs)
            for t in out if isinstance(out, (list, tuple)) else (out,):
                self._counter.mark(t)  # as a dispatched op's output on device tensors
            return out

        return counted


def _to_cpu(args: tuple, kwargs: dict) -> bool:
    """Whether ``Tensor.to(*args, **kwargs)`` names the CPU literally (``.to("cpu")``).

    ``.to(x.device)`` with x a device tensor (HF's rotary does it) is no readback on a GPU,
    though on the CPU its target is the CPU too: only the literal form is counted.
    """
    target = kwargs.get("device", args[0] if args else None)
    return isinstance(target, str) and torch.device(target).type == "cpu"


@contextlib.contextmanager
def counting(counter: ShapeCounter) -> Iterator[None]:
    """Patch the readback methods, ``torch.tensor`` and dstp's kernel extension so that the
    counter sees them, and enter its dispatch mode."""
    from dstp.cpu import kernels as cpu_kernels

    originals = {name: getattr(torch.Tensor, name) for name in READBACK_METHODS}

    def patched(name):
        original = originals[name]

        def method(self, *args, **kwargs):
            if name != "to" or _to_cpu(args, kwargs):
                counter.readback(self, name)
            return original(self, *args, **kwargs)

        return method

    tensor = torch.tensor

    def counted_tensor(*args, **kwargs):
        if kwargs.get("device") is not None:
            counter.upload()
        return tensor(*args, **kwargs)

    from dstp.worker.step_inputs import PackedUpload

    uploads = {name: getattr(PackedUpload, name) for name in ("upload", "upload_into")}

    def marking(original):
        def method(self, *args, **kwargs):
            out = original(self, *args, **kwargs)
            counter.mark(out)  # a host array's copy on the device
            return out

        return method

    built = cpu_kernels._ops()
    kernels = cpu_kernels._ops
    if built is not None:
        wrapped = _CountedKernels(built, counter)
        cpu_kernels._ops = lambda: wrapped
    for name in READBACK_METHODS:
        setattr(torch.Tensor, name, patched(name))
    for name, original in uploads.items():
        setattr(PackedUpload, name, marking(original))
    torch.tensor = counted_tensor
    try:
        with counter:
            yield
    finally:
        torch.tensor = tensor
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
        for name, original in uploads.items():
            setattr(PackedUpload, name, original)
        cpu_kernels._ops = kernels


def build_engine(layers: int, root: Path | None = None, **config):
    """A TP=1 engine over a random bf16 Llama of ``layers`` layers (hidden 256)."""
    from dstp.engine.llm_engine import Engine, EngineConfig
    from tests.helpers.tiny_models import llama_config, save_random_model

    model = llama_config(
        hidden_size=HIDDEN,
        intermediate_size=3 * HIDDEN,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1024,
        max_position_embeddings=512,
    )
    root = Path(tempfile.mkdtemp()) if root is None else root
    path = save_random_model(model, root / f"llama{layers}")
    return Engine(EngineConfig(str(path), dtype="bfloat16", num_blocks=128, **config))


def decode_params(index: int):
    """Sampled and penalised, seeded: the issue's mix."""
    from dstp.engine.sampling_params import SamplingParams

    return SamplingParams(
        max_tokens=STEPS + 4,
        temperature=0.8,
        top_p=0.9,
        top_k=40,
        repetition_penalty=1.2,
        seed=7 + index,
        ignore_eos=True,
    )


@dataclass
class Counted:
    """One engine's ``STEPS`` decode steps: the whole steps' counts and the forwards'."""

    step: StepCounts
    forward: StepCounts
    steps: int
    fused_layers: int | None

    def per_step(self, what: str) -> float:
        return getattr(self.step, f"num_{what}") / self.steps


def count_decode_steps(engine, steps: int = STEPS, before_step=None) -> Counted:
    """Add BATCH requests, prefill and decode once, then count ``steps`` decode steps.

    ``before_step``: called inside each counted step's window (a test adds a readback).
    """
    for i in range(BATCH):
        engine.add_request(f"r{i}", [3 + i, 17, 29, 101 + i, 5], decode_params(i))
    engine.step()  # the prefill
    engine.step()  # one warm decode
    counter = ShapeCounter()
    base = engine.runner.base_model
    for tensor in (*base.parameters(), *base.buffers()):
        counter.mark(tensor)
    hooks = [
        base.register_forward_pre_hook(lambda *_: setattr(counter, "in_forward", True)),
        base.register_forward_hook(lambda *_: setattr(counter, "in_forward", False)),
    ]
    first = engine.num_steps
    try:
        with counting(counter):
            for _ in range(steps):
                counter.active = True
                if before_step is not None:
                    before_step(engine)
                engine.step()
                counter.active = False
    finally:
        for hook in hooks:
            hook.remove()
    assert engine.num_steps == first + steps, "a counted step ran no forward"
    sharded = getattr(engine.runner, "sharded", None)
    return Counted(counter.step, counter.forward, steps, getattr(sharded, "fused_layers", None))
