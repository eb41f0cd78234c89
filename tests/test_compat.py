"""The UntangleAI tutorial end to end, with only the import changed, plus the compatibility API's
invariants (joint scale, diff + invDiff = 0, JSON fields), errors, and the model left untouched.

The module trains LeNet for one epoch (single-threaded: fast even on a busy machine), saves it as the
tutorial's checkpoint and runs the tutorial's Step 1 once (on 8 images per class); every test reuses
that checkpoint and those stores.
"""
import functools
import json
import os
import sys
import types
import warnings
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from untangle_ext import Attributor, StoreError, UntangleAI, cli, loaders  # noqa: E402
from untangle_ext.data import load_mnist_sample  # noqa: E402
from untangle_ext.external.signal_api import _attribute  # noqa: E402
from untangle_ext.heatmaps import channel_sum, normalise  # noqa: E402
from untangle_ext.models import LeNet, train_lenet  # noqa: E402
from untangle_ext.validation import (ArgumentError, ClassIdError, InputError, InputShapeError,  # noqa: E402
                                     TopKError)

IMAGES_PER_CLASS = 8


def _tutorial_step1():
    """The tutorial's Step 1 cells, verbatim except the import (``untangle`` → ``untangle_ext``)."""
    # Required imports

    import os
    import torch
    import torch.nn as nn
    from tqdm import tqdm  # noqa: F401
    torch.set_printoptions(precision=8)
    from untangle_ext import UntangleAI

    torch.manual_seed(42)
    torch.cuda.manual_seed(42)
    torch.backends.cudnn.deterministic=True

    #Use the same model used for training
    class LeNet(nn.Module):
        # TODO: This isn't really a LeNet, but we implement this to be
        #  consistent with the Evidential Deep Learning paper
        def __init__(self):
            super(LeNet, self).__init__()
            self.model = None
            lenet_conv = []
            lenet_conv += [torch.nn.Conv2d(1,20, kernel_size=(5,5))]
            lenet_conv += [torch.nn.ReLU(inplace=True)]
            lenet_conv += [torch.nn.MaxPool2d(kernel_size=(2,2), stride=2)]
            lenet_conv += [torch.nn.Conv2d(20, 50, kernel_size=(5,5))]
            lenet_conv += [torch.nn.ReLU(inplace=True)]
            lenet_conv += [torch.nn.MaxPool2d(kernel_size=(2,2), stride=2)]

            lenet_dense = []
            lenet_dense += [torch.nn.Linear(4*4*50, 500)]
            lenet_dense += [torch.nn.ReLU(inplace=True)]
            lenet_dense += [torch.nn.Linear(500, 10)]

            self.features = torch.nn.Sequential(*lenet_conv)
            self.classifier = torch.nn.Sequential(*lenet_dense)

        def forward(self, input):
            output = self.features(input)
            output = output.view(input.shape[0], -1)
            output = self.classifier(output)
            return(output)

    model_ckpt_path = 'lenet_mnist_model.h5'
    model = LeNet()
    if (torch.cuda.is_available()):
        ckpt = torch.load(model_ckpt_path)
        model.load_state_dict(ckpt)
        model = model.cuda()
    else:
        ckpt = torch.load(model_ckpt_path, map_location='cpu')
        model.load_state_dict(ckpt)

    model.eval()

    class SignalEstimationArgs:
        mname = 'lenet'
        batch_size = 16
        num_classes = 10
        img_size = (1,28,28)
        input_tensor = torch.randn(1,1,28,28) # provide your own input tensor
        input_tensor_true = torch.randn(28,28,1) # provide your own true input tensor / ndarray / PIL Image Obj
        data_class = None # or `None` to estimate all classes
        mode = 'estimate' # one of `estimate`, `attribute`
        topk = 1
        cmap = 'seismic'
        json = False
        hm_diff = 'joint'

    args = SignalEstimationArgs()

    module_path = os.path.dirname(os.path.realpath('.'))
    proj_path = os.path.abspath(os.path.join(module_path, os.pardir))  # noqa: F841
    model_signal_data_path = os.path.join(module_path, 'model_signal_data/')
    results_path = os.path.join(module_path, 'results')
    if(not os.path.exists(model_signal_data_path)):
        os.makedirs(model_signal_data_path)
    if(not os.path.exists(results_path)):
        os.makedirs(results_path)
    signal_store_path = os.path.join(model_signal_data_path, '{}_signals'.format(args.mname))


    # Create untangle object
    untangle_ai = UntangleAI()

    def train_loader_fun(class_i):
        loader, _ = untangle_ai.load_mnist_per_class(batch_size=args.batch_size, data_class=class_i)
        return(loader)

    untangle_ai.estimate_signals(model, signal_store_path, train_loader_fun, args = args)

    return SimpleNamespace(**locals())


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """LeNet's ops are tiny: extra intra-op threads only fight over shared CPUs (6x slower on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tut(tmp_path_factory, _one_thread):
    """Train LeNet, save the tutorial's checkpoint, run Step 1 with module_path = a temp folder."""
    root = tmp_path_factory.mktemp("tutorial")
    notebook = root / "notebook"  # the tutorial's module_path is the notebook folder's parent
    notebook.mkdir()
    torch.save(train_lenet(epochs=1, progress=False)[0].state_dict(), notebook / "lenet_mnist_model.h5")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(notebook)
        mp.setattr(loaders, "load_mnist_per_class",
                   functools.partial(loaders.load_mnist_per_class, limit=IMAGES_PER_CLASS))
        ns = _tutorial_step1()
    assert ns.module_path == str(root)
    images, labels = load_mnist_sample("test")
    ns.x = images[labels == 4][:1]
    ns.root = root
    return ns


