"""The rule table: how every traced op runs forward and how the reverse pass crosses it (SPEC §2).

A rule turns one graph node into a step with a forward (that may record what
the reverse pass needs on the :class:`Tape`) and a reverse that maps the
gradient-like signal of the step's output onto each of its tensor inputs, for
``B·k`` (image, class) pairs at once (pair ``b·k + j`` belongs to image ``b``).

* affine layers (:mod:`untangle_ext.layers`) reverse through their patterns;
* elementwise activations multiply by their recorded slope (the gate for
  ReLU; the derivative for smooth ones: the gradient rule);
* max pools route to the recorded argmax; reshapes, identities and additions
  pass the signal on;
* every other op is :class:`Generic`: its vector-Jacobian product at the
  recorded forward inputs — exact for linear maps (cat, permute, slicing,
  means, pools), the gradient rule for the rest (LayerNorm, softmax, products
  of activations such as squeeze-excitation and attention). With
  ``constant_gates=True`` a product holds its gating operand (an output of a
  sigmoid/softmax-like op) constant instead.

:func:`rule_for` is the only place that maps an op to its rule; the text of
:func:`supported_ops` (used by error messages) is generated from the table.
"""
from __future__ import annotations

import operator
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .layers import AFFINE_KINDS, AffineLayer


class Ref(int):
    """Marks an argument that refers to the value of another step."""


def resolve(a: Any, values: Any) -> Any:
    """Replace the :class:`Ref` markers in an argument structure by ``values[ref]``."""
    return fx.node.map_aggregate(a, lambda v: values[v] if isinstance(v, Ref) else v)


@dataclass
class Tape:
    """What the reverse pass needs from one forward pass, per step index."""

    saved: dict = field(default_factory=dict)  # step -> what its rule recorded
    shapes: dict = field(default_factory=dict)  # step -> shape of its first tensor input
    batch: int = 0


@dataclass
class Step:
    """One node of the program: ``rule`` runs it forward and reverses it."""

    rule: "Rule"
    name: str
    index: int = -1
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    fn: Optional[Callable[..., Any]] = None
    layer: Optional[AffineLayer] = None
    tensor_inputs: tuple[int, ...] = ()  # steps whose values the signal flows back to
    gates: frozenset = frozenset()  # tensor inputs held constant (constant_gates option)

    @property
    def op(self) -> str:
        return self.rule.name


#: Reverse-pass context: ``pairs`` per image and the affine rule ``affine(layer, grad, input_shape)``;
#: ``exclusive``: no other pending signal shares the memory of the ``grad`` a reverse gets now, so the rule
#: may overwrite it (an addition hands one tensor to both of its inputs: then it is not exclusive).
@dataclass
class Reverse:
    tape: Tape
    pairs: int
    affine: Callable[[AffineLayer, torch.Tensor, torch.Size], torch.Tensor]
    constant_gates: bool = False
    exclusive: bool = False


class Rule:
    """Forward and reverse of one kind of op; the base runs ``step.fn`` and has no reverse."""

    name = "rule"
    rescales = True  # the reverse may change the signal's scale (the pass renormalises after it)
    #: passes positive values and (nearly) blocks negative ones: ReLU and its smooth relatives. An affine layer
    #: whose output reaches only such ops is "sign-gated" (the two-component estimator's model of a unit)
    gates_sign = False
    #: moves or selects values without changing them (reshapes, dropout, max-pool): a gate behind it still
    #: splits the affine layer's output by sign
    keeps_sign = False

    def forward(self, step: Step, args: tuple, kwargs: dict, tape: Optional[Tape]) -> Any:
        return step.fn(*args, **kwargs)

    def reverse(self, step: Step, grad: torch.Tensor, ctx: Reverse) -> Sequence[Optional[torch.Tensor]]:
        raise AssertionError(f"no reverse rule for {self.name}")


class Constant(Rule):
    """Values that do not depend on the input (sizes, parameters, buffers): computed, never reversed."""

    name = "constant"


