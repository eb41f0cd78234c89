"""Streaming per-class moments of every affine layer's input and output (SPEC §2).

One :class:`Moments` holds float64 accumulators for a set of class *slots*
(a chunk of classes, or one slot for an all-class store). Inputs are shifted
by a fixed per-feature shift (the first batch's mean) before any product is
formed, so ``E[xy] - E[x]E[y]`` never cancels catastrophically; the pattern
formula undoes the shift exactly (see :mod:`untangle_ext.patterns`). Layers with
few products per sample (:func:`wide_products`: first layers on images, small
heads) form them in float64: in a first layer the shift turns exact zeros (MNIST's background) into
-mean, every float32 product is rounded and summed over ~10^5 positions per
batch (measured on LeNet/MNIST: a⁺ of the first conv 1e-3 from float64; with
float64 products 2e-11; with the whole issue-11 precision work 5–9% of LeNet's estimation
time, 3% of the VGG-style net's: README "Numerics"). Other shift rules
(none; only where |mean| > std) were measured and lost: README "Numerics".
"""
from __future__ import annotations

import copy
from typing import Optional

import torch

from . import ops
from .layers import AffineLayer, Conv, Linear
from .subsample import PositionSampler
from .trace import Program

#: Layout of ``vec`` (owned here; the kernels and the reference follow it): per-output sums, then the count.
VEC_FIELDS = ("sum_y", "pos_n", "pos_sum_y")
#: Row blocks of ``mat`` per group, each ``Kg`` rows except the last: Σ y~x~ᵀ, Σ g x~ᵀ, Σ g y~ x~ᵀ, Σ x~ᵀ.
MAT_BLOCKS = ("sum_yx", "pos_sum_x", "pos_sum_yx", "sum_x")


#: A Linear layer's rows are buffered until this many are pending, then accumulated in one
#: call: a mixed-label batch of 16 touches ~10 class accumulators of D x (3K+1) float64 each,
#: so accumulating every batch at once is memory-bound (measured: 41% of LeNet b16 time).
PENDING_ROWS = 256

#: Layers with at most this many products per sample, ``(3K + 1) * D`` (D: patch length), form
#: them in float64: LeNet's first conv (1,525) and last layer (15,500), VGG-style's first conv
#: (5,211); their moments are ~1% of a VGG-style net's (measured cost: README "Numerics").
F64_MAX_PRODUCTS = 1 << 15


