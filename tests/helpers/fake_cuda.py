"""A fake CUDA device for tests on a CPU-only torch: device tensors that cannot mix.

``with fake_cuda() as dev:`` makes ``torch.device("cuda:N")`` usable on a CPU build:

* every tensor on "cuda" is a ``FakeTensor`` (``torch._subclasses.fake_tensor``): its
  device, shape and dtype propagate through torch's own meta kernels, and an op that
  mixes it with a (non-scalar) CPU tensor raises ``FakeTensorDeviceMismatchError``, as
  CUDA would. A CPU ``torch.Generator`` used on a cuda tensor raises too.
* each fake tensor carries a *shadow*: a real CPU tensor on which the same op runs, so
  values exist where the host reads them (sampled token ids), views alias as they would,
  and a run gives the same tokens as on the CPU. Host tensors stay real tensors.
* every host<->device movement is counted (:class:`Transfers`): uploads (``.to("cuda")``,
  ``copy_`` into a cuda tensor, a CPU index tensor used on a cuda tensor), downloads
  (``.to("cpu")``, ``copy_`` into a host tensor) and syncs (``.item()``, ``.tolist()``,
  ``bool(t)``, data-dependent shapes such as ``nonzero``), each with the Python line that
  made it, and an upload from pageable memory marked ``non_blocking`` (a hidden sync).
* the ``torch.cuda`` calls dstp makes are stubbed (``mem_get_info`` reports the card's
  ``total_bytes``; ``memory_allocated`` / ``max_memory_allocated`` count the bytes of
  the fake storages alive; ``Event``, ``Stream``, ``synchronize``, ``set_device``,
  ``current_device``, ``empty_cache``, ``reset_peak_memory_stats``),
  ``pin_memory=True`` / ``is_pinned()`` work on host tensors, and
  ``torch.Generator("cuda")`` gives a CPU generator that reports device cuda.

A CUDA ``DeviceGuardImpl`` is needed for ``Tensor.copy_``, ``.item()`` and ``.to("cuda")``
(their Python bindings take a device guard before dispatch): torch's own
``c10::impl::FakeGuardImpl`` is registered for CUDA from a tiny C++ library, built once
(about a second) under ``~/.cache/dstp/fake_cuda``. Registration is permanent for the
process and changes nothing for CPU tensors; ``torch.cuda.is_available()`` stays False.

The mode is per thread (torch dispatch modes are thread-local) and blocks do not nest.
Every op on a cuda tensor runs through Python twice (fake and shadow): a stories260K
decode step (about 700 ops) takes about 0.3 s.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import subprocess
import threading
import traceback
import weakref
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import torch
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensor,
    FakeTensorMode,
)
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

aten = torch.ops.aten

_GUARD_SOURCE = """
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/core/impl/FakeGuardImpl.h>
C10_REGISTER_GUARD_IMPL(CUDA, c10::impl::FakeGuardImpl<c10::DeviceType::CUDA>);
"""
_GUARD_LOADED = False


class DeviceMixError(RuntimeError):
    """A cuda tensor met a CPU one (or a CPU generator) where CUDA would refuse."""


def register_cuda_guard() -> None:
    """Build (once per torch version) and load the library registering a CUDA device guard."""
    global _GUARD_LOADED
    if _GUARD_LOADED:
        return
    torch_dir = Path(torch.__file__).parent
    key = hashlib.sha256((torch.__version__ + str(torch_dir) + _GUARD_SOURCE).encode()).hexdigest()
    folder = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dstp" / "fake_cuda"
    library = folder / f"guard_{key[:16]}.so"
    if not library.exists():
        folder.mkdir(parents=True, exist_ok=True)
        source = folder / f"guard_{key[:16]}.cpp"
        source.write_text(_GUARD_SOURCE)
        partial = library.with_suffix(f".{os.getpid()}.tmp")
        compiler = os.environ.get("CXX", "c++")
        if shutil.which(compiler) is None:
            raise RuntimeError(
                f"the fake CUDA device builds a small library with a C++ compiler ({compiler!r}, "
                "or $CXX): install one (the same that DeepSpeed's ops build with)"
            )
        subprocess.run(
            [compiler, "-shared", "-fPIC", "-std=c++17", "-O0", f"-I{torch_dir / 'include'}",
             str(source), f"-L{torch_dir / 'lib'}", "-lc10", f"-Wl,-rpath,{torch_dir / 'lib'}",
             "-o", str(partial)],
            check=True,
            capture_output=True,
        )  # fmt: skip
        partial.replace(library)
    ctypes.CDLL(str(library))
    _GUARD_LOADED = True


# -- counting --------------------------------------------------------------------------
@dataclass
class Transfers:
    """Host<->device movements seen, by kind, each with where it happened."""

    counts: Counter = field(default_factory=Counter)
    sites: dict[str, list[str]] = field(default_factory=dict)

    KINDS = ("upload", "implicit_upload", "pageable_non_blocking", "download", "sync")

    def add(self, kind: str, what: str) -> None:
        self.counts[kind] += 1
        self.sites.setdefault(kind, []).append(f"{what} at {_caller()}")

    def reset(self) -> None:
        self.counts.clear()
        self.sites.clear()

    def __getitem__(self, kind: str) -> int:
        return self.counts[kind]

    def snapshot(self) -> dict[str, int]:
        return {kind: self.counts[kind] for kind in self.KINDS}


def _caller() -> str:
    """The innermost frame outside torch and this file: the line that moved the data."""
    torch_dir = str(Path(torch.__file__).parent)
    for frame in reversed(traceback.extract_stack(limit=40)):
        if frame.filename == __file__ or frame.filename.startswith(torch_dir):
            continue
        return f"{Path(frame.filename).name}:{frame.lineno}"
    return "?"


# -- the device ------------------------------------------------------------------------
def _is_cuda(x: object) -> bool:
    return isinstance(x, FakeTensor) and x.device.type == "cuda"


def _is_cuda_device(x: object) -> bool:
    return isinstance(x, (torch.device, str)) and torch.device(x).type == "cuda"


@dataclass
class FakeCuda:
    """State of one ``fake_cuda()`` block: counters, memory, the stubbed device's size."""

    total_bytes: int
    transfers: Transfers = field(default_factory=Transfers)
    allocated: int = 0
    peak: int = 0
    current_device: int = 0
    bf16: bool = True  # torch.cuda.is_bf16_supported(): an Ampere or later card
    set_device_calls: list[tuple[str, int]] = field(default_factory=list)

    def _alloc(self, nbytes: int) -> None:
        self.allocated += nbytes
        self.peak = max(self.peak, self.allocated)

    def _free(self, nbytes: int) -> None:
        self.allocated -= nbytes


