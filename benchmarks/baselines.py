"""Baselines the suite compares against (written for the benchmarks only, not part of the library).

* :class:`NaiveNeuronLoop`: statistics in a Python loop over output neurons, per class and layer,
  with masked sums per neuron (the style of the public PyTorch PatternNet ports).
* :func:`seed_style_estimate`: the UntangleAI driver scripts' shape: per class a deepcopy of the
  model, images fed one at a time, forward hooks accumulating dense per-image statistics.
* :func:`seed_style_attribute`: per image and class a deepcopy of the model whose Linear/Conv2d
  layers pass gradients through the pattern weights, then ``autograd`` back to the input.
* :func:`captum_saliency`: Captum's ``Saliency`` (plain input gradient), k calls of B images.

Both estimation baselines produce :class:`RawStats` in one layout, turned into patterns by
:func:`raw_patterns` (the SPEC §2 formulas on unshifted sums), so the suite can check that they
agree with the library's patterns before their timings are compared.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

Affine = (nn.Linear, nn.Conv2d)


@dataclass
class RawStats:
    """Float64 sums of one (class, layer): ``mat`` rows are Σ x yₖ (K), Σ⁺ x (K), Σ⁺ x yₖ (K), Σ x (1)."""

    mat: torch.Tensor  # (3K+1, D), or (S, 3K+1, D) for S classes at once
    sum_y: torch.Tensor  # (K,) / (S, K)
    pos_n: torch.Tensor  # (K,) / (S, K)
    pos_sum_y: torch.Tensor  # (K,) / (S, K)
    n: torch.Tensor  # () / (S,) samples

    @classmethod
    def zeros(cls, k: int, d: int, *slots: int) -> "RawStats":
        z = lambda *s: torch.zeros((*slots, *s), dtype=torch.float64)  # noqa: E731
        return cls(z(3 * k + 1, d), z(k), z(k), z(k), z())

    def slot(self, i: int) -> "RawStats":
        """The sums of class slot ``i`` of a multi-class RawStats."""
        return RawStats(self.mat[i], self.sum_y[i], self.pos_n[i], self.pos_sum_y[i], self.n[i])


def affine_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The model's Linear/Conv2d modules by qualified name (the names the library's stores use)."""
    mods = {name: m for name, m in model.named_modules() if isinstance(m, Affine)}
    for name, m in mods.items():
        if isinstance(m, nn.Conv2d) and m.groups != 1:
            raise ValueError(f"the baselines support groups=1 convolutions only ({name} has {m.groups})")
    return mods


