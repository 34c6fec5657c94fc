"""Permutation specs traced from any `nn.Module` with torch.fx, so a user's architecture needs no hand-written spec.

Every tensor axis that may carry channels is a variable of a union-find; each op of the traced graph joins the
variables that must share one permutation (a Linear's input axis with its input's last axis, a residual `add`'s
two operands, a norm's scale with the channels it normalises, …). The network's input and output axes, batch and
spatial axes, and every axis an op this module does not know touches are joined to one FIXED variable: they stay
unpermuted. The groups of the spec are the classes that hold at least one activation axis, are not FIXED and are
wider than one unit. A wrong spec is worse than a small one, so anything not understood fixes its axes and is named
in a warning with the user's source line. Shapes come from one pass on meta tensors (no arithmetic).

Probes (for activation-based aligners): for every conv/linear input, the nearest single-use module upstream whose
output carries the group on dim 1 (pooling and repeated modules are looked through), e.g. the ReLU before it.
"""

from __future__ import annotations

import builtins
import dataclasses
import math
import operator
import re
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.func import functional_call

from mergebench.errors import ConfigError
from mergebench.spec import Part, PermutationSpec, ProbeView

FIXED = 0
TORCH_DIR = str(Path(torch.__file__).resolve().parent)


class TraceError(ConfigError):
    """The model's forward cannot be traced symbolically (data-dependent control flow, unsupported Python)."""


@dataclasses.dataclass(frozen=True)
class Segmented:
    """An axis made of parts, in order: (variable, units, block) = `units` units of the variable, each over `block`
    contiguous entries. A flattened C×H×W map is one part (C, H·W); `cat` along channels gives one part per input."""

    parts: tuple[tuple[int, int, int], ...]

    @property
    def variables(self) -> list[int]:
        return [var for var, _, _ in self.parts]


Dim = int | Segmented


class _UnionFind:
    def __init__(self) -> None:
        self.parent = [FIXED]

    def new(self) -> int:
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            low, high = sorted((ra, rb))  # FIXED (0) stays a root
            self.parent[high] = low


@dataclasses.dataclass
class TracedSpec:
    """The traced spec, the ops that left axes unpermuted (warnings), the layers whose permuted output units are not
    on dim 1 (a Linear on channels-last maps: REPAIR cannot correct them), and what tracing took."""

    spec: PermutationSpec
    warnings: list[str]
    channels_last: list[str]
    seconds: float


class _Recorder(fx.Interpreter):
    """Runs the traced graph once on the example input and keeps every node's output shape. With `meta`, every
    tensor lives on the meta device (shapes without arithmetic: a big model costs what a small one does)."""

    def __init__(self, module: fx.GraphModule, meta: bool) -> None:
        super().__init__(module)
        self.meta = meta
        self.shapes: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        self.shapes[n] = tuple(result.shape) if isinstance(result, Tensor) else None
        return result

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        if not self.meta:
            return super().call_module(target, args, kwargs)
        module = self.fetch_attr(target)
        tensors = dict(module.named_parameters()) | dict(module.named_buffers())
        return functional_call(module, {k: v.to("meta") for k, v in tensors.items()}, args, kwargs)

    def get_attr(self, target: Any, args: Any, kwargs: Any) -> Any:
        value = super().get_attr(target, args, kwargs)
        return value.to("meta") if self.meta and isinstance(value, Tensor) else value


def _is_node(a: Any) -> bool:
    return isinstance(a, fx.Node)


STACK_LINE = re.compile(r'File "([^"]+)", line (\d+), in \w+\n\s+(.*)')


def _where(node: fx.Node) -> str:
    """The user's source line that made `node` (file:line `code`), else the node's name."""
    for path, line, code in STACK_LINE.findall(node.stack_trace or ""):
        if not path.startswith(TORCH_DIR):
            return f"{Path(path).name}:{line} `{code.strip()}`"
    return f"module {node.target}" if node.op == "call_module" else f"node {node.name}"