class _ShadowMode(TorchDispatchMode):
    """Runs every op touching a cuda tensor twice: on fake tensors (devices checked) and on
    their real CPU shadows (values); host-only ops run as they are."""

    def __init__(self, state: FakeCuda) -> None:
        super().__init__()
        self.state = state
        self.fake = FakeTensorMode(allow_non_fake_inputs=True)
        self.pinned: dict[int, int] = {}  # data_ptr -> nbytes of host buffers made pinned
        self._storages: dict[int, int] = {}  # live fake storages: shadow data_ptr -> nbytes
        self._refs: dict[int, set[weakref.ref]] = {}  # the fake tensors on each

    # -- helpers
    def _mark_pinned(self, t: torch.Tensor) -> torch.Tensor:
        self.pinned[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    def _is_pinned(self, t: torch.Tensor) -> bool:
        if _is_cuda(t):
            return False
        return t.untyped_storage().data_ptr() in self.pinned

    def _track(self, t: FakeTensor, real: torch.Tensor) -> None:
        """Count a fake storage's bytes while any fake tensor on it lives."""
        storage = real.untyped_storage()
        key, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes == 0:
            return
        if key not in self._storages:
            self._storages[key] = nbytes
            self.state._alloc(nbytes)
        refs = self._refs.setdefault(key, set())

        def dead(ref: weakref.ref) -> None:
            refs.discard(ref)
            if not refs and self._refs.get(key) is refs:
                del self._refs[key]
                self.state._free(self._storages.pop(key))

        refs.add(weakref.ref(t, dead))

    def _real(self, x: object) -> object:
        if _is_cuda(x):
            return x._dstp_shadow  # type: ignore[attr-defined]
        if _is_cuda_device(x):
            return torch.device("cpu")
        return x

    def _fake(self, x: object) -> object:
        if isinstance(x, torch.Tensor) and not isinstance(x, FakeTensor):
            return self.fake.from_tensor(x)
        if isinstance(x, torch._C.Generator):
            return None  # checked by _GeneratorCheck; fake mode's refs refuse generators
        return x

    # -- dispatch
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat = _flat(args, kwargs)
        cuda = any(_is_cuda(a) or _is_cuda_device(a) for a in flat)
        if func is torch.ops.prim.device.default and _is_cuda(args[0]):
            return args[0].fake_device
        if func is aten.is_pinned.default:
            return self._is_pinned(args[0])
        if not cuda:
            return self._host(func, args, kwargs)
        if _is_composite(func):  # seen under inference_mode: run its parts through this mode
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        self._count(func, args, kwargs, flat)
        real_args, real_kwargs = _map(self._real, args, kwargs)
        real_kwargs.pop("pin_memory", None)
        try:
            # host tensors as fakes too: else fake mode may run the op for real ("constants")
            fake_args, fake_kwargs = _map(self._fake, args, kwargs)
            with self.fake:
                fake_out = func(*fake_args, **fake_kwargs)
        except (DataDependentOutputException, DynamicOutputShapeException):
            fake_out = None  # a read of device values (counted by _count); shapes from the real op
        real_out = func(*real_args, **real_kwargs)
        if fake_out is None:
            return self._from_real(real_out)
        fakes, spec = tree_flatten(fake_out)
        reals, _ = tree_flatten(real_out)
        out = []
        for f, r in zip(fakes, reals, strict=True):
            if _is_cuda(f):
                if getattr(f, "_dstp_shadow", None) is not r:
                    f._dstp_shadow = r
                    self._track(f, r)
                out.append(f)
            elif isinstance(f, torch.Tensor):
                out.append(r)  # host tensors are real
            else:
                out.append(f)  # metadata (a device, a size) is the fake's
        return tree_unflatten(out, spec)

    def _from_real(self, real_out):
        """Fake cuda tensors shaped as a data-dependent op's real (shadow) results."""

        def wrap(r):
            if not isinstance(r, torch.Tensor):
                return r
            with self.fake:
                f = torch.empty_strided(r.shape, r.stride(), dtype=r.dtype, device="cuda")
            f._dstp_shadow = r
            self._track(f, r)
            return f

        return tree_map(wrap, real_out)

    def _host(self, func, args, kwargs):
        if kwargs.get("pin_memory"):
            kwargs = {k: v for k, v in kwargs.items() if k != "pin_memory"}
            return self._mark_pinned(func(*args, **kwargs))
        if func is aten._pin_memory.default:
            return self._mark_pinned(args[0].clone())
        return func(*args, **kwargs)

    def _count(self, func, args, kwargs, flat) -> None:
        t = self.state.transfers
        name = str(func.overloadpacket.__name__)
        if func is aten._local_scalar_dense.default or func.overloadpacket in _READS:
            t.add("sync", name)
            return
        if func.overloadpacket in _DATA_DEPENDENT and kwargs.get("output_size") is None:
            t.add("sync", f"{name} (data-dependent shape)")  # output_size= would spare it
        if func.overloadpacket in (aten._to_copy, aten.copy_, aten.copy):
            src = args[1] if func.overloadpacket is not aten._to_copy else args[0]
            dst_cuda = (
                _is_cuda_device(kwargs.get("device"))
                if func.overloadpacket is aten._to_copy
                else _is_cuda(args[0])
            )
            if func.overloadpacket is aten._to_copy and kwargs.get("device") is None:
                dst_cuda = _is_cuda(src)
            src_cuda = _is_cuda(src)
            if dst_cuda and not src_cuda and isinstance(src, torch.Tensor):
                t.add("upload", f"{name} of {src.numel()} elements")
                non_blocking = kwargs.get("non_blocking", False) or (
                    len(args) > 2 and bool(args[2])
                )
                if non_blocking and not self._is_pinned(src):
                    t.add("pageable_non_blocking", name)
            elif src_cuda and not dst_cuda:
                t.add("download", f"{name} of {src.numel()} elements")
            return
        for a in flat:
            if isinstance(a, torch.Tensor) and not _is_cuda(a) and a.dim() > 0:
                t.add("implicit_upload", f"{name} with a host tensor of {a.numel()} elements")


_COMPOSITE: dict[object, bool] = {}


def _is_composite(func) -> bool:
    known = _COMPOSITE.get(func)
    if known is None:
        known = _COMPOSITE[func] = func.namespace == "aten" and (
            torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CompositeImplicitAutograd")
        )
    return known


def _flat(args: tuple, kwargs: dict) -> list:
    """The leaves of an op's arguments (lists and tuples of tensors one level down)."""
    out = []
    for a in (*args, *kwargs.values()):
        if isinstance(a, (list, tuple)):
            out.extend(a)
        else:
            out.append(a)
    return out


def _map(fn, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    def one(a):
        if isinstance(a, (list, tuple)):
            return type(a)(fn(x) for x in a)
        return fn(a)

    return tuple(one(a) for a in args), {k: one(v) for k, v in kwargs.items()}


_ACTIVE: list[FakeCuda] = []
_READS = {aten.equal, aten.is_nonzero, aten._assert_async}
_DATA_DEPENDENT = {
    aten.nonzero,
    aten.masked_select,
    aten._unique2,
    aten.unique_consecutive,
    aten.unique_dim,
    aten.repeat_interleave,
}


class _GeneratorCheck(TorchFunctionMode):
    """A generator must be on the device of the tensors it draws for. Checked at the torch
    function level: a generator reaching ``__torch_dispatch__`` is a new wrapper that has
    lost :class:`_Generator`'s device."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat = _flat(args, kwargs)
        for gen in flat:
            if not isinstance(gen, torch._C.Generator):
                continue
            cuda = any(_is_cuda(a) or _is_cuda_device(a) for a in flat)
            if (gen.device.type == "cuda") != cuda:
                where = "cuda" if cuda else "cpu"
                raise DeviceMixError(
                    f"{getattr(func, '__name__', func)}: a {gen.device} generator drawing for "
                    f"{where} tensors (CUDA refuses it)"
                )
        return func(*args, **kwargs)


class _Generator(torch._C.Generator):
    """``torch.Generator("cuda")`` on a CPU build: a CPU generator that says it is on cuda
    (the shadow ops draw from it; the fake ops see a cuda generator)."""

    def __new__(cls, device: object = "cpu") -> _Generator:
        gen = torch._C.Generator.__new__(cls)
        gen._dstp_device = torch.device(device)
        if gen._dstp_device.type == "cuda" and gen._dstp_device.index is None:
            gen._dstp_device = torch.device("cuda", 0)
        return gen

    @property
    def device(self) -> torch.device:
        return self._dstp_device


class _Event:
    def __init__(self, *args, **kwargs) -> None:
        self.recorded = False

    def record(self, stream=None) -> None:
        self.recorded = True

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def wait(self, stream=None) -> None:
        pass

    def elapsed_time(self, other) -> float:
        return 0.0


class _Stream:
    def __init__(self, *args, **kwargs) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def wait_stream(self, other) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event=None):
        return event or _Event()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def _cuda_stubs(state: FakeCuda) -> dict[str, object]:
    def set_device(device) -> None:
        index = device if isinstance(device, int) else torch.device(device).index or 0
        state.current_device = index
        state.set_device_calls.append((threading.current_thread().name, index))

    return {
        "mem_get_info": lambda device=None: (
            state.total_bytes - state.allocated,
            state.total_bytes,
        ),
        "synchronize": lambda device=None: None,
        "reset_peak_memory_stats": lambda device=None: setattr(state, "peak", state.allocated),
        "memory_allocated": lambda device=None: state.allocated,
        "max_memory_allocated": lambda device=None: state.peak,
        "memory_reserved": lambda device=None: state.allocated,
        "empty_cache": lambda: None,
        "Event": _Event,
        "Stream": _Stream,
        "current_stream": lambda device=None: _Stream(),
        "stream": lambda s: contextlib.nullcontext(),
        "set_device": set_device,
        "current_device": lambda: state.current_device,
        "is_bf16_supported": lambda including_emulation=True: state.bf16,
        "_lazy_init": lambda: None,  # a factory with device="cuda" initialises CUDA first
    }


@contextlib.contextmanager
def fake_cuda(total_gib: float = 80.0) -> Iterator[FakeCuda]:
    """A fake CUDA device of ``total_gib`` for the block's thread (see the module doc)."""
    if _ACTIVE:
        raise RuntimeError("fake_cuda() blocks do not nest: end the outer one first")
    register_cuda_guard()
    state = FakeCuda(total_bytes=int(total_gib * 2**30))
    with contextlib.ExitStack() as stack:
        for name, stub in _cuda_stubs(state).items():
            stack.enter_context(mock.patch.object(torch.cuda, name, stub, create=True))
        # torch.tensor(data, device="cuda") then builds on the host and moves it through
        # this mode (as under FakeTensorMode), not in C++ where no mode sees it
        lift_cpu_only = torch._C._only_lift_cpu_tensors()
        torch._C._set_only_lift_cpu_tensors(True)
        stack.callback(torch._C._set_only_lift_cpu_tensors, lift_cpu_only)
        stack.enter_context(_ShadowMode(state))
        _ACTIVE.append(state)
        stack.callback(_ACTIVE.pop)

        def one_read(self: torch.Tensor):  # one copy of the whole tensor, not one per element
            state.transfers.add("sync", f"tolist of {self.numel()} elements")
            return shadow(self).tolist()

        stack.enter_context(mock.patch.object(FakeTensor, "tolist", one_read))
        stack.enter_context(mock.patch.object(torch, "Generator", _Generator))
        stack.enter_context(_GeneratorCheck())
        yield state


@contextlib.contextmanager
def fake_cuda_rank(total_gib: float = 80.0) -> Iterator[FakeCuda]:
    """:func:`fake_cuda`, with this process a TP=1 rank on ``cuda:0`` for the block (the
    engine's TP group is put back after it)."""
    from dstp import distributed as dist

    kept = dist._TP
    with fake_cuda(total_gib) as state:
        dist._TP = dist.TPGroup(0, 1, 0, 1, torch.device("cuda:0"), None, False)
        try:
            yield state
        finally:
            dist._TP = kept


def shadow(t: torch.Tensor) -> torch.Tensor:
    """The real values of a fake cuda tensor (for assertions)."""
    return t._dstp_shadow if _is_cuda(t) else t  # type: ignore[attr-defined]
