"""Permutation specs traced from any `nn.Module` with torch.fx, so a user's architecture needs no hand-written spec.

Every tensor axis that may carry channels is a variable of a union-find; each op of the traced graph joins the
variables that must share one permutation (a Linear's input axis with its input's last axis, a residual `add`'s
two operands, a norm's scale with the channels it normalises, …). The network's input and output axes, batch and
spatial axes, and every axis an op this module does not know touches are joined to one FIXED variable: they stay
unpermuted. A wrong spec is worse than a small one, so anything not understood fixes its axes and is named in a
warning with the user's source line. Shapes come from one pass on meta tensors (no arithmetic).

A variable can also be *defined* as consecutive segments of others, each unit of a segment spread over `block`
entries: `cat` along channels makes its output [x's units; y's units]; `chunk`/`split`/slicing cuts its input into
fresh variables [first; second; …], one permutation per segment; a flatten of C×H×W gives C units of H·W entries; a
grouped conv's input is G blocks moved by one shared permutation and its output G blocks each moved by its own.
Joining two defined variables joins them entry by entry (cutting a segment where the other has a boundary), so a
split, a concatenation and a residual add compose, and a parameter axis whose variable is defined becomes the spec's
parts. Where two axes cannot be paired unit by unit their units are fixed, and the op is named in a warning.

A view that cuts one axis into several (attention heads, a channel shuffle) or merges several makes that axis a
Kronecker product of them: only one factor can stay permuted (no spec permutes a product of permutations), chosen
once the whole graph is seen (the factor that keeps the most units, preferring the one that keeps a defined axis's
segments whole), and a factor it had to leave unpermuted is named in a warning.

The groups of the spec are the classes that hold at least one activation axis, are not FIXED, are not defined and
are wider than one unit. Probes (for activation-based aligners): for every conv/linear input, the nearest single-use
module upstream whose output carries the group plainly on dim 1 or the last dim (pooling and repeated modules are
looked through), e.g. the ReLU before it; a group whose units only ever appear as segments of a wider axis has none.
"""

from __future__ import annotations

import builtins
import dataclasses
import itertools
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
from mergebench.modes import evaluating
from mergebench.spec import Heads, Part, PermutationSpec, ProbeView

FIXED = 0
TORCH_DIR = str(Path(torch.__file__).resolve().parent)
Seg = tuple[int, int, int]  # (variable, units, block): `units` units of the variable, each over `block` entries
# (variable, units, block, offset, step): a leaf placed on a parameter's axis, its entries `step` apart (1: in a row)
Placed = tuple[int, int, int, int, int]


class TraceError(ConfigError):
    """The model's forward cannot be traced symbolically (data-dependent control flow, unsupported Python)."""