class _Builder:
    """Walks the graph once, joining axis variables op by op."""

    def __init__(self, gm: fx.GraphModule, shapes: dict[fx.Node, Any], names: dict[int, str]) -> None:
        self.gm = gm
        self.uf = _UnionFind()
        self.shapes = shapes
        self.dims: dict[fx.Node, list[Dim] | None] = {}
        self.names = names  # id(tensor) -> its first state-dict name (tied weights share one)
        self.state_names = set(names.values()) | set(dict(gm.state_dict(keep_vars=True)))
        self.param_vars: dict[str, list[int]] = {}
        self.param_parts: dict[int, Segmented] = {}  # a parameter axis's variable -> the parts it is made of
        self.probe_views: dict[str, ProbeView] = {}  # probe module -> where its output holds the units
        self.activation: set[int] = set()
        self.modules = dict(gm.named_modules())
        self.calls: dict[str, int] = {}
        self.layer_inputs: list[tuple[fx.Node, int]] = []  # (input node of a conv/linear, its channel variable)
        self.warnings: list[str] = []
        self.channels_last: list[tuple[str, int]] = []  # (layer, output variable) with units on the last of >2 dims

    # variables -------------------------------------------------------------------------------------------------
    def fix(self, d: Dim | None) -> None:
        if isinstance(d, Segmented):
            for var in d.variables:
                self.uf.union(var, FIXED)
        elif d is not None:
            self.uf.union(d, FIXED)

    def join(self, a: Dim, b: Dim) -> None:
        if isinstance(a, int) and isinstance(b, int):
            self.uf.union(a, b)
        elif a != b:  # an axis made of parts meets another axis: no spec can say that, keep both unpermuted
            self.fix(a)
            self.fix(b)

    def bind(self, param_var: int, d: Dim) -> None:
        """A parameter axis that reads (or scales) the activation axis `d`: joined, or made of `d`'s parts."""
        if isinstance(d, Segmented):
            self.uf.union(param_var, FIXED)
            self.param_parts[param_var] = d
        else:
            self.uf.union(param_var, d)

    def param(self, name: str) -> list[int]:
        """One variable per axis of a parameter or buffer, by its state-dict name (tied tensors share them)."""
        tensor = operator.attrgetter(name)(self.gm)
        key = self.names.get(id(tensor), name)
        if key not in self.param_vars:
            self.param_vars[key] = [self.uf.new() for _ in range(tensor.dim())]
        return self.param_vars[key]

    def module_param(self, target: str, attr: str) -> list[int] | None:
        tensor = getattr(self.modules[target], attr, None)
        return self.param(f"{target}.{attr}" if target else attr) if isinstance(tensor, Tensor) else None

    def warn(self, node: fx.Node, what: str) -> None:
        self.warnings.append(f"{_where(node)}: {what}")

    # the walk --------------------------------------------------------------------------------------------------
    def run(self) -> None:
        for node in self.gm.graph.nodes:
            if node.op == "call_module":
                self.calls[node.target] = self.calls.get(node.target, 0) + 1
        for node in self.gm.graph.nodes:
            out = self.visit(node)
            self.dims[node] = out
            for d in () if node.op == "get_attr" else out or ():
                self.activation.update(d.variables if isinstance(d, Segmented) else [d])

    def visit(self, node: fx.Node) -> list[Dim] | None:
        shape = self.shapes.get(node)
        if node.op == "placeholder":
            return None if shape is None else [FIXED] * len(shape)
        if node.op == "output":
            fx.node.map_arg(node.args, self._fix_all)
            return None
        if node.op == "get_attr":
            if node.target in self.state_names:
                return list(self.param(node.target))
            return None if shape is None else [FIXED] * len(shape)
        if all(self.dims.get(a) is None for a in node.all_input_nodes):
            return None if shape is None else [FIXED] * len(shape)  # Python on shapes, or a new constant tensor
        if shape is None and _is_metadata(node):
            return None  # x.shape, x.size(): no channel flows on
        rule, key = self._rule(node)
        if rule is not None and shape is not None:
            try:
                return rule(self, node)
            except Exception as err:  # arguments the rule does not expect: treated as an unknown op, never a crash
                self.warn(node, f"{key} could not be analysed ({type(err).__name__}: {err}): its axes stay unpermuted")
        elif rule is None:
            self.warn(node, f"{key} is not a known op: its axes stay unpermuted")
        return self.unpermutable(node)  # unknown, or a known op that returned no single tensor here

    def unpermutable(self, node: fx.Node) -> list[Dim] | None:
        """An op whose channels cannot be followed: every input axis and the output stay unpermuted."""
        for a in node.all_input_nodes:
            self._fix_all(a)
        shape = self.shapes.get(node)
        return None if shape is None else [FIXED] * len(shape)

    def _fix_all(self, arg: Any) -> None:
        if _is_node(arg):
            for d in self.dims.get(arg) or ():
                self.fix(d)

    def _rule(self, node: fx.Node) -> tuple[Callable[[_Builder, fx.Node], list[Dim]] | None, str]:
        if node.op == "call_module":
            module = self.modules[node.target]
            for cls in type(module).__mro__:
                if cls in MODULE_RULES:
                    return MODULE_RULES[cls], type(module).__name__
            return None, f"module {node.target} ({type(module).__name__})"
        if node.op == "call_method":
            return METHOD_RULES.get(node.target), f"method .{node.target}()"
        name = getattr(node.target, "__name__", str(node.target))
        return FUNCTION_RULES.get(node.target) or NAMED_FUNCTION_RULES.get(name), f"function {name}"

    # helpers for rules ------------------------------------------------------------------------------------------
    def arg(self, node: fx.Node, i: int, key: str, default: Any = None) -> Any:
        if key in node.kwargs:
            return node.kwargs[key]
        return node.args[i] if len(node.args) > i else default

    def tensor_dims(self, a: Any) -> list[Dim]:
        return list(self.dims[a]) if _is_node(a) and self.dims.get(a) is not None else []

    def shape(self, a: Any) -> tuple[int, ...]:
        return self.shapes[a] if _is_node(a) and self.shapes.get(a) is not None else ()