def wide_products(layer: AffineLayer) -> bool:
    """Whether ``layer`` forms its per-batch products in float64 (see :data:`F64_MAX_PRODUCTS`)."""
    return (3 * layer.out_features // layer.groups + 1) * layer.patch_size <= F64_MAX_PRODUCTS


class LayerMoments:
    """Accumulators of one affine layer for ``S`` class slots, with named views of every block.

    ``mat[s, g]`` is ``[y~ | g | g*y~ | 1]^T x~`` summed over samples, shape
    ``(3*Kg + 1, Dg)`` per group ``g``; ``vec[s]`` holds the per-output sums of
    :data:`VEC_FIELDS` (``K`` each) and the sample count last. Everything else reads
    them through the views (:meth:`block`, :meth:`field`, :attr:`count`). Linear-layer
    rows may be pending (see :data:`PENDING_ROWS`); reading ``mat`` or ``vec`` adds them first.
    """

    def __init__(self, layer: AffineLayer, mat: torch.Tensor, vec: torch.Tensor):
        self.layer = layer
        self._mat, self._vec = mat, vec  # (S, G, 3Kg+1, Dg) and (S, 3K+1), float64
        self.shift: Optional[torch.Tensor] = None  # input dtype: (D,) linear, (C_in,) conv
        # dtype of the per-batch products (None: the input's), see F64_MAX_PRODUCTS
        self.product_dtype = torch.float64 if wide_products(layer) else None
        self._wide: Optional[AffineLayer] = None  # the layer in product_dtype, made on first use
        self.out_offset: Optional[torch.Tensor] = None  # (K,) float64 = W shift + b
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._pending_rows = 0
        # conv layers only: (sampler, index of the layer in the program) when statistics are position-subsampled
        self.sampling: Optional[tuple[PositionSampler, int]] = None

    @property
    def mat(self) -> torch.Tensor:
        self.flush()
        return self._mat

    @property
    def vec(self) -> torch.Tensor:
        self.flush()
        return self._vec

    @property
    def groups(self) -> int:
        return self.layer.groups

    def block(self, name: str) -> torch.Tensor:
        """One block of ``mat`` as a view (S, G, Kg, Dg) (``sum_x``: (S, G, 1, Dg)); see :data:`MAT_BLOCKS`."""
        kg = self.layer.out_features // self.groups
        i = MAT_BLOCKS.index(name)
        return self.mat[:, :, i * kg:(i + 1) * kg if name != "sum_x" else None]

    def per_neuron(self, name: str, slot: int) -> torch.Tensor:
        """One block for one slot as (K, Dg), neuron by neuron (``sum_x`` repeated for the neurons of its group)."""
        b = self.block(name)[slot]
        kg = self.layer.out_features // self.groups
        return b.repeat_interleave(kg, dim=1).reshape(-1, b.shape[-1]) if name == "sum_x" else b.reshape(-1, b.shape[-1])

    def field(self, name: str) -> torch.Tensor:
        """One block of ``vec`` as a view (S, K): a name of :data:`VEC_FIELDS`."""
        k = self.layer.out_features
        i = VEC_FIELDS.index(name)
        return self.vec[:, i * k:(i + 1) * k]

    @property
    def count(self) -> torch.Tensor:
        """Samples (output positions for conv) seen per slot, (S,)."""
        return self.vec[:, -1]

    def patch_shift(self) -> torch.Tensor:
        """The shift in patch space, (G, Dg) float64, as the pattern formula needs it."""
        return self.layer.patch_shift(self.shift.double())

    def init_shift(self, x: torch.Tensor) -> None:
        """Fix the shift from the first batch: its mean per feature (Linear) or per channel (conv)."""
        self.set_shift(x.mean(self.layer.shift_dims(x)) if x.numel() else x.new_zeros(self.layer.in_features))

    def set_shift(self, shift: torch.Tensor) -> None:
        """Use ``shift`` (input dtype) and its ``out_offset``; only valid while the sums are zero or re-shifted."""
        self.flush()  # pending rows belong to the old shift
        self.shift = shift
        self.out_offset = _weight_times(self.layer, self.patch_shift()).reshape(-1) + self.layer.bias.double()

    def reshift(self, shift: torch.Tensor) -> None:
        """Re-express the sums about ``shift`` instead of ``self.shift``, exactly, in place.

        With ``d = s_old - s_new`` (patch space) and ``e = W d``, the shifted data move by
        constants: ``x~' = x~ + d``, ``y~' = y~ + e`` (gates are unchanged: they come from the
        layer's output). Hence, with ``n`` samples and ``n+`` open gates::

            Σx~'    = Σx~ + n d                      Σy~'  = Σy~ + n e
            Σy~'x~' = Σy~x~ + e Σx~ + d Σy~ + n e d
            and the gated sums likewise with Σg x~, Σg y~ and n+ in place of Σx~, Σy~ and n.
        """
        if self.shift is None:  # nothing accumulated yet: all-zero sums are valid about any shift
            self.set_shift(shift)
            return
        old = self.patch_shift()
        self.set_shift(shift)
        d = old - self.patch_shift()  # (G, Dg)
        g, k = self.groups, self.layer.out_features
        kg = k // g
        e = _weight_times(self.layer, d)  # (G, Kg)
        slots = self.count.shape[0]
        e4, d4, n4 = e.view(1, g, kg, 1), d.view(1, g, 1, -1), self.count.view(slots, 1, 1, 1)
        sy4, gy4, npos4 = (self.field(f).view(slots, g, kg, 1) for f in ("sum_y", "pos_sum_y", "pos_n"))
        sxy, sgx, sgxy, sx = (self.block(b) for b in MAT_BLOCKS)
        sxy += e4 * sx + d4 * sy4 + n4 * e4 * d4  # old Σx~, Σy~ (updated below)
        sgxy += e4 * sgx + d4 * gy4 + npos4 * e4 * d4  # old Σg x~, Σg y~
        sgx += npos4 * d4
        sx += n4 * d4
        ev, n2, npos = e.view(1, k), self.count.view(slots, 1), self.field("pos_n")
        self.field("sum_y").add_(n2 * ev)
        self.field("pos_sum_y").add_(npos * ev)

    def sums(self) -> tuple[torch.Tensor, ...]:
        """The accumulators that add up across data shards once all are about one shift."""
        return self.mat, self.vec

    def accumulate(self, x: torch.Tensor, slots: torch.Tensor, keys: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Add the batch ``x`` (images assigned to ``slots``; -1 = skip) and return the layer output.

        ``keys``: the images' sampling keys (:meth:`PositionSampler.image_keys`) when position subsampling is on.
        """
        if self.shift is None:
            self.init_shift(x)
        index = self._sampled_positions(x, keys)
        if index is not None:
            return self._accumulate_at(x, slots, index)
        if not isinstance(self.layer, Linear) or (not self._pending and x.shape[0] >= PENDING_ROWS):
            return self._accumulate(x, slots)
        self._pending.append((x.clone(), slots.clone()))  # clone: the caller's tensors may change later
        self._pending_rows += x.shape[0]
        skip = torch.full_like(slots, -1)
        z = self._accumulate(x, skip)  # output only
        if self._pending_rows >= PENDING_ROWS:
            self.flush()
        return z

    def flush(self) -> None:
        """Accumulate the pending Linear rows in one call."""
        if not self._pending:
            return
        xs, slots = zip(*self._pending)
        self._pending, self._pending_rows = [], 0
        self._accumulate(torch.cat(xs), torch.cat(slots))

    def _product_layer(self, dtype: torch.dtype) -> AffineLayer:
        """The layer with its weight in :attr:`product_dtype` (the layer itself when that is ``dtype``)."""
        if self.product_dtype in (None, dtype):
            return self.layer
        if self._wide is None:
            self._wide = copy.copy(self.layer)
            self._wide.weight = self.layer.weight.to(self.product_dtype)
            self._wide.bias = self.layer.bias.to(self.product_dtype)
        return self._wide

    def _accumulate(self, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """One kernel call, with the products in :attr:`product_dtype`; the output in the input dtype."""
        layer = self._product_layer(x.dtype)
        if layer is self.layer:
            return layer.accumulate(x, self.shift, self.out_offset, slots, self._mat, self._vec)
        return layer.accumulate(x.to(layer.weight.dtype), self.shift, self.out_offset, slots, self._mat,
                                self._vec).to(x.dtype)

    # --- position subsampling (conv layers; see untangle_ext.subsample) ------------------------------------------
    def _sampled_positions(self, x: torch.Tensor, keys: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The output positions (B, k) whose statistics this batch adds, or None for all of them."""
        if keys is None or self.sampling is None:
            return None
        sampler, index = self.sampling
        total = self.layer.positions(x)
        return sampler.select(keys, index, total) if sampler.take(total) < total else None

    def _accumulate_at(self, x: torch.Tensor, slots: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Add the patches at positions ``index`` (B, k) only; the output is the layer's plain forward."""
        layer = self._product_layer(x.dtype)
        rows = self.layer.patches_at(x, index).to(layer.weight.dtype)
        self._accumulate_rows(layer, rows, slots.repeat_interleave(index.shape[1]))
        return self.layer.forward(x)

    def _accumulate_rows(self, layer: AffineLayer, rows: torch.Tensor, row_slots: torch.Tensor) -> None:
        """Accumulate patch rows (M, D) as samples of ``layer`` (the Linear op, one call per group)."""
        g, k, dg = self.groups, self.layer.out_features, self.layer.patch_size
        kg = k // g
        w, shift = layer.weight.reshape(k, -1), self.layer.patch_shift(self.shift)  # (K, Dg), (G, Dg)
        if g == 1:
            ops.accumulate_linear(rows, w, shift[0], self.out_offset, row_slots, self._mat, self._vec)
            return
        # grouped: each group is a Linear layer of its own; its sums go through small (present slots) accumulators
        valid = (row_slots >= 0) & (row_slots < self._mat.shape[0])
        present = torch.unique(row_slots[valid])
        if present.numel() == 0:
            return
        local = torch.where(valid, torch.searchsorted(present, row_slots), -1)
        for j in range(g):
            out = slice(j * kg, (j + 1) * kg)
            mat = self._mat.new_zeros(len(present), 1, 3 * kg + 1, dg)
            vec = self._vec.new_zeros(len(present), 3 * kg + 1)
            ops.accumulate_linear(rows[:, j * dg:(j + 1) * dg].contiguous(), w[out], shift[j], self.out_offset[out],
                                  local, mat, vec)
            self._mat[present, j] += mat[:, 0]
            for i, name in enumerate(VEC_FIELDS):
                self.field(name)[present, out] += vec[:, i * kg:(i + 1) * kg]
        self._vec[present, -1] += vec[:, -1]  # one sample per position, whatever the groups


def _new_layer_moments(layer: Affine, slots: int) -> LayerMoments:
    k, g = layer.out_features, layer.groups
    dev = layer.weight.device
    mat = torch.zeros((slots, g, 3 * (k // g) + 1, layer.patch_size), dtype=torch.float64, device=dev)
    vec = torch.zeros((slots, len(VEC_FIELDS) * k + 1), dtype=torch.float64, device=dev)
    return LayerMoments(layer, mat, vec)


def slots_of(classes: torch.Tensor, slot_classes: list[int], num_classes: int) -> torch.Tensor:
    """Slot index of each class id in ``classes``: its position in ``slot_classes``, -1 where absent."""
    table = torch.full((num_classes,), -1, dtype=torch.long, device=classes.device)
    table[torch.tensor(slot_classes, dtype=torch.long, device=classes.device)] = torch.arange(
        len(slot_classes), device=classes.device)
    return table[classes]


#: Weight elements converted to float64 at once by :func:`_weight_times`.
_ROW_BLOCK_ELEMENTS = 1 << 16


def _weight_times(layer: AffineLayer, v: torch.Tensor) -> torch.Tensor:
    """``W v`` per group in float64, (G, Kg), for ``v`` (G, Dg) float64: the weight is converted in
    row blocks, so no weight-sized float64 temporary adds to the accumulators' memory."""
    g = layer.groups
    w = layer.weight.detach().reshape(g, layer.out_features // g, -1)
    rows = max(1, _ROW_BLOCK_ELEMENTS // max(w.shape[2], 1))
    out = v.new_empty(w.shape[:2])
    for r0 in range(0, w.shape[1], rows):
        out[:, r0:r0 + rows] = torch.bmm(w[:, r0:r0 + rows].double(), v.unsqueeze(2)).squeeze(2)
    return out


def accumulator_bytes(program: Program, slots: int = 1) -> int:
    """Bytes of float64 accumulators needed for ``slots`` classes."""
    per_slot = 0
    for layer in program.layers:
        k, g = layer.out_features, layer.groups
        per_slot += 8 * (g * (3 * (k // g) + 1) * layer.patch_size + len(VEC_FIELDS) * k + 1)
    return per_slot * slots


class Moments:
    """Accumulators of every affine layer of a program, for ``num_slots`` class slots.

    ``sampler``: conv statistics from a random subset of output positions (see
    :mod:`untangle_ext.subsample`); None or rate 1 accumulates every position.
    """

    def __init__(self, program: Program, num_slots: int, sampler: Optional[PositionSampler] = None):
        self.program = program
        self.num_slots = num_slots
        self.layers = {layer.name: _new_layer_moments(layer, num_slots) for layer in program.layers}
        self.images = torch.zeros(num_slots, dtype=torch.long)  # images seen per slot
        self.sampler = sampler if sampler is not None and sampler.rate < 1 else None
        if self.sampler is not None:
            for i, lm in enumerate(self.layers.values()):
                if isinstance(lm.layer, Conv):
                    lm.sampling = (self.sampler, i)

    def shifts(self) -> Optional[list[torch.Tensor]]:
        """Every layer's shift (None before any batch)."""
        first = next(iter(self.layers.values()))
        return None if first.shift is None else [lm.shift for lm in self.layers.values()]

    @torch.no_grad()
    def reshift(self, shifts: list[torch.Tensor]) -> None:
        """Re-express every layer's sums about ``shifts`` (one per layer, in order), exactly."""
        for lm, shift in zip(self.layers.values(), shifts):
            lm.reshift(shift)

    def sums(self) -> list[torch.Tensor]:
        """Every accumulator that adds up across data shards (about one shift), image counts excluded."""
        return [t for lm in self.layers.values() for t in lm.sums()]

    @torch.no_grad()
    def update(self, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Run one batch through the model, accumulating every layer; return the logits."""
        kept = slots[(slots >= 0) & (slots < self.num_slots)]
        self.images += torch.bincount(kept.cpu(), minlength=self.num_slots)
        keys = self.sampler.image_keys(x) if self.sampler is not None else None
        return self.program.forward(x, affine=lambda layer, inp: self.layers[layer.name].accumulate(inp, slots, keys))
