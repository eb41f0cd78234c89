"""Model walk: turn a classifier into a :class:`Program` of simple steps.

The model is traced once with ``torch.fx``; every node becomes a step whose
forward and reverse rules we know (SPEC §2). BatchNorm is folded into the
affine layer before it, as new tensors: the user's model is never modified and
its modules are never called (so training-mode BatchNorm/Dropout cannot change
any state). Anything we do not know raises :class:`UnsupportedModelError`
naming the module and what is supported.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

SUPPORTED = (
    "Conv2d, Linear, ReLU, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d, Flatten, Dropout, Identity, "
    "BatchNorm1d/2d directly after a Conv2d/Linear (folded), residual additions (a + b), "
    "view/reshape/flatten and shape arithmetic"
)


class UnsupportedModelError(TypeError):
    """The model contains a layer or operation the engine has no rule for."""


@dataclass
class Affine:
    """A Linear or Conv2d layer (BatchNorm folded in): the layers that get patterns."""

    name: str
    kind: str  # "linear" | "conv2d"
    weight: torch.Tensor  # (K, D) or (K, C/groups, kh, kw), folded
    bias: torch.Tensor  # (K,), folded; zeros when the layer has none
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    folded: Optional[str] = None  # name of the BatchNorm folded into this layer

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The layer's ordinary output (with ``weight`` swapped in when given)."""
        w = self.weight if weight is None else weight
        if self.kind == "linear":
            return F.linear(x, w, self.bias)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


@dataclass
class Step:
    """One node of the program: ``op`` selects the forward and reverse rule."""

    op: str  # input | meta | affine | relu | maxpool | linear_map | reshape | add | identity
    name: str
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    fn: Optional[Callable[..., Any]] = None  # forward callable for meta / linear_map / reshape
    layer: Optional[Affine] = None
    pool: Optional[dict] = None
    tensor_inputs: tuple[int, ...] = ()  # indices of steps the gradient flows back to


class Ref(int):
    """Marks an argument that refers to the value of another step."""


@dataclass
class Tape:
    """What the reverse pass needs from one forward pass."""

    gates: dict = field(default_factory=dict)  # step index -> bool mask (B, ...)
    indices: dict = field(default_factory=dict)  # step index -> max-pool argmax (B, C, H', W')
    shapes: dict = field(default_factory=dict)  # step index -> input shape
    extra: dict = field(default_factory=dict)  # step index -> (args[1:], kwargs) of a linear map
    batch: int = 0


def _pair(v) -> tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _fold_batchnorm(layer: Affine, bn: nn.Module, bn_name: str) -> None:
    """Fold an eval-mode BatchNorm into ``layer`` (new tensors; ``bn`` is untouched)."""
    if bn.running_mean is None or bn.running_var is None:
        raise UnsupportedModelError(
            f"BatchNorm '{bn_name}' has no running statistics (track_running_stats=False); "
            "it cannot be folded. Use track_running_stats=True."
        )
    if layer.folded is not None:
        raise UnsupportedModelError(f"'{layer.name}' is followed by two BatchNorms ('{layer.folded}', '{bn_name}')")
    with torch.no_grad():
        scale = (bn.running_var + bn.eps).rsqrt()
        if bn.weight is not None:
            scale = scale * bn.weight
        shift = -bn.running_mean * scale
        if bn.bias is not None:
            shift = shift + bn.bias
        view = (-1,) + (1,) * (layer.weight.dim() - 1)
        layer.weight = (layer.weight * scale.view(view)).to(layer.weight.dtype)
        layer.bias = (layer.bias * scale + shift).to(layer.bias.dtype)
    layer.folded = bn_name


