"""Step 1 of the tutorial: estimate the signals of every class and store one file per class.

Writes ``model_signal_data/lenet_signals_class_{c}.pkl``; classes already estimated for this model
are skipped, so an interrupted run resumes. ``--limit N`` uses N images per class (a quick run).
"""
import random

import torch
from _tutorial import SignalEstimationArgs, load_lenet, parse_workdir, tutorial_paths

from untangle_ext import UntangleAI

torch.manual_seed(42)
random.seed(42)
opts = parse_workdir(__doc__, lambda p: p.add_argument("--limit", type=int, help="images per class"))
args = SignalEstimationArgs()
model_ckpt_path, signal_store_path, _ = tutorial_paths(opts.workdir, args)
model = load_lenet(model_ckpt_path)

untangle_ai = UntangleAI()


def train_loader_fun(class_i):
    loader, _ = untangle_ai.load_mnist_per_class(batch_size=args.batch_size, data_class=class_i, limit=opts.limit)
    return loader


untangle_ai.estimate_signals(model, signal_store_path, train_loader_fun, args=args)
print(f"signal stores: {signal_store_path}_class_{{0..{args.num_classes - 1}}}.pkl")
