"""Shared set-up of the tutorial scripts: the tutorial's args class, its folders and its checkpoint.

The tutorial keeps its files next to the notebook; these scripts keep them in ``--workdir``
(default ``examples/output``): ``lenet_mnist_model.h5``, ``model_signal_data/`` and ``results/``.
"""
from __future__ import annotations

import argparse
import os

import torch

from untangle_ext.models import LeNet

HERE = os.path.dirname(os.path.realpath(__file__))


class SignalEstimationArgs:
    """The tutorial's arguments, field for field."""

    mname = 'lenet'
    batch_size = 16
    num_classes = 10
    img_size = (1, 28, 28)
    input_tensor = torch.randn(1, 1, 28, 28)  # provide your own input tensor
    input_tensor_true = torch.randn(28, 28, 1)  # provide your own true input tensor / ndarray / PIL Image Obj
    data_class = None  # or `None` to estimate all classes
    mode = 'estimate'  # one of `estimate`, `attribute`
    topk = 1
    cmap = 'seismic'
    json = False
    hm_diff = 'joint'


def parse_workdir(description: str, extra=None) -> argparse.Namespace:
    """Command line of every step: ``--workdir`` (plus the step's own options)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--workdir", default=os.path.join(HERE, "output"),
                        help="folder for the checkpoint, the signal stores and the results (default examples/output)")
    if extra:
        extra(parser)
    return parser.parse_args()


def tutorial_paths(workdir: str, args: SignalEstimationArgs) -> tuple[str, str, str]:
    """(checkpoint, signal_store_path, results_path) as the tutorial names them; folders are created."""
    model_signal_data_path = os.path.join(workdir, 'model_signal_data/')
    results_path = os.path.join(workdir, 'results')
    os.makedirs(model_signal_data_path, exist_ok=True)
    os.makedirs(results_path, exist_ok=True)
    signal_store_path = os.path.join(model_signal_data_path, '{}_signals'.format(args.mname))
    return os.path.join(workdir, 'lenet_mnist_model.h5'), signal_store_path, results_path


def load_lenet(model_ckpt_path: str) -> LeNet:
    """The tutorial's model loading: LeNet + the state_dict in ``lenet_mnist_model.h5``."""
    if not os.path.isfile(model_ckpt_path):
        raise SystemExit(f"{model_ckpt_path} does not exist; run examples/step0_train_lenet.py first")
    model = LeNet()
    if torch.cuda.is_available():
        model.load_state_dict(torch.load(model_ckpt_path))
        model = model.cuda()
    else:
        model.load_state_dict(torch.load(model_ckpt_path, map_location='cpu'))
    return model.eval()
