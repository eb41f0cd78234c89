"""Estimate per-class signals of LeNet on the bundled MNIST sample with N processes (torch.distributed).

    torchrun --nproc_per_node=2 examples/distributed_estimate.py --out results/dist/lenet
    python examples/distributed_estimate.py --out results/dist/lenet        # the same, one process

Each rank reads its own shard (ShardSampler), the accumulators are summed
across ranks in float64, every rank computes the same patterns, and rank 0
writes ``{out}_class_{c}.pkl``. On GPUs, torchrun gives each process its own
GPU (LOCAL_RANK) and the NCCL backend is used.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset

from untangle_ext import SignalEstimator, distributed
from untangle_ext.data import load_mnist_sample
from untangle_ext.models import load_or_train_lenet
from untangle_ext.store import class_store_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/dist/lenet", help="store prefix: writes {out}_class_{c}.pkl")
    parser.add_argument("--cache", default=".cache/lenet_mnist.pt", help="LeNet weights (trained once if missing)")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    shard = distributed.init() if "WORLD_SIZE" in os.environ else distributed.Shard(0, 1)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if distributed.is_main():  # train (or load) once, then the other ranks load the cached weights
        load_or_train_lenet(args.cache, progress=False)
    distributed.barrier()
    model, _ = load_or_train_lenet(args.cache)
    model = model.to(device)

    dataset = TensorDataset(*load_mnist_sample("train"))
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=distributed.ShardSampler(dataset))
    start = time.perf_counter()
    stores = SignalEstimator(model, progress=distributed.is_main()).fit(loader)
    seconds = time.perf_counter() - start
    if distributed.is_main():
        for c, store in stores.items():
            store.save(class_store_path(args.out, c))
        print(f"{len(dataset)} images on {shard.world_size} process(es) in {seconds:.2f} s; "
              f"wrote {len(stores)} stores to {Path(args.out).parent}/")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