# ---- rules: each returns the output's dims ------------------------------------------------------------------------
Rule = Callable[[_Builder, fx.Node], list[Dim]]


def _same(b: _Builder, node: fx.Node) -> list[Dim]:
    """Elementwise on one tensor (activations, dropout, softmax along any axis: all permutation-equivariant)."""
    return b.tensor_dims(node.args[0])


def _broadcast(b: _Builder, node: fx.Node) -> list[Dim]:
    """Elementwise on several tensors: right-aligned axes of equal size are one variable; an operand of size 1
    along an axis gives every unit the same value there, which any permutation keeps."""
    out_shape = b.shapes[node]
    out: list[Dim] = [FIXED] * len(out_shape)
    owner: list[Dim | None] = [None] * len(out_shape)
    for a in [*node.args, *node.kwargs.values()]:
        if not _is_node(a) or b.dims.get(a) is None:
            continue
        dims, shape = b.dims[a], b.shape(a)
        offset = len(out_shape) - len(dims)
        for i, d in enumerate(dims):
            j = offset + i
            if shape[i] != out_shape[j]:
                continue
            if owner[j] is None:
                owner[j] = d
            else:
                b.join(owner[j], d)
    for j, d in enumerate(owner):
        if d is not None:
            out[j] = d
    return out


def _linear_core(b: _Builder, node: fx.Node, x: Any, weight: list[int], bias: list[int] | None) -> list[Dim]:
    dims = b.tensor_dims(x)
    last = dims[-1]
    b.bind(weight[1], last)
    b.layer_inputs.extend((x, var) for var in (last.variables if isinstance(last, Segmented) else [last]))
    if bias is not None:
        b.uf.union(bias[0], weight[0])
    if len(dims) > 2:
        b.channels_last.append((str(node.target) if node.op == "call_module" else node.name, weight[0]))
    return [*dims[:-1], weight[0]]


def _conv_core(
    b: _Builder,
    node: fx.Node,
    x: Any,
    weight: list[int],
    w_shape: Sequence[int],
    bias: list[int] | None,
    groups: int,
) -> list[Dim]:
    dims = b.tensor_dims(x)
    cin, out = dims[1], weight[0]
    for k in weight[2:]:
        b.uf.union(k, FIXED)
    if groups == 1 and not (isinstance(cin, Segmented) and any(block != 1 for _, _, block in cin.parts)):
        b.bind(weight[1], cin)
        b.layer_inputs.extend((x, var) for var in (cin.variables if isinstance(cin, Segmented) else [cin]))
    elif groups == w_shape[0] == b.shape(x)[1] and w_shape[1] == 1:  # depthwise: unit i reads only channel i
        b.uf.union(weight[1], FIXED)
        b.join(cin, out)
        b.layer_inputs.append((x, cin))
    else:
        b.uf.union(weight[1], FIXED)
        b.fix(cin)
        b.uf.union(out, FIXED)
        b.warn(node, f"grouped conv ({groups} groups, not depthwise): its channels stay unpermuted")
    if bias is not None:
        b.uf.union(bias[0], out)
    return [dims[0], out, *([FIXED] * (len(dims) - 2))]


def _norm_core(b: _Builder, x: Any, per_channel: Sequence[list[int] | None], axes: Sequence[int]) -> list[Dim]:
    """Per-unit tensors (scale, shift, running stats) over the normalised axes `axes` of x."""
    dims = b.tensor_dims(x)
    for tensor in per_channel:
        if tensor is None:
            continue
        for var, axis in zip(tensor, axes):
            b.bind(var, dims[axis])
    return dims


def _module_linear(b: _Builder, node: fx.Node) -> list[Dim]:
    t = node.target
    return _linear_core(b, node, node.args[0], b.module_param(t, "weight"), b.module_param(t, "bias"))


def _module_conv(b: _Builder, node: fx.Node) -> list[Dim]:
    t = node.target
    module = b.modules[t]
    weight, bias = b.module_param(t, "weight"), b.module_param(t, "bias")
    return _conv_core(b, node, node.args[0], weight, module.weight.shape, bias, module.groups)