def layer_samples(module: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(X (M, D) input patches, Y (M, K) outputs without bias, gate (M, K), positions per image)."""
    bias = module.bias if module.bias is not None else out.new_zeros(out.shape[1])
    if isinstance(module, nn.Linear):
        return inp, out - bias, out > 0, 1
    cols = F.unfold(inp, module.kernel_size, module.dilation, module.padding, module.stride)
    x = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    y = out.flatten(2).transpose(1, 2).reshape(-1, out.shape[1])
    return x, y - bias, y > 0, cols.shape[2]


@contextmanager
def layer_hooks(model: nn.Module, on_layer: Callable[[str, nn.Module, torch.Tensor, torch.Tensor], None]
                ) -> Iterator[None]:
    """Call ``on_layer(name, module, input, output)`` after every Linear/Conv2d while active."""
    handles = [m.register_forward_hook(lambda mod, i, o, n=name: on_layer(n, mod, i[0], o))
               for name, m in affine_modules(model).items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class NaiveNeuronLoop:
    """Per-class statistics with a Python loop over each layer's output neurons.

    Classes are not looped over: each neuron's masked sums are formed for all ``classes`` at
    once through a one-hot matrix (a stronger baseline than one loop per class and neuron).
    """

    def __init__(self, model: nn.Module, classes: Sequence[int]):
        self.model = model
        self.classes = list(classes)
        self.sums: dict[str, RawStats] = {}  # per layer, every tensor with a leading class dim

    @torch.no_grad()
    def update(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        """Add one batch of images with their class labels (each one of ``classes``)."""
        table = torch.full((max(self.classes + labels.tolist()) + 1,), -1, dtype=torch.long)
        table[torch.tensor(self.classes)] = torch.arange(len(self.classes))
        onehot = F.one_hot(table[labels], len(self.classes)).to(x.dtype)

        def on_layer(name, module, inp, out):
            xs, ys, gs, per_image = layer_samples(module, inp, out)
            if name not in self.sums:
                self.sums[name] = RawStats.zeros(ys.shape[1], xs.shape[1], len(self.classes))
            self._neurons(self.sums[name], xs, ys, gs, onehot.repeat_interleave(per_image, 0))

        with layer_hooks(self.model, on_layer):
            self.model(x)

    @staticmethod
    def _neurons(st: RawStats, x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, onehot: torch.Tensor) -> None:
        k = y.shape[1]
        st.n += onehot.sum(0).double()
        st.mat[:, 3 * k] += (onehot.t() @ x).double()
        st.sum_y += (onehot.t() @ y).double()
        for j in range(k):
            yj, gj = y[:, j:j + 1], gate[:, j:j + 1].to(x.dtype)
            pos = onehot * gj
            st.mat[:, j] += ((onehot * yj).t() @ x).double()
            st.mat[:, k + j] += (pos.t() @ x).double()
            st.mat[:, 2 * k + j] += ((pos * yj).t() @ x).double()
            st.pos_n[:, j] += pos.sum(0).double()
            st.pos_sum_y[:, j] += (pos.t() @ yj).squeeze(1).double()

    def stats(self) -> dict[tuple[int, str], RawStats]:
        """Per (class, layer) sums, as :func:`seed_style_estimate` returns them."""
        return {(c, name): st.slot(i) for name, st in self.sums.items() for i, c in enumerate(self.classes)}


def _dense_update(stats: dict[str, RawStats]) -> Callable:
    """A hook that adds ``[y | g | g·y | 1]ᵀ X`` of one forward to ``stats[name]``."""
    def on_layer(name, module, inp, out):
        x, y, gate, _ = layer_samples(module, inp, out)
        g = gate.to(x.dtype)
        design = torch.cat([y, g, g * y, x.new_ones(x.shape[0], 1)], 1)
        if name not in stats:
            stats[name] = RawStats.zeros(y.shape[1], x.shape[1])
        st = stats[name]
        st.mat += (design.t() @ x).double()
        st.sum_y += y.sum(0).double()
        st.pos_n += g.sum(0).double()
        st.pos_sum_y += (g * y).sum(0).double()
        st.n += x.shape[0]
    return on_layer


def seed_style_estimate(model: nn.Module, images_by_class: Mapping[int, torch.Tensor]
                        ) -> dict[tuple[int, str], RawStats]:
    """Per class: deepcopy the model, feed its images one at a time, accumulate with hooks."""
    out: dict[tuple[int, str], RawStats] = {}
    for c, images in images_by_class.items():
        replica = copy.deepcopy(model)
        stats: dict[str, RawStats] = {}
        with layer_hooks(replica, _dense_update(stats)), torch.no_grad():
            for i in range(images.shape[0]):
                replica(images[i:i + 1])
        out.update({(c, name): st for name, st in stats.items()})
    return out


def _normalise(cov: torch.Tensor, w: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    den = (w * cov).sum(1, keepdim=True)
    ok = alive[:, None] & (den != 0)
    return torch.where(ok, cov / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(cov))


def raw_patterns(st: RawStats, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """a_lin, a_pos, a_neg (shaped like ``weight``) from unshifted sums, E[y] over all samples (eq. 4, 8)."""
    k = weight.shape[0]
    w = weight.reshape(k, -1).double()
    sxy, spx, spxy, sx = st.mat[:k], st.mat[k:2 * k], st.mat[2 * k:3 * k], st.mat[3 * k]
    n, npos = float(st.n), st.pos_n
    nneg = n - npos
    ey = (st.sum_y / max(n, 1.0))[:, None]
    per = lambda v: v.clamp(min=1)[:, None]  # noqa: E731
    cov = sxy / max(n, 1.0) - (sx / max(n, 1.0))[None] * ey
    cov_pos = spxy / per(npos) - spx / per(npos) * ey
    cov_neg = (sxy - spxy) / per(nneg) - (sx[None] - spx) / per(nneg) * ey
    full = torch.full((k,), n > 1)
    return {name: _normalise(c, w, alive).reshape(weight.shape)
            for name, c, alive in (("a_lin", cov, full), ("a_pos", cov_pos, npos > 0), ("a_neg", cov_neg, nneg > 0))}


class _GradThrough(nn.Module):
    """The layer's forward value, but the gradient to its input flows through ``pattern``."""

    def __init__(self, layer: nn.Module, pattern: torch.Tensor):
        super().__init__()
        self.layer = layer
        self.pattern = pattern.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer(x)
        if isinstance(self.layer, nn.Linear):
            via = F.linear(x, self.pattern)
        else:
            la = self.layer
            via = F.conv2d(x, self.pattern, None, la.stride, la.padding, la.dilation, la.groups)
        return via + (out - via).detach()


def _swap_layers(model: nn.Module, patterns: Mapping[str, torch.Tensor]) -> nn.Module:
    for name, module in list(affine_modules(model).items()):
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, _GradThrough(module, patterns[name]))
    return model


def seed_style_attribute(model: nn.Module, reverse_weights: Mapping[int, Mapping[str, torch.Tensor]],
                         x: torch.Tensor, topk: int) -> torch.Tensor:
    """(B, k, ...) attributions: per image its top-k, per (image, class) a deepcopy and one backward.

    ``reverse_weights[c][layer]`` is the weight the reverse pass uses for class ``c``
    (``W ⊙ a⁺`` for PatternAttribution).
    """
    out = x.new_zeros((x.shape[0], topk, *x.shape[1:]))
    for b in range(x.shape[0]):
        with torch.no_grad():
            targets = model(x[b:b + 1]).topk(topk, dim=1).indices[0].tolist()
        for j, c in enumerate(targets):
            replica = _swap_layers(copy.deepcopy(model), reverse_weights[c])
            xb = x[b:b + 1].clone().requires_grad_(True)
            replica(xb)[0, c].backward()
            out[b, j] = xb.grad[0]
    return out


def captum_saliency(model: nn.Module, x: torch.Tensor, topk: int) -> torch.Tensor:
    """(B, k, ...) Captum ``Saliency`` attributions of each image's top-k classes (k calls of B images)."""
    from captum.attr import Saliency

    with torch.no_grad():
        targets = model(x).topk(topk, dim=1).indices
    saliency = Saliency(model)
    return torch.stack([saliency.attribute(x, target=targets[:, j], abs=False) for j in range(topk)], 1)
