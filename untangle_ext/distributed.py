"""Distributed estimation with ``torch.distributed`` (SPEC §6).

Two ways to split the work, chosen by what the data allows:

* per-class data (per-class loaders, or a data set that knows its labels): the
  ranks split the CLASSES (:func:`class_share`); each rank reads its classes
  whole, computes their patterns and writes their files. No collectives but a
  final barrier.
* one mixed loader without labels: the ranks split the DATA; each accumulates the
  moments of its shard, and the injected reducer :func:`all_reduce` (one float64
  all-reduce per accumulator, through the moments' own methods) gives every rank
  the sums of the whole data set; then each rank computes its share of the classes.

Estimation is distributed while a default process group of more than one rank
is initialised (``torchrun`` + ``dist.init_process_group``, or :func:`init`,
the explicit request), unless the caller is inside :func:`disabled`. There is
no cluster code here: launching, rendezvous and transport are torch's.

Shards: a loader whose sampler is a ``DistributedSampler`` is taken as this
rank's shard (use :class:`ShardSampler`, which never pads); any other loader
(e.g. the tutorial's per-class loaders) is split by batches, rank ``r`` taking
batches ``r, r + W, r + 2W, ...``; wrap a loader that is already sharded by
other means in :class:`Presharded`.
"""
from __future__ import annotations

import contextlib
import contextvars
import itertools
import os
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Sequence, Sized

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from .moments import Moments

_ENABLED: contextvars.ContextVar[bool] = contextvars.ContextVar("untangle_ext_distributed", default=True)
_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Shard:
    """This process's place in the estimation: ``rank`` of ``world_size`` processes."""

    rank: int
    world_size: int


def init(backend: Optional[str] = None) -> Shard:
    """Join the default process group from torchrun's environment, unless already joined (the explicit request).

    ``backend`` defaults to NCCL when CUDA is available (one GPU per local rank), else gloo.
    """
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed; install a build with distributed support")
    if not dist.is_initialized():
        missing = [v for v in _TORCHRUN_ENV if v not in os.environ]
        if missing:
            raise RuntimeError(f"cannot join a process group: environment variables {missing} are not set; "
                               "launch the script with torchrun (e.g. torchrun --nproc_per_node=2 script.py)")
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return Shard(dist.get_rank(), dist.get_world_size())


def current() -> Optional[Shard]:
    """This process's shard while estimation is distributed (a group of > 1 ranks, not disabled), else None."""
    if not (_ENABLED.get() and dist.is_available() and dist.is_initialized()):
        return None
    world = dist.get_world_size()
    return Shard(dist.get_rank(), world) if world > 1 else None


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Estimate on this process alone even though a process group exists (e.g. on rank 0 of a DDP job)."""
    token = _ENABLED.set(False)
    try:
        yield
    finally:
        _ENABLED.reset(token)


def is_main() -> bool:
    """True on the process that writes files: rank 0, or the only process."""
    shard = current()
    return shard is None or shard.rank == 0


class ShardSampler(DistributedSampler):
    """A ``DistributedSampler`` that never pads: rank ``r`` reads samples ``r, r + W, ...`` (shards differ by <= 1).

    torch's sampler repeats samples to even out the shards (or drops the tail
    with ``drop_last``); either would change the sums, so estimation refuses it.
    """

    def __init__(self, dataset: Sized, num_replicas: Optional[int] = None, rank: Optional[int] = None):
        if num_replicas is None and rank is None:  # this process's shard; everything when not distributed
            shard = current() or Shard(0, 1)
            num_replicas, rank = shard.world_size, shard.rank
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.total_size = len(dataset)
        self.num_samples = len(range(self.rank, self.total_size, self.num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.total_size, self.num_replicas))


class Presharded:
    """Marks batches that are already this rank's shard (sharded by means this module cannot see)."""

    def __init__(self, batches: Iterable):
        self.batches = batches

    def __iter__(self) -> Iterator:
        return iter(self.batches)


def _sampler_of(loader: object) -> object:
    batch_sampler = getattr(loader, "batch_sampler", None)
    return getattr(batch_sampler, "sampler", None) or getattr(loader, "sampler", None)


def _check_sampler(sampler: DistributedSampler, shard: Shard) -> None:
    """Refuse a sampler that repeats or drops samples, or that shards for another world size."""
    n = len(sampler.dataset)
    if sampler.num_replicas != shard.world_size or sampler.rank != shard.rank:
        raise ValueError(f"the loader's DistributedSampler is for rank {sampler.rank} of {sampler.num_replicas}, "
                         f"but this process is rank {shard.rank} of {shard.world_size}; build it after "
                         "init_process_group without num_replicas/rank")
    if sampler.total_size != n:
        effect = "repeats samples to pad" if sampler.total_size > n else "drops samples to even out"
        raise ValueError(f"the loader's DistributedSampler {effect} the {n} samples over {shard.world_size} ranks, "
                         "which would change the statistics; use untangle_ext.distributed.ShardSampler instead")