def _module_channel_norm(b: _Builder, node: fx.Node) -> list[Dim]:
    """BatchNorm / InstanceNorm: per-unit tensors on dim 1."""
    t = node.target
    tensors = [b.module_param(t, k) for k in ("weight", "bias", "running_mean", "running_var")]
    return _norm_core(b, node.args[0], tensors, [1])


def _module_layer_norm(b: _Builder, node: fx.Node) -> list[Dim]:
    t = node.target
    k = len(b.modules[t].normalized_shape)
    ndim = len(b.shape(node.args[0]))
    tensors = [b.module_param(t, "weight"), b.module_param(t, "bias")]
    return _norm_core(b, node.args[0], tensors, list(range(ndim - k, ndim)))


def _module_group_norm(b: _Builder, node: fx.Node) -> list[Dim]:
    t = node.target
    module = b.modules[t]
    dims = _norm_core(b, node.args[0], [b.module_param(t, "weight"), b.module_param(t, "bias")], [1])
    if module.num_groups not in (1, module.num_channels):
        b.fix(dims[1])
        b.warn(node, f"GroupNorm with {module.num_groups} groups: its channels stay unpermuted")
    return dims


def _module_prelu(b: _Builder, node: fx.Node) -> list[Dim]:
    dims = b.tensor_dims(node.args[0])
    weight = b.module_param(node.target, "weight")
    if b.modules[node.target].num_parameters > 1:
        b.join(weight[0], dims[1])
    else:
        b.uf.union(weight[0], FIXED)
    return dims


def _pool(b: _Builder, node: fx.Node) -> list[Dim]:
    """Pooling over the spatial axes: batch and channel axes pass, the spatial ones are new."""
    dims = b.tensor_dims(node.args[0])
    return [*dims[:2], *([FIXED] * (len(b.shapes[node]) - 2))]


def _reshape(b: _Builder, node: fx.Node) -> list[Dim]:
    """view/reshape/flatten/squeeze/…: match input and output axes by their sizes. An axis that only moves or
    gains/loses size-1 neighbours keeps its variable; C merged with trailing unpermuted axes becomes C blocks of
    H·W; the inverse split undoes that; any other split or merge of a channel axis fixes it (e.g. attention heads)."""
    src = next(a for a in node.all_input_nodes if b.dims.get(a) is not None)
    dims, shape, out_shape = b.tensor_dims(src), b.shape(src), b.shapes[node]
    out: list[Dim] = []
    i = j = 0
    while i < len(shape) or j < len(out_shape):
        bi, bj = [i], [j]
        pi = shape[i] if i < len(shape) else 1
        pj = out_shape[j] if j < len(out_shape) else 1
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj:
                pi *= shape[i]
                bi.append(i)
                i += 1
            else:
                pj *= out_shape[j]
                bj.append(j)
                j += 1
        ins = [(dims[k], shape[k]) for k in bi if k < len(shape) and shape[k] != 1]
        outs = [k for k in bj if k < len(out_shape)]
        real_outs = [k for k in outs if out_shape[k] != 1]
        result = {k: FIXED for k in outs}
        if len(ins) == 1 and len(real_outs) == 1:
            result[real_outs[0]] = ins[0][0]
        elif len(ins) > 1 and len(real_outs) == 1:
            (head, size), rest = ins[0], [d for d, _ in ins[1:]]
            block = math.prod(s for _, s in ins[1:])
            if not all(isinstance(d, int) and b.uf.find(d) == FIXED for d in rest):
                for d, _ in ins:
                    b.fix(d)
            elif isinstance(head, Segmented):
                result[real_outs[0]] = Segmented(tuple((v, u, k * block) for v, u, k in head.parts))
            else:
                result[real_outs[0]] = head if b.uf.find(head) == FIXED else Segmented(((head, size, block),))
        elif len(ins) == 1 and len(real_outs) > 1:
            d, size = ins[0]
            if isinstance(d, Segmented) and len(d.parts) == 1 and d.parts[0][1] == out_shape[real_outs[0]]:
                result[real_outs[0]] = d.parts[0][0]  # C blocks of H·W split back into C × H × W
            else:
                b.fix(d)
        else:
            for d, _ in ins:
                b.fix(d)
        out.extend(result[k] for k in outs)
    return out[: len(out_shape)]


def _reorder(fn: Callable[..., Tensor]) -> Rule:
    """permute/transpose/movedim: find where each axis goes by applying the op to a tensor of distinct sizes."""

    def rule(b: _Builder, node: fx.Node) -> list[Dim]:
        dims = b.tensor_dims(node.args[0])
        probe = torch.empty(tuple(range(2, len(dims) + 2)), device="meta")
        moved = fn(probe, *node.args[1:], **node.kwargs)
        return [dims[s - 2] for s in moved.shape]

    return rule


