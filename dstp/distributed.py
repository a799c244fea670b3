"""Process-group set-up and the few collectives tensor parallelism needs.

Everything goes through ``deepspeed.comm`` so the same code runs on NCCL (GPU)
and gloo / shared memory (CPU). The rank layout comes from the environment the
``deepspeed`` launcher (or ``torchrun``) sets: RANK, LOCAL_RANK, WORLD_SIZE,
LOCAL_WORLD_SIZE (or LOCAL_SIZE), MASTER_ADDR, MASTER_PORT.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, NoReturn, TypeVar

import torch

if TYPE_CHECKING:
    from dstp.replicas.layout import ReplicaLayout

log = logging.getLogger("dstp")
T = TypeVar("T")

# Dtypes DeepSpeed's CPU shared-memory all-reduce actually reduces; for any
# other dtype its kernel returns without reducing (FIELD-NOTES).
_SHM_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True)
class TPGroup:
    """This process's place in the tensor-parallel group, plus its communicator."""

    rank: int
    size: int
    local_rank: int
    local_size: int
    device: torch.device
    group: object | None  # deepspeed.comm process group; None when size == 1
    fast_all_reduce: bool  # DeepSpeed inference_all_reduce is safe to use
    comm_device: torch.device = torch.device("cpu")  # where collective tensors live (GPU: NCCL)
    cpu_group: object | None = None  # gloo over the same ranks: step plans, start-up checks
    # Data-parallel replicas (dstp.replicas): ``rank`` and ``size`` are inside this
    # replica's TP group; the world holds ``num_replicas`` groups of ``size`` consecutive ranks.
    global_rank: int = 0
    world_size: int = 1
    replica: int = 0
    num_replicas: int = 1
    world_cpu_group: object | None = None  # gloo over the whole world (start-up only)
    # DeepSpeed's CPU shared-memory kernel sums 16-bit floats only with AVX512BW; on other
    # CPUs (AVX2) it sums fp32 only and sends bf16 to gloo (70-300x slower, FINDINGS).
    all_reduce_in_fp32: bool = False

    @property
    def is_driver(self) -> bool:
        """Rank 0 of its replica's group owns that replica's scheduler and sampling."""
        return self.rank == 0

    @property
    def first_rank(self) -> int:
        """Global rank of this replica's driver."""
        return self.replica * self.size

    def describe(self) -> str:
        """'replica 1 (global ranks 2-3)': how logs name this rank's replica."""
        from dstp.replicas.layout import ReplicaLayout

        return ReplicaLayout(self.world_size, self.size).describe(self.replica)

    def set_collective_timeout(self, seconds: float) -> None:
        """Time out any collective of this rank's groups after ``seconds``.

        Start-up keeps the long default (ranks may load weights at different speeds);
        once serving, the step timeout applies, so a rank whose peer died or failed
        mid-step ends within it instead of NCCL's 30 minutes (its watchdog then aborts
        the process; gloo raises, and the follower exits). Idle followers are not at
        risk: rank 0 sends a heartbeat round every ``--heartbeat-interval``.
        """
        from torch.distributed.distributed_c10d import _set_pg_timeout

        groups = (self.group, self.cpu_group, self.world_cpu_group)
        for group in {id(g): g for g in groups if g is not None}.values():
            _set_pg_timeout(timedelta(seconds=seconds), group)

    # -- collectives ---------------------------------------------------------
    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` in place over the group and return it."""
        if self.size == 1:
            return tensor
        import deepspeed.comm as dist

        if self.fast_all_reduce and tensor.dtype in _SHM_DTYPES:
            if self.all_reduce_in_fp32 and tensor.dtype != torch.float32:
                wide = tensor.float()  # exact; summed in fp32 and rounded once, as the kernel does
                dist.inference_all_reduce(wide, group=self.group)
                return tensor.copy_(wide)
            dist.inference_all_reduce(tensor, group=self.group)
        else:
            dist.all_reduce(tensor, group=self.group)
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's ``tensor`` along ``dim`` (same shape on all ranks)."""
        if self.size == 1:
            return tensor
        if self._gathers_in_shared_memory:
            return self._gather_by_sum(tensor, dim)
        import deepspeed.comm as dist

        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        dist.all_gather(parts, tensor, group=self.group)
        return torch.cat(parts, dim=dim)

    def gather_to_driver(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor | None:
        """Concatenate every rank's ``tensor`` on rank 0 only; other ranks get None."""
        if self.size == 1:
            return tensor
        if self._gathers_in_shared_memory:
            full = self._gather_by_sum(tensor, dim)
            return full if self.is_driver else None
        import torch.distributed as tdist

        wire = tensor.to(self.comm_device).contiguous()  # gloo gathers CPU tensors only
        parts = [torch.empty_like(wire) for _ in range(self.size)] if self.is_driver else None
        tdist.gather(wire, parts, dst=self.first_rank, group=self.group)  # dst: a global rank
        return torch.cat(parts, dim=dim).to(tensor.device) if self.is_driver else None

    @property
    def _gathers_in_shared_memory(self) -> bool:
        """On one CPU host gloo's gather costs milliseconds; the shm all-reduce microseconds."""
        return self.fast_all_reduce and self.device.type == "cpu"

    def _gather_by_sum(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """An all-gather through the all-reduce: each part at its offset in zeros, summed.

        Adding zeros is exact, so the result is the parts' bytes (up to the sign of a zero).
        """
        dim = dim % tensor.dim()
        part = tensor.size(dim)
        shape = list(tensor.shape)
        shape[dim] = part * self.size
        wire = torch.float32 if self.all_reduce_in_fp32 else tensor.dtype
        full = tensor.new_zeros(shape, dtype=wire)
        full.narrow(dim, self.rank * part, part).copy_(tensor)
        return self.all_reduce(full).to(tensor.dtype)

    def broadcast_host(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Broadcast a host tensor over the CPU (gloo) group, never the accelerator's backend."""
        if self.size > 1:
            import torch.distributed as tdist

            tdist.broadcast(tensor, src=self.first_rank + src, group=self.cpu_group)
        return tensor

    def min_over_ranks(self, value: int) -> int:
        """The smallest ``value`` any rank holds (sizes every rank must agree on)."""
        if self.size == 1:
            return value
        import torch.distributed as tdist

        wire = torch.tensor([value], dtype=torch.long)
        tdist.all_reduce(wire, op=tdist.ReduceOp.MIN, group=self.cpu_group)
        return int(wire[0])

    def barrier(self) -> None:
        if self.size > 1:
            import deepspeed.comm as dist

            dist.barrier(group=self.group)

    def agree(self, check: Callable[[], T]) -> T:
        """:func:`agree` over this TP group's ranks."""
        return agree(check, self.min_over_ranks)


class AnotherRankFailed(RuntimeError):
    """A start-up check failed on another rank (whose log names the problem), not this one."""

    def __init__(self) -> None:
        super().__init__(
            "another rank failed during start-up (its log names the problem); stopping this one too"
        )


def agree(check: Callable[[], T], min_over_ranks: Callable[[int], int]) -> T:
    """Run ``check`` on every rank and fail on every rank if it failed on any: with its own
    exception where it failed, :class:`AnotherRankFailed` elsewhere.

    A check that raises on one rank only (a file missing on one node) would otherwise
    leave the other ranks waiting forever in the next collective. ``min_over_ranks``: the
    smallest value any rank holds (a collective over the ranks that must agree).
    """
    error: BaseException | None = None
    result = None
    try:
        result = check()
    except Exception as exc:  # re-raised below, on every rank
        error = exc
    any_failed = min_over_ranks(0 if error is not None else 1) == 0
    if error is not None:
        raise error
    if any_failed:
        raise AnotherRankFailed()
    return result


_TP: TPGroup | None = None


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if name in os.environ:
            return int(os.environ[name])
    return default


def launched_world_size() -> int:
    """World size the launcher set up (1 when run as a plain script)."""
    return _env_int("WORLD_SIZE", default=1)


def tp_size_from_env(world: int) -> int:
    """``DSTP_TENSOR_PARALLEL_SIZE`` if set, else the world size (one replica)."""
    value = os.environ.get("DSTP_TENSOR_PARALLEL_SIZE")
    return int(value) if value else world


def init_tp(tp_size: int | None = None, timeout_s: float = 1800.0) -> TPGroup:
    """Initialise ``deepspeed.comm`` once and return this rank's TP group (all ranks).

    Safe to call repeatedly. ``tp_size`` (default ``$DSTP_TENSOR_PARALLEL_SIZE``,
    else the world size) must divide the world: the world then holds
    ``world / tp_size`` data-parallel replicas, each a TP group of consecutive ranks
    (:mod:`dstp.replicas`). Every rank creates every replica's groups, in the same
    order, as ``torch.distributed.new_group`` requires.
    """
    global _TP
    if _TP is not None:
        if tp_size is not None and tp_size != _TP.size:
            raise RuntimeError(
                f"the process group is already set up with TP={_TP.size}, not {tp_size}"
            )
        return _TP

    from deepspeed.accelerator import get_accelerator

    from dstp.replicas.layout import ReplicaLayout

    accel = get_accelerator()
    world = launched_world_size()
    rank = _env_int("RANK", default=0)
    local_rank = _env_int("LOCAL_RANK", default=0)
    local_size = _env_int("LOCAL_WORLD_SIZE", "LOCAL_SIZE", default=world)
    backend = os.environ.get("DSTP_DIST_BACKEND") or accel.communication_backend_name()
    device = _bind_device(accel, rank, local_rank, local_size, backend)
    layout = ReplicaLayout(world, tp_size if tp_size is not None else tp_size_from_env(world))
    tp, replicas, replica = layout.tp, layout.num_replicas, layout.replica_of(rank)
    group = cpu_group = world_cpu = None
    fast = in_fp32 = False
    if world > 1:
        group, world_cpu = _join_world(accel, backend, local_rank, local_size, timeout_s)
        cpu_group = world_cpu
        if replicas > 1:
            group, cpu_group = _replica_groups(layout, replica, backend)
        fast, in_fp32 = _fast_all_reduce(accel.device_name(), layout, rank, local_size)
        if accel.device_name() == "cpu":
            _unlink_shm_segment(rank)

    comm_device = device if backend == "nccl" else torch.device("cpu")
    _TP = TPGroup(
        rank % tp,
        tp,
        local_rank,
        local_size,
        device,
        group,
        fast,
        comm_device,
        cpu_group,
        global_rank=rank,
        world_size=world,
        replica=replica,
        num_replicas=replicas,
        world_cpu_group=world_cpu,
        all_reduce_in_fp32=in_fp32,
    )
    log.debug(
        "TP group: rank %d/%d of %s on %s, fast all-reduce=%s (16-bit sums in fp32: %s)",
        rank % tp,
        tp,
        _TP.describe(),
        device,
        fast,
        in_fp32,
    )
    return _TP


class DeviceLayoutError(RuntimeError):
    """More ranks on this host than GPUs it shows, under a backend that needs one each."""


def _bind_device(
    accel, rank: int, local_rank: int, local_size: int, backend: str = "nccl"
) -> torch.device:
    """This rank's device: the CPU (its threads pinned to this rank's share of the
    cores), or the accelerator of its local rank, with a CPU thread cap.

    NCCL refuses two ranks on one GPU (a duplicate-GPU error at the first collective),
    so more local ranks than visible GPUs is a start-up error naming the fix; only a
    gloo backend (``DSTP_DIST_BACKEND=gloo``) may share a device.
    """
    if accel.device_name() == "cpu":
        _pin_cpu_threads(local_rank, local_size)
        return torch.device("cpu")
    count = accel.device_count()
    if local_size > count:  # every local rank stops, not only those without a GPU: the
        # others would wait in the process group's rendezvous until its timeout
        if backend == "nccl":
            raise DeviceLayoutError(
                f"{local_size} ranks on this host but it shows {count} GPU(s): NCCL needs "
                "one GPU per rank. Start one rank per GPU, choosing the GPUs with "
                "`deepspeed --include localhost:0,1` (the deepspeed launcher ignores "
                "CUDA_VISIBLE_DEVICES; torchrun honours CUDA_VISIBLE_DEVICES=0,1 with "
                "--nproc_per_node 2)"
            )
        log.warning(
            "more local ranks than devices: rank %d on device %d, shared over %s",
            rank,
            local_rank % max(1, count),
            backend,
        )
    index = local_rank % max(1, count)
    accel.set_device(index)
    _cap_cpu_threads(local_size)
    return torch.device(accel.device_name(index))


def bind_thread_device(device: torch.device) -> None:
    """Make ``device`` the calling thread's current CUDA device (a no-op elsewhere).

    CUDA's current device is per host thread: a thread starts on cuda:0, whatever the
    thread that started it set, so kernels, allocations and NCCL calls without an
    explicit device (and every ``torch.cuda`` call that defaults to the current device)
    would land on GPU 0. Every thread that runs CUDA work calls this first.
    """
    if device.type == "cuda":
        torch.cuda.set_device(device)


def _threads_per_rank(cores: int, local_size: int) -> int:
    if "DSTP_THREADS" in os.environ:
        return int(os.environ["DSTP_THREADS"])
    return max(1, cores // max(1, local_size))


def _cap_cpu_threads(local_size: int) -> None:
    """GPU ranks: torch's intra-op threads at this rank's share of the host's cores.

    Each rank's torch would otherwise start one thread per core: 8 ranks on a 64-core
    host run 512 threads for the host-side work (step plans, sampling fallbacks, weight
    loading), fighting over the cores that feed the GPUs.
    """
    torch.set_num_threads(_threads_per_rank(len(_usable_cores()), local_size))


def _usable_cores() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def _join_world(
    accel, backend: str, local_rank: int, local_size: int, timeout_s: float
) -> tuple[object, object]:
    """Join the launched world over ``backend``: (the world group, a gloo group over
    the world for host-side messages)."""
    import deepspeed
    import deepspeed.comm as dist
    import torch.distributed as tdist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    # DeepSpeed's shm kernel reads LOCAL_SIZE (its launcher sets it, torchrun
    # does not); unset, the kernel is never initialised and crashes.
    os.environ.setdefault("LOCAL_SIZE", str(local_size))
    if accel.device_name() == "cpu":
        from dstp.cpu.kernels import clear_stale_extension_lock

        clear_stale_extension_lock("deepspeed_shm_comm")
        if local_rank == 0 and not _shm_op_built():
            log.info(
                "building DeepSpeed's shared-memory all-reduce op (first start only, about a minute)"
            )
    timeout = timedelta(seconds=timeout_s)
    if accel.device_name() != "cpu" and local_size > accel.device_count():
        # Ranks sharing a GPU (gloo; _bind_device refuses it under NCCL): DeepSpeed would
        # join with device_id=cuda:LOCAL_RANK, a GPU this host lacks (seen on an H200,
        # FINDINGS). Join first without one; DeepSpeed then takes the group as it is.
        tdist.init_process_group(backend, timeout=timeout)
    deepspeed.init_distributed(dist_backend=backend, timeout=timeout, verbose=False)
    group = dist.get_world_group()
    world_cpu = group if backend == "gloo" else tdist.new_group(backend="gloo")
    atexit.register(shutdown)
    return group, world_cpu


def _fast_all_reduce(
    device_name: str, layout: ReplicaLayout, rank: int, local_size: int
) -> tuple[bool, bool]:
    """Whether the TP group all-reduces through DeepSpeed's fast kernel, and whether
    that kernel sums 16-bit values in fp32 (the CPU shared-memory kernel's level 1)."""
    tp, replicas = layout.tp, layout.num_replicas
    fast = tp > 1 and _fast_all_reduce_available(device_name, layout.world, local_size)
    in_fp32 = False
    if fast and device_name == "cpu":
        level = _shm_kernel_level()
        fast, in_fp32 = level >= 1, level == 1
    if fast and replicas > 1 and device_name == "cpu":
        # DeepSpeed's shared-memory all-reduce ignores its group: it would sum
        # over every rank of the host, every replica's together.
        fast = False
        if rank == 0:
            log.warning(
                "%d replicas of TP=%d: DeepSpeed's shared-memory all-reduce ignores its "
                "group, so each TP group all-reduces over gloo (slower)",
                replicas,
                tp,
            )
    return fast, in_fp32


def _replica_groups(layout: ReplicaLayout, mine: int, backend: str) -> tuple[object, object]:
    """Every replica's (device, gloo) groups, made by every rank in the same order;
    returns this rank's pair (None for a TP=1 replica: it has no collectives)."""
    import torch.distributed as tdist

    group = cpu_group = None
    for r in range(layout.num_replicas):
        ranks = list(layout.ranks(r))
        device_group = tdist.new_group(ranks)
        host_group = device_group if backend == "gloo" else tdist.new_group(ranks, backend="gloo")
        if r == mine and layout.tp > 1:
            group, cpu_group = device_group, host_group
    return group, cpu_group


def shutdown(exit_code: int | None = None, timeout_s: float = 30.0) -> None:
    """Leave the process group together, then (with ``exit_code``) exit at once.

    Ranks meet at a barrier (bounded: a dead peer must not hang the exit),
    then destroy the group while the interpreter is fully alive. Gloo can
    still abort in C++ destructors during interpreter teardown ("terminate
    called without an active exception", a known torch/gloo race), so entry
    points pass ``exit_code`` to skip teardown once logs are flushed. Scripts
    that just return get the same barrier and destroy from an ``atexit`` hook.
    """
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        with contextlib.suppress(Exception):
            tdist.barrier(async_op=True).wait(timeout=timedelta(seconds=timeout_s))
        with contextlib.suppress(Exception):
            tdist.destroy_process_group()
    if exit_code is not None:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)


_ABORTED_KEY = "dstp/first_aborted_rank"


def abort_process_groups(store_timeout_s: float = 2.0) -> int | None:
    """A step failed here or on a peer: abort every process group of this process, and
    return the global rank that aborted first (this one unless a peer did; None unknown).

    One call for every backend, ``_abort_process_group()``. Under NCCL it aborts each
    communicator (ncclCommAbort), so no kernel or watchdog of this rank waits on a dead
    peer. Under gloo (torch 2.13, measured in FINDINGS) the abort reaches neither the
    peers nor this rank's own pending collective: what ends a peer's gloo wait at once is
    this process's sockets closing, so the caller exits next (:func:`abort_and_exit`).
    On every backend a later collective on an aborted group raises instead of waiting.

    The first rank to abort records itself in the rendezvous store, so the others' logs
    name it (the store lives in global rank 0's process: unknown once that is gone).
    """
    import torch.distributed as tdist
    from torch.distributed import distributed_c10d as c10d

    if not (tdist.is_available() and tdist.is_initialized()):
        return None
    rank = tdist.get_rank()
    first: int | None = None
    try:
        store = c10d._get_default_store()
        store.set_timeout(timedelta(seconds=store_timeout_s))  # a gone store must not hold us
        first = int(store.compare_set(_ABORTED_KEY, "", str(rank)))
    except Exception as exc:  # the store's host (rank 0) is gone
        log.debug("could not record the abort in the store: %s", exc)
    if first is None or first == rank:
        log.error("global rank %d: aborting its process groups", rank)
    else:
        log.error(
            "global rank %d: aborting its process groups after global rank %d aborted first "
            "(its log names the cause)",
            rank,
            first,
        )
    with contextlib.suppress(Exception):
        c10d._abort_process_group()  # every group, NCCL and gloo alike
    return first


def abort_and_exit(exit_code: int = 1) -> NoReturn:
    """Abort every process group, then exit at once: no exit-time barrier with peers
    that may be gone, and the closed sockets end the peers' gloo collectives now."""
    abort_process_groups()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)


def get_tp() -> TPGroup:
    """The TP group, initialising a single-process one if nobody did yet."""
    return _TP if _TP is not None else init_tp()


def _unlink_shm_segment(rank: int) -> None:
    """Unlink this rank's DeepSpeed shared-memory all-reduce segment once every peer mapped it.

    DeepSpeed creates ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``
    and never removes it: each process group leaked its segments (tens of MB
    per rank) until /dev/shm filled the machine's memory. DeepSpeed maps the
    peers' segments while initialising, so after a barrier the names are no
    longer needed; the mappings stay valid and the kernel frees the memory when
    the last rank exits, however it exits.
    """
    import deepspeed.comm as dist

    name = "deepspeed_allreduce_buffer_{}_{}_{}_{}".format(
        os.getuid(), os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", ""), rank
    )
    path = os.path.join("/dev/shm", name)
    dist.barrier()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _fast_all_reduce_available(device_name: str, world: int, local_size: int) -> bool:
    """Whether DeepSpeed's ``inference_all_reduce`` may be used for this group.

    On CPU it is a shared-memory kernel: it ignores its ``group`` argument, so
    it is correct only when the TP group is the whole world and every rank is
    on this host. ``DSTP_FAST_ALLREDUCE=0`` turns it off (for measuring).
    """
    if os.environ.get("DSTP_FAST_ALLREDUCE", "1") == "0":
        return False
    if device_name != "cpu":
        return True  # NCCL: inference_all_reduce is a plain all_reduce there
    import torch.distributed as tdist

    if local_size != world:
        log.warning("ranks span several hosts: using gloo all-reduce (slow), not shared memory")
        return False
    backend = tdist.get_backend()
    if backend != "gloo" and backend != "ccl":
        return False
    has_op = hasattr(torch.ops, "deepspeed") and hasattr(
        torch.ops.deepspeed, "inference_all_reduce_"
    )
    if not has_op:
        log.warning("DeepSpeed shared-memory all-reduce unavailable: falling back to gloo (slow)")
    return has_op


def _shm_op_built() -> bool:
    """Whether DeepSpeed's shared-memory all-reduce op is ready to load without a build.

    DeepSpeed builds it with ninja on first use (JIT, about a minute on 2 cores) unless
    it was installed prebuilt; the build lands in torch's extension folder. True when
    DeepSpeed will not build it at all (prebuilt, or not for this machine).
    """
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import installed_ops
    from torch.utils.cpp_extension import _get_build_directory

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return True
    if installed_ops.get(builder.name, False):
        return True
    folder = _get_build_directory(builder.name, verbose=False)
    return os.path.exists(os.path.join(folder, f"{builder.name}.so"))


def _shm_kernel_level() -> int:
    """Which dtypes DeepSpeed's shm kernel sums on this CPU: 2 all, 1 fp32 only, 0 none.

    Below 2 (no AVX512BW) DeepSpeed hands bf16/fp16 ``inference_all_reduce``
    calls to the process group (gloo over TCP) instead of shared memory.
    Versions without ``shm_vector_kernel_level`` sum every dtype in shared memory.
    """
    from deepspeed.comm import comm

    return getattr(comm.cdb, "shm_vector_kernel_level", 2)


def _pin_cpu_threads(local_rank: int, local_size: int) -> None:
    """Give each local rank a disjoint set of cores and that many torch threads.

    Oversubscribed ranks (more threads than cores) make every collective wait
    for the slowest straggler, so threads per rank = cores / local ranks.
    """
    cores = _usable_cores()
    threads = _threads_per_rank(len(cores), local_size)
    if local_size > 1 and len(cores) >= local_size * threads:
        mine = cores[local_rank * threads : (local_rank + 1) * threads]
        with contextlib.suppress(AttributeError, OSError):  # not Linux / restricted
            os.sched_setaffinity(0, mine)
    torch.set_num_threads(threads)
