"""Loaders of the tutorial: MNIST (IDX files, download with checksum, bundled fallback), ImageNet folders,
the test-image generator and top-k predictions. No network: downloads are simulated."""
import gzip
import hashlib
import io
import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image

from untangle_ext import loaders, validation
from untangle_ext.data import load_mnist_sample
from untangle_ext.models import residual_net


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _fake_mnist(n=30, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), (np.arange(n) % 10).astype(np.uint8)


def _write_idx(folder, split, images, labels, gz=True):
    folder.mkdir(parents=True, exist_ok=True)
    for part, array in (("images", images), ("labels", labels)):
        name = loaders.MNIST_FILES[(split, part)][0]
        data = _idx_bytes(array)
        if gz:
            (folder / name).write_bytes(gzip.compress(data))
        else:
            (folder / name[:-3]).write_bytes(data)


@pytest.fixture(autouse=True)
def _fresh_notices(monkeypatch):
    monkeypatch.setattr(loaders, "_notices", set())
    monkeypatch.delenv(loaders.MNIST_DIR_ENV, raising=False)


def test_class_ids_and_booleans_come_from_validation():
    assert validation.class_ids(None, None, "data_class") is None
    assert validation.class_ids(3, None, "c") == [3] and validation.class_ids("945", None, "c") == [945]
    assert validation.class_ids(["1", 2, np.int64(4)], None, "c") == [1, 2, 4]
    for bad in ("cat", True, 1.5, [], 10):
        with pytest.raises(validation.ClassIdError, match=r"args\.data_class.*(class id|empty)"):
            validation.class_ids(bad, 10, "args.data_class")
    assert validation.boolean("False", "x") is False and validation.boolean("True", "x") is True
    assert validation.boolean(1, "x") is True
    with pytest.raises(validation.ArgumentError, match="is_resnet='maybe': must be a boolean"):
        validation.boolean("maybe", "is_resnet")
    with pytest.raises(validation.ClassIdError, match="data_class: invalid class id 12"):
        loaders.load_mnist_per_class(4, 12)


def test_missing_data_dir_is_an_error_naming_the_path(tmp_path, monkeypatch):
    typo = tmp_path / "mnsit"
    with pytest.raises(loaders.MissingDataError, match=r"data_dir='.*mnsit': no such folder.*download=True"):
        loaders.load_mnist_per_class(8, 3, data_dir=typo)
    monkeypatch.setenv(loaders.MNIST_DIR_ENV, str(typo))
    with pytest.raises(FileNotFoundError, match=r"\$UNTANGLE_EXT_MNIST_DIR='.*mnsit': no such folder"):
        loaders.load_mnist_tensors(train=False)


def test_existing_empty_data_dir_falls_back_with_a_notice_naming_it(tmp_path, capsys):
    x, _ = loaders.load_mnist_tensors(train=False, classes=[1], data_dir=tmp_path)
    assert x.shape[0] == 100  # the bundled sample's test split of class 1
    assert f"no MNIST IDX files of the test split in {tmp_path}" in capsys.readouterr().err


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_from_idx_files_filters_classes(tmp_path, gz):
    images, labels = _fake_mnist()
    _write_idx(tmp_path, "train", images, labels, gz=gz)
    loader, dataset = loaders.load_mnist_per_class(4, data_class="3", data_dir=tmp_path)
    x, y = dataset.tensors
    assert x.shape == (3, 1, 28, 28) and x.dtype == torch.float32 and set(y.tolist()) == {3}
    np.testing.assert_array_equal((x[:, 0] * 255).round().byte().numpy(), images[labels == 3])
    assert sum(b[0].shape[0] for b in loader) == 3
    both = loaders.load_mnist_per_class(8, data_class=[1, 2], data_dir=tmp_path)[1].tensors[1]
    assert sorted(set(both.tolist())) == [1, 2] and len(both) == 6