def _expand(b: _Builder, node: fx.Node) -> list[Dim]:
    """expand/expand_as: size-1 axes repeated (new, unpermuted); axes of unchanged size keep their variable."""
    dims, shape, out_shape = b.tensor_dims(node.args[0]), b.shape(node.args[0]), b.shapes[node]
    new = len(out_shape) - len(dims)
    return [FIXED] * new + [d if shape[i] == out_shape[new + i] else FIXED for i, d in enumerate(dims)]


def _reduce(b: _Builder, node: fx.Node) -> list[Dim]:
    """mean/sum/amax over axes: a reduced axis disappears (a sum over units is permutation-invariant)."""
    dims = b.tensor_dims(node.args[0])
    axes = b.arg(node, 1, "dim")
    keep = b.arg(node, 2, "keepdim", False)
    if axes is None:
        return [FIXED] * len(b.shapes[node])
    axes = {a % len(dims) for a in (axes if isinstance(axes, (list, tuple)) else [axes])}
    return [FIXED if i in axes else d for i, d in enumerate(dims) if keep or i not in axes]


def _cat(b: _Builder, node: fx.Node) -> list[Dim]:
    """cat along an axis: the other axes are joined; the axis itself is made of the inputs' axes, as parts."""
    parts = [p for p in b.arg(node, 0, "tensors") if _is_node(p)]
    axis = b.arg(node, 1, "dim", 0) % len(b.shapes[node])
    out = b.tensor_dims(parts[0])
    for p in parts[1:]:
        for i, d in enumerate(b.tensor_dims(p)):
            if i != axis:
                b.join(out[i], d)
    segments: list[tuple[int, int, int]] = []
    for p in parts:
        d, n = b.tensor_dims(p)[axis], b.shape(p)[axis]
        segments.extend(d.parts if isinstance(d, Segmented) else [(d, n, 1)])
    active = any(b.uf.find(var) != FIXED for var, _, _ in segments)
    out[axis] = Segmented(tuple(segments)) if active else FIXED  # each input's units stay a part of the result
    return out


def _matmul(b: _Builder, node: fx.Node) -> list[Dim]:
    x, y = node.args[0], node.args[1]
    dx, dy = b.tensor_dims(x), b.tensor_dims(y)
    if len(dx) < 2 or len(dy) < 2:
        for d in (*dx, *dy):
            b.fix(d)
        return [FIXED] * len(b.shapes[node])
    b.join(dx[-1], dy[-2])  # the contracted axis: the same permutation on both sides cancels
    batch = _broadcast_dims(b, [(dx[:-2], b.shape(x)[:-2]), (dy[:-2], b.shape(y)[:-2])], b.shapes[node][:-2])
    return [*batch, dx[-2], dy[-1]]


def _broadcast_dims(b: _Builder, parts: list[tuple[list[Dim], tuple[int, ...]]], out_shape: Sequence[int]) -> list[Dim]:
    out: list[Dim | None] = [None] * len(out_shape)
    for dims, shape in parts:
        offset = len(out_shape) - len(dims)
        for i, d in enumerate(dims):
            if shape[i] == out_shape[offset + i]:
                if out[offset + i] is None:
                    out[offset + i] = d
                else:
                    b.join(out[offset + i], d)
    return [FIXED if d is None else d for d in out]


def _getitem(b: _Builder, node: fx.Node) -> list[Dim]:
    """Indexing a tensor: full slices keep an axis; any other index on a channel axis fixes it."""
    dims = b.tensor_dims(node.args[0])
    index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    if any(_is_node(i) or isinstance(i, (list, Tensor)) for i in index):
        for d in dims:
            b.fix(d)
        return [FIXED] * len(b.shapes[node])
    if Ellipsis in index:
        at = index.index(Ellipsis)
        fill = len(dims) - sum(1 for i in index if i is not None and i is not Ellipsis)
        index = (*index[:at], *([slice(None)] * fill), *index[at + 1 :])
    out: list[Dim] = []
    pos = 0
    for i in index:
        if i is None:
            out.append(FIXED)
            continue
        if isinstance(i, slice) and i == slice(None):
            out.append(dims[pos])
        else:
            b.fix(dims[pos])
            if isinstance(i, slice):
                out.append(FIXED)
        pos += 1
    return out + dims[pos:]


def _tuple_getitem(b: _Builder, node: fx.Node) -> list[Dim]:
    if b.dims.get(node.args[0]) is not None:
        return _getitem(b, node)
    return [FIXED] * len(b.shapes[node])  # an element of a tuple an unknown op returned (its inputs were fixed)