def _args(**fields):
    base = dict(mname="lenet", batch_size=16, num_classes=10, img_size=(1, 28, 28), data_class=None,
                mode="attribute", topk=3, cmap="seismic", json=False, hm_diff="joint")
    base.update(fields)
    return SimpleNamespace(**base)


def _snapshot(model, x):
    with torch.no_grad():
        out = model(x)
    return {k: v.clone() for k, v in model.state_dict().items()}, out, model.training


def _assert_untouched(model, x, snap):
    state, out, training = snap
    assert model.training == training
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(x), out)


def test_tutorial_step1_wrote_every_class(tut):
    for c in range(10):
        assert os.path.isfile(f"{tut.signal_store_path}_class_{c}.pkl")


def test_tutorial_step2_and_slider_run_unchanged(tut, monkeypatch):
    """Step 2 and the slider cells verbatim, except ``scipy.misc.imread`` → ``matplotlib.pyplot.imread``,
    and ``_attribute``'s import path; plt.show is a no-op and ipywidgets is a stand-in calling the tool."""
    monkeypatch.setattr(plt, "show", lambda *a, **k: None)
    slider_calls = []
    fake = types.ModuleType("ipywidgets")
    fake.interact = lambda fn, th: [slider_calls.append(v) or fn(v) for v in (th[0], 0.5, th[1])]
    monkeypatch.setitem(sys.modules, "ipywidgets", fake)
    monkeypatch.setattr(loaders, "load_mnist_per_class",
                        functools.partial(loaders.load_mnist_per_class, limit=IMAGES_PER_CLASS))
    args, untangle_ai, model = tut.args, tut.untangle_ai, tut.model
    signal_store_path, results_path, train_loader_fun = tut.signal_store_path, tut.results_path, tut.train_loader_fun

    # ---- tutorial cells from here on ----
    from matplotlib.pyplot import imread
    import matplotlib.pyplot as plt_  # the tutorial's `plt`
    import random
    random.seed(3)

    keys = [str(item) for item in range(args.num_classes)]
    ID2Name_Map = dict(zip(keys, keys))
    rand_class = random.randint(0, 9)
    print('Visualizing signal for a data point in class {}'.format(rand_class))
    rand_class_loader = train_loader_fun(rand_class)
    for input_tensor, _ in rand_class_loader:
        idx = random.randint(0, input_tensor.shape[0]-1)
        for topk in range(1, 2): # Heatmap showing signals in favour of top prediction
            args.topk = topk
            input_tensor_single = input_tensor[idx][None, :, :, :]
            input_tensor_true = input_tensor[idx].permute(1, 2, 0) # expected shape (H,W,C)
            out_prefix = os.path.join(results_path, '{}_signals'.format(idx))
            untangle_ai.attribute_signals(model, input_tensor_single, input_tensor_true, signal_store_path,
                ID2Name_Map, args, out_prefix)
            for i in range(topk):
                img = imread(out_prefix + '_class_{}.JPEG'.format(i))
                print('Visualizing {}'.format(out_prefix + '_class_{}.JPEG'.format(i)))
                plt_.imshow(img)
                plt_.show()
        break

    for topk in range(2, 4): # Joint and Differential Heatmaps comparing top class with other k-1 top predictions.
        args.topk = topk
        out_prefix = os.path.join(results_path, '{}_signals'.format(idx))
        untangle_ai.attribute_signals(model, input_tensor_single, input_tensor_true, signal_store_path,
                ID2Name_Map, args, out_prefix)
        for i in range(1, topk):
            img = imread(out_prefix + '_diff_class_{}.JPEG'.format(i))
            print('Visualizing {}'.format(out_prefix + '_diff_class_{}.JPEG'.format(i)))
            plt_.imshow(img)
            plt_.show()
            img = imread(out_prefix + '_invDiff_class_{}.JPEG'.format(i))
            print('Visualizing {}'.format(out_prefix + '_invDiff_class_{}.JPEG'.format(i)))
            plt_.imshow(img)
            plt_.show()

    from untangle_ext.external.signal_api import _attribute
    signal = _attribute(model, input_tensor_single, signal_store_path, rand_class, args)
    signal = signal.permute(0, 2, 3, 1)
    signal = signal.numpy()
    heatmap_signal = untangle_ai.get_heatmap(signal)
    def slider_tool(th):
        fig,axes = plt_.subplots(1,1,figsize = (8,8))

        analysis = [heatmap_signal<th]*heatmap_signal

        axes.set_title('Attribution')
        axes.imshow(analysis[0][0])

    from ipywidgets import interact
    interact(slider_tool, th = (0.0, 0.99))
    # ---- end of the tutorial's cells ----

    plt.close("all")
    assert slider_calls == [0.0, 0.5, 0.99]
    expected = [f"{out_prefix}_class_{i}.JPEG" for i in range(3)]
    expected += [f"{out_prefix}_{kind}_class_{i}.JPEG" for kind in ("diff", "invDiff") for i in (1, 2)]
    for path in expected:
        with Image.open(path) as im:
            im.load()
            assert im.format == "JPEG" and min(im.size) >= 320
    assert heatmap_signal.shape == (1, 28, 28, 3) and 0 <= heatmap_signal.min() and heatmap_signal.max() <= 1
    assert signal.shape == (1, 28, 28, 1)