def shard_batches(batches: Iterable) -> Iterable:
    """This rank's part of ``batches``: the loader itself when it is already sharded, else every W-th batch."""
    shard = current()
    if shard is None or isinstance(batches, Presharded):
        return batches
    sampler = _sampler_of(batches)
    if isinstance(sampler, DistributedSampler):
        _check_sampler(sampler, shard)
        return batches
    return itertools.islice(batches, shard.rank, None, shard.world_size)


def collective_device() -> Optional[torch.device]:
    """Where the process group's collectives need their tensors: this rank's GPU under NCCL (which reduces
    CUDA tensors only), None (anywhere) under gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None


def _collective(op: Callable[[torch.Tensor], object], t: torch.Tensor) -> None:
    """Run the in-place collective ``op`` on ``t``; under NCCL a tensor that is not on this rank's GPU
    (accumulators of a model kept on the CPU) goes through a GPU copy and comes back."""
    device = collective_device()
    if device is None or t.device == device:
        op(t)
        return
    on_device = t.to(device)
    op(on_device)
    t.copy_(on_device)


def _common_shifts(moments: Moments, shard: Shard, device: torch.device) -> Optional[list[torch.Tensor]]:
    """The shifts of the lowest rank that saw data (bit-identical on every rank), or None if no rank did."""
    mine = moments.shifts()
    source = torch.tensor([shard.rank if mine is not None else shard.world_size], device=device)
    _collective(lambda t: dist.all_reduce(t, op=dist.ReduceOp.MIN), source)
    src = int(source.item())
    if src == shard.world_size:
        return None
    layers = [lm.layer for lm in moments.layers.values()]
    sizes = [layer.in_features for layer in layers]
    flat = (torch.cat([s.double().flatten() for s in mine]).to(device) if shard.rank == src
            else torch.empty(sum(sizes), dtype=torch.float64, device=device))
    _collective(lambda t: dist.broadcast(t, src=src), flat)
    return [s.to(layer.weight.dtype) for s, layer in zip(flat.split(sizes), layers)]


@torch.no_grad()
def all_reduce(moments: Moments) -> None:
    """The torch.distributed reducer: sum every rank's accumulators into ``moments`` (float64, in place).

    Each rank accumulated about its own first batch's shift, and sums about
    different shifts cannot be added. Rather than agreeing on a shift before
    accumulating (a collective before the first batch, and a special case for
    ranks or classes without data), every rank re-shifts its finished sums
    exactly (:meth:`Moments.reshift`) to the shift of the lowest rank that saw data;
    a rank without data has all-zero sums, valid about any shift. Then the
    sums (:meth:`Moments.sums`) and the per-slot image counts are all-reduced.
    Every rank must call this. Under NCCL every collective runs on this rank's GPU
    (:func:`collective_device`), wherever the accumulators live.
    """
    shard = current()
    if shard is None:
        return
    sums = moments.sums()
    common = _common_shifts(moments, shard, sums[0].device)
    if common is not None:
        moments.reshift(common)
    for t in sums:
        _collective(dist.all_reduce, t)
    _collective(dist.all_reduce, moments.images)


def _local(moments: Moments) -> None:
    """The single-process reducer: nothing to combine."""


def reducer() -> Callable[[Moments], None]:
    """The reducer for the current context: :func:`all_reduce` while distributed, else a no-op."""
    return all_reduce if current() is not None else _local


def class_share(classes: Sequence[int]) -> list[int]:
    """This rank's share of ``classes`` (every W-th, from position ``rank``); all of them unless distributed."""
    shard = current()
    return list(classes) if shard is None else list(classes)[shard.rank::shard.world_size]


def check_whole(batches: object, class_id: int) -> None:
    """Refuse a per-class loader sharded over ranks: under the class split one rank reads a class whole."""
    sampler = _sampler_of(batches)
    if isinstance(sampler, DistributedSampler) and sampler.num_replicas > 1:
        raise ValueError(f"the loader of class {class_id} reads only rank {sampler.rank}'s part of the class "
                         f"({type(sampler).__name__} over {sampler.num_replicas} ranks), but each class is now "
                         "estimated whole by one rank (the ranks split the classes); build per-class loaders "
                         "without ShardSampler/DistributedSampler")


def gather_classes(classes: Sequence[int], num_classes: int) -> list[int]:
    """The union of every rank's ``classes`` (ids below ``num_classes``), sorted; ``classes`` unless distributed."""
    shard = current()
    if shard is None:
        return sorted(classes)
    mask = torch.zeros(num_classes + 1, dtype=torch.int32, device=collective_device() or "cpu")
    mask[torch.tensor([c + 1 for c in classes], dtype=torch.long, device=mask.device)] = 1  # +1: ALL_CLASSES is -1
    dist.all_reduce(mask)
    return [i - 1 for i in torch.nonzero(mask).view(-1).tolist()]


def barrier() -> None:
    """Wait until every rank gets here (after each has written its files); a no-op unless distributed."""
    if current() is not None:
        device = collective_device()  # NCCL: name this rank's GPU (else NCCL guesses one from the rank)
        dist.barrier(device_ids=None if device is None else [device.index])