def _param_of(b: _Builder, a: Any) -> list[int] | None:
    if not _is_node(a):
        return None
    if a.op == "get_attr":
        return b.dims[a]
    b._fix_all(a)  # a weight computed in forward: it cannot be permuted with the state dict
    return None


def _f_linear(b: _Builder, node: fx.Node) -> list[Dim] | None:
    weight = _param_of(b, b.arg(node, 1, "weight"))
    if weight is None:
        return b.unpermutable(node)
    return _linear_core(b, node, node.args[0], weight, _param_of(b, b.arg(node, 2, "bias")))


def _f_conv(b: _Builder, node: fx.Node) -> list[Dim] | None:
    weight = _param_of(b, b.arg(node, 1, "weight"))
    if weight is None:
        return b.unpermutable(node)
    groups = b.arg(node, 6, "groups", 1)
    w_shape = b.shape(b.arg(node, 1, "weight"))
    return _conv_core(b, node, node.args[0], weight, w_shape, _param_of(b, b.arg(node, 2, "bias")), groups)


def _f_layer_norm(b: _Builder, node: fx.Node) -> list[Dim]:
    ndim = len(b.shape(node.args[0]))
    k = len(b.arg(node, 1, "normalized_shape"))
    tensors = [_param_of(b, b.arg(node, 2, "weight")), _param_of(b, b.arg(node, 3, "bias"))]
    return _norm_core(b, node.args[0], tensors, list(range(ndim - k, ndim)))