def test_json_joint_scale_diff_and_fields(tut, tmp_path):
    ua, x = UntangleAI(), tut.x
    names = {str(i): f"digit {i}" for i in range(10)}
    (path,) = ua.attribute_signals(tut.model, x, None, tut.signal_store_path, names, _args(json=True),
                                   str(tmp_path / "four"))
    assert path.name == "four.json" and list(tmp_path.iterdir()) == [path]  # JSON instead of images
    data = json.loads(path.read_text())
    assert {"classes", "probabilities", "logits", "maps"} <= set(data)
    ids = [c["id"] for c in data["classes"]]
    with torch.no_grad():
        logits = tut.model(x)[0]
    assert ids == logits.topk(3).indices.tolist()
    assert [c["name"] for c in data["classes"]] == [f"digit {i}" for i in ids]
    np.testing.assert_allclose(data["logits"], logits[ids].numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(data["probabilities"], torch.softmax(logits.double(), 0)[ids].numpy(), rtol=1e-5)
    maps = {k: np.array(v) for k, v in data["maps"].items()}
    assert maps["class"].shape == (3, 28, 28) and maps["diff"].shape == maps["invDiff"].shape == (2, 28, 28)
    assert np.abs(maps["class"]).max() == 1.0  # ONE scale over the k maps
    assert np.all(np.abs(maps["class"]).reshape(3, -1).max(1) <= 1.0)
    np.testing.assert_array_equal(maps["diff"] + maps["invDiff"], 0.0)
    raw = maps["class"][:1] - maps["class"][1:]
    np.testing.assert_allclose(maps["diff"], raw / np.abs(raw).max(), atol=1e-5)
    # oracle: one batched explain == three single-class _attribute calls, jointly scaled
    single = torch.cat([_attribute(tut.model, x, tut.signal_store_path, c, _args()) for c in ids])
    np.testing.assert_allclose(maps["class"], normalise(channel_sum(single.double())).numpy(), atol=1e-5)


def test_hm_diff_single_gives_one_scale_per_map(tut, tmp_path):
    (path,) = UntangleAI().attribute_signals(tut.model, tut.x, None, tut.signal_store_path, None,
                                             _args(json="True", hm_diff="single"), str(tmp_path / "s"))
    maps = {k: np.array(v) for k, v in json.loads(path.read_text())["maps"].items()}
    np.testing.assert_array_equal(np.abs(maps["class"]).reshape(3, -1).max(1), 1.0)
    np.testing.assert_array_equal(np.abs(maps["diff"]).reshape(2, -1).max(1), 1.0)
    np.testing.assert_array_equal(maps["diff"] + maps["invDiff"], 0.0)


def test_one_batched_explain_call_for_all_topk(tut, tmp_path, monkeypatch):
    calls = []
    original = Attributor.explain
    monkeypatch.setattr(Attributor, "explain", lambda self, *a, **k: calls.append(k) or original(self, *a, **k))
    paths = UntangleAI().attribute_signals(tut.model, tut.x, tut.x[0].permute(1, 2, 0).numpy(),
                                           tut.signal_store_path, None, _args(topk=4), str(tmp_path / "p"))
    assert len(calls) == 1 and len(paths) == 4 + 3 + 3


def test_overlay_on_pil_rgb_image_and_custom_cmap(tut, tmp_path):
    rgb = Image.fromarray((tut.x[0, 0].numpy() * 255).astype(np.uint8)).convert("RGB")
    paths = UntangleAI().attribute_signals(tut.model, tut.x, rgb, tut.signal_store_path, None,
                                           _args(topk=2, cmap="bwr"), str(tmp_path / "p"))
    assert [p.name for p in paths] == ["p_class_0.JPEG", "p_class_1.JPEG", "p_diff_class_1.JPEG",
                                       "p_invDiff_class_1.JPEG"]


def test_model_untouched_by_every_public_call(tut, tmp_path):
    model, x, ua = tut.model, tut.x, UntangleAI()
    snap = _snapshot(model, x)
    ua.estimate_signals(model, str(tmp_path / "m"), lambda c: loaders.load_mnist_per_class(4, c, limit=4)[0],
                        _args(data_class=2))
    _assert_untouched(model, x, snap)
    ua.attribute_signals(model, x, None, tut.signal_store_path, None, _args(), str(tmp_path / "a"))
    _assert_untouched(model, x, snap)
    _attribute(model, x, tut.signal_store_path, 4, _args())
    ua.get_topk_pred(model, x, None, 3)
    ua.signal_attribution(model, tut.signal_store_path, [1, 4]).attribute(x, target=1)
    _assert_untouched(model, x, snap)


def test_estimate_passes_classes_as_written_and_resumes(tut, tmp_path):
    seen = []

    def loader_fun(class_i):
        seen.append(class_i)
        return loaders.load_mnist_per_class(4, class_i, limit=4)[0]

    prefix = str(tmp_path / "lenet_signals")
    written = UntangleAI().estimate_signals(tut.model, prefix, loader_fun, _args(data_class="3"))
    assert seen == ["3"] and list(written) == [3] and os.path.isfile(f"{prefix}_class_3.pkl")
    mtime = os.stat(f"{prefix}_class_3.pkl").st_mtime_ns
    UntangleAI().estimate_signals(tut.model, prefix, loader_fun, _args(data_class=3))
    assert seen == ["3"] and os.stat(f"{prefix}_class_3.pkl").st_mtime_ns == mtime  # resumed: nothing redone


def test_errors_are_clear(tut, tmp_path):
    ua, model, x, store = UntangleAI(), tut.model, tut.x, tut.signal_store_path
    attribute = functools.partial(ua.attribute_signals, model, x, None, store, None, out_prefix=str(tmp_path / "e"))
    with pytest.raises(TopKError, match=r"^args\.topk=11 must lie in \[1, 10\]: it is larger than the number of"):
        attribute(_args(topk=11))
    with pytest.raises(TopKError, match=r"^args\.topk=11 must lie in \[1, 10\]: it is larger than the number of"):
        attribute(_args(topk=11, num_classes=None))
    with pytest.raises(FileNotFoundError, match=r"nothing_class_\d\.pkl.*estimate_signals"):
        ua.attribute_signals(model, x, None, str(tmp_path / "nothing"), None, _args(), str(tmp_path / "e"))
    with pytest.raises(FileNotFoundError, match=r"nothing_class_4\.pkl.*estimate_signals"):
        _attribute(model, x, str(tmp_path / "nothing"), 4, _args())
    with pytest.raises(InputShapeError, match=r"^input_tensor: images have shape \(1, 28, 28\) \(batch of 1\), expected \(3, 28, 28\) "
                                              r"\(args.img_size\); fix args.img_size or resize the images"):
        attribute(_args(img_size=(3, 28, 28)))
    with pytest.raises(InputShapeError, match=r"^input: images have shape \(1, 28, 28\) \(batch of 1\), expected \(1, 32, 32\) \(args.img_size"):
        _attribute(model, x, store, 4, _args(img_size=(1, 32, 32)))
    with pytest.raises(InputShapeError, match=r"class '3': images have shape \(1, 28, 28\) \(batch of 4\), expected "
                                              r"\(1, 32, 32\) \(args.img_size\); fix args.img_size or resize"):
        ua.estimate_signals(model, str(tmp_path / "w"), lambda c: loaders.load_mnist_per_class(4, c, limit=4)[0],
                            _args(img_size=(1, 32, 32), data_class="3"))
    assert not list(tmp_path.glob("w_class_*"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an error, not also a warning
        with pytest.raises(InputError, match=r"classes \['1'\] yielded no images"):
            ua.estimate_signals(model, str(tmp_path / "z"), lambda c: [], _args(data_class="1"))
    with pytest.raises(ArgumentError, match=r"names one store file; pass the prefix '.*lenet_signals'"):
        _attribute(model, x, f"{store}_class_4.pkl", 4, _args())
    with pytest.raises(ClassIdError, match=r"^class_idx: invalid class id 12"):
        _attribute(model, x, store, 12, _args())
    with pytest.raises(StoreError, match="different model weights"):
        _attribute(LeNet(), x, store, 4, _args())  # stores of the trained model, weights of a fresh one
    with pytest.raises(InputShapeError, match=r"^input_tensor has shape \(2, 1, 28, 28\); expected ONE image"):
        ua.attribute_signals(model, x.repeat(2, 1, 1, 1), None, store, None, _args(), str(tmp_path / "e"))
    for field, value, message in [
        ("hm_diff", "both", "hm_diff must be one of"), ("cmap", "nope", "unknown colormap"),
        ("mode", "train", "args.mode='train': must be one of"), ("batch_size", 0, "args.batch_size=0: must be a positive"),
        ("data_class", "cat", "args.data_class: invalid class id 'cat'"), ("json", "maybe", "args.json='maybe': must be a"),
        ("img_size", (28, 28), r"args.img_size=\(28, 28\): must be"), ("num_classes", 5, "args.num_classes=5 but the model has 10"),
        ("mname", "", "args.mname"),
    ]:
        with pytest.raises(ValueError, match=message):
            attribute(_args(**{field: value, "topk": 1}))


def test_missing_optional_fields_get_defaults(tut, tmp_path):
    class Minimal:  # only what cannot be guessed: nothing at all
        pass

    paths = UntangleAI().attribute_signals(tut.model, tut.x[0], None, tut.signal_store_path, None, Minimal(),
                                           str(tmp_path / "m"))
    assert [p.name for p in paths] == ["m_class_0.JPEG"]  # topk 1, JPEG, (C, H, W) input accepted


def test_visualization_helpers(tut):
    ids = [4, 9, 7]
    grads = [_attribute(tut.model, tut.x, tut.signal_store_path, c, _args()) for c in ids]
    vis = UntangleAI().visualization()
    rgb, maps = vis.get_joint_heatmaps(grads, _args())
    assert rgb.shape == (3, 28, 28, 3) and maps.abs().max() == 1
    rgb_d, diff = vis.get_joint_diff_heatmaps(grads, _args())
    assert rgb_d.shape == (2, 2, 28, 28, 3) and torch.equal(diff[0] + diff[1], torch.zeros_like(diff[0]))
    white = UntangleAI().get_heatmap(np.zeros((1, 4, 4, 1)))
    np.testing.assert_array_equal(white, np.ones((1, 4, 4, 3), dtype=np.float32))


def test_cli_estimate_and_attribute(tut, tmp_path, capsys):
    ckpt = os.path.join(tut.root, "notebook", "lenet_mnist_model.h5")
    model_args = ["--model", "untangle_ext.models:LeNet", "--checkpoint", ckpt]
    assert cli.main(["estimate", *model_args, "--store-prefix", str(tmp_path / "c"), "--classes", "2",
                     "--limit", "4"]) == 0
    assert os.path.isfile(tmp_path / "c_class_2.pkl")
    assert cli.main(["attribute", *model_args, "--store-prefix", tut.signal_store_path, "--topk", "2",
                     "--out-prefix", str(tmp_path / "r" / "x"), "--json"]) == 0
    assert json.loads((tmp_path / "r" / "x.json").read_text())["topk"] == 2
    with pytest.raises(SystemExit, match="no signal store"):
        cli.main(["attribute", *model_args, "--store-prefix", str(tmp_path / "none")])
    with pytest.raises(SystemExit, match="module:factory"):
        cli.main(["estimate", "--model", "LeNet", "--random-weights", "--store-prefix", str(tmp_path / "c")])


def test_example_scripts_run_offline(tut, tmp_path, monkeypatch):
    """examples/step1 and step2 on the module's checkpoint (step 0 is the same LeNet training)."""
    import runpy
    import shutil

    examples = os.path.join(os.path.dirname(__file__), os.pardir, "examples")
    monkeypatch.syspath_prepend(examples)
    monkeypatch.setitem(sys.modules, "ipywidgets", None)  # a script, not a notebook: the static sweep figure
    shutil.copy(os.path.join(tut.root, "notebook", "lenet_mnist_model.h5"), tmp_path)
    for script, extra in (("step1_estimate_signals.py", ["--limit", "4"]), ("step2_attribute_signals.py", [])):
        monkeypatch.setattr(sys, "argv", [script, "--workdir", str(tmp_path), *extra])
        runpy.run_path(os.path.join(examples, script), run_name="__main__")
    assert len(list((tmp_path / "model_signal_data").glob("lenet_signals_class_*.pkl"))) == 10
    results = sorted(p.name for p in (tmp_path / "results").iterdir())
    assert sum(name.endswith(".JPEG") for name in results) == 7
    assert any(name.endswith("_threshold_sweep.png") for name in results)


def test_compat_traces_the_model_once_per_call(tut, tmp_path, monkeypatch):
    from untangle_ext import trace

    traced = []
    original = trace.Program.__init__
    monkeypatch.setattr(trace.Program, "__init__", lambda self, model, **kw: traced.append(1) or original(self, model, **kw))
    UntangleAI().attribute_signals(tut.model, tut.x, None, tut.signal_store_path, None, _args(topk=3),
                                   str(tmp_path / "p"))
    assert len(traced) == 1
    traced.clear()
    _attribute(tut.model, tut.x, tut.signal_store_path, 4, _args())
    assert len(traced) == 1
    traced.clear()
    UntangleAI().estimate_signals(tut.model, str(tmp_path / "e"),
                                  lambda c: loaders.load_mnist_per_class(8, c, limit=8)[0], _args(data_class=[1, 2]))
    assert len(traced) == 1