class Affine(Rule):
    """Linear/ConvNd: the layer's forward (or the estimator's accumulating one); reversed through patterns."""

    name = "affine"

    def forward(self, step, args, kwargs, tape, affine=None):
        x = args[0]
        if tape is not None:
            tape.shapes[step.index] = x.shape
        return affine(step.layer, x) if affine is not None else step.layer.forward(x)

    def reverse(self, step, grad, ctx):
        return (ctx.affine(step.layer, grad, ctx.tape.shapes[step.index]),)


def _per_image(grad: torch.Tensor, batch: int) -> torch.Tensor:
    """(B·k, ...) pairs viewed as (B, k, ...)."""
    return grad.view(batch, -1, *grad.shape[1:])


class Generic(Rule):
    """The vector-Jacobian product of the op at its recorded inputs, for all pairs of an image at once."""

    name = "generic"

    def forward(self, step, args, kwargs, tape):
        if tape is not None:
            tape.saved[step.index] = (args, kwargs)
        return step.fn(*args, **kwargs)

    def reverse(self, step, grad, ctx):
        args, kwargs = ctx.tape.saved[step.index]
        batch = ctx.tape.batch
        held = step.gates if ctx.constant_gates else frozenset()
        live = [j for j in step.tensor_inputs if j not in held]
        values = dict(_refs_to_values(step.args, args))
        values.update(_refs_to_values(step.kwargs, kwargs))
        with torch.enable_grad():
            primals = {j: values[j].detach().requires_grad_(True) for j in live if values[j].is_floating_point()}
            env = {**values, **primals}
            out = step.fn(*resolve(step.args, env), **resolve(step.kwargs, env))
            inputs = list(primals.values())
            cot = _per_image(grad, batch).transpose(0, 1)  # (k, B, ...)
            grads = _batched_grad(out, inputs, cot) if inputs else []
        by_step = {j: _pairs(g) for j, g in zip(primals, grads)}
        return tuple(by_step.get(j) for j in step.tensor_inputs)


def _refs_to_values(template: Any, resolved: Any) -> list[tuple[int, Any]]:
    """Pair every :class:`Ref` in ``template`` with the value at the same place in ``resolved``."""
    found: list[tuple[int, Any]] = []

    def walk(t: Any, r: Any) -> None:
        if isinstance(t, Ref):
            found.append((int(t), r))
        elif isinstance(t, (list, tuple)):
            for a, b in zip(t, r):
                walk(a, b)
        elif isinstance(t, dict):
            for key in t:
                walk(t[key], r[key])

    walk(template, resolved)
    return found


def _batched_grad(out: torch.Tensor, inputs: list[torch.Tensor], cot: torch.Tensor) -> list[Optional[torch.Tensor]]:
    """VJPs of ``out`` for the ``k`` cotangents ``cot`` (k, *out.shape): vmapped, else one by one."""
    if cot.shape[0] == 1:
        grads = torch.autograd.grad(out, inputs, cot[0], allow_unused=True)
        return [None if g is None else g.unsqueeze(0) for g in grads]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch notes slow vmap fallbacks: speed, not results
            grads = torch.autograd.grad(out, inputs, cot, is_grads_batched=True, allow_unused=True,
                                        retain_graph=True)
    except RuntimeError:
        per = [torch.autograd.grad(out, inputs, c, allow_unused=True, retain_graph=True) for c in cot]
        grads = [None if per[0][i] is None else torch.stack([p[i] for p in per]) for i in range(len(inputs))]
    return list(grads)


