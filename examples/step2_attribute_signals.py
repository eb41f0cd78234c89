"""Step 2 of the tutorial: explain one digit for its top class, then for its top 2 and top 3 classes
with difference heatmaps (JPEGs in ``results/``), and finally the importance-threshold slider.

Without ipywidgets the slider is written as a static threshold-sweep figure.
"""
import os
import random

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from _tutorial import SignalEstimationArgs, load_lenet, parse_workdir, tutorial_paths  # noqa: E402

from untangle_ext import UntangleAI  # noqa: E402
from untangle_ext.external.signal_api import _attribute  # noqa: E402

random.seed(42)
opts = parse_workdir(__doc__, lambda p: p.add_argument("--json", action="store_true", help="JSON instead of JPEGs"))
args = SignalEstimationArgs()
args.json = opts.json
model_ckpt_path, signal_store_path, results_path = tutorial_paths(opts.workdir, args)
model = load_lenet(model_ckpt_path)
untangle_ai = UntangleAI()
keys = [str(item) for item in range(args.num_classes)]
ID2Name_Map = dict(zip(keys, keys))

rand_class = random.randint(0, 9)
print('Visualizing signal for a data point in class {}'.format(rand_class))
loader, _ = untangle_ai.load_mnist_per_class(batch_size=args.batch_size, data_class=rand_class, train=False)
input_tensor, _ = next(iter(loader))
idx = random.randint(0, input_tensor.shape[0] - 1)
input_tensor_single = input_tensor[idx][None, :, :, :]
input_tensor_true = input_tensor[idx].permute(1, 2, 0)  # expected shape (H,W,C)
out_prefix = os.path.join(results_path, '{}_signals'.format(idx))

for topk in range(1, 4):  # top-1: evidence for the prediction; top-2/3: joint and difference heatmaps
    args.topk = topk
    paths = untangle_ai.attribute_signals(model, input_tensor_single, input_tensor_true, signal_store_path,
                                          ID2Name_Map, args, out_prefix)
    print(f"top-{topk}: " + ", ".join(os.path.basename(p) for p in paths))

# The slider: keep only the most important pixels of the attribution for rand_class.
signal = _attribute(model, input_tensor_single, signal_store_path, rand_class, args)
# ipywidgets installed: an interactive slider (in a notebook); otherwise a static threshold-sweep figure
slider = untangle_ai.slider(signal, input_tensor_true, path=os.path.join(results_path, f"{idx}_threshold_sweep.png"))
print(f"slider: {slider}")
heatmap_signal = untangle_ai.get_heatmap(signal.permute(0, 2, 3, 1).cpu().numpy())
plt.imsave(os.path.join(results_path, f"{idx}_heatmap_class_{rand_class}.png"), heatmap_signal[0])
print(f"results in {results_path}")