def _f_batch_norm(b: _Builder, node: fx.Node) -> list[Dim]:
    keys = [(1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias")]
    return _norm_core(b, node.args[0], [_param_of(b, b.arg(node, i, k)) for i, k in keys], [1])


def _is_metadata(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target is builtins.getattr
    return node.op == "call_method" and node.target in ("size", "dim", "numel")


ACTIVATIONS = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Mish, nn.ELU,
    nn.LeakyReLU, nn.Softplus, nn.Identity, nn.modules.dropout._DropoutNd, nn.Softmax, nn.LogSoftmax,
)  # fmt: skip
POOLS = (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd,
         nn.modules.pooling._AdaptiveMaxPoolNd)  # fmt: skip

MODULE_RULES: dict[type, Rule | None] = {
    nn.Linear: _module_linear,
    nn.modules.conv._ConvNd: _module_conv,
    nn.modules.batchnorm._NormBase: _module_channel_norm,
    nn.LayerNorm: _module_layer_norm,
    nn.GroupNorm: _module_group_norm,
    nn.PReLU: _module_prelu,
    nn.Flatten: _reshape,
    nn.Unflatten: _reshape,
    **dict.fromkeys(ACTIVATIONS, _same),
    **dict.fromkeys(POOLS, _pool),
}
# ConvTranspose stores its weight [in, out, …]: not the conv rule's layout, so it is left to the unknown-op path
MODULE_RULES[nn.modules.conv._ConvTransposeNd] = None

UNARY_FUNCTIONS = (
    torch.relu, F.relu, F.relu6, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.leaky_relu, F.elu,
    F.softplus, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.dropout, F.dropout2d, torch.exp, torch.abs,
    operator.neg, torch.neg, F.softmax, F.log_softmax, torch.softmax, torch.clone, torch.clamp,
)  # fmt: skip
ELEMENTWISE = (operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul,
               torch.div, torch.maximum, torch.minimum, torch.where, operator.iadd, operator.imul, torch.addcmul,
               torch.addcdiv, torch.lerp)  # fmt: skip
FUNCTION_RULES: dict[Any, Rule] = {
    **dict.fromkeys(UNARY_FUNCTIONS, _same),
    **dict.fromkeys(ELEMENTWISE, _broadcast),
    torch.flatten: _reshape,
    torch.reshape: _reshape,
    torch.squeeze: _reshape,
    torch.unsqueeze: _reshape,
    torch.permute: _reorder(torch.permute),
    torch.transpose: _reorder(torch.transpose),
    torch.movedim: _reorder(torch.movedim),
    torch.mean: _reduce,
    torch.sum: _reduce,
    torch.amax: _reduce,
    torch.cat: _cat,
    torch.concat: _cat,
    torch.matmul: _matmul,
    operator.matmul: _matmul,
    torch.bmm: _matmul,
    operator.getitem: _tuple_getitem,
    F.linear: _f_linear,
    F.conv1d: _f_conv,
    F.conv2d: _f_conv,
    F.conv3d: _f_conv,
    F.layer_norm: _f_layer_norm,
    F.batch_norm: _f_batch_norm,
    **dict.fromkeys((F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.avg_pool2d, F.max_pool2d), _pool),
}
SAME_METHODS = ("relu", "sigmoid", "tanh", "exp", "abs", "neg", "softmax", "log_softmax", "contiguous", "clone",
                "float", "double", "half", "to", "type", "detach", "clamp", "relu_", "clamp_")  # fmt: skip
RESHAPE_METHODS = ("view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as")
METHOD_RULES: dict[str, Rule] = {
    **dict.fromkeys(SAME_METHODS, _same),
    **dict.fromkeys(
        ("add", "sub", "mul", "div", "add_", "mul_", "sub_", "div_", "addcmul", "addcdiv", "lerp"), _broadcast
    ),
    **dict.fromkeys(RESHAPE_METHODS, _reshape),
    "permute": _reorder(torch.Tensor.permute),
    "transpose": _reorder(torch.Tensor.transpose),
    "movedim": _reorder(torch.Tensor.movedim),
    "mean": _reduce,
    "sum": _reduce,
    "amax": _reduce,
    "matmul": _matmul,
    "expand": _expand,
    "expand_as": _expand,
}
# functions of vision libraries that fx keeps whole (`torch.fx.wrap`), known by name so the core imports none of
# them: torchvision's stochastic depth scales whole samples, so each keeps its input's axes
NAMED_FUNCTION_RULES: dict[str, Rule] = {"stochastic_depth": _same, "drop_path": _same}
LOOK_THROUGH = (*POOLS, nn.Flatten)  # a probe is taken before these, as the hand-written specs do


def _trace_error(model: nn.Module, err: BaseException) -> TraceError:
    """One line naming the call in the user's code where symbolic tracing failed."""
    frames = [f for f in traceback.extract_tb(err.__traceback__) if not f.filename.startswith(TORCH_DIR)]
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno} `{frames[-1].line}`" if frames else ""
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return TraceError(
        f"cannot trace {type(model).__name__}.forward{where}: {first} "
        "(torch.fx needs a forward without data-dependent control flow)"
    )


def _record_shapes(gm: fx.GraphModule, example: Tensor) -> _Recorder:
    """Shapes from meta tensors; an op without a meta kernel (or a forward that makes real tensors) falls back to
    two real samples."""
    with torch.no_grad():
        try:
            recorder = _Recorder(gm, meta=True)
            recorder.run(example.to("meta"))
        except Exception:
            recorder = _Recorder(gm, meta=False)
            recorder.run(example)
    return recorder


def trace_spec(model: nn.Module, example: Tensor) -> TracedSpec:
    """The permutation spec of `model`, from a torch.fx trace and one forward of `example` (shapes; eval mode,
    no grad, so BatchNorm statistics are untouched). Warnings name every op that left axes unpermuted."""
    start = time.perf_counter()
    tracer = fx.Tracer()
    tracer.record_stack_traces = True  # warnings name the user's source line
    modes = {m: m.training for m in model.modules()}
    # traced in eval mode: a drop path written as `if self.training: x * rand(...)` is then the identity it is at
    # inference, not random ops that would cut the residual stream it sits on
    model.eval()
    try:
        try:
            gm = fx.GraphModule(model, tracer.trace(model))
        except Exception as err:
            raise _trace_error(model, err) from None
        try:
            recorder = _record_shapes(gm, example[:2])
        except Exception as err:
            raise TraceError(
                f"running the traced {type(model).__name__} on an input of shape {list(example.shape)} failed: "
                f"{(str(err).strip().splitlines() or [type(err).__name__])[0]}"
            ) from None
    finally:
        for m, mode in modes.items():
            m.training = mode
    state = model.state_dict(keep_vars=True)
    names: dict[int, str] = {}
    for name, tensor in state.items():
        names.setdefault(id(tensor), name)
    builder = _Builder(gm, recorder.shapes, names)
    builder.run()
    spec, roots = _assemble(builder, state)
    channels_last = [name for name, var in builder.channels_last if builder.uf.find(var) in roots]
    return TracedSpec(spec, builder.warnings, channels_last, time.perf_counter() - start)


def _assemble(b: _Builder, state: dict[str, Tensor]) -> tuple[PermutationSpec, set[int]]:
    """Classes with an activation axis, not FIXED, wider than one unit, become groups; each is named after the
    module whose output axis it is (first in state-dict order), so names read like the hand-written ones."""
    active = {b.uf.find(v) for v in b.activation} - {b.uf.find(FIXED)}
    roots: dict[str, list[int | None]] = {}
    for name, tensor in state.items():
        variables = b.param_vars.get(b.names.get(id(tensor), name))
        roots[name] = [
            None if variables is None or tensor.shape[axis] == 1 or b.uf.find(variables[axis]) not in active
            else b.uf.find(variables[axis])
            for axis in range(tensor.dim())
        ]  # fmt: skip
    group_names: dict[int, str] = {}
    for producer_only in (True, False):
        for name, axis_roots in roots.items():
            for axis, root in enumerate(axis_roots):
                if root is None or root in group_names or (producer_only and axis != 0):
                    continue
                label = name.rsplit(".", 1)[0] if axis == 0 and "." in name else f"{name}:{axis}"
                while label in group_names.values():
                    label += "'"
                group_names[root] = label
    axes = {name: tuple(None if r is None else group_names[r] for r in rs) for name, rs in roots.items()}
    parts: dict[str, dict[int, tuple[Part, ...]]] = {}
    for name, tensor in state.items():
        for axis, var in enumerate(b.param_vars.get(b.names.get(id(tensor), name)) or ()):
            if var in b.param_parts:
                found = _parts(b, b.param_parts[var], group_names)
                if any(p.group is not None for p in found):
                    parts.setdefault(name, {})[axis] = found
    probes: dict[str, list[str]] = {}
    for node, var in b.layer_inputs:
        root = b.uf.find(var)
        if root not in group_names:
            continue
        probe = _probe_for(b, node, root)
        found = probes.setdefault(group_names[root], [])
        if probe is not None and probe not in found:
            found.append(probe)
    unprobed = {root: name for root, name in group_names.items() if not probes.get(name)}
    for node in b.gm.graph.nodes:  # no layer input reachable: the last single-use module of each chain holding it
        for root, view in _held_groups(b, node).items():
            if root in unprobed and not any(root in _held_groups(b, user) for user in node.users):
                probes.setdefault(unprobed[root], []).append(node.target)
                b.probe_views[node.target] = view
    probes_found = {g: tuple(p) for g, p in probes.items() if p}
    used = {p for found in probes_found.values() for p in found}
    views = {p: view for p, view in b.probe_views.items() if p in used and view != ProbeView()}
    return PermutationSpec(axes=axes, probes=probes_found, parts=parts, probe_views=views), set(group_names)


def _parts(b: _Builder, d: Segmented, group_names: dict[int, str]) -> tuple[Part, ...]:
    """A segmented axis as the spec's parts: each variable's group (None where it was fixed), at its offset."""
    out, offset = [], 0
    for var, units, block in d.parts:
        group = group_names.get(b.uf.find(var)) if units > 1 else None
        out.append(Part(group, offset, units, block))
        offset += units * block
    return tuple(out)


def _held_groups(b: _Builder, node: fx.Node) -> dict[int, ProbeView]:
    """{group root: view} of the units a single-use module's output holds where activation statistics can read
    them: dim 1 (channels-first maps, [N, C] features) and the last dim (channels-last maps, tokens [N, T, D]),
    with any other axis that holds a permuted group averaged out."""
    if node.op != "call_module" or b.calls[node.target] != 1 or isinstance(b.modules[node.target], LOOK_THROUGH):
        return {}
    dims = b.dims.get(node) or []
    permuted = [
        i for i, d in enumerate(dims) if i > 0 and (isinstance(d, Segmented) or b.uf.find(d) != b.uf.find(FIXED))
    ]
    held: dict[int, ProbeView] = {}
    for axis in (1, len(dims) - 1) if len(dims) > 2 else (1,) if len(dims) == 2 else ():
        if axis in permuted and isinstance(dims[axis], int):
            view = ProbeView(axis if axis == 1 else -1, tuple(i - len(dims) for i in permuted if i != axis))
            held.setdefault(b.uf.find(dims[axis]), view)
    return held


def _probe_for(b: _Builder, node: fx.Node, root: int) -> str | None:
    """The nearest single-use module upstream of `node` (through one-input ops and pooling) whose output holds the
    group `root` (its axis noted in `probe_axes`), where activation statistics read units; None where a residual
    add comes first."""
    while True:
        held = _held_groups(b, node)
        if root in held:
            b.probe_views[node.target] = held[root]
            return node.target
        inputs = [a for a in node.all_input_nodes if b.dims.get(a) is not None and a.op != "get_attr"]
        if len(inputs) != 1:
            return None
        node = inputs[0]


def model_spec(model: nn.Module, example: Tensor) -> tuple[PermutationSpec, dict[str, Any]]:
    """The model's own hand-written spec where it has one, else the traced spec (warnings go to `warnings`)."""
    own = getattr(model, "permutation_spec", None)
    if callable(own):
        return own(), {"spec": "hand-written"}
    traced = trace_spec(model, example)
    for line in traced.warnings:
        warnings.warn(f"traced spec: {line}", stacklevel=2)
    return traced.spec, {
        "spec": "traced",
        "spec_groups": len(traced.spec.groups),
        "spec_warnings": traced.warnings,
        "spec_channels_last": traced.channels_last,
        "trace_s": traced.seconds,
    }
