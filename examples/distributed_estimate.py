"""Estimate per-class signals of LeNet on the bundled MNIST sample with N processes (torch.distributed).

    torchrun --nproc_per_node=2 examples/distributed_estimate.py --out results/dist/lenet
    python examples/distributed_estimate.py --out results/dist/lenet        # the same, one process

The data set knows its labels, so the ranks split the classes: each rank reads
its classes' samples once, computes their patterns and writes their
``{out}_class_{c}.pkl`` (the output folder must be shared by the ranks). On GPUs, torchrun gives each process its own
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
    loader = DataLoader(dataset, batch_size=args.batch_size)  # the data set knows its labels: ranks split the classes
    start = time.perf_counter()
    written = SignalEstimator(model, progress=distributed.is_main()).fit_to_files(args.out, loader, overwrite=True)
    seconds = time.perf_counter() - start
    if distributed.is_main():
        print(f"{len(dataset)} images on {shard.world_size} process(es) in {seconds:.2f} s; "
              f"{len(written)} stores in {Path(args.out).parent}/ (each rank wrote its share of the classes)")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
