"""Class-by-class reading of a labelled data set: every sample once, one class's accumulators in memory.

A data set "knows its labels" when they can be had without loading images: the
``targets`` of torchvision's ImageFolder/MNIST-style data sets, the label tensor
of a two-tensor ``TensorDataset``, or a labels array the caller passes. Then one
``DataLoader`` over :class:`ClassBatchSampler` reads the samples class after
class, in batches that never mix classes, so the estimator can finish a class
(patterns, store) and free its accumulators before the next class starts.
"""
from __future__ import annotations

from typing import Any, Iterator, Optional, Sequence

import torch
from torch.utils.data import DataLoader, RandomSampler, Sampler, SequentialSampler, TensorDataset
from torch.utils.data.distributed import DistributedSampler


class ClassBatchSampler(Sampler[list[int]]):
    """Batches of one class each, class after class (in the order of ``groups``)."""

    def __init__(self, groups: dict[int, list[int]], batch_size: int):
        self.groups = groups
        self.batch_size = batch_size

    def schedule(self) -> list[int]:
        """The class of each batch, in order."""
        return [c for c, idx in self.groups.items() for _ in range(0, len(idx), self.batch_size)]

    def __iter__(self) -> Iterator[list[int]]:
        for idx in self.groups.values():
            for i in range(0, len(idx), self.batch_size):
                yield idx[i:i + self.batch_size]

    def __len__(self) -> int:
        return sum(-(-len(idx) // self.batch_size) for idx in self.groups.values())


def dataset_labels(loader: Any, labels: Optional[Sequence[int]] = None) -> Optional[torch.Tensor]:
    """The label of every sample of ``loader.dataset`` (index order), or None when it cannot be had cheaply.

    ``labels`` (the caller's array) wins; else ``dataset.targets``, else a two-tensor
    ``TensorDataset``'s second tensor. A loader that reads only part of its data set (a
    subset sampler) or that is not a map-style ``DataLoader`` gives None (chunked passes).
    """
    dataset = getattr(loader, "dataset", None)
    if not isinstance(loader, DataLoader) or dataset is None or loader.batch_size is None:
        if labels is not None:
            raise ValueError("labels= needs a torch DataLoader with a batch_size over a map-style data set, so "
                             "that each class can be read through its own subset; pass such a loader")
        return None
    if not isinstance(loader.sampler, (SequentialSampler, RandomSampler, DistributedSampler)) or (
            isinstance(loader.sampler, RandomSampler) and loader.sampler.replacement):
        if labels is not None:
            raise ValueError("labels= cannot be used with a loader whose sampler reads only part of the data set "
                             f"({type(loader.sampler).__name__}); use a plain DataLoader over the samples to use")
        return None
    if labels is None:
        labels = getattr(dataset, "targets", None)
        if labels is None and isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
            labels = dataset.tensors[1]
    if labels is None:
        return None
    labels = torch.as_tensor(labels).reshape(-1)
    if labels.numel() != len(dataset):
        raise ValueError(f"{labels.numel()} labels for a data set of {len(dataset)} samples; give one label per "
                         "sample, in the data set's index order")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise ValueError(f"labels must be integer class ids, not {labels.dtype}")
    return labels.long()


def class_loader(loader: DataLoader, labels: torch.Tensor, classes: Sequence[int]) -> tuple[DataLoader, list[int]]:
    """A loader over ``loader.dataset`` reading only ``classes``, class by class; and each batch's class."""
    groups = {}
    for c in classes:
        idx = torch.nonzero(labels == c).view(-1).tolist()
        if idx:
            groups[c] = idx
    sampler = ClassBatchSampler(groups, loader.batch_size)
    out = DataLoader(loader.dataset, batch_sampler=sampler, num_workers=loader.num_workers,
                     collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                     worker_init_fn=loader.worker_init_fn, multiprocessing_context=loader.multiprocessing_context,
                     generator=loader.generator, prefetch_factor=loader.prefetch_factor,
                     persistent_workers=loader.persistent_workers)
    return out, sampler.schedule()
