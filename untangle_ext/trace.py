"""Model walk: turn a classifier into a :class:`Program` of steps, each run by a rule of :mod:`untangle_ext.rules`.

The model is traced once with ``torch.fx`` on an *eval view*: a shallow copy of
the module tree in eval mode (dropout off, BatchNorm on running statistics,
stochastic depth off, ``inplace`` off) that shares the user's parameters. The
user's model is never called and never modified. BatchNorm directly after an
affine layer is folded into it as new tensors. Ops the fx tracer cannot follow
raise :class:`UnsupportedModelError` naming the module, the op and a way out.
"""
from __future__ import annotations

import copy
import operator
from typing import Any, Callable, Iterable, Optional

import torch
import torch.fx as fx
import torch.nn as nn

from . import rules
from .layers import AffineLayer, UnsupportedModelError, affine_for
from .rules import CONSTANT, Ref, Reverse, Step, Tape, resolve

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
#: Reads of a tensor's metadata: constants (they never carry the signal), whatever tensor they read.
_METADATA_ATTRS = frozenset({"shape", "dtype", "device", "ndim", "is_cuda", "layout"})
_METADATA_METHODS = frozenset({"size", "dim", "numel", "nelement", "element_size", "get_device"})
_INPLACE_FUNCTIONS = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
                      operator.itruediv: operator.truediv}


