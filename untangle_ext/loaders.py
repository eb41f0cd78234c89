"""Data loaders and small helpers of the UntangleAI tutorial: MNIST / ImageNet per class, a test-image
generator and top-k predictions. Nothing here needs the network unless a download is asked for.

MNIST comes from standard IDX files in a data directory (``data_dir`` or ``$UNTANGLE_EXT_MNIST_DIR``),
downloaded and sha256-verified only when ``download=True`` and online; otherwise the bundled 5k sample
is used and a one-line notice says so (once per process).
"""
from __future__ import annotations

import gzip
import hashlib
import os
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from . import validation
from .data import load_mnist_sample
from ._io import atomic_write

PathLike = Union[str, "os.PathLike[str]"]
MNIST_DIR_ENV = "UNTANGLE_EXT_MNIST_DIR"
MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/",
                 "https://storage.googleapis.com/cvdf-datasets/mnist/")
#: (split, part) → (file name, sha256 of the gzip file)
MNIST_FILES = {
    ("train", "images"): ("train-images-idx3-ubyte.gz",
                          "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
    ("train", "labels"): ("train-labels-idx1-ubyte.gz",
                          "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
    ("test", "images"): ("t10k-images-idx3-ubyte.gz",
                         "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
    ("test", "labels"): ("t10k-labels-idx1-ubyte.gz",
                         "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".webp")
_notices: set[str] = set()
TopK = tuple[list[float], list[float], list[str], list[int]]  # (logits, probabilities, class names, class ids)


MissingDataError = validation.MissingDataError


class ChecksumError(ValueError):
    """A downloaded file does not have the expected sha256 (nothing is kept on disk)."""


def notice_once(message: str) -> None:
    """Print ``message`` to stderr the first time it is given in this process."""
    if message not in _notices:
        _notices.add(message)
        print(f"untangle_ext: {message}", file=sys.stderr)


# ----------------------------------------------------------------------------------------- MNIST

def read_idx(path: PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzipped) of unsigned bytes: images (N, 28, 28) or labels (N,)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (bad magic number); delete it and "
                         "download MNIST again")
    ndim = data[3]
    dims = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path} is truncated: header says {dims} but it holds {body.size} values; delete it "
                         "and download MNIST again")
    return body.reshape(dims)


def _mnist_dir(data_dir: Optional[PathLike], download: bool) -> Optional[Path]:
    """The MNIST folder the caller chose (``data_dir``, else ``$UNTANGLE_EXT_MNIST_DIR``), or None.

    A chosen folder that does not exist is an error (a typo must not fall back to the bundled sample),
    unless ``download`` will create it.
    """
    chosen, name = (data_dir, "data_dir") if data_dir is not None else (os.environ.get(MNIST_DIR_ENV), f"${MNIST_DIR_ENV}")
    return validation.data_folder(chosen, name, created=download) if chosen else None


def find_idx(data_dir: Path, file_name: str) -> Optional[Path]:
    """The IDX file ``file_name`` (gzipped or not) in ``data_dir`` or torchvision's ``data_dir/MNIST/raw``."""
    for folder in (data_dir, data_dir / "MNIST" / "raw"):
        for name in (file_name, file_name[:-3]):
            if (folder / name).is_file():
                return folder / name
    return None


def download_mnist(data_dir: PathLike, split: str = "train", timeout: float = 30.0) -> None:
    """Fetch the two IDX files of ``split`` into ``data_dir`` (sha256-checked, atomic); keeps files already there.

    Raises :class:`OSError` when no mirror can be reached and :class:`ChecksumError` on a bad download.
    """
    data_dir = Path(data_dir)
    for part in ("images", "labels"):
        name, sha = MNIST_FILES[(split, part)]
        if find_idx(data_dir, name) is not None:
            continue
        errors = []
        for mirror in MNIST_MIRRORS:
            try:
                with urllib.request.urlopen(mirror + name, timeout=timeout) as response:
                    payload = response.read()
                break
            except (urllib.error.URLError, OSError) as exc:
                errors.append(f"{mirror}: {exc}")
        else:
            raise OSError(f"could not download {name}: " + "; ".join(errors))
        digest = hashlib.sha256(payload).hexdigest()
        if digest != sha:
            raise ChecksumError(f"{name} from {mirror} has sha256 {digest}, expected {sha}; nothing was saved. "
                                "Try again later or place the official file in the data directory yourself.")
        atomic_write(data_dir / name, lambda f: f.write(payload))


def _split(train: bool) -> str:
    return "train" if train else "test"


def _idx_arrays(data_dir: Optional[Path], split: str, download: bool) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """MNIST (images, labels) from IDX files, downloading first when asked; None when unavailable."""
    if data_dir is None and download:
        data_dir = Path.home() / ".cache" / "untangle_ext" / "mnist"
    if data_dir is None:
        return None
    paths = [find_idx(data_dir, MNIST_FILES[(split, part)][0]) for part in ("images", "labels")]
    if None in paths and download:
        try:
            download_mnist(data_dir, split)
        except OSError as exc:  # offline: fall back to the bundled sample below
            notice_once(f"MNIST download failed ({exc}); using the bundled 5,000-image sample")
            return None
        paths = [find_idx(data_dir, MNIST_FILES[(split, part)][0]) for part in ("images", "labels")]
    if None in paths:
        return None
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"MNIST files in {data_dir} do not match: images {images.shape}, labels {labels.shape}")
    return images, labels


def _first_per_class(labels: torch.Tensor, limit: Optional[int]) -> torch.Tensor:
    """Indices keeping at most ``limit`` samples of each class (in order); all when ``limit`` is None."""
    if limit is None:
        return torch.arange(labels.shape[0])
    if int(limit) < 1:
        raise ValueError(f"limit must be >= 1 images per class, got {limit}")
    keep = [torch.nonzero(labels == c).flatten()[:int(limit)] for c in labels.unique()]
    return torch.cat(keep).sort().values


def load_mnist_tensors(train: bool = True, classes: Optional[Sequence[int]] = None,
                       data_dir: Optional[PathLike] = None, download: bool = False,
                       limit: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST images (N, 1, 28, 28) float32 in [0, 1] and labels (N,) int64 of the chosen classes."""
    split = _split(train)
    folder = _mnist_dir(data_dir, download)
    arrays = _idx_arrays(folder, split, download)
    if arrays is None:
        where = (f"no MNIST IDX files of the {split} split in {folder}" if folder is not None else
                 f"no MNIST folder given (data_dir=..., ${MNIST_DIR_ENV}, or download=True)")
        notice_once(f"{where}; using the bundled 5,000-image sample")
        x, y = load_mnist_sample(split, classes)
    else:
        images, labels = arrays
        mask = np.isin(labels, classes) if classes is not None else np.ones(labels.shape[0], dtype=bool)
        x = torch.from_numpy(images[mask].astype(np.float32) / 255.0).unsqueeze(1)
        y = torch.from_numpy(labels[mask].astype(np.int64))
    keep = _first_per_class(y, limit)
    return x[keep], y[keep]


def load_mnist_per_class(batch_size: int, data_class: Any = None, data_dir: Optional[PathLike] = None,
                         download: bool = False, train: bool = True, shuffle: bool = False,
                         limit: Optional[int] = None) -> tuple[DataLoader, TensorDataset]:
    """(loader, dataset) of MNIST images of ``data_class`` (None = all; 3, '3' or a list) with their labels.

    ``limit`` keeps at most that many images per class (quick runs).
    """
    classes = validation.class_ids(data_class, 10, "data_class")
    x, y = load_mnist_tensors(train, classes, data_dir, download, limit)
    if x.shape[0] == 0:
        raise ValueError(f"no MNIST images of class {data_class!r} in the {_split(train)} split")
    dataset = TensorDataset(x, y)
    return DataLoader(dataset, batch_size=validation.positive_int(batch_size, "batch_size"), shuffle=shuffle), dataset


def mnist_data_gen(batch_size: int, results_path: PathLike, gen_images: bool = False,
                   data_dir: Optional[PathLike] = None, download: bool = False,
                   limit: Optional[int] = None) -> Iterator[tuple[list[str], torch.Tensor]]:
    """Yield (names, images (B, 1, 28, 28)) over the MNIST test split; names are ``mnist_test_{i}``.

    With ``gen_images`` each image is also written to ``{results_path}/{name}.png``.
    """
    batch_size = validation.positive_int(batch_size, "batch_size")
    write = validation.boolean(gen_images, "gen_images")
    x, _ = load_mnist_tensors(False, None, data_dir, download, limit)
    for start in range(0, x.shape[0], batch_size):
        batch = x[start:start + batch_size]
        names = [f"mnist_test_{start + i}" for i in range(batch.shape[0])]
        if write:
            for name, image in zip(names, batch):
                _save_gray_png(Path(results_path) / f"{name}.png", image[0])
        yield names, batch


def _save_gray_png(path: Path, image: torch.Tensor) -> None:
    from PIL import Image

    pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    atomic_write(path, lambda f: Image.fromarray(pixels, mode="L").save(f, format="PNG"))


# -------------------------------------------------------------------------------------- ImageNet

@dataclass(frozen=True)
class ImagePreprocess:
    """PIL image → tensor (3, crop, crop): resize the shorter side, center-crop, scale to [0, 1], normalise."""

    resize: int = 256
    crop: int = 224
    mean: Optional[tuple[float, float, float]] = IMAGENET_MEAN
    std: Optional[tuple[float, float, float]] = IMAGENET_STD

    def __call__(self, image) -> torch.Tensor:
        from PIL import Image

        image = image.convert("RGB")
        w, h = image.size
        s = self.resize / min(w, h)
        image = image.resize((max(self.crop, round(w * s)), max(self.crop, round(h * s))), Image.BILINEAR)
        w, h = image.size
        left, top = round((w - self.crop) / 2), round((h - self.crop) / 2)
        image = image.crop((left, top, left + self.crop, top + self.crop))
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()
        if self.mean is not None:
            x = (x - torch.tensor(self.mean).view(3, 1, 1)) / torch.tensor(self.std).view(3, 1, 1)
        return x


def imagenet_preprocess(is_resnet: Any = False) -> ImagePreprocess:
    """The tutorial's two presets: resize 256, crop 224; ``is_resnet`` adds ImageNet mean/std normalisation
    (what torchvision's ResNets expect), otherwise pixels stay in [0, 1]."""
    if validation.boolean(is_resnet, "is_resnet"):
        return ImagePreprocess()
    return ImagePreprocess(mean=None, std=None)


class ImageFolderDataset(Dataset):
    """(image tensor, class id) pairs from a list of files, decoded lazily with PIL."""

    def __init__(self, samples: Sequence[tuple[Path, int]], transform: ImagePreprocess):
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        path, label = self.samples[index]
        with Image.open(path) as image:
            return self.transform(image), label


def read_synset_map(synset_map: Union[Mapping[Any, str], PathLike]) -> dict[int, str]:
    """Class id → synset folder: a mapping such as ``{'945': 'n07720875'}``, or a text file whose line i
    starts with the synset of class i (``LOC_synset_mapping.txt`` / ``synsets.txt``)."""
    if isinstance(synset_map, Mapping):
        return {validation.class_ids(k, None, "synset_map key")[0]: str(v) for k, v in synset_map.items()}
    lines = Path(synset_map).read_text().splitlines()
    return {i: line.split()[0] for i, line in enumerate(l for l in lines if l.strip())}


def load_imagenet_per_class(batch_size: int, data_path: PathLike, synset_map: Union[Mapping[Any, str], PathLike],
                            data_class: Any = None, is_resnet: Any = False, shuffle: bool = False,
                            num_workers: int = 0) -> tuple[DataLoader, ImageFolderDataset]:
    """(loader, dataset) over ``data_path/<synset>/*`` for ``data_class`` (None = every class of ``synset_map``)."""
    mapping = read_synset_map(synset_map)
    classes = validation.class_ids(data_class, None, "data_class") or sorted(mapping)
    samples: list[tuple[Path, int]] = []
    for c in classes:
        if c not in mapping:
            raise KeyError(f"class {c} is not in synset_map (it maps {len(mapping)} classes); add its synset folder")
        folder = Path(data_path) / mapping[c]
        if not folder.is_dir():
            raise FileNotFoundError(f"no folder {folder} for class {c}; data_path must hold one folder per synset")
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        samples += [(p, c) for p in files]
    dataset = ImageFolderDataset(samples, imagenet_preprocess(is_resnet))
    loader = DataLoader(dataset, batch_size=validation.positive_int(batch_size, "batch_size"), shuffle=shuffle, num_workers=num_workers)
    return loader, dataset


# ----------------------------------------------------------------------------------- predictions

def class_name(id2name: Optional[Mapping[Any, str]], c: int) -> str:
    """The name of class ``c`` in the tutorial's ``ID2Name_Map`` (string keys), else ``str(c)``."""
    if not id2name:
        return str(c)
    return str(id2name.get(str(c), id2name.get(c, c)))


def get_topk_pred(model: nn.Module, input: torch.Tensor, ID2Name_Map: Optional[Mapping[Any, str]],  # noqa: A002
                  topk: int) -> TopK:
    """Top-k (logits, probabilities, class names, class ids) of one image, best first (model never called)."""
    from .trace import Program

    return topk_pred(Program(model), input, ID2Name_Map, topk)


@torch.no_grad()
def topk_pred(program, input: torch.Tensor, ID2Name_Map: Optional[Mapping[Any, str]],  # noqa: A002
              topk: int, topk_name: str = "topk") -> TopK:
    """:func:`get_topk_pred` on an already traced :class:`~untangle_ext.trace.Program`."""
    k = validation.check_topk(topk, program.num_outputs, topk_name)
    weight = program.layers[0].weight
    logits = program.forward(validation.one_image(input, None, "input").to(weight.device, weight.dtype))[0]
    top = logits.topk(k)
    probs = torch.softmax(logits.double(), dim=0)[top.indices]
    ids = top.indices.tolist()
    return top.values.tolist(), probs.tolist(), [class_name(ID2Name_Map, c) for c in ids], ids
