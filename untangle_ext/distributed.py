"""Distributed estimation with ``torch.distributed`` (SPEC §6).

The statistics are sums, so each rank accumulates the moments of its own shard
of the data, and one float64 all-reduce (sum) per accumulator gives every rank
the moments of the whole data set before patterns are computed. Only rank 0
writes store files; the others wait on a barrier.

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
from typing import Callable, Iterable, Iterator, Optional, Sized

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from .moments import LayerMoments, Moments

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


def reshift(lm: LayerMoments, shift: torch.Tensor) -> None:
    """Re-express the sums of ``lm`` about ``shift`` instead of ``lm.shift``, exactly, in place.

    With ``d = s_old - s_new`` (patch space) and ``e = W d``, the shifted data move by
    constants: ``x~' = x~ + d``, ``y~' = y~ + e`` (gates are unchanged: they come from the
    layer's output). Hence, with ``n`` samples and ``n+`` open gates::

        Σx~'    = Σx~ + n d                      Σy~'  = Σy~ + n e
        Σy~'x~' = Σy~x~ + e Σx~ + d Σy~ + n e d
        and the gated sums likewise with Σg x~, Σg y~ and n+ in place of Σx~, Σy~ and n.
    """
    old = lm.patch_shift()
    lm.set_shift(shift)
    d = old - lm.patch_shift()  # (G, Dg)
    layer = lm.layer
    g, k = layer.groups, layer.out_features
    kg = k // g
    e = (layer.weight.double().reshape(g, kg, -1) @ d.unsqueeze(2)).squeeze(2)  # (G, Kg)
    slots = lm.count.shape[0]
    e4, d4, n4 = e.view(1, g, kg, 1), d.view(1, g, 1, -1), lm.count.view(slots, 1, 1, 1)
    sy4, gy4, npos4 = (lm.field(f).view(slots, g, kg, 1) for f in ("sum_y", "pos_sum_y", "pos_n"))
    sxy, sgx, sgxy, sx = (lm.block(b) for b in ("sum_yx", "pos_sum_x", "pos_sum_yx", "sum_x"))
    sxy += e4 * sx + d4 * sy4 + n4 * e4 * d4  # old Σx~, Σy~ (updated below)
    sgxy += e4 * sgx + d4 * gy4 + npos4 * e4 * d4  # old Σg x~, Σg y~
    sgx += npos4 * d4
    sx += n4 * d4
    ev, n2, npos = e.view(1, k), lm.count.view(slots, 1), lm.field("pos_n")
    lm.field("sum_y").add_(n2 * ev)
    lm.field("pos_sum_y").add_(npos * ev)


def _common_shifts(layers: list[LayerMoments], shard: Shard, device: torch.device) -> Optional[list[torch.Tensor]]:
    """The shifts of the lowest rank that saw data (bit-identical on every rank), or None if no rank did."""
    has_data = layers[0].shift is not None
    source = torch.tensor([shard.rank if has_data else shard.world_size], device=device)
    dist.all_reduce(source, op=dist.ReduceOp.MIN)
    src = int(source.item())
    if src == shard.world_size:
        return None
    sizes = [lm.layer.in_features for lm in layers]
    flat = (torch.cat([lm.shift.double().flatten() for lm in layers]) if shard.rank == src
            else torch.empty(sum(sizes), dtype=torch.float64, device=device))
    dist.broadcast(flat, src=src)
    return [s.to(lm.layer.weight.dtype) for s, lm in zip(flat.split(sizes), layers)]


@torch.no_grad()
def all_reduce_moments(moments: Moments) -> None:
    """Sum every rank's accumulators into ``moments`` (float64, in place); a no-op unless distributed.

    Each rank accumulated about its own first batch's shift, and sums about
    different shifts cannot be added. Rather than agreeing on a shift before
    accumulating (a collective before the first batch, and a special case for
    ranks or classes without data), every rank re-shifts its finished sums
    exactly (:func:`reshift`) to the shift of the lowest rank that saw data;
    a rank without data has all-zero sums, valid about any shift. Then the
    sums and the per-slot image counts are all-reduced. Every rank must call this.
    """
    shard = current()
    if shard is None:
        return
    layers = list(moments.layers.values())
    device = layers[0].mat.device
    common = _common_shifts(layers, shard, device)
    for lm, shift in zip(layers, common or []):
        if lm.shift is None:
            lm.set_shift(shift)
        else:
            reshift(lm, shift)
    for lm in layers:
        dist.all_reduce(lm.mat)
        dist.all_reduce(lm.vec)
    images = moments.images.to(device)
    dist.all_reduce(images)
    moments.images.copy_(images.cpu())


def main_decides(decide: Callable[..., bool], *args: object) -> bool:
    """Rank 0 evaluates ``decide(*args)``; every rank returns its answer (so all take the same branch)."""
    shard = current()
    if shard is None:
        return decide(*args)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    flag = torch.tensor([int(decide(*args)) if shard.rank == 0 else 0], device=device)
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def barrier() -> None:
    """Wait until every rank gets here (after rank 0 has written its files); a no-op unless distributed."""
    if current() is not None:
        dist.barrier()