def eval_view(module: nn.Module, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """A shallow copy of ``module``'s tree in eval mode with ``inplace`` off, sharing its parameters and buffers
    (or holding copies cast to ``dtype``); the original is untouched."""
    view = copy.copy(module)
    view.__dict__ = dict(module.__dict__)
    view._modules = {name: (eval_view(m, dtype) if m is not None else None) for name, m in module._modules.items()}
    view._parameters = {n: _cast(p, dtype) for n, p in module._parameters.items()}
    view._buffers = {n: _cast(b, dtype) for n, b in module._buffers.items()}
    view.training = False
    if getattr(view, "inplace", None) is True:
        view.inplace, view.was_inplace = False, True  # remembered: the tracer checks the mutation is not observed
    return view


def _cast(t: Optional[torch.Tensor], dtype: Optional[torch.dtype]) -> Optional[torch.Tensor]:
    if t is None or dtype is None or not t.is_floating_point():
        return t
    return nn.Parameter(t.detach().to(dtype), requires_grad=False) if isinstance(t, nn.Parameter) else t.to(dtype)


def _fold_batchnorm(layer: AffineLayer, bn: nn.Module, bn_name: str) -> None:
    """Fold an eval-mode BatchNorm into ``layer`` (new tensors; ``bn`` is untouched)."""
    if bn.running_mean is None or bn.running_var is None:
        raise UnsupportedModelError(
            f"BatchNorm '{bn_name}' has no running statistics (track_running_stats=False), so its eval-mode output "
            "depends on the batch and it cannot be folded; use track_running_stats=True")
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


def _where(node: fx.Node) -> str:
    """The innermost module a node was traced in, for messages."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "the model's own forward"
    path, cls = list(stack.values())[-1]
    return f"module '{path}' ({getattr(cls, '__name__', cls)})"


def _method(name: str) -> Callable[..., Any]:
    def call(x, *args, **kwargs):
        return getattr(x, name)(*args, **kwargs)

    call.__name__ = name
    return call


def _getitem_of(fn: Callable[..., Any], index: Any) -> Callable[..., Any]:
    def call(*args, **kwargs):
        return fn(*args, **kwargs)[index]

    call.__name__ = f"{getattr(fn, '__name__', 'op')}[{index}]"
    return call


class _Builder:
    """Translate an fx graph into steps, node by node, with the rule table."""

    def __init__(self, root: nn.Module):
        self.root = root
        self.steps: list[Step] = []
        self.index: dict[fx.Node, int] = {}
        self.data: dict[fx.Node, bool] = {}  # does the node's value depend on the input?
        self.fused: dict[fx.Node, tuple] = {}  # multi-output ops, run through each getitem user
        self.gating: set[int] = set()
        self.output: Optional[int] = None

    def add(self, node: fx.Node, step: Step, data: bool = True) -> None:
        step.index = len(self.steps)
        self.index[node] = step.index
        self.data[node] = data
        self.steps.append(step)

    def ref(self, a: Any) -> Any:
        return fx.node.map_arg(a, lambda n: Ref(self.index[n]))

    def data_inputs(self, node: fx.Node) -> tuple[int, ...]:
        return tuple(self.index[n] for n in node.all_input_nodes if self.data[n])

    def build(self, graph: fx.Graph) -> list[Step]:
        self.position = {node: i for i, node in enumerate(graph.nodes)}
        for node in graph.nodes:
            getattr(self, f"on_{node.op}")(node)
        return self.steps

    def check_inplace(self, node: fx.Node, what: str) -> None:
        """An in-place op is run out of place: exact only when its result is used and its input is not read later."""
        target = node.args[0] if node.args else None
        read_later = isinstance(target, fx.Node) and any(
            self.position[u] > self.position[node] for u in target.users if u is not node)
        if not node.users or read_later:
            raise self.unsupported(node, f"{what}, whose mutation is seen through another reference",
                                   "use the out-of-place form (y = x + z, not x.add_(z) / inplace=True) there")

    def on_placeholder(self, node: fx.Node) -> None:
        if self.steps:
            raise UnsupportedModelError(f"the model takes more than one input ('{node.name}'); only one image "
                                        "tensor is supported (wrap the model so that forward takes one tensor)")
        self.add(node, Step(rules.Identity(), "input"))

    def on_get_attr(self, node: fx.Node) -> None:
        value = _get_attr(self.root, str(node.target))
        value = value.detach() if isinstance(value, torch.Tensor) else value
        self.add(node, Step(CONSTANT, str(node.target), fn=lambda _v=value: _v), data=False)

    def on_output(self, node: fx.Node) -> None:
        out = node.args[0]
        if not isinstance(out, fx.Node) or not self.data.get(out, False):
            raise UnsupportedModelError("the model must return one tensor of logits that depends on its input "
                                        "(not a tuple or dict; wrap the model to return the logits)")
        self.output = self.index[out]

    def on_call_module(self, node: fx.Node) -> None:
        module = self.root.get_submodule(str(node.target))
        name = str(node.target)
        kind = affine_for(module)
        if getattr(module, "was_inplace", False) and self.data_inputs(node):
            self.check_inplace(node, f"the in-place module '{name}' ({type(module).__name__}(inplace=True))")
        if kind is not None and not self.data_inputs(node):
            self.call(node, CONSTANT, module, name, gating=False)  # e.g. an MLP over a constant position table
        elif kind is not None:
            self.add(node, Step(rules.AFFINE, name, args=self.ref(node.args[:1]), layer=kind.from_module(name, module),
                                tensor_inputs=self.data_inputs(node)))
        elif isinstance(module, _BATCHNORMS) and self._folds_into(node):
            _fold_batchnorm(self.steps[self.index[node.args[0]]].layer, module, name)
            self.index[node] = self.index[node.args[0]]
            self.data[node] = True
        elif isinstance(module, nn.MaxPool2d):
            if module.return_indices:
                raise self.unsupported(node, f"MaxPool2d '{name}' with return_indices=True", "use return_indices=False")
            pool = {k: getattr(module, k) for k in ("kernel_size", "stride", "padding", "dilation", "ceil_mode")}
            self.add(node, Step(rules.rule_for_module(module), name, args=self.ref(node.args[:1]), kwargs=pool,
                                tensor_inputs=self.data_inputs(node)))
        else:
            self.call(node, rules.rule_for_module(module), module, name,
                      gating=isinstance(module, rules.GATING_MODULES))

    def _folds_into(self, node: fx.Node) -> bool:
        """A BatchNorm is folded when it alone reads the output of an affine layer."""
        src = node.args[0]
        return (isinstance(src, fx.Node) and src in self.index and self.steps[self.index[src]].rule is rules.AFFINE
                and self.steps[self.index[src]].layer.folded is None and len(src.users) == 1)

    def on_call_function(self, node: fx.Node) -> None:
        fn = _INPLACE_FUNCTIONS.get(node.target, node.target)
        if (fn is not node.target or node.kwargs.get("inplace") is True) and self.data_inputs(node):
            self.check_inplace(node, f"the in-place op '{getattr(node.target, '__name__', node.target)}'")
        if fn is operator.getitem and node.args[0] in self.fused:
            src_fn, args, kwargs, data, src_name = self.fused[node.args[0]]
            self.add(node, Step(rules.GENERIC, f"{src_name}[{node.args[1]}]", args=args, kwargs=kwargs,
                                fn=_getitem_of(src_fn, node.args[1]), tensor_inputs=data))
            return
        self.call(node, rules.rule_for_function(fn), fn, node.name, gating=fn in rules.GATING_CALLS,
                  product=fn in rules.PRODUCTS)

    def on_call_method(self, node: fx.Node) -> None:
        name = str(node.target)
        if name.endswith("_") and not name.endswith("__") and self.data_inputs(node):
            if not hasattr(torch.Tensor, name[:-1]):
                raise self.unsupported(node, f"the in-place tensor method '.{name}()'", "use an out-of-place op")
            self.check_inplace(node, f"the in-place tensor method '.{name}()'")
            name = name[:-1]
        self.call(node, rules.rule_for_method(name), _method(name), node.name, gating=name in rules.GATING_CALLS,
                  product=name in rules.PRODUCTS)

    def call(self, node: fx.Node, rule: rules.Rule, fn: Callable, name: str, gating: bool,
             product: bool = False) -> None:
        """A function, method or leaf-module call: constant when no input reaches it, else run by ``rule``."""
        metadata = (fn is getattr and node.args[1] in _METADATA_ATTRS) or (
            node.op == "call_method" and node.target in _METADATA_METHODS)
        data = () if metadata else self.data_inputs(node)
        args, kwargs = self.ref(node.args), self.ref(node.kwargs)
        if "inplace" in kwargs:
            kwargs = {**kwargs, "inplace": False}
        if not data:
            self.add(node, Step(CONSTANT, name, args=args, kwargs=kwargs, fn=fn), data=False)
            return
        if isinstance(rule, rules.Add) and (kwargs or len(node.args) != 2 or node.args[0] is node.args[1]):
            rule = rules.GENERIC  # alpha=, or x + x: the generic rule gets these right
        if rule is rules.GENERIC and node.users and all(
                u.op == "call_function" and u.target is operator.getitem for u in node.users):
            self.fused[node] = (fn, args, kwargs, data, name)  # e.g. chunk/split or a module returning a tuple
            self.index[node] = -1
            self.data[node] = True
            return
        step = Step(rule, name, args=args, kwargs=kwargs, fn=fn, tensor_inputs=data)
        if product:
            step.gates = frozenset(j for j in data if j in self.gating)
        self.add(node, step)
        if gating:
            self.gating.add(step.index)

    def unsupported(self, node: fx.Node, what: str, fix: str) -> UnsupportedModelError:
        return UnsupportedModelError(f"{what} in {_where(node)} (graph node '{node.name}') is not supported: {fix}")


def _get_attr(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


class _Tracer(fx.Tracer):
    """fx tracing that remembers which module it is inside, and treats ``leaf_modules`` as single ops."""

    def __init__(self, leaf_modules: tuple[type, ...] = ()):
        super().__init__()
        self.leaf_types = leaf_modules
        self.path: list[str] = []
        self.failed_in: Optional[str] = None  # the innermost module being traced when tracing failed

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self.leaf_types) or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        self.path.append(f"module '{self.path_of_module(m)}' ({type(m).__name__})")
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            self.failed_in = self.failed_in or self.path[-1]
            raise
        finally:
            self.path.pop()


def _trace(view: nn.Module, name: str, leaf_modules: tuple[type, ...]) -> fx.Graph:
    tracer = _Tracer(leaf_modules)
    try:
        return tracer.trace(view)
    except Exception as exc:  # fx raises many kinds of errors for untraceable code
        where = tracer.failed_in or f"the forward of {name}"
        raise UnsupportedModelError(
            f"could not trace {where} with torch.fx ({type(exc).__name__}: {str(exc).splitlines()[0][:300]}). "
            "Usual causes: Python control flow on tensor values, or in-place ops on views. Workarounds: make the "
            "forward independent of tensor values, or pass that module's class in leaf_modules=(...) so it is "
            "treated as one op (reversed with its gradient)") from exc


class Program:
    """A traced classifier: forward with optional recording, and the batched reverse pass."""

    def __init__(self, model: nn.Module, dtype: Optional[torch.dtype] = None,
                 leaf_modules: Iterable[type] = ()):
        if type(model).__module__.startswith("torch.nn.modules") and not isinstance(model, nn.Sequential):
            model = nn.Sequential(model)  # a bare layer: trace it as a leaf named "0"
        view = eval_view(model, dtype)
        builder = _Builder(view)
        self.steps = builder.build(_trace(view, type(model).__name__, tuple(leaf_modules)))
        if builder.output is None:
            raise UnsupportedModelError("the traced model has no output")
        self.output = builder.output
        self.layers: list[AffineLayer] = [s.layer for s in self.steps if s.rule is rules.AFFINE]
        self.step_of: dict[str, int] = {s.layer.name: s.index for s in self.steps if s.rule is rules.AFFINE}
        self._last_use = _last_uses(self.steps)
        self.sign_gated = _sign_gated(self.steps, self.output)
        if len(self.step_of) != len(self.layers):
            raise UnsupportedModelError("a Linear/Conv module is called more than once; weight sharing is not "
                                        "supported (use one module per call)")
        if not self.layers:
            raise UnsupportedModelError("the model has no Linear or Conv layer, so there is nothing to estimate")
        self.num_outputs = self._logit_layer().out_features

    def _logit_layer(self) -> AffineLayer:
        """The affine layer nearest to the output: its outputs are the classes."""
        frontier, seen = [self.output], set()
        while frontier:
            i = frontier.pop(0)
            step = self.steps[i]
            if step.rule is rules.AFFINE:
                return step.layer
            seen.add(i)
            frontier += [j for j in step.tensor_inputs if j not in seen]
        raise UnsupportedModelError("the model's output does not come from a Linear or Conv layer")

    def forward(
        self,
        x: torch.Tensor,
        affine: Optional[Callable[[AffineLayer, torch.Tensor], torch.Tensor]] = None,
        tape: Optional[Tape] = None,
    ) -> torch.Tensor:
        """Run the model; ``affine(layer, x)`` replaces the affine layers' forward, ``tape`` records for reversal."""
        values: list[Any] = [None] * len(self.steps)
        values[0] = x
        if tape is not None:
            tape.batch = x.shape[0]
        for step in self.steps[1:]:
            args = resolve(step.args, values)
            kwargs = resolve(step.kwargs, values)
            if step.rule is rules.AFFINE:
                values[step.index] = step.rule.forward(step, args, kwargs, tape, affine)
            else:
                values[step.index] = step.rule.forward(step, args, kwargs, tape)
            for j in step.tensor_inputs:  # free activations nobody needs any more
                if self._last_use[j] == step.index and j != self.output:
                    values[j] = None
        logits = values[self.output]
        if not isinstance(logits, torch.Tensor):
            raise UnsupportedModelError(f"the model returns a {type(logits).__name__}; it must return one tensor of "
                                        "logits (wrap the model to return only the logits)")
        if logits.dim() < 2 or logits.shape[1] != self.num_outputs:
            raise UnsupportedModelError(f"the model returns shape {tuple(logits.shape)}; expected logits "
                                        f"(batch, {self.num_outputs}) from its last Linear/Conv layer")
        return logits

    def backward(
        self,
        tape: Tape,
        seed: torch.Tensor,
        k: int,
        affine_reverse: Callable[[AffineLayer, torch.Tensor, torch.Size], torch.Tensor],
        constant_gates: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reverse ``seed`` (B·k, outputs), pair-major per image, back to the input.

        Returns ``(values, exponent)``: after every step that can change its scale, a pair whose signal
        drifted far from 1 is rescaled by an exact power of two, so deep nets never overflow or underflow;
        the true map of pair ``i`` is ``values[i] * 2**exponent[i]``.
        """
        ctx = Reverse(tape, k, affine_reverse, constant_gates)
        grads: dict[int, _Scaled] = {self.output: _Scaled(seed, seed.new_zeros(seed.shape[0], dtype=torch.long))}
        for step in reversed(self.steps):
            item = grads.pop(step.index, None)
            if item is None:
                continue
            if step.index == 0:
                return item.values, item.exponent
            ctx.exclusive = item.writable()
            outs = step.rule.reverse(step, item.values, ctx)
            memory = [_storage(g) for g in outs if g is not None]
            for j, g in zip(step.tensor_inputs, outs):
                if g is None:
                    continue
                shared = memory.count(_storage(g)) > 1 or (item.shared and _storage(g) == _storage(item.values))
                scaled = _Scaled(g, item.exponent, item.unchecked, shared)
                if step.rule.rescales:
                    scaled = scaled.normalised()
                grads[j] = grads[j].plus(scaled) if j in grads else scaled
        raise RuntimeError("the output does not depend on the input")


#: Binary exponents a pair's signal may drift by before it is renormalised, checked after every
#: CHECK_EVERY-th step that can change its scale: far inside float32's ±126, so two such steps together may
#: grow a signal by up to 2^94 without overflow (real layers change it by a few powers of two), and the check
#: (one reduction) runs on half of the steps only.
_DRIFT = 32
CHECK_EVERY = 2
_IN_RANGE = (2.0 ** -_DRIFT, 2.0 ** _DRIFT)


def _storage(t: torch.Tensor) -> int:
    """Where a tensor's memory lives (views of one tensor share it)."""
    return t.untyped_storage().data_ptr()


class _Scaled:
    """A signal for B·k pairs as ``values * 2**exponent`` (exponent per pair); ``unchecked``: rescaling
    steps since its range was last checked; ``shared``: another pending signal uses the same memory."""

    def __init__(self, values: torch.Tensor, exponent: torch.Tensor, unchecked: int = 0, shared: bool = False):
        self.values, self.exponent, self.unchecked, self.shared = values, exponent, unchecked, shared

    def writable(self) -> bool:
        """Whether ``values`` may be overwritten: no other pending signal shares its memory, and it has no
        overlapping elements (a VJP may return an expanded view, e.g. the reverse of a sum)."""
        return not self.shared and self.values.is_contiguous()

    def _view(self, e: torch.Tensor) -> torch.Tensor:
        return e.view(-1, *([1] * (self.values.dim() - 1)))

    def normalised(self) -> "_Scaled":
        """After a rescaling step: every :data:`CHECK_EVERY`-th time, rescale the pairs whose max |value|
        left [2^-32, 2^32] back to [0.5, 1) (one reduction when none did)."""
        if self.unchecked + 1 < CHECK_EVERY or not self.values.numel():
            return _Scaled(self.values, self.exponent, self.unchecked + 1, self.shared)
        flat = self.values.flatten(1)
        amax = torch.maximum(flat.amax(1), flat.amin(1).neg_())  # max |value| per pair (10x faster than an inf-norm)
        lo, hi = torch.aminmax(torch.where(amax > 0, amax, 1.0))  # a pair whose signal is exactly 0 stays so
        if _IN_RANGE[0] <= float(lo) and float(hi) <= _IN_RANGE[1]:  # the common case
            return _Scaled(self.values, self.exponent, shared=self.shared)
        _, e = torch.frexp(amax)
        drifted = (amax > 0) & torch.isfinite(amax) & ((e > _DRIFT) | (e < -_DRIFT))
        e = torch.where(drifted, e.long(), torch.zeros_like(e, dtype=torch.long))
        return _Scaled(torch.ldexp(self.values, self._view(-e).to(self.values.dtype)), self.exponent + e)

    def plus(self, other: "_Scaled") -> "_Scaled":
        """The sum of two signals of the same pairs (a fork in the graph), at the larger exponent of each pair."""
        unchecked = max(self.unchecked, other.unchecked)
        if self.exponent is other.exponent:  # the common case: both branches never rescaled since the fork
            return _Scaled(self.values + other.values, self.exponent, unchecked)
        e = torch.maximum(self.exponent, other.exponent)
        a = torch.ldexp(self.values, self._view(self.exponent - e).to(self.values.dtype))
        b = torch.ldexp(other.values, self._view(other.exponent - e).to(self.values.dtype))
        return _Scaled(a + b, e, unchecked)


def _sign_gated(steps: list[Step], output: int) -> frozenset[str]:
    """The affine layers whose output is split by its sign downstream: it reaches only ReLU-like gates
    (through ops that keep each value, e.g. max-pool or flatten), or it is the model's output.

    Elsewhere (a residual branch before its addition, a conv whose BatchNorm-then-ReLU is not folded,
    any other activation) the sign of the layer's own output gates nothing: ``estimator="gated"`` reverses
    those layers through the linear estimator.
    """
    readers: list[list[int]] = [[] for _ in steps]
    for step in steps:
        for j in step.tensor_inputs:
            readers[j].append(step.index)
    gated = [False] * len(steps)
    for step in reversed(steps):  # readers come after the steps they read
        rs = readers[step.index]
        gated[step.index] = step.index == output or (bool(rs) and all(
            steps[r].rule.gates_sign or (steps[r].rule.keeps_sign and gated[r]) for r in rs))
    return frozenset(s.layer.name for s in steps if s.rule is rules.AFFINE and gated[s.index])


def _last_uses(steps: list[Step]) -> list[int]:
    """For every step, the index of the last step that reads its value."""
    last = list(range(len(steps)))
    for step in steps:
        found: list[int] = []
        fx.node.map_aggregate((step.args, step.kwargs), lambda v: found.append(v) if isinstance(v, Ref) else v)
        for j in found:
            last[j] = max(last[j], step.index)
    return last
