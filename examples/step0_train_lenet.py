"""Step 0 of the tutorial: train LeNet on MNIST and save its state_dict as ``lenet_mnist_model.h5``.

Offline: trains on the bundled 4,000-image MNIST sample (about 97% held-out accuracy with 4 epochs).
An existing checkpoint is reused, not overwritten.
"""
from _tutorial import SignalEstimationArgs, parse_workdir, tutorial_paths

from untangle_ext.models import load_or_train_lenet

opts = parse_workdir(__doc__, lambda p: p.add_argument("--epochs", type=int, default=4))
model_ckpt_path, _, _ = tutorial_paths(opts.workdir, SignalEstimationArgs())
model, accuracy = load_or_train_lenet(model_ckpt_path, epochs=opts.epochs)
print(f"LeNet in {model_ckpt_path}: held-out accuracy {accuracy:.2%} on the bundled MNIST sample")