def _pairs(g: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """(k, B, ...) back to the pair layout (B·k, ...)."""
    if g is None:
        return None
    return g.transpose(0, 1).reshape(-1, *g.shape[2:])


class Elementwise(Rule):
    """An elementwise activation: the signal is multiplied by the recorded slope f'(x) of each image."""

    name = "elementwise"

    def forward(self, step, args, kwargs, tape):
        if tape is None:
            return step.fn(*args, **kwargs)
        with torch.enable_grad():
            x = args[0].detach().requires_grad_(True)
            out = step.fn(x, *args[1:], **kwargs)
            (slope,) = torch.autograd.grad(out, x, torch.ones_like(out))
        tape.saved[step.index] = slope
        return out.detach()

    def reverse(self, step, grad, ctx):
        """The signal times each image's slope (a bool gate for ReLU); in place when ``grad`` is exclusive
        (a fresh output of this size costs more in page faults than the multiplication itself)."""
        slope = ctx.tape.saved[step.index].unsqueeze(1)
        per_image = _per_image(grad, ctx.tape.batch)
        return ((per_image.mul_(slope) if ctx.exclusive else per_image * slope).view_as(grad),)


class ReLU(Elementwise):
    """ReLU: the slope is the gate ``x > 0``, kept as a bool mask."""

    name = "relu"
    rescales = False  # a 0/1 gate cannot grow the signal
    gates_sign = True

    def forward(self, step, args, kwargs, tape):
        out = torch.relu(args[0])
        if tape is not None:
            tape.saved[step.index] = out > 0
        return out


class ReLULike(Elementwise):
    """ReLU6, GELU, SiLU, Mish, Hardswish: the recorded slope like any activation; like ReLU, they gate by sign."""

    name = "relu_like"
    gates_sign = True


class MaxPool2d(Rule):
    """Max pooling: each pair's signal goes to the recorded argmax of its image."""

    name = "maxpool2d"
    rescales = False
    keeps_sign = True

    def forward(self, step, args, kwargs, tape):
        out, idx = F.max_pool2d(args[0], **kwargs, return_indices=True)
        if tape is not None:
            tape.saved[step.index] = idx
            tape.shapes[step.index] = args[0].shape
        return out

    def reverse(self, step, grad, ctx):
        idx, in_shape = ctx.tape.saved[step.index], ctx.tape.shapes[step.index]
        bk, c = grad.shape[:2]
        flat_idx = idx.unsqueeze(1).expand(ctx.tape.batch, ctx.pairs, *idx.shape[1:]).reshape(bk, c, -1)
        out = grad.new_zeros((bk, c, in_shape[2] * in_shape[3]))
        out.scatter_add_(2, flat_idx, grad.reshape(bk, c, -1))
        return (out.view(bk, *in_shape[1:]),)


class Reshape(Generic):
    """view/reshape/flatten keeping the batch dim: the signal is reshaped back (else the generic rule)."""

    name = "reshape"
    rescales = False
    keeps_sign = True

    def forward(self, step, args, kwargs, tape):
        out = step.fn(*args, **kwargs)
        if tape is not None:
            shape = args[0].shape
            keeps_batch = out.dim() > 0 and shape[0] == out.shape[0] == tape.batch
            tape.saved[step.index] = shape if keeps_batch else (args, kwargs)
        return out

    def reverse(self, step, grad, ctx):
        saved = ctx.tape.saved[step.index]
        if isinstance(saved, torch.Size):
            return (grad.reshape(grad.shape[0], *saved[1:]),)
        return super().reverse(step, grad, ctx)


class Identity(Rule):
    """Dropout (eval), Identity, contiguous: the signal passes unchanged."""

    name = "identity"
    rescales = False
    keeps_sign = True

    def forward(self, step, args, kwargs, tape):
        return args[0]

    def reverse(self, step, grad, ctx):
        return (grad,)


class Contiguous(Identity):
    """``x.contiguous()``: the value must still become contiguous (a later ``view`` may need it)."""

    def forward(self, step, args, kwargs, tape):
        return args[0].contiguous()


class Add(Generic):
    """``a + b`` of two activations of one shape (residual connections): both get the signal."""

    name = "add"
    rescales = False

    def forward(self, step, args, kwargs, tape):
        out = args[0] + args[1]
        if tape is not None:
            same = args[0].shape == args[1].shape == out.shape
            tape.saved[step.index] = None if same else (args, kwargs)
        return out

    def reverse(self, step, grad, ctx):
        if ctx.tape.saved[step.index] is None:
            return (grad, grad)
        return super().reverse(step, grad, ctx)


# ------------------------------------------------------------------------------------------------------------
# The table

CONSTANT, AFFINE, GENERIC = Constant(), Affine(), Generic()
_RELU, _RELU_LIKE, _ELEMENTWISE = ReLU(), ReLULike(), Elementwise()
_MAXPOOL, _RESHAPE, _IDENTITY, _ADD = MaxPool2d(), Reshape(), Identity(), Add()

#: Module types with their own rule (affine kinds come from :data:`layers.AFFINE_KINDS`; BatchNorm directly after
#: an affine layer is folded into it by the tracer, elsewhere it is generic: an exact per-channel affine map).
MODULE_RULES: dict[type, Rule] = {
    nn.ReLU: _RELU,
    **{t: _RELU_LIKE for t in (nn.ReLU6, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish)},
    **{t: _ELEMENTWISE for t in (nn.LeakyReLU, nn.Hardtanh, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.Hardsigmoid,
                                 nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softsign, nn.LogSigmoid, nn.Tanhshrink)},
    nn.MaxPool2d: _MAXPOOL,
    nn.Flatten: _RESHAPE,
    **{t: _IDENTITY for t in (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity)},
}
FUNCTION_RULES: dict[Callable, Rule] = {
    **{f: _RELU for f in (F.relu, torch.relu, torch.relu_, F.relu_)},
    **{f: _RELU_LIKE for f in (F.relu6, F.gelu, F.silu, F.mish, F.hardswish)},
    **{f: _ELEMENTWISE for f in (F.leaky_relu, F.hardtanh, F.elu, F.selu, F.celu, F.hardsigmoid, F.sigmoid,
                                 torch.sigmoid, F.tanh, torch.tanh, F.softplus, F.softsign, F.logsigmoid)},
    torch.flatten: _RESHAPE,
    **{f: _IDENTITY for f in (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout)},
    **{f: _ADD for f in (operator.add, operator.iadd, torch.add)},
}
METHOD_RULES: dict[str, Rule] = {  # in-place methods arrive here without their trailing "_"
    "relu": _RELU,
    **{m: _ELEMENTWISE for m in ("sigmoid", "tanh")},
    **{m: _RESHAPE for m in ("view", "reshape", "flatten")},
    "contiguous": Contiguous(),
    "add": _ADD,
}
#: Ops whose output gates another activation (held constant by a product when ``constant_gates=True``).
GATING_MODULES = (nn.Sigmoid, nn.Hardsigmoid, nn.Softmax)
GATING_CALLS = frozenset({torch.sigmoid, F.sigmoid, F.hardsigmoid, F.softmax, torch.softmax, "sigmoid", "softmax"})
#: Products of two activations (squeeze-excitation, attention): where ``constant_gates`` applies.
PRODUCTS = frozenset({operator.mul, torch.mul, operator.matmul, torch.matmul, torch.bmm, torch.einsum, "mul",
                      "matmul", "bmm"})


def rule_for_module(module: nn.Module) -> Rule:
    """The rule of a leaf module (affine layers are the tracer's business: it folds BatchNorm into them)."""
    for cls in type(module).__mro__:
        if cls in MODULE_RULES:
            return MODULE_RULES[cls]
    return GENERIC


def rule_for_function(fn: Callable) -> Rule:
    return FUNCTION_RULES.get(fn, GENERIC)


def rule_for_method(name: str) -> Rule:
    return METHOD_RULES.get(name, GENERIC)


def supported_ops() -> str:
    """One line describing the table, for error messages."""
    affine = ", ".join(cls.module_type.__name__ for cls in AFFINE_KINDS.values())
    named = sorted({t.__name__ for t in MODULE_RULES})
    return (f"patterns for {affine} (BatchNorm right after one is folded in); own rules for {', '.join(named)}; "
            "every other traceable op is reversed with its vector-Jacobian product (the gradient rule)")