def _affine_from_module(name: str, module: nn.Module) -> Affine:
    weight = module.weight.detach()
    bias = module.bias.detach() if module.bias is not None else weight.new_zeros(weight.shape[0])
    if isinstance(module, nn.Linear):
        return Affine(name, "linear", weight, bias)
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        if module.padding == "valid":
            padding = (0, 0)
        elif module.padding == "same" and module.padding_mode == "zeros":
            padding = tuple(d * (k - 1) // 2 for d, k in zip(module.dilation, module.kernel_size))
            if any(d * (k - 1) % 2 for d, k in zip(module.dilation, module.kernel_size)):
                raise UnsupportedModelError(f"Conv2d '{name}': padding='same' with an even kernel is not supported")
        else:
            raise UnsupportedModelError(
                f"Conv2d '{name}' uses padding_mode={module.padding_mode!r}; only zero padding is supported"
            )
    else:
        padding = _pair(module.padding)
    return Affine(
        name, "conv2d", weight, bias, _pair(module.stride), padding, _pair(module.dilation), module.groups
    )


_META_FUNCS = {
    getattr, operator.getitem, operator.mul, operator.floordiv, operator.truediv, operator.sub,
    operator.neg, len, int,
}
_ADD_FUNCS = {operator.add, operator.iadd, torch.add}
_RELU_FUNCS = {F.relu, torch.relu, torch.relu_, torch.nn.functional.relu_}
_IDENTITY_FUNCS = {F.dropout, F.dropout2d}
_LINEAR_MAP_FUNCS = {F.avg_pool2d, F.adaptive_avg_pool2d, torch.nn.functional.adaptive_avg_pool2d}
_RESHAPE_METHODS = {"view", "reshape", "flatten"}
_IDENTITY_MODULES = (nn.Dropout, nn.Dropout2d, nn.Dropout1d, nn.Identity, nn.AlphaDropout)
_POOL_KEYS = ("kernel_size", "stride", "padding", "dilation", "ceil_mode")


class _Builder:
    """Translate an fx graph into steps, node by node."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.steps: list[Step] = []
        self.index: dict[fx.Node, int] = {}
        self.is_meta: dict[fx.Node, bool] = {}
        self.users: dict[fx.Node, int] = {}

    def ref(self, a):
        """Replace fx nodes inside an argument structure by step references."""
        return fx.node.map_arg(a, lambda n: Ref(self.index[n]))

    def tensor_refs(self, node: fx.Node) -> tuple[int, ...]:
        return tuple(self.index[n] for n in node.all_input_nodes if not self.is_meta[n])

    def add(self, node: fx.Node, step: Step, meta: bool = False) -> None:
        self.index[node] = len(self.steps)
        self.is_meta[node] = meta
        self.steps.append(step)

    def unsupported(self, node: fx.Node, what: str) -> UnsupportedModelError:
        return UnsupportedModelError(f"{what} (graph node '{node.name}') is not supported. Supported: {SUPPORTED}.")

    def build(self, graph: fx.Graph) -> list[Step]:
        for node in graph.nodes:
            self.users[node] = len(node.users)
            getattr(self, f"on_{node.op}")(node)
        return self.steps

    def on_placeholder(self, node: fx.Node) -> None:
        if any(s.op == "input" for s in self.steps):
            raise UnsupportedModelError(f"the model takes more than one input ('{node.name}'); only one image tensor is supported")
        self.add(node, Step("input", node.name))

    def on_get_attr(self, node: fx.Node) -> None:
        raise self.unsupported(node, f"direct use of the parameter/buffer '{node.target}' in forward")

    def on_output(self, node: fx.Node) -> None:
        out = node.args[0]
        if not isinstance(out, fx.Node) or self.is_meta.get(out, True):
            raise UnsupportedModelError("the model must return a single tensor of logits")
        self.output = self.index[out]

    def on_call_module(self, node: fx.Node) -> None:
        module = self.model.get_submodule(node.target)
        name = str(node.target)
        desc = f"module '{name}' ({type(module).__name__})"
        data = self.tensor_refs(node)
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            self.add(node, Step("affine", name, self.ref(node.args), layer=_affine_from_module(name, module), tensor_inputs=data))
        elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
            src = node.args[0]
            prev = self.steps[self.index[src]] if isinstance(src, fx.Node) else None
            if prev is None or prev.op != "affine" or self.users[src] != 1:
                raise UnsupportedModelError(
                    f"{desc} must directly follow a Conv2d/Linear whose output it alone uses, so that it can be "
                    "folded; move it or replace it by an affine layer"
                )
            _fold_batchnorm(prev.layer, module, name)
            self.index[node] = self.index[src]
            self.is_meta[node] = False
        elif isinstance(module, nn.ReLU):
            self.add(node, Step("relu", name, self.ref(node.args[:1]), tensor_inputs=data))
        elif isinstance(module, nn.MaxPool2d):
            if module.return_indices:
                raise self.unsupported(node, f"{desc} with return_indices=True")
            pool = {k: getattr(module, k) for k in _POOL_KEYS}
            self.add(node, Step("maxpool", name, self.ref(node.args[:1]), pool=pool, tensor_inputs=data))
        elif isinstance(module, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
            self.add(node, Step("linear_map", name, self.ref(node.args), fn=module, tensor_inputs=data))
        elif isinstance(module, nn.Flatten):
            self.add(node, Step("reshape", name, self.ref(node.args), fn=module, tensor_inputs=data))
        elif isinstance(module, _IDENTITY_MODULES):
            self.add(node, Step("identity", name, self.ref(node.args[:1]), tensor_inputs=data))
        else:
            raise self.unsupported(node, desc)

    def on_call_function(self, node: fx.Node) -> None:
        fn = node.target
        data = self.tensor_refs(node)
        args, kwargs = self.ref(node.args), self.ref(node.kwargs)
        fname = getattr(fn, "__name__", str(fn))
        if fn is getattr or (not data and (fn in _META_FUNCS or fn in _ADD_FUNCS)):
            self.add(node, Step("meta", node.name, args, kwargs, fn=fn), meta=True)
        elif fn in _ADD_FUNCS and len(data) == 2 and not kwargs:
            self.add(node, Step("add", node.name, args, tensor_inputs=data))
        elif fn in _RELU_FUNCS:
            self.add(node, Step("relu", node.name, args[:1], tensor_inputs=data))
        elif fn is torch.flatten:
            self.add(node, Step("reshape", node.name, args, kwargs, fn=fn, tensor_inputs=data))
        elif fn in _IDENTITY_FUNCS:
            self.add(node, Step("identity", node.name, args[:1], tensor_inputs=data))
        elif fn in _LINEAR_MAP_FUNCS:
            self.add(node, Step("linear_map", node.name, args, kwargs, fn=fn, tensor_inputs=data))
        elif fn is F.max_pool2d or fn is torch.max_pool2d:
            pool = dict(zip(_POOL_KEYS, args[1:]), **kwargs)
            pool.setdefault("stride", None)
            if pool.get("return_indices"):
                raise self.unsupported(node, "max_pool2d with return_indices=True")
            pool.pop("return_indices", None)
            self.add(node, Step("maxpool", node.name, args[:1], pool=pool, tensor_inputs=data))
        else:
            raise self.unsupported(node, f"function '{fname}' on activations")

    def on_call_method(self, node: fx.Node) -> None:
        method = node.target
        data = self.tensor_refs(node)
        args, kwargs = self.ref(node.args), self.ref(node.kwargs)
        if method in ("size", "dim") or not data:
            self.add(node, Step("meta", node.name, args, kwargs, fn=lambda x, *a, _m=method, **k: getattr(x, _m)(*a, **k)), meta=True)
        elif method in _RESHAPE_METHODS:
            fn = lambda x, *a, _m=method, **k: getattr(x, _m)(*a, **k)  # noqa: E731
            self.add(node, Step("reshape", node.name, args, kwargs, fn=fn, tensor_inputs=data[:1]))
        elif method in ("relu", "relu_"):
            self.add(node, Step("relu", node.name, args[:1], tensor_inputs=data))
        elif method == "contiguous":
            self.add(node, Step("identity", node.name, args[:1], tensor_inputs=data))
        elif method in ("add", "add_") and len(data) == 2 and not kwargs and len(args) == 2:
            self.add(node, Step("add", node.name, args, tensor_inputs=data))
        else:
            raise self.unsupported(node, f"tensor method '.{method}()' on activations")


def _resolve(a, values):
    return fx.node.map_aggregate(a, lambda v: values[v] if isinstance(v, Ref) else v)


class Program:
    """A traced classifier: forward with optional recording, and the generic reverse pass."""

    def __init__(self, model: nn.Module):
        if type(model).__module__.startswith("torch.nn.modules") and not isinstance(model, nn.Sequential):
            model = nn.Sequential(model)  # a bare layer: trace it as a leaf named "0"
        try:
            graph = fx.Tracer().trace(model)
        except Exception as exc:  # fx raises many kinds of errors for untraceable code
            raise UnsupportedModelError(
                f"could not trace {type(model).__name__} with torch.fx ({type(exc).__name__}: {exc}). "
                "The forward must not branch on tensor values."
            ) from exc
        builder = _Builder(model)
        self.steps = builder.build(graph)
        if not hasattr(builder, "output"):
            raise UnsupportedModelError("the traced model has no output")
        self.output = builder.output
        self.layers: list[Affine] = [s.layer for s in self.steps if s.op == "affine"]
        self.step_of: dict[str, int] = {s.layer.name: i for i, s in enumerate(self.steps) if s.op == "affine"}
        self._last_use = _last_uses(self.steps)
        names = [layer.name for layer in self.layers]
        if len(set(names)) != len(names):
            raise UnsupportedModelError("a Linear/Conv2d module is called more than once; weight sharing is not supported")
        if not self.layers:
            raise UnsupportedModelError("the model has no Linear or Conv2d layer")
        if self.steps[self.output].op != "affine":
            raise UnsupportedModelError(
                "the model's output must come straight from a Linear/Conv2d layer (the logits); "
                f"it comes from '{self.steps[self.output].name}' ({self.steps[self.output].op})"
            )

    def cast(self, dtype: torch.dtype) -> "Program":
        """Compute in ``dtype`` from now on (new weight tensors; the model is untouched)."""
        for layer in self.layers:
            layer.weight, layer.bias = layer.weight.to(dtype), layer.bias.to(dtype)
        return self

    @property
    def num_outputs(self) -> int:
        return self.steps[self.output].layer.out_features

    def forward(
        self,
        x: torch.Tensor,
        affine: Optional[Callable[[Affine, torch.Tensor], torch.Tensor]] = None,
        tape: Optional[Tape] = None,
    ) -> torch.Tensor:
        """Run the model; ``affine(layer, x)`` replaces the affine layers' rule, ``tape`` records gates."""
        values: list[Any] = [None] * len(self.steps)
        if tape is not None:
            tape.batch = x.shape[0]
        for i, step in enumerate(self.steps):
            if step.op == "input":
                values[i] = x
                continue
            args = _resolve(step.args, values)
            kwargs = _resolve(step.kwargs, values)
            if tape is not None and step.tensor_inputs:
                tape.shapes[i] = values[step.tensor_inputs[0]].shape
            values[i] = self._forward_step(i, step, args, kwargs, affine, tape)
            for j in step.tensor_inputs:  # free activations nobody needs any more
                if self._last_use[j] == i and j != self.output:
                    values[j] = None
        return values[self.output]

    @staticmethod
    def _forward_step(i, step, args, kwargs, affine, tape):
        op = step.op
        if op == "affine":
            return affine(step.layer, args[0]) if affine is not None else step.layer.forward(args[0])
        if op == "relu":
            out = torch.relu(args[0])
            if tape is not None:
                tape.gates[i] = out > 0
            return out
        if op == "maxpool":
            out, idx = F.max_pool2d(args[0], **step.pool, return_indices=True)
            if tape is not None:
                tape.indices[i] = idx
            return out
        if op == "add":
            return args[0] + args[1]
        if op == "identity":
            return args[0]
        if op == "linear_map" and tape is not None:
            tape.extra[i] = (args[1:], kwargs)
        return step.fn(*args, **kwargs)  # meta, linear_map, reshape

    def backward(
        self,
        tape: Tape,
        seed: torch.Tensor,
        k: int,
        affine_reverse: Callable[[Affine, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """Reverse ``seed`` (B*k, outputs), pair-major per image, back to the input.

        Gated steps reuse the recorded gates of image ``b`` for its ``k`` pairs;
        ``affine_reverse(layer, grad)`` is the rule for Linear/Conv2d layers.
        """
        grads: dict[int, torch.Tensor] = {self.output: seed}
        result = None
        for i in range(len(self.steps) - 1, -1, -1):
            grad = grads.pop(i, None)
            if grad is None:
                continue
            step = self.steps[i]
            if step.op == "input":
                result = grad
                continue
            grad_in = self._reverse_step(i, step, grad, tape, k, affine_reverse)
            for j in step.tensor_inputs:
                grads[j] = grad_in if j not in grads else grads[j] + grad_in
        if result is None:
            raise RuntimeError("the output does not depend on the input")
        return result

    @staticmethod
    def _reverse_step(i, step, grad, tape, k, affine_reverse):
        op = step.op
        bk = grad.shape[0]
        if op == "affine":
            return affine_reverse(step.layer, grad)
        if op == "relu":
            gate = tape.gates[i]
            return (grad.view(tape.batch, k, *grad.shape[1:]) * gate.unsqueeze(1)).view_as(grad)
        if op == "maxpool":
            idx = tape.indices[i]
            in_shape = tape.shapes[i]
            c = in_shape[1]
            flat_idx = idx.unsqueeze(1).expand(tape.batch, k, *idx.shape[1:]).reshape(bk, c, -1)
            out = grad.new_zeros((bk, c, in_shape[2] * in_shape[3]))
            out.scatter_add_(2, flat_idx, grad.reshape(bk, c, -1))
            return out.view(bk, *in_shape[1:])
        if op == "reshape":
            return grad.reshape(bk, *tape.shapes[i][1:])
        if op in ("add", "identity"):
            return grad
        if op == "linear_map":
            return _linear_map_vjp(step.fn, *tape.extra[i], grad, tape.shapes[i])
        raise AssertionError(f"no reverse rule for {op}")


def _last_uses(steps: list[Step]) -> list[int]:
    """For every step, the index of the last step that reads its value."""
    last = list(range(len(steps)))
    for i, step in enumerate(steps):
        for j in _refs(step):
            last[j] = max(last[j], i)
    return last


def _refs(step: Step) -> list[int]:
    found: list[int] = []
    fx.node.map_aggregate((step.args, step.kwargs), lambda v: found.append(v) if isinstance(v, Ref) else v)
    return found


def _linear_map_vjp(fn, args: tuple, kwargs: dict, grad: torch.Tensor, in_shape: torch.Size) -> torch.Tensor:
    """Transpose of a linear, input-independent map (average pools) via autograd on zeros."""
    with torch.enable_grad():
        z = grad.new_zeros((grad.shape[0], *in_shape[1:]), requires_grad=True)
        out = fn(z, *args, **kwargs)
        (g,) = torch.autograd.grad(out, z, grad)
    return g