class _UnionFind:
    """Axis variables; a root may be defined as consecutive segments of other variables (`defs`), or as their units
    interleaved (`inter`: a channel shuffle's output, entry u·g + s is unit u of member s; the last round may be
    partial, so the members' unit counts are non-increasing and differ by at most one)."""

    def __init__(self) -> None:
        self.parent = [FIXED]
        self.defs: dict[int, tuple[Seg, ...]] = {}
        self.inter: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {}  # root -> (its g members, their units)
        self.conflicts = 0  # pairings of units that could not be made (counted, so the op behind them is named)
        self.joined: set[int] = set()  # roots ever joined with another variable (a fresh one is not among them)

    def new(self) -> int:
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def define(self, segs: Sequence[Seg]) -> int:
        """A variable made of `segs` in order (empty ones left out); a lone plain segment is its own variable, and
        segments all fixed are FIXED."""
        kept = tuple(s for s in segs if s[1] > 0)
        if all(self.fixed(v) for v, _, _ in kept):
            return FIXED
        if len(kept) == 1 and kept[0][2] == 1:
            return kept[0][0]
        var = self.new()
        self.defs[var] = kept
        return var

    def leaves(self, var: int, units: int, block: int = 1) -> list[Seg]:
        """`units` units of `var`, each over `block` entries, as undefined roots in order (FIXED as single entries)."""
        root = self.find(var)
        if root == FIXED:
            return [(FIXED, units * block, 1)]
        if root not in self.defs:  # undefined, or interleaved: a whole leaf (cut through `_take`)
            return [(root, units, block)]
        return [leaf for v, u, k in self.defs[root] for leaf in self.leaves(v, u, k * block)]

    def placed(self, var: int, units: int, block: int = 1, offset: int = 0, step: int = 1) -> list[Placed] | None:
        """`leaves`, each with the axis entry it starts at and the distance between its entries: an interleaved
        variable's members are placed `g` times further apart. None where a unit's block would be spread out (a
        multi-entry unit inside an interleaved axis): no part can say that."""
        root = self.find(var)
        if root == FIXED:
            return [(FIXED, units * block, 1, offset, step)]
        if root in self.inter:
            members, counts = self.inter[root]
            if block != 1:
                return None
            out: list[Placed] = []
            for s, (member, n) in enumerate(zip(members, counts)):
                found = self.placed(member, n, 1, offset + s * step, len(members) * step) if n else []
                if found is None:
                    return None
                out += found
            return out
        if root in self.defs:
            out, position = [], 0
            for v, u, k in self.defs[root]:
                found = self.placed(v, u, k * block, offset + position * step, step)
                if found is None:
                    return None
                out += found
                position += u * k * block
            return out
        return None if step != 1 and block != 1 else [(root, units, block, offset, step)]

    def leaf_roots(self, var: int) -> list[int]:
        """The undefined roots `var` is made of, in order (repeated where a segment repeats)."""
        root = self.find(var)
        if root in self.inter:
            return [r for m in self.inter[root][0] for r in self.leaf_roots(m)]
        return [r for v, _, _ in self.defs[root] for r in self.leaf_roots(v)] if root in self.defs else [root]

    def fixed(self, var: int) -> bool:
        """Whether no unit of `var` can move (FIXED, or made of FIXED segments only)."""
        return all(r == FIXED for r in self.leaf_roots(var))

    def fix(self, var: int) -> None:
        root = self.find(var)
        if root != FIXED:
            self.parent[root] = FIXED
            for v, _, _ in self.defs.pop(root, ()):
                self.fix(v)
            for m in self.inter.pop(root, ((), 0))[0]:
                self.fix(m)

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        self.joined.update((ra, rb))
        if FIXED in (ra, rb):
            self.fix(ra if rb == FIXED else rb)
            return
        if ra in self.leaf_roots(rb) or rb in self.leaf_roots(ra):  # one made of the other: no spec can say that
            self.conflicts += 1
            self.fix(ra)
            self.fix(rb)
            return
        if ra in self.inter or rb in self.inter:
            self._union_interleaved(*((ra, rb) if ra in self.inter else (rb, ra)))
            return
        da, db = self.defs.pop(ra, None), self.defs.pop(rb, None)
        low, high = sorted((ra, rb))  # FIXED (0) stays a root
        self.parent[high] = low
        if da is None or db is None:
            if da or db:
                self.defs[low] = da or db
            return
        self.defs[low] = da
        self._align([leaf for s in da for leaf in self.leaves(*s)], [leaf for s in db for leaf in self.leaves(*s)])

    def interleave(self, members: Sequence[int], counts: Sequence[int]) -> int:
        """The variable whose entry u·g + s is unit u of `members[s]` (`counts[s]` units; g members)."""
        if all(self.fixed(m) for m in members):
            return FIXED
        var = self.new()
        self.inter[var] = (tuple(members), tuple(counts))
        return var

    def cut(self, var: int, sizes: Sequence[int]) -> list[int]:
        """`var` (single-entry units) cut into consecutive pieces of `sizes` entries, a variable each (FIXED where
        empty). An interleaved variable is cut member by member, so each piece interleaves the members' pieces,
        starting with the member whose unit comes first in it."""
        root = self.find(var)
        if root == FIXED:
            return [FIXED] * len(sizes)
        if root not in self.inter:
            pieces = [self.new() if n > 0 else FIXED for n in sizes]
            self.union(root, self.define([(p, n, 1) for p, n in zip(pieces, sizes)]))
            return pieces
        members, counts = self.inter[root]
        g = len(members)

        def before(s: int, entry: int) -> int:  # units of member s at entries < entry
            return max(0, min(counts[s], -(-(entry - s) // g)))

        bounds = [sum(sizes[:k]) for k in range(len(sizes) + 1)]
        shares = [[before(s, hi) - before(s, lo) for lo, hi in itertools.pairwise(bounds)] for s in range(g)]
        per_member = [self.cut(m, shares[s]) for s, m in enumerate(members)]
        pieces = []
        for k, lo in enumerate(bounds[:-1]):
            order = [(lo + i) % g for i in range(g)]
            pieces.append(self.interleave([per_member[s][k] for s in order], [shares[s][k] for s in order]))
        return pieces

    def _union_interleaved(self, ra: int, rb: int) -> None:
        """Join an interleaved root `ra` with `rb`: member by member where `rb` interleaves alike, by aliasing where
        `rb` is undefined, piece by piece where `rb` is single-entry segments that cut `ra` between rounds; anything
        else cannot be paired unit by unit (fixed, counted)."""
        members, counts = self.inter[ra]
        if rb in self.inter:
            other, other_counts = self.inter[rb]
            if len(other) == len(members) and other_counts == counts:
                del self.inter[rb]
                self.parent[rb] = ra
                for m, n in zip(members, other):
                    self.union(m, n)
                return
        elif rb not in self.defs:
            self.parent[rb] = ra
            return
        else:
            segs = self.defs[rb]
            if all(k == 1 for _, _, k in segs):
                pieces = self.cut(ra, [u for _, u, _ in segs])
                del self.defs[rb]
                self.parent[rb] = self.find(ra)
                for piece, (v, _, _) in zip(pieces, segs):
                    self.union(piece, v)
                return
        self.conflicts += 1
        self.fix(ra)
        self.fix(rb)

    def _align(self, xs: list[Seg], ys: list[Seg]) -> None:
        """Join two expansions of one axis entry by entry, cutting a segment where the other has a boundary; a
        unit of one side that holds several of the other's defines them as its blocks."""
        xs, ys = xs[::-1], ys[::-1]  # stacks: the next segment last
        while xs and ys:
            x, y = self._next(xs), self._next(ys)
            if x[2] > y[2]:
                x, y, xs, ys = y, x, ys, xs  # x has the finer block
            (a, ua, ka), (c, uc, kc) = x, y
            size = min(ua * ka, uc * kc)
            if kc % ka or size % kc or (a == c != FIXED and ka != kc):  # units that straddle each other
                self.conflicts += 1
                for stack, (v, u, k) in ((xs, x), (ys, y)):
                    self.fix(v)
                    if u * k > size:
                        stack.append((FIXED, u * k - size, 1))
                continue
            first_a, first_c = self._take(xs, x, size // ka), self._take(ys, y, size // kc)
            if FIXED in (a, c):
                self.fix(first_a)
                self.fix(first_c)
            elif ka == kc:
                self.union(first_a, first_c)
            elif self.find(first_a) in self.inter:  # interleaved single entries cannot be blocks of another's units
                self.conflicts += 1
                self.fix(first_a)
                self.fix(first_c)
            else:
                self.defs[first_a] = ((first_c, size // kc, kc // ka),)
        for stack in (xs, ys):
            if stack:  # the two sides disagree on the axis's size: nothing can be paired
                self.conflicts += 1
                for v, _, _ in stack:
                    self.fix(v)

    def _next(self, stack: list[Seg]) -> Seg:
        """The next leaf of a stack, re-expanded where its variable was cut or fixed since it was pushed."""
        head, *rest = self.leaves(*stack.pop())
        stack.extend(reversed(rest))
        return head

    def _take(self, stack: list[Seg], leaf: Seg, units: int) -> int:
        """The variable of the first `units` units of `leaf`; the others are cut off as a new variable, pushed back."""
        var, total, block = leaf
        if units == total:
            return var
        if self.find(var) in self.inter:
            if block == 1:
                pieces = self.cut(var, [units, total - units])
            else:  # interleaved single entries cannot be cut into blocks
                self.conflicts += 1
                self.fix(var)
                pieces = [FIXED, FIXED]
            stack.append((pieces[1], total - units, block))
            return pieces[0]
        rest = FIXED if var == FIXED else self.new()
        stack.append((rest, total - units, block))
        if var == FIXED:
            return FIXED
        first = self.new()
        self.defs[var] = ((first, units, 1), (rest, total - units, 1))
        return first


@dataclasses.dataclass(frozen=True)
class _Product:
    """`var` = the Kronecker product of `factors` (outer to inner, `sizes` units each): an axis a view cut into
    several, or made of several. One factor stays permuted, the others are fixed (`_Builder.resolve`)."""

    var: int
    factors: tuple[int, ...]
    sizes: tuple[int, ...]
    node: fx.Node


@dataclasses.dataclass(frozen=True)
class _Headed:
    """A variable made of `count` attention heads, head by head: `head` is the variable of the head axis (its
    permutation σ is shared by every variable with the same head variable), `inner` the within-head axis's where a
    view made it (its permutation may differ from head to head: no tensor of the model acts on it)."""

    head: int
    inner: int | None
    count: int
    node: fx.Node


@dataclasses.dataclass
class TracedSpec:
    """The traced spec, the ops that left axes unpermuted (warnings), the layers whose permuted output units are not
    on dim 1 (a Linear on channels-last maps: REPAIR cannot correct them), and what tracing took."""

    spec: PermutationSpec
    warnings: list[str]
    channels_last: list[str]
    seconds: float


class _Recorder(fx.Interpreter):
    """Runs the traced graph once on the example input and keeps every node's output shape (and the shapes of the
    tensors of a tuple it returns: `chunk`, `split`). With `meta`, every tensor lives on the meta device (shapes
    without arithmetic: a big model costs what a small one does)."""

    def __init__(self, module: fx.GraphModule, meta: bool) -> None:
        super().__init__(module)
        self.meta = meta
        self.shapes: dict[fx.Node, Any] = {}
        self.elements: dict[fx.Node, list[tuple[int, ...]]] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        self.shapes[n] = tuple(result.shape) if isinstance(result, Tensor) else None
        tensors = isinstance(result, (tuple, list)) and any(isinstance(t, Tensor) for t in result)
        if tensors and all(isinstance(t, Tensor) or t is None for t in result):  # None: attention without weights
            self.elements[n] = [tuple(t.shape) if isinstance(t, Tensor) else None for t in result]
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
    """The innermost line of the user's source that made `node` (file:line `code`), else the node's name."""
    for path, line, code in reversed(STACK_LINE.findall(node.stack_trace or "")):
        if not path.startswith(TORCH_DIR):
            return f"{Path(path).name}:{line} `{code.strip()}`"
    return f"module {node.target}" if node.op == "call_module" else f"node {node.name}"


class _Builder:
    """Walks the graph once, joining axis variables op by op."""

    def __init__(self, gm: fx.GraphModule, recorder: _Recorder, names: dict[int, str]) -> None:
        self.gm = gm
        self.uf = _UnionFind()
        self.shapes = recorder.shapes
        self.element_shapes = recorder.elements
        self.dims: dict[fx.Node, list[int] | None] = {}
        self.elements: dict[fx.Node, list[list[int]]] = {}  # a tuple-returning op's (chunk, split) tensors' dims
        self.names = names  # id(tensor) -> its first state-dict name (tied weights share one)
        self.state_names = set(names.values()) | set(dict(gm.state_dict(keep_vars=True)))
        self.param_vars: dict[str, list[int]] = {}
        self.probe_views: dict[str, ProbeView] = {}  # probe -> where its module's output holds the units
        self.activation: set[int] = set()
        self.products: list[_Product] = []
        self.modules = dict(gm.named_modules())
        self.calls: dict[str, int] = {}
        self.layer_inputs: list[tuple[fx.Node, int]] = []  # (input node of a conv/linear, its channel variable)
        self.warnings: list[str] = []
        self.channels_last: list[tuple[str, int]] = []  # (layer, output variable) with units on the last of >2 dims
        self.headed: dict[int, _Headed] = {}  # variables made of attention heads
        self._headed_by_axes: dict[tuple[int, int], int] = {}  # (head, inner) roots -> their headed variable
        self.residual: set[int] = set()  # variables summed with another activation (a residual stream)
        self._slices: dict[int, list[dict[int, int]]] = {}  # a view's sliced factor -> its slices' fresh factors

    # variables -------------------------------------------------------------------------------------------------
    def fix(self, d: int) -> None:
        self.uf.fix(d)

    def join(self, a: int, b: int) -> None:
        self.uf.union(a, b)

    def bind(self, param_var: int, d: int) -> None:
        """A parameter axis that reads (or scales) the activation axis `d`: the same variable, segments and all."""
        self.uf.union(param_var, d)

    def segments(self, d: int, sizes: Sequence[int]) -> list[int]:
        """The axis `d` cut into consecutive pieces of `sizes` units, each a variable of its own (FIXED if `d` is)."""
        if self.uf.fixed(d):
            return [FIXED] * len(sizes)
        return self.uf.cut(d, sizes)

    def attention_heads(self, node: fx.Node, count: int) -> tuple[int, int, int]:
        """Fresh variables for an attention whose rule knows its heads (a fused module, a library function): one for
        q and k, one for v, of `count` heads each, and the head variable they share."""
        head, qk, v = self.uf.new(), self.uf.new(), self.uf.new()
        for var in (qk, v):
            self.headed[var] = _Headed(head, None, count, node)
        self.activation.update((head, qk, v))
        return qk, v, head

    def param_roots(self) -> set[int]:
        """The undefined roots some parameter or buffer axis is made of."""
        return {r for variables in self.param_vars.values() for v in variables for r in self.uf.leaf_roots(v)}

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
            conflicts = self.uf.conflicts
            out = self.visit(node)
            self.dims[node] = out
            if self.uf.conflicts > conflicts:
                self.warn(node, "pairs axes whose units do not line up: those units stay unpermuted")
            if node.op != "get_attr":
                for dims in [out or [], *self.elements.get(node, [])]:
                    self.activation.update(dims)
        heads = self._head_views()
        for product in reversed(self.products):  # downstream first: a factor a later view fixed is known fixed
            self.resolve(product, heads.get(id(product)))
        self.check_heads()

    def visit(self, node: fx.Node) -> list[int] | None:
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
        if not any(self.dims.get(a) is not None or a in self.elements for a in node.all_input_nodes):
            return None if shape is None else [FIXED] * len(shape)  # Python on shapes, or a new constant tensor
        if shape is None and _is_metadata(node):
            return None  # x.shape, x.size(): no channel flows on
        if shape is None and node.target is operator.getitem and node.args[0] in self.element_shapes:
            return None  # the None of (output, None): an attention that returns no weights
        if node in self.element_shapes:
            return self._visit_tuple(node)
        rule, key = self._rule(node, MODULE_RULES, FUNCTION_RULES, METHOD_RULES)
        if rule is not None and shape is not None:
            try:
                return rule(self, node)
            except Exception as err:  # arguments the rule does not expect: treated as an unknown op, never a crash
                self.warn(node, f"{key} could not be analysed ({type(err).__name__}: {err}): its axes stay unpermuted")
        elif rule is None:
            self.warn(node, f"{key} is not a known op: its axes stay unpermuted")
        return self.unpermutable(node)  # unknown, or a known op that returned no single tensor here

    def _visit_tuple(self, node: fx.Node) -> None:
        """An op that returns several tensors: their dims go to `elements`, for `getitem` to pick."""
        rule, key = self._rule(node, TUPLE_MODULE_RULES, TUPLE_FUNCTION_RULES, TUPLE_METHOD_RULES)
        if rule is None:
            self.warn(node, f"{key} is not a known op: its axes stay unpermuted")
        else:
            try:
                self.elements[node] = rule(self, node)
                return None
            except Exception as err:
                self.warn(node, f"{key} could not be analysed ({type(err).__name__}: {err}): its axes stay unpermuted")
        self.unpermutable(node)
        return None

    def unpermutable(self, node: fx.Node) -> list[int] | None:
        """An op whose channels cannot be followed: every input axis and the output stay unpermuted."""
        for a in node.all_input_nodes:
            self._fix_all(a)
        shape = self.shapes.get(node)
        return None if shape is None else [FIXED] * len(shape)

    def _fix_all(self, arg: Any) -> None:
        if _is_node(arg):
            for dims in [self.dims.get(arg) or [], *self.elements.get(arg, [])]:
                for d in dims:
                    self.fix(d)

    def _rule(
        self, node: fx.Node, modules: dict[type, Any], functions: dict[Any, Any], methods: dict[str, Any]
    ) -> tuple[Any, str]:
        if node.op == "call_module":
            module = self.modules[node.target]
            for cls in type(module).__mro__:
                if cls in modules:
                    return modules[cls], type(module).__name__
            return None, f"module {node.target} ({type(module).__name__})"
        if node.op == "call_method":
            return methods.get(node.target), f"method .{node.target}()"
        name = getattr(node.target, "__name__", str(node.target))
        named = NAMED_FUNCTION_RULES.get(name) if functions is FUNCTION_RULES else None
        return functions.get(node.target) or named, f"function {name}"

    # views: Kronecker products, resolved once the graph is seen ---------------------------------------------------
    def merged(self, node: fx.Node, ins: Sequence[tuple[int, int]]) -> int:
        """The axis a view makes of the axes `ins` ((variable, size), outer to inner): each unit of the only permuted
        one spread over the entries of the axes after it, or a product resolved later if several are permuted."""
        free = [i for i, (d, _) in enumerate(ins) if not self.uf.fixed(d)]
        sizes = [n for _, n in ins]
        if not free:
            return FIXED
        shuffled = self._shuffle(ins)
        if shuffled is not None:
            return shuffled
        if len(free) == 1:
            p = free[0]
            return self.uf.define([(ins[p][0], sizes[p], math.prod(sizes[p + 1 :]))] * math.prod(sizes[:p]))
        var = self.uf.new()
        self.products.append(_Product(var, tuple(d for d, _ in ins), tuple(sizes), node))
        return var

    def _shuffle(self, ins: Sequence[tuple[int, int]]) -> int | None:
        """A channel shuffle (ShuffleNet): an axis viewed as g × n, transposed to n × g and merged again interleaves
        its g consecutive pieces (entry u·g + s = unit u of piece s), which keeps every piece's units permuted on
        their own, instead of a product of which only one factor could stay permuted."""
        if len(ins) != 2:
            return None
        (inner, n), (outer, g) = ins
        product = next((p for p in self.products if p.factors == (outer, inner) and p.sizes == (g, n)), None)
        if product is None:
            return None
        self.products.remove(product)
        pieces = self.segments(product.var, [n] * g)
        for factor in product.factors:  # the g × n view itself is gone once merged back
            self.fix(factor)
        return self.uf.interleave(pieces, [n] * g)

    def split(self, node: fx.Node, d: int, sizes: Sequence[int]) -> list[int]:
        """The axes (of `sizes` units, outer to inner) a view cuts the axis `d` into: a product resolved later."""
        if self.uf.fixed(d):
            return [FIXED] * len(sizes)
        factors = tuple(self.uf.new() for _ in sizes)
        self.products.append(_Product(d, factors, tuple(sizes), node))
        return list(factors)

    def slices(self, d: int, count: int) -> list[dict[int, int]] | None:
        """Taking single units of the outermost factor `d` of a view nothing else has read yet (a fused qkv output
        viewed as 3 × H × d, then unbound or indexed into q, k and v): each slice becomes a view of its own segment
        of the axis, with fresh variables for the other factors, so q, k and v keep apart what the one view would
        have tied. Returns the slices' {old factor: fresh factor} (the same for every op that slices `d`), or None
        where `d` leads no such view."""
        if d in self._slices:
            return self._slices[d]
        product = next((p for p in self.products if p.factors[0] == d and p.sizes[0] == count), None)
        if product is None or len(product.factors) < 2:
            return None
        if any(self.uf.find(f) != f or f in self.uf.joined for f in product.factors[1:]):
            return None
        self.products.remove(product)
        slices = []
        for piece in self.segments(product.var, [math.prod(product.sizes[1:])] * count):
            fresh = {f: self.uf.new() for f in product.factors[1:]}
            self.products.append(_Product(piece, tuple(fresh.values()), product.sizes[1:], product.node))
            slices.append(fresh)
        for f in product.factors:
            self.fix(f)
        self._slices[d] = slices
        return slices

    def _head_views(self) -> dict[int, tuple[int, int]]:
        """The views to keep as attention heads, by id: {id: (head factor, within-head factor)} for every product
        whose only permuted factors are two neighbours (heads × units of a head), the inner one plain and touching no
        parameter, neither factor nor the viewed axis read by another view (which would tie the units' permutation
        across heads, or keep only one of the factors), nor the inner one paired with two different head axes."""
        uf, params = self.uf, self.param_roots()
        found: dict[int, tuple[int, int]] = {}
        for product in self.products:
            free = [i for i, f in enumerate(product.factors) if product.sizes[i] > 1 and not uf.fixed(f)]
            if uf.fixed(product.var) or len(free) != 2 or free[1] != free[0] + 1:
                continue
            head, inner = (uf.find(product.factors[i]) for i in free)
            if not any(r in uf.defs or r in uf.inter for r in (head, inner)) and inner not in params:
                found[id(product)] = (product.factors[free[0]], product.factors[free[1]])
        views = {id(p): p for p in self.products}
        while True:
            others = [p for p in self.products if id(p) not in found]
            used = {r for p in others for f in (p.var, *p.factors) for r in uf.leaf_roots(f)}
            heads_of: dict[int, set[int]] = {}
            for head, inner in found.values():
                heads_of.setdefault(uf.find(inner), set()).add(uf.find(head))
            drop = [
                k
                for k, (head, inner) in found.items()
                if {uf.find(head), uf.find(inner), *uf.leaf_roots(views[k].var)} & used
                or len(heads_of[uf.find(inner)]) > 1
            ]
            if not drop:
                return found
            for k in drop:
                del found[k]

    def resolve(self, product: _Product, heads: tuple[int, int] | None = None) -> None:
        """Keep one factor of a product permuted and fix the others: among those that still have free units, the
        one that keeps a defined axis's segments whole, then the one with the most free units, then the innermost."""
        uf, sizes = self.uf, product.sizes
        free = [self._free_units(f, n) for f, n in zip(product.factors, sizes)]
        if uf.fixed(product.var) or not any(free):
            for var in (product.var, *product.factors):
                uf.fix(var)
            return
        if heads is not None:
            self._resolve_heads(product, *heads)
            return
        leaves = uf.leaves(product.var, math.prod(sizes))
        p = max((i for i, n in enumerate(free) if n), key=lambda i: (_keeps_segments(leaves, sizes, i), free[i], i))
        lost = [str(sizes[i]) for i, n in enumerate(free) if n and i != p]
        for i, var in enumerate(product.factors):
            if i != p:
                uf.fix(var)
        conflicts = uf.conflicts
        inner = math.prod(sizes[p + 1 :])
        uf.union(product.var, uf.define([(product.factors[p], sizes[p], inner)] * math.prod(sizes[:p])))
        shape = "×".join(map(str, sizes))
        if lost:
            self.warn(
                product.node,
                f"view of an axis as {shape}: only the {sizes[p]}-unit factor stays permuted, the "
                f"{', '.join(lost)}-unit {'one is' if len(lost) == 1 else 'ones are'} left unpermuted (a spec cannot "
                "permute a product of axes)",
            )
        if uf.conflicts > conflicts:
            self.warn(product.node, f"view of an axis as {shape} does not line up with its segments: units fixed")

    def _resolve_heads(self, product: _Product, head: int, inner: int) -> None:
        """Attention heads: an axis viewed as H × d (heads × units of a head) whose two factors both stay permuted
        keeps both (`_head_views` chose it): it becomes a variable of H heads (`_Headed`), one per pair of (head,
        within-head) variables, so q and k (their within-head axes joined by q·kᵀ) share one and v has its own, tied
        to theirs by the head axis."""
        uf, sizes = self.uf, product.sizes
        p = product.factors.index(head)
        key = (uf.find(head), uf.find(inner))
        var = self._headed_by_axes.get(key)
        if var is None:
            var = self._headed_by_axes[key] = uf.new()
            self.headed[var] = _Headed(head, inner, sizes[p], product.node)
            self.activation.add(var)
        rest = math.prod(sizes[p + 2 :])
        uf.union(product.var, uf.define([(var, sizes[p] * sizes[p + 1], rest)] * math.prod(sizes[:p])))

    def check_heads(self) -> None:
        """Keep a variable made of heads only where its heads can still move as one (its head variable free and
        plain, its within-head one touching no parameter, one head variable per group); else fix it, named."""
        uf, params = self.uf, self.param_roots()
        heads_of: dict[int, set[int]] = {}
        for var, info in self.headed.items():
            heads_of.setdefault(uf.find(var), set()).add(uf.find(info.head))
        for var, info in self.headed.items():
            root, head = uf.find(var), uf.find(info.head)
            if root == FIXED:
                continue
            inner = None if info.inner is None else uf.find(info.inner)
            broken = (
                root in uf.defs
                or root in uf.inter
                or head == FIXED
                or head in uf.defs
                or head in uf.inter
                or len(heads_of[root]) > 1
                or (inner is not None and (inner == FIXED or inner in params or inner in uf.defs))
            )
            if broken:  # its head and within-head axes go with it: nothing may move what no longer moves with them
                for v in (var, info.head, *([] if info.inner is None else [info.inner])):
                    uf.fix(v)
                self.warn(info.node, f"attention heads ({info.count}) cannot move as whole heads here: left unpermuted")

    def _free_units(self, var: int, units: int) -> int:
        return sum(u for v, u, _ in self.uf.leaves(var, units) if v != FIXED and u > 1)

    # helpers for rules ------------------------------------------------------------------------------------------
    def arg(self, node: fx.Node, i: int, key: str, default: Any = None) -> Any:
        if key in node.kwargs:
            return node.kwargs[key]
        return node.args[i] if len(node.args) > i else default

    def tensor_dims(self, a: Any) -> list[int]:
        return list(self.dims[a]) if _is_node(a) and self.dims.get(a) is not None else []

    def shape(self, a: Any) -> tuple[int, ...]:
        return self.shapes[a] if _is_node(a) and self.shapes.get(a) is not None else ()


def _keeps_segments(leaves: Sequence[Seg], sizes: Sequence[int], p: int) -> bool:
    """Whether keeping factor `p` of a product pairs every permuted segment of the axis whole with units of it: the
    segment's block is a multiple of the factor's and it lies within one repetition of the factor."""
    inner = math.prod(sizes[p + 1 :])
    period, offset = sizes[p] * inner, 0
    for var, units, block in leaves:
        end = offset + units * block
        if var != FIXED and units > 1 and (block % inner or offset // period != (end - 1) // period):
            return False
        offset = end
    return True


# ---- rules: each returns the output's dims ------------------------------------------------------------------------
Rule = Callable[[_Builder, fx.Node], list[int]]
TupleRule = Callable[[_Builder, fx.Node], list[list[int]]]


def _same(b: _Builder, node: fx.Node) -> list[int]:
    """Elementwise on one tensor (activations, dropout, softmax along any axis: all permutation-equivariant)."""
    return b.tensor_dims(node.args[0])


def _broadcast(b: _Builder, node: fx.Node) -> list[int]:
    """Elementwise on several tensors: right-aligned axes of equal size are one variable; an operand of size 1
    along an axis gives every unit the same value there, which any permutation keeps."""
    out_shape = b.shapes[node]
    out: list[int] = [FIXED] * len(out_shape)
    owner: list[int | None] = [None] * len(out_shape)
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
    if node.target in RESIDUAL_ADDS and _activation_operands(b, node, out_shape) >= 2:
        b.residual.update(out)
    return out


def _activation_operands(b: _Builder, node: fx.Node, shape: Sequence[int]) -> int:
    """How many operands of `node` are activations of the output's full shape (not parameters or constants)."""
    return sum(1 for a in node.args if _is_node(a) and a.op != "get_attr" and b.shapes.get(a) == tuple(shape))


def _linear_core(b: _Builder, node: fx.Node, x: Any, weight: list[int], bias: list[int] | None) -> list[int]:
    dims = b.tensor_dims(x)
    b.bind(weight[1], dims[-1])
    b.layer_inputs.append((x, dims[-1]))
    if bias is not None:
        b.join(bias[0], weight[0])
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
) -> list[int]:
    """A conv. With G groups, output block g (C_out/G channels) reads input block g alone through the weight's
    axis 1: every input block is moved by one shared permutation (the weight's axis 1 moves with it) and every
    output block by its own. With one input channel per group (depthwise, or with a channel multiplier) the input
    channels move freely and carry their output blocks along instead. The kernel mixes neighbouring positions, so
    the input's spatial axes (free where a view made a map of a permuted axis) are fixed."""
    dims = b.tensor_dims(x)
    cin, out = dims[1], weight[0]
    for k in (*weight[2:], *dims[2:]):
        b.fix(k)
    if groups == 1:
        b.bind(weight[1], cin)
        b.layer_inputs.append((x, cin))
    elif w_shape[1] == 1:
        b.fix(weight[1])
        b.join(out, b.uf.define([(cin, groups, w_shape[0] // groups)]))
        b.layer_inputs.append((x, cin))
    else:
        shared = b.uf.new()
        b.join(cin, b.uf.define([(shared, w_shape[1], 1)] * groups))
        b.bind(weight[1], shared)
        b.join(out, b.uf.define([(b.uf.new(), w_shape[0] // groups, 1) for _ in range(groups)]))
        b.layer_inputs.append((x, shared))
    if bias is not None:
        b.join(bias[0], out)
    return [dims[0], out, *([FIXED] * (len(dims) - 2))]


def _norm_core(b: _Builder, x: Any, per_channel: Sequence[list[int] | None], axes: Sequence[int]) -> list[int]:
    """Per-unit tensors (scale, shift, running stats) over the normalised axes `axes` of x."""
    dims = b.tensor_dims(x)
    for tensor in per_channel:
        if tensor is None:
            continue
        for var, axis in zip(tensor, axes):
            b.bind(var, dims[axis])
    return dims


def _module_linear(b: _Builder, node: fx.Node) -> list[int]:
    t = node.target
    return _linear_core(b, node, node.args[0], b.module_param(t, "weight"), b.module_param(t, "bias"))


def _module_conv(b: _Builder, node: fx.Node) -> list[int]:
    t = node.target
    module = b.modules[t]
    weight, bias = b.module_param(t, "weight"), b.module_param(t, "bias")
    return _conv_core(b, node, node.args[0], weight, module.weight.shape, bias, module.groups)


def _module_channel_norm(b: _Builder, node: fx.Node) -> list[int]:
    """BatchNorm / InstanceNorm: per-unit tensors on dim 1."""
    t = node.target
    tensors = [b.module_param(t, k) for k in ("weight", "bias", "running_mean", "running_var")]
    return _norm_core(b, node.args[0], tensors, [1])


def _module_layer_norm(b: _Builder, node: fx.Node) -> list[int]:
    t = node.target
    k = len(b.modules[t].normalized_shape)
    ndim = len(b.shape(node.args[0]))
    tensors = [b.module_param(t, "weight"), b.module_param(t, "bias")]
    return _norm_core(b, node.args[0], tensors, list(range(ndim - k, ndim)))


def _group_norm_core(b: _Builder, x: Any, groups: int, per_channel: Sequence[list[int] | None]) -> list[int]:
    """GroupNorm: each group of channels is normalised on its own, so each moves by its own permutation (one group,
    or one channel per group, lets the channels move freely)."""
    dims, channels = b.tensor_dims(x), b.shape(x)[1]
    if 1 < groups < channels:
        b.segments(dims[1], [channels // groups] * groups)
    return _norm_core(b, x, per_channel, [1])


def _module_group_norm(b: _Builder, node: fx.Node) -> list[int]:
    t = node.target
    tensors = [b.module_param(t, "weight"), b.module_param(t, "bias")]
    return _group_norm_core(b, node.args[0], b.modules[t].num_groups, tensors)


def _module_prelu(b: _Builder, node: fx.Node) -> list[int]:
    dims = b.tensor_dims(node.args[0])
    weight = b.module_param(node.target, "weight")
    if b.modules[node.target].num_parameters > 1:
        b.join(weight[0], dims[1])
    else:
        b.fix(weight[0])
    return dims


def _pool(b: _Builder, node: fx.Node) -> list[int]:
    """Pooling over the spatial axes: batch and channel axes pass, the spatial ones are new (windows mix neighbouring
    positions, so the input's are fixed)."""
    dims = b.tensor_dims(node.args[0])
    for d in dims[2:]:
        b.fix(d)
    return [*dims[:2], *([FIXED] * (len(b.shapes[node]) - 2))]


def _reshape(b: _Builder, node: fx.Node) -> list[int]:
    """view/reshape/flatten/squeeze/…: match input and output axes by their sizes. An axis that only moves or
    gains/loses size-1 neighbours keeps its variable; axes merged into one make it their product, one axis cut
    into several is their product (`_Builder.merged`, `_Builder.split`: C×H×W flattened is C units of H·W entries,
    attention heads H×d keep one of the two permuted); axes regrouped into others (2×6 → 3×4) are fixed, named in a
    warning where they held permuted units."""
    src = next(a for a in node.all_input_nodes if b.dims.get(a) is not None)
    dims, shape, out_shape = b.tensor_dims(src), b.shape(src), b.shapes[node]
    out: list[int] = []
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
        result = dict.fromkeys(outs, FIXED)
        if len(ins) == 1 and len(real_outs) == 1:
            result[real_outs[0]] = ins[0][0]
        elif len(ins) > 1 and len(real_outs) == 1:
            result[real_outs[0]] = b.merged(node, ins)
        elif len(ins) == 1 and len(real_outs) > 1:
            result.update(zip(real_outs, b.split(node, ins[0][0], [out_shape[k] for k in real_outs])))
        elif ins:
            if not all(b.uf.fixed(d) for d, _ in ins):
                b.warn(node, f"view regroups axes {[n for _, n in ins]} into others: their units stay unpermuted")
            for d, _ in ins:
                b.fix(d)
        out.extend(result[k] for k in outs)
    return out[: len(out_shape)]


def _reorder(fn: Callable[..., Tensor]) -> Rule:
    """permute/transpose/movedim: find where each axis goes by applying the op to a tensor of distinct sizes."""

    def rule(b: _Builder, node: fx.Node) -> list[int]:
        dims = b.tensor_dims(node.args[0])
        probe = torch.empty(tuple(range(2, len(dims) + 2)), device="meta")
        moved = fn(probe, *node.args[1:], **node.kwargs)
        return [dims[s - 2] for s in moved.shape]

    return rule


def _expand(b: _Builder, node: fx.Node) -> list[int]:
    """expand/expand_as: size-1 axes repeated (new, unpermuted); axes of unchanged size keep their variable."""
    dims, shape, out_shape = b.tensor_dims(node.args[0]), b.shape(node.args[0]), b.shapes[node]
    new = len(out_shape) - len(dims)
    return [FIXED] * new + [d if shape[i] == out_shape[new + i] else FIXED for i, d in enumerate(dims)]


def _reduce(b: _Builder, node: fx.Node) -> list[int]:
    """mean/sum/amax over axes: a reduced axis disappears (a sum over units is permutation-invariant)."""
    dims = b.tensor_dims(node.args[0])
    axes = b.arg(node, 1, "dim")
    keep = b.arg(node, 2, "keepdim", False)
    if axes is None:
        return [FIXED] * len(b.shapes[node])
    axes = {a % len(dims) for a in (axes if isinstance(axes, (list, tuple)) else [axes])}
    return [FIXED if i in axes else d for i, d in enumerate(dims) if keep or i not in axes]


def _cat(b: _Builder, node: fx.Node) -> list[int]:
    """cat along an axis: the other axes are joined; the axis itself is made of the inputs' axes, as segments."""
    parts = [p for p in b.arg(node, 0, "tensors") if _is_node(p)]
    axis = b.arg(node, 1, "dim", 0) % len(b.shapes[node])
    out = b.tensor_dims(parts[0])
    for p in parts[1:]:
        for i, d in enumerate(b.tensor_dims(p)):
            if i != axis:
                b.join(out[i], d)
    out[axis] = b.uf.define([(b.tensor_dims(p)[axis], b.shape(p)[axis], 1) for p in parts])
    return out


def _split(dim_at: int) -> TupleRule:
    """chunk/split/tensor_split/unbind along an axis: the axis is cut into consecutive segments, a variable each,
    so each part may flow into its own consumer (like cat's inputs, in reverse); unbind's parts are single units."""

    def rule(b: _Builder, node: fx.Node) -> list[list[int]]:
        dims = b.tensor_dims(node.args[0])
        axis = b.arg(node, dim_at, "dim", 0) % len(dims)
        shapes = b.element_shapes[node]
        if any(len(s) != len(dims) for s in shapes):  # unbind: the axis is gone, one unit per tensor
            slices = b.slices(dims[axis], len(shapes))
            b.fix(dims[axis])
            rest = dims[:axis] + dims[axis + 1 :]
            return [rest for _ in shapes] if slices is None else [[fresh.get(v, v) for v in rest] for fresh in slices]
        pieces = b.segments(dims[axis], [s[axis] for s in shapes])
        return [[*dims[:axis], piece, *dims[axis + 1 :]] for piece in pieces]

    return rule


def _narrow(b: _Builder, node: fx.Node) -> list[int]:
    """narrow(dim, start, length): one segment of the axis."""
    dims, shape = b.tensor_dims(node.args[0]), b.shape(node.args[0])
    axis = b.arg(node, 1, "dim") % len(dims)
    start = b.arg(node, 2, "start") % shape[axis]
    length = b.arg(node, 3, "length")
    dims[axis] = b.segments(dims[axis], [start, length, shape[axis] - start - length])[1]
    return dims


def _matmul(b: _Builder, node: fx.Node) -> list[int]:
    x, y = node.args[0], node.args[1]
    dx, dy = b.tensor_dims(x), b.tensor_dims(y)
    if len(dx) < 2 or len(dy) < 2:
        for d in (*dx, *dy):
            b.fix(d)
        return [FIXED] * len(b.shapes[node])
    b.join(dx[-1], dy[-2])  # the contracted axis: the same permutation on both sides cancels
    batch = _broadcast_dims(b, [(dx[:-2], b.shape(x)[:-2]), (dy[:-2], b.shape(y)[:-2])], b.shapes[node][:-2])
    return [*batch, dx[-2], dy[-1]]


def _broadcast_dims(b: _Builder, parts: list[tuple[list[int], tuple[int, ...]]], out_shape: Sequence[int]) -> list[int]:
    out: list[int | None] = [None] * len(out_shape)
    for dims, shape in parts:
        offset = len(out_shape) - len(dims)
        for i, d in enumerate(dims):
            if shape[i] == out_shape[offset + i]:
                if out[offset + i] is None:
                    out[offset + i] = d
                else:
                    b.join(out[offset + i], d)
    return [FIXED if d is None else d for d in out]


def _getitem(b: _Builder, node: fx.Node) -> list[int]:
    """Indexing a tensor: full slices keep an axis; a slice of step 1 is a segment of it; an integer keeps the units
    around it; tensor indices and strided slices fix the axis."""
    dims, shape = b.tensor_dims(node.args[0]), b.shape(node.args[0])
    index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    advanced = [p for p, i in enumerate(index) if _is_node(i) or isinstance(i, (list, Tensor))]
    if len(advanced) == 1 and all(i == slice(None) for p, i in enumerate(index) if p != advanced[0]):
        return _index_one_axis(b, node, dims, advanced[0])
    if advanced:
        for d in dims:
            b.fix(d)
        return [FIXED] * len(b.shapes[node])
    if Ellipsis in index:
        at = index.index(Ellipsis)
        fill = len(dims) - sum(1 for i in index if i is not None and i is not Ellipsis)
        index = (*index[:at], *([slice(None)] * fill), *index[at + 1 :])
    out: list[int] = []
    fresh: dict[int, int] = {}  # the factors of a slice of a view (q of a fused qkv), where an integer takes one
    pos = 0
    for i in index:
        if i is None:
            out.append(FIXED)
            continue
        d, n = dims[pos], shape[pos]
        if i == slice(None):
            out.append(d)
        elif isinstance(i, slice) and i.step in (None, 1):
            start, stop, _ = i.indices(n)
            stop = max(start, stop)
            out.append(b.segments(d, [start, stop - start, n - stop])[1])
        elif isinstance(i, int):
            slices = b.slices(d, n)
            if slices is not None:
                fresh = slices[i % n]
            b.segments(d, [i % n, 1, n - i % n - 1])
        else:
            b.fix(d)
            out.append(FIXED)
        pos += 1
    return [fresh.get(v, v) for v in out + dims[pos:]]


def _index_one_axis(b: _Builder, node: fx.Node, dims: list[int], axis: int) -> list[int]:
    """`t[..., idx]` with one index tensor on `axis` (a relative-position bias table looked up by position): that
    axis is fixed and replaced by the index's axes, the others keep their variables."""
    out_shape, shape = b.shapes[node], b.shape(node.args[0])
    new = len(out_shape) - len(dims) + 1
    if new < 1 or tuple(out_shape[axis + new :]) != tuple(shape[axis + 1 :]):
        return b.unpermutable(node)
    b.fix(dims[axis])
    return [*dims[:axis], *([FIXED] * new), *dims[axis + 1 :]]


def _tuple_getitem(b: _Builder, node: fx.Node) -> list[int]:
    source, index = node.args
    if source in b.elements:
        if isinstance(index, int):
            return list(b.elements[source][index])
        return b.unpermutable(node)
    if b.dims.get(source) is not None:
        return _getitem(b, node)
    return [FIXED] * len(b.shapes[node])  # an element of a tuple an unknown op returned (its inputs were fixed)


def _param_of(b: _Builder, a: Any) -> list[int] | None:
    if not _is_node(a):
        return None
    if a.op == "get_attr":
        return b.dims[a]
    b._fix_all(a)  # a weight computed in forward: it cannot be permuted with the state dict
    return None


def _f_linear(b: _Builder, node: fx.Node) -> list[int] | None:
    weight = _param_of(b, b.arg(node, 1, "weight"))
    if weight is None:
        return b.unpermutable(node)
    return _linear_core(b, node, node.args[0], weight, _param_of(b, b.arg(node, 2, "bias")))


def _f_conv(b: _Builder, node: fx.Node) -> list[int] | None:
    weight = _param_of(b, b.arg(node, 1, "weight"))
    if weight is None:
        return b.unpermutable(node)
    groups = b.arg(node, 6, "groups", 1)
    w_shape = b.shape(b.arg(node, 1, "weight"))
    return _conv_core(b, node, node.args[0], weight, w_shape, _param_of(b, b.arg(node, 2, "bias")), groups)


def _f_layer_norm(b: _Builder, node: fx.Node) -> list[int]:
    ndim = len(b.shape(node.args[0]))
    k = len(b.arg(node, 1, "normalized_shape"))
    tensors = [_param_of(b, b.arg(node, 2, "weight")), _param_of(b, b.arg(node, 3, "bias"))]
    return _norm_core(b, node.args[0], tensors, list(range(ndim - k, ndim)))


def _f_group_norm(b: _Builder, node: fx.Node) -> list[int]:
    tensors = [_param_of(b, b.arg(node, 2, "weight")), _param_of(b, b.arg(node, 3, "bias"))]
    return _group_norm_core(b, node.args[0], b.arg(node, 1, "num_groups"), tensors)


def _f_batch_norm(b: _Builder, node: fx.Node) -> list[int]:
    keys = [(1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias")]
    return _norm_core(b, node.args[0], [_param_of(b, b.arg(node, i, k)) for i, k in keys], [1])


# ---- attention --------------------------------------------------------------------------------------------------
def _scaled_dot_product_attention(b: _Builder, node: fx.Node) -> list[int]:
    """softmax(q·kᵀ)·v over [..., tokens, units]: q's and k's units share a variable (the product sums over them),
    k's and v's tokens too; the leading (batch, head) axes of q, k, v, the mask and the output are one. With fewer
    k/v heads than q heads (grouped-query attention) no head can move."""
    q, k, v = (b.arg(node, i, key) for i, key in enumerate(("query", "key", "value")))
    (dq, dk, dv), (sq, sk, sv) = (b.tensor_dims(t) for t in (q, k, v)), (b.shape(t) for t in (q, k, v))
    b.join(dq[-1], dk[-1])
    b.join(dk[-2], dv[-2])
    lead = b.shapes[node][:-2]
    batch = _broadcast_dims(b, [(dq[:-2], sq[:-2]), (dk[:-2], sk[:-2]), (dv[:-2], sv[:-2])], lead)
    if not sq[:-2] == sk[:-2] == sv[:-2]:
        for d in (*dq[:-2], *dk[:-2], *dv[:-2]):
            b.fix(d)
        batch = [FIXED] * len(lead)
    mask = b.arg(node, 3, "attn_mask")
    if _is_node(mask) and b.dims.get(mask) is not None:
        scores = (*lead, sq[-2], sk[-2])
        _broadcast_dims(b, [([*batch, dq[-2], dk[-2]], scores), (b.tensor_dims(mask), b.shape(mask))], scores)
    return [*batch, dq[-2], dv[-1]]


def _packed_attention(
    b: _Builder,
    node: fx.Node,
    inputs: Sequence[Any],
    qkv: tuple[list[int], list[int] | None],
    proj: tuple[list[int], list[int] | None],
    heads: int,
    size: int,
) -> int:
    """An attention inside one op (a module, a library function) with its q, k, v projections packed in one weight
    [3·size, E] (`qkv`: weight and bias) and an output projection (`proj`): q and k share a variable of `heads`
    heads, v has its own, tied to it by one head variable, which is returned."""
    (qkv_w, qkv_b), (proj_w, proj_b) = qkv, proj
    qk, v, head = b.attention_heads(node, heads)
    b.bind(qkv_w[0], b.uf.define([(qk, size, 1), (qk, size, 1), (v, size, 1)]))
    if qkv_b is not None:
        b.join(qkv_b[0], qkv_w[0])
    for x in dict.fromkeys(inputs):
        b.bind(qkv_w[1], b.tensor_dims(x)[-1])
        b.layer_inputs.append((x, b.tensor_dims(x)[-1]))
    b.bind(proj_w[1], v)
    if proj_b is not None:
        b.join(proj_b[0], proj_w[0])
    b.channels_last.append((str(node.target) if node.op == "call_module" else node.name, proj_w[0]))
    return head


def _module_multihead_attention(b: _Builder, node: fx.Node) -> list[list[int]]:
    """nn.MultiheadAttention (torchvision's ViT): returns (output, weights or None). Masks that differ per head, a
    bias added to k and v, or separate q/k/v weights are not followed (its axes stay unpermuted)."""
    t, module = node.target, b.modules[node.target]
    if not module._qkv_same_embed_dim or module.bias_k is not None or module.add_zero_attn:
        raise ValueError("only packed q/k/v projections without add_bias_kv/add_zero_attn are followed")
    inputs = [b.arg(node, i, key) for i, key in enumerate(("query", "key", "value"))]
    qkv = (b.module_param(t, "in_proj_weight"), b.module_param(t, "in_proj_bias"))
    proj = (b.module_param(f"{t}.out_proj", "weight"), b.module_param(f"{t}.out_proj", "bias"))
    head = _packed_attention(b, node, inputs, qkv, proj, module.num_heads, module.embed_dim)
    mask = b.arg(node, 5, "attn_mask")
    if _is_node(mask) and len(b.shape(mask)) == 3:  # one mask per (sample, head): heads cannot move
        b.fix(head)
    dims = b.tensor_dims(inputs[0])
    out: list[list[int]] = [[*dims[:-1], proj[0][0]]]
    for shape in b.element_shapes[node][1:]:
        out.append([] if shape is None else [FIXED, head, FIXED, FIXED] if len(shape) == 4 else [FIXED] * len(shape))
    return out


def _shifted_window_attention(b: _Builder, node: fx.Node) -> list[int]:
    """torchvision's Swin attention (`shifted_window_attention`, kept whole by fx): channels-last maps in and out, a
    packed qkv weight, a relative-position bias [1, heads, N, N] and, in V2, a logit scale [heads, 1, 1]: both move
    with the heads. Windows and shifts move positions, never channels: the spatial axes are fixed."""
    keys = ("input", "qkv_weight", "proj_weight", "relative_position_bias", "window_size", "num_heads", "shift_size",
            "attention_dropout", "dropout", "qkv_bias", "proj_bias", "logit_scale")  # fmt: skip
    arg = {key: b.arg(node, i, key) for i, key in enumerate(keys)}
    x = arg["input"]
    qkv = (_param_of(b, arg["qkv_weight"]), _param_of(b, arg["qkv_bias"]))
    proj = (_param_of(b, arg["proj_weight"]), _param_of(b, arg["proj_bias"]))
    if qkv[0] is None or proj[0] is None:
        return b.unpermutable(node)
    heads = arg["num_heads"]
    head = _packed_attention(b, node, [x], qkv, proj, heads, b.shape(arg["qkv_weight"])[0] // 3)
    for per_head, axis in ((arg["relative_position_bias"], 1), (arg["logit_scale"], 0)):
        if _is_node(per_head) and b.dims.get(per_head) is not None:
            dims = b.tensor_dims(per_head)
            for i, d in enumerate(dims):
                b.join(d, head) if i == axis and b.shape(per_head)[i] == heads else b.fix(d)
    dims = b.tensor_dims(x)
    for d in dims[1:-1]:
        b.fix(d)
    return [*dims[:-1], proj[0][0]]


def _relative_position_bias(b: _Builder, node: fx.Node) -> list[int]:
    """torchvision's `_get_relative_position_bias(table [positions, heads], index, window)` -> [1, heads, N, N]."""
    table, shape = b.tensor_dims(node.args[0]), b.shapes[node]
    if len(shape) != 4 or len(table) != 2 or b.shape(node.args[0])[1] != shape[1]:
        return b.unpermutable(node)
    b.fix(table[0])
    return [FIXED, table[1], FIXED, FIXED]


def _patch_merging_pad(b: _Builder, node: fx.Node) -> list[int]:
    """torchvision's Swin `_patch_merging_pad`: [..., H, W, C] -> [..., H/2, W/2, 4·C], the four 2×2 neighbours'
    channels side by side (each a copy of the input's channels)."""
    dims, shape = b.tensor_dims(node.args[0]), b.shape(node.args[0])
    for d in dims[-3:-1]:
        b.fix(d)
    return [*dims[:-3], FIXED, FIXED, b.uf.define([(dims[-1], shape[-1], 1)] * 4)]


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
    torch.narrow: _narrow,
    torch.matmul: _matmul,
    operator.matmul: _matmul,
    torch.bmm: _matmul,
    operator.getitem: _tuple_getitem,
    F.linear: _f_linear,
    F.conv1d: _f_conv,
    F.conv2d: _f_conv,
    F.conv3d: _f_conv,
    F.layer_norm: _f_layer_norm,
    F.group_norm: _f_group_norm,
    F.batch_norm: _f_batch_norm,
    F.scaled_dot_product_attention: _scaled_dot_product_attention,
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
    "narrow": _narrow,
    "matmul": _matmul,
    "expand": _expand,
    "expand_as": _expand,
}
# ops that return several tensors (their `dim` argument's position)
TUPLE_FUNCTION_RULES: dict[Any, TupleRule] = {
    torch.chunk: _split(2),
    torch.split: _split(2),
    torch.tensor_split: _split(2),
    torch.unbind: _split(1),
}
TUPLE_MODULE_RULES: dict[type, TupleRule] = {nn.MultiheadAttention: _module_multihead_attention}
TUPLE_METHOD_RULES: dict[str, TupleRule] = {
    "chunk": _split(2),
    "split": _split(2),
    "tensor_split": _split(2),
    "unbind": _split(1),
}
# functions of vision libraries that fx keeps whole (`torch.fx.wrap`), known by name so the core imports none of
# them: torchvision's stochastic depth scales whole samples, so each keeps its input's axes; its Swin's attention,
# relative-position bias and patch-merging padding
NAMED_FUNCTION_RULES: dict[str, Rule] = {
    "stochastic_depth": _same,
    "drop_path": _same,
    "shifted_window_attention": _shifted_window_attention,
    "_get_relative_position_bias": _relative_position_bias,
    "_patch_merging_pad": _patch_merging_pad,
}
# a sum of two activations of one shape: a residual stream (`PermutationSpec.residual`)
RESIDUAL_ADDS = (operator.add, operator.iadd, torch.add, "add", "add_")
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
    # traced in eval mode: a drop path written as `if self.training: x * rand(...)` is then the identity it is at
    # inference, not random ops that would cut the residual stream it sits on
    with evaluating(model):
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
    state = model.state_dict(keep_vars=True)
    names: dict[int, str] = {}
    for name, tensor in state.items():
        names.setdefault(id(tensor), name)
    builder = _Builder(gm, recorder, names)
    builder.run()
    spec, roots = _assemble(builder, state)
    channels_last = [name for name, var in builder.channels_last if roots & set(builder.uf.leaf_roots(var))]
    return TracedSpec(spec, builder.warnings, channels_last, time.perf_counter() - start)


def _assemble(b: _Builder, state: dict[str, Tensor]) -> tuple[PermutationSpec, set[int]]:
    """Undefined classes with an activation axis, not FIXED, wider than one unit, become groups; each is named after
    the module whose output axis holds it (first in state-dict order; `[start:stop]` where it is a segment of that
    axis), so names read like the hand-written ones. A parameter axis whose variable is defined becomes parts."""
    active = {r for v in b.activation for r in b.uf.leaf_roots(v)} - {FIXED}
    leaves = _param_leaves(b, state)
    group_names: dict[int, str] = {}
    labels: set[str] = set()
    for producer_only in (True, False):
        for name, per_axis in leaves.items():
            for axis, placed in enumerate(per_axis):
                if producer_only and axis != 0:
                    continue
                for var, units, block, offset, step in placed:
                    if var in active and units > 1 and var not in group_names:
                        label = name.rsplit(".", 1)[0] if axis == 0 and "." in name else f"{name}:{axis}"
                        end = offset + (units - 1) * step * block + block
                        label += f"[{offset}:{end}{'' if step == 1 else f':{step}'}]" if len(placed) > 1 else ""
                        while label in labels:
                            label += "'"
                        group_names[var] = label
                        labels.add(label)
    axes: dict[str, tuple[str | None, ...]] = {}
    parts: dict[str, dict[int, tuple[Part, ...]]] = {}
    for name, per_axis in leaves.items():
        groups: list[str | None] = []
        for axis, placed in enumerate(per_axis):
            found = _parts(placed, group_names)
            plain = len(found) == 1 and found[0].block == 1 and not found[0].stride
            groups.append(found[0].group if plain else None)
            if not plain and any(p.group is not None for p in found):
                parts.setdefault(name, {})[axis] = found
        axes[name] = tuple(groups)
    probes: dict[str, list[str]] = {}
    for node, var in b.layer_inputs:
        for root in dict.fromkeys(b.uf.leaf_roots(var)):
            if root not in group_names:
                continue
            probe = _probe_for(b, node, root)
            found = probes.setdefault(group_names[root], [])
            if probe is not None and probe not in found:
                found.append(probe)
    unprobed = {root: name for root, name in group_names.items() if not probes.get(name)}
    for node in b.gm.graph.nodes:  # no layer input reachable: the last single-use module of each chain holding it
        for root, (name, view) in _held_groups(b, node).items():
            if root in unprobed and not any(root in _held_groups(b, user) for user in node.users):
                probes.setdefault(unprobed[root], []).append(name)
                b.probe_views[name] = view
    probes_found = {g: tuple(p) for g, p in probes.items() if p}
    used = {p for found in probes_found.values() for p in found}
    views = {p: view for p, view in b.probe_views.items() if p in used and view != ProbeView()}
    spec = PermutationSpec(
        axes=axes,
        probes=probes_found,
        parts=parts,
        probe_views=views,
        heads=_heads(b, group_names),
        residual=_residual(b, group_names),
    )
    return spec, set(group_names)


def _residual(b: _Builder, group_names: dict[int, str]) -> tuple[str, ...]:
    roots = (r for v in b.residual for r in b.uf.leaf_roots(v))
    return tuple(dict.fromkeys(group_names[r] for r in roots if r in group_names))


def _heads(b: _Builder, group_names: dict[int, str]) -> dict[str, Heads]:
    """The groups made of heads, each tied to the others of its head variable: by that variable's group where it is
    one (a head-indexed bias), else by a name made from the tie's first group."""
    out: dict[str, Heads] = {}
    ties: dict[int, str] = {}
    for var, info in b.headed.items():
        root, head = b.uf.find(var), b.uf.find(info.head)
        if root in group_names:
            tie = group_names.get(head) or ties.setdefault(head, f"{group_names[root]}:heads")
            out[group_names[root]] = Heads(tie, info.count)
    return out


def _param_leaves(b: _Builder, state: dict[str, Tensor]) -> dict[str, list[list[Placed]]]:
    """Every state tensor's axes as placed leaves (one FIXED leaf for a tensor the graph never read). A variable
    whose segments do not add up to its axis's size (a rule's mistake), or that no part can place, is fixed and
    named in a warning, never turned into a wrong spec."""
    while True:
        out: dict[str, list[list[Placed]]] = {}
        wrong: list[int] = []
        for name, tensor in state.items():
            variables = b.param_vars.get(b.names.get(id(tensor), name))
            axes = [
                [(FIXED, n, 1, 0, 1)] if variables is None else b.uf.placed(variables[axis], n)
                for axis, n in enumerate(tensor.shape)
            ]
            wrong = [
                ax
                for ax, leaves in enumerate(axes)
                if leaves is None or sum(u * k for _, u, k, _, _ in leaves) != tensor.shape[ax]
            ]
            if wrong:
                break
            out[name] = axes
        else:
            return out
        b.uf.fix(variables[wrong[0]])
        b.warnings.append(f"{name} axis {wrong[0]}: its traced segments do not add up to its size: left unpermuted")


def _parts(leaves: Sequence[Placed], group_names: dict[int, str]) -> tuple[Part, ...]:
    """An axis's placed leaves as the spec's parts: each group at its offset (a stride where interleaved), runs of
    unpermuted entries in a row as one part."""
    out: list[Part] = []
    for var, units, block, offset, step in leaves:
        group = group_names.get(var) if units > 1 else None
        stride = 0 if step == 1 else step
        if group is not None:
            out.append(Part(group, offset, units, block, stride))
        elif stride:
            out.append(Part(None, offset, units * block, 1, stride))
        elif out and out[-1].group is None and not out[-1].stride and out[-1].offset + out[-1].size == offset:
            out[-1] = Part(None, out[-1].offset, out[-1].units + units * block)
        else:
            out.append(Part(None, offset, units * block))
    return tuple(out)


def _held_groups(b: _Builder, node: fx.Node) -> dict[int, tuple[str, ProbeView]]:
    """{group root: (probe name, view)} of the units a single-use module's output holds where activation statistics
    can read them: dim 1 (channels-first maps, [N, C] features) and the last dim (channels-last maps, tokens
    [N, T, D]), with any other axis that holds a permuted group averaged out; a group that is a segment of such an
    axis (a grouped conv's block, a chunk) is read from its slice by a probe `module[start:stop]`."""
    if node.op != "call_module" or b.calls[node.target] != 1 or isinstance(b.modules[node.target], LOOK_THROUGH):
        return {}
    dims, shape = b.dims.get(node) or [], b.shape(node)
    permuted = [i for i, d in enumerate(dims) if i > 0 and not b.uf.fixed(d)]
    held: dict[int, tuple[str, ProbeView]] = {}
    for axis in (1, len(dims) - 1) if len(dims) > 2 else (1,) if len(dims) == 2 else ():
        if axis not in permuted:
            continue
        at, pooled = axis if axis == 1 else -1, tuple(i - len(dims) for i in permuted if i != axis)
        leaves = b.uf.leaves(dims[axis], shape[axis])
        offset = 0
        for var, units, block in leaves:
            if var != FIXED and block == 1:
                if len(leaves) == 1:
                    held.setdefault(var, (node.target, ProbeView(at, pooled)))
                else:
                    view = ProbeView(at, pooled, (offset, offset + units))
                    held.setdefault(var, (f"{node.target}[{offset}:{offset + units}]", view))
            offset += units * block
    return held


def _probe_for(b: _Builder, node: fx.Node, root: int) -> str | None:
    """The nearest single-use module upstream of `node` (through one-input ops and pooling) whose output holds the
    group `root` (its view noted in `probe_views`), where activation statistics read units; None where a residual
    add comes first."""
    while True:
        held = _held_groups(b, node)
        if root in held:
            name, view = held[root]
            b.probe_views[name] = view
            return name
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