def test_mnist_torchvision_layout_and_env_dir(tmp_path, monkeypatch):
    images, labels = _fake_mnist()
    _write_idx(tmp_path / "MNIST" / "raw", "test", images, labels)
    monkeypatch.setenv(loaders.MNIST_DIR_ENV, str(tmp_path))
    x, y = loaders.load_mnist_tensors(train=False, classes=[0])
    assert x.shape[0] == 3 and set(y.tolist()) == {0}


def test_bundled_fallback_gives_one_notice(capsys):
    _, dataset = loaders.load_mnist_per_class(16, data_class=7)
    x, y = dataset.tensors
    ref_x, _ = load_mnist_sample("train", [7])
    assert torch.equal(x, ref_x) and set(y.tolist()) == {7}
    loaders.load_mnist_per_class(16, data_class=2)
    err = capsys.readouterr().err
    assert err.count("bundled 5,000-image sample") == 1


def test_limit_keeps_first_images_per_class():
    x, y = loaders.load_mnist_tensors(train=True, classes=[1, 4], limit=5)
    assert torch.bincount(y, minlength=10)[[1, 4]].tolist() == [5, 5]
    ref, _ = load_mnist_sample("train", [1])
    assert torch.equal(x[y == 1], ref[:5])
    with pytest.raises(ValueError, match="limit"):
        loaders.load_mnist_tensors(limit=0)


def _serve(monkeypatch, payloads):
    """Replace urlopen: ``payloads`` maps file name → bytes, or an exception to raise."""
    def fake_urlopen(url, timeout):
        item = payloads[url.rsplit("/", 1)[-1]]
        if isinstance(item, Exception):
            raise item
        return io.BytesIO(item)

    monkeypatch.setattr(loaders.urllib.request, "urlopen", fake_urlopen)


def test_download_offline_falls_back_to_bundled(tmp_path, monkeypatch, capsys):
    offline = urllib.error.URLError("no network")
    _serve(monkeypatch, {name: offline for name, _ in loaders.MNIST_FILES.values()})
    _, dataset = loaders.load_mnist_per_class(8, data_class=5, data_dir=tmp_path, download=True)
    assert torch.equal(dataset.tensors[0], load_mnist_sample("train", [5])[0])
    assert "download failed" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_download_with_bad_checksum_keeps_nothing(tmp_path, monkeypatch):
    _serve(monkeypatch, {name: b"not mnist" for name, _ in loaders.MNIST_FILES.values()})
    with pytest.raises(loaders.ChecksumError, match="sha256"):
        loaders.load_mnist_per_class(8, data_dir=tmp_path, download=True)
    assert list(tmp_path.iterdir()) == []


def test_download_verifies_and_reads(tmp_path, monkeypatch):
    images, labels = _fake_mnist()
    payloads = {"train-images-idx3-ubyte.gz": gzip.compress(_idx_bytes(images)),
                "train-labels-idx1-ubyte.gz": gzip.compress(_idx_bytes(labels))}
    table = dict(loaders.MNIST_FILES)
    for part in ("images", "labels"):
        name = table[("train", part)][0]
        table[("train", part)] = (name, hashlib.sha256(payloads[name]).hexdigest())
    monkeypatch.setattr(loaders, "MNIST_FILES", table)
    _serve(monkeypatch, payloads)
    _, dataset = loaders.load_mnist_per_class(8, data_class=9, data_dir=tmp_path, download=True)
    assert len(dataset) == 3 and sorted(p.name for p in tmp_path.iterdir()) == sorted(payloads)


