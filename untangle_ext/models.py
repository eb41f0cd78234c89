"""Reference models: the tutorial's LeNet (with a fast trainer on the bundled MNIST sample),
plus a VGG-style and a small residual network used to exercise the engine on other layer mixes."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._progress import bars_off
from .store import atomic_torch_save

__all__ = ["LeNet", "BasicBlock", "evaluate_accuracy", "train_lenet", "load_or_train_lenet",
           "vgg_style_net", "residual_net"]


class LeNet(nn.Module):
    """The tutorial's LeNet, layer for layer, so state_dicts load from its ``lenet_mnist_model.h5``."""

    # TODO (from the tutorial): this isn't really a LeNet; it follows the Evidential Deep Learning paper.
    def __init__(self) -> None:
        super().__init__()
        self.model = None  # kept from the tutorial (not a parameter; not in the state_dict)
        lenet_conv = []
        lenet_conv += [torch.nn.Conv2d(1, 20, kernel_size=(5, 5))]
        lenet_conv += [torch.nn.ReLU(inplace=True)]
        lenet_conv += [torch.nn.MaxPool2d(kernel_size=(2, 2), stride=2)]
        lenet_conv += [torch.nn.Conv2d(20, 50, kernel_size=(5, 5))]
        lenet_conv += [torch.nn.ReLU(inplace=True)]
        lenet_conv += [torch.nn.MaxPool2d(kernel_size=(2, 2), stride=2)]

        lenet_dense = []
        lenet_dense += [torch.nn.Linear(4 * 4 * 50, 500)]
        lenet_dense += [torch.nn.ReLU(inplace=True)]
        lenet_dense += [torch.nn.Linear(500, 10)]

        self.features = torch.nn.Sequential(*lenet_conv)
        self.classifier = torch.nn.Sequential(*lenet_dense)

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 (tutorial's name)
        output = self.features(input)
        output = output.view(input.shape[0], -1)
        output = self.classifier(output)
        return output


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, split: str = "test", batch_size: int = 500) -> float:
    """Top-1 accuracy of ``model`` on a split of the bundled MNIST sample (model left in eval mode)."""
    from .data import load_mnist_sample

    x, y = load_mnist_sample(split)
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for i in range(0, x.shape[0], batch_size):
        pred = model(x[i:i + batch_size].to(device)).argmax(1).cpu()
        correct += int((pred == y[i:i + batch_size]).sum())
    return correct / x.shape[0]


def train_classifier(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, epochs: int, lr: float = 1e-2,
                     weight_decay: float = 0.0, batch_size: int = 32, seed: int = 0) -> nn.Module:
    """Adam with cross-entropy on shuffled in-memory mini-batches (the examples' small nets); returns it in eval mode."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(batch_size):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), labels[idx]).backward()
            opt.step()
    return model.eval()


def train_lenet(epochs: int = 5, batch_size: int = 64, lr: float = 1e-3, seed: int = 0,
                progress: bool = True) -> tuple[LeNet, float]:
    """Train LeNet with Adam on the bundled train split (4,000 images), deterministically.

    Returns (model in eval mode, accuracy on the held-out 1,000-image test split).
    Defaults reach ~96-97% (seeds 0-2) in about 7 s on 2 CPU threads (torch 2.13 CPU).
    """
    from tqdm.auto import tqdm

    from .data import mnist_sample_loader

    torch.manual_seed(seed)
    model = LeNet()
    loader = mnist_sample_loader(batch_size, split="train", shuffle=True, seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    with tqdm(total=epochs * len(loader), desc="train LeNet", unit="batch", disable=bars_off(progress)) as bar:
        for epoch in range(epochs):
            for x, y in loader:
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(model(x), y)
                loss.backward()
                opt.step()
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
    acc = evaluate_accuracy(model, "test")
    return model, acc


def load_or_train_lenet(cache_path: str | Path, **kw: Any) -> tuple[LeNet, float]:
    """Load a cached LeNet state_dict (safely, weights only) or train one and cache it atomically.

    ``kw`` goes to :func:`train_lenet`. Returns (model in eval mode, held-out accuracy).
    """
    path = Path(cache_path)
    if path.exists():
        model = LeNet()
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        except Exception as e:  # corrupt/truncated/foreign file: say which and how to fix
            raise ValueError(f"cannot load LeNet weights from {path}: {e}. "
                             f"Delete the file to retrain it.") from e
        return model.eval(), evaluate_accuracy(model, "test")
    model, acc = train_lenet(**kw)
    atomic_torch_save(model.state_dict(), path)
    return model, acc


def vgg_style_net(num_classes: int = 10, in_channels: int = 3) -> nn.Sequential:
    """A VGG-like conv stack for 64x64 inputs (conv3x3+ReLU blocks, max-pools, two dense layers)."""
    layers: list[nn.Module] = []
    c = in_channels
    for v in (64, 64, "M", 128, 128, "M", 256, 256, "M"):
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(c, int(v), kernel_size=3, padding=1), nn.ReLU()]
            c = int(v)
    layers += [nn.Flatten(), nn.Linear(256 * 8 * 8, 1024), nn.ReLU(), nn.Linear(1024, num_classes)]
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """torchvision-style residual block: conv3x3-BN-ReLU-conv3x3-BN, plus identity or 1x1conv-BN, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


def residual_net(num_classes: int = 10) -> nn.Sequential:
    """A tiny ResNet for 1x28x28 inputs (stem, two BasicBlocks, global average pool, linear)."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        BasicBlock(8, 8),
        BasicBlock(8, 16, stride=2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes),
    )
