"""The README's figure: the joint and difference heatmaps of one digit (top-3 classes).

Run after steps 0 and 1: ``python examples/make_docs_figure.py`` writes ``examples/output/compat_heatmaps.png``;
``--out docs/compat_heatmaps.png`` replaces the tracked figure (only when you mean to).
"""
import os

from _tutorial import HERE, SignalEstimationArgs, load_lenet, parse_workdir, tutorial_paths

from untangle_ext import Attributor, heatmaps
from untangle_ext.compat import load_stores
from untangle_ext.data import load_mnist_sample

opts = parse_workdir(__doc__, lambda p: (p.add_argument("--index", type=int, default=942, help="bundled test image (a 9 the model finds close to a 4)"),
                                         p.add_argument("--out", default=os.path.join(HERE, "output",
                                                                                      "compat_heatmaps.png"))))
args = SignalEstimationArgs()
model_ckpt_path, signal_store_path, _ = tutorial_paths(opts.workdir, args)
model = load_lenet(model_ckpt_path)
images, labels = load_mnist_sample("test")
x = images[opts.index][None]
attributor = Attributor(model, load_stores(signal_store_path, range(args.num_classes)))
exp = attributor.explain(x, topk=3)
maps = heatmaps.explanation_maps(exp.attributions[0], "joint")
ids, probs = exp.targets[0].tolist(), exp.probabilities[0]
panels = [heatmaps.overlay(heatmaps.to_rgb(m), x[0]) for kind in ("class", "diff", "invDiff") for m in maps[kind]]
titles = ([f"class {c}  p={probs[c]:.2f}" for c in ids] + [f"diff {ids[0]} − {c}" for c in ids[1:]]
          + [f"invDiff {c} − {ids[0]}" for c in ids[1:]])
path = heatmaps.save_figure(opts.out, panels, titles, cols=len(panels), min_pixels=140)
print(f"wrote {os.path.normpath(path)} ({os.path.getsize(path) / 1024:.0f} KB) for a digit labelled "
      f"{int(labels[opts.index])}")