def test_truncated_idx_file_is_reported(tmp_path):
    images, labels = _fake_mnist()
    _write_idx(tmp_path, "train", images, labels, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated"):
        loaders.load_mnist_per_class(8, data_dir=tmp_path)


def test_mnist_data_gen_names_and_images(tmp_path):
    batches = list(loaders.mnist_data_gen(7, tmp_path, gen_images="True", limit=2))
    names = [n for b in batches for n in b[0]]
    assert len(names) == 20 and names[0] == "mnist_test_0" and batches[0][1].shape == (7, 1, 28, 28)
    with Image.open(tmp_path / "mnist_test_3.png") as img:
        pixels = np.asarray(img)
    np.testing.assert_array_equal(pixels, (batches[0][1][3, 0] * 255).round().byte().numpy())
    assert not list(tmp_path.glob("*.tmp"))


def _make_imagenet(root):
    rng = np.random.default_rng(0)
    for synset, sizes in (("n01440764", [(300, 260), (256, 256)]), ("n07720875", [(240, 320)])):
        (root / synset).mkdir(parents=True)
        for i, (w, h) in enumerate(sizes):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / synset / f"img_{i}.JPEG")
    (root / "n07720875" / "notes.txt").write_text("not an image")


def test_imagenet_per_class(tmp_path):
    _make_imagenet(tmp_path)
    synsets = {"0": "n01440764", "945": "n07720875"}
    loader, dataset = loaders.load_imagenet_per_class(2, tmp_path, synsets, data_class="945", is_resnet="True")
    assert len(dataset) == 1 and dataset[0][1] == 945
    x = next(iter(loader))[0]
    assert x.shape == (1, 3, 224, 224)
    raw = loaders.load_imagenet_per_class(2, tmp_path, synsets, data_class="945", is_resnet="False")[1][0][0]
    assert raw.min() >= 0 and raw.max() <= 1
    mean = torch.tensor(loaders.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(loaders.IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(x[0], (raw - mean) / std)
    # center crop of the resized image: compare with PIL directly
    with Image.open(tmp_path / "n07720875" / "img_0.JPEG") as img:
        resized = img.convert("RGB").resize((256, 341), Image.BILINEAR)  # shorter side 240 → 256
        ref = np.asarray(resized.crop((16, 58, 240, 282)), dtype=np.float32) / 255
    np.testing.assert_allclose(raw.permute(1, 2, 0).numpy(), ref, atol=1e-6)
    everything = loaders.load_imagenet_per_class(4, tmp_path, synsets)[1]
    assert sorted(label for _, label in everything.samples) == [0, 0, 945]


def test_imagenet_synset_file_and_errors(tmp_path):
    _make_imagenet(tmp_path / "train")
    mapping = tmp_path / "LOC_synset_mapping.txt"
    mapping.write_text("n01440764 tench, Tinca tinca\nn01443537 goldfish\n")
    assert len(loaders.load_imagenet_per_class(1, tmp_path / "train", mapping, data_class=0)[1]) == 2
    with pytest.raises(FileNotFoundError, match="n01443537"):
        loaders.load_imagenet_per_class(1, tmp_path / "train", mapping, data_class=1)
    with pytest.raises(KeyError, match="not in synset_map"):
        loaders.load_imagenet_per_class(1, tmp_path / "train", mapping, data_class=5)


def test_get_topk_pred_matches_model_and_leaves_it_untouched():
    torch.manual_seed(0)
    model = residual_net().train()  # training mode: calling it would update BatchNorm statistics
    x = torch.randn(1, 1, 28, 28)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    logits, probs, names, ids = loaders.get_topk_pred(model, x, {str(i): f"c{i}" for i in range(10)}, 3)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        ref = model.eval()(x)[0]
    assert ids == ref.topk(3).indices.tolist() and names == [f"c{i}" for i in ids]
    torch.testing.assert_close(torch.tensor(logits), ref[ids], rtol=1e-5, atol=1e-5)
    expected = torch.softmax(ref.double(), 0)[ids]
    torch.testing.assert_close(torch.tensor(probs, dtype=torch.float64), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="topk=11"):
        loaders.get_topk_pred(model, x, None, 11)
    with pytest.raises(ValueError, match="ONE image"):
        loaders.get_topk_pred(model, torch.randn(2, 1, 28, 28), None, 1)
