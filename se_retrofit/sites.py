"""Analysis: find the residual additions in one module's graph and decide where SE goes.

This module only reads graphs; ``rewrite`` changes them. An addition is a residual when it sums a
branch that does the block's work (a convolution and a non-linearity, or an op not known to be
linear) with a shortcut that is the branch's own input, a linear projection of it (conv + norm,
pooling) or a tensor the caller handed in. A sum of several light parallel convolutions from one input (RepVGG,
MobileOne) is a multi-branch block: it gets one SE after the sum. Such a linear sum (arms without an
activation: convolutions, norms, pooling, an identity) that lies on another unit's residual branch is
one layer of that unit and is left alone: SE goes at the end of the unit's branch, as in
SE-ResNet (`nesting` does the same when the sum is in a child module). Everything else (token and
channels-last adds, partial-channel adds, fusions of separate inputs) is reported with a reason.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.fx as fx
from torch import nn

from . import catalog
from .compiled import is_compiled, is_linear
from .layout import Layout, expects_channel_first, merge_layouts
from .mutation import moved_read_problem
from .se_block import SEBlock


@dataclass
class Placement:
    """Where one SE block goes in one graph; node names refer to that graph."""

    add: str
    kind: str                 # "residual" or "multi-branch"
    shortcut: str             # "identity", "projection", "activation", "argument" or "none"
    channels: int
    spatial_dims: int
    after: str                # the SE block takes this node's value...
    consumers: tuple[str, ...] | None  # ...and replaces it in these nodes (None: in every user)
    branch: frozenset[str] = field(default=frozenset(), compare=False, repr=False)  # residual: its branch's nodes
    linear: bool = field(default=False, compare=False)  # no summed branch has an activation (see `_outside_units`)

    def signature(self) -> tuple:
        return (self.kind, self.shortcut, self.channels, self.spatial_dims)


@dataclass
class Rejection:
    add: str
    reason: str
    branch: frozenset[str] = field(default=frozenset(), compare=False, repr=False)  # a residual unit's branch nodes


NESTED_REASON = ("linear sum on a residual branch (parallel arms without an activation, RepVGG-style): a layer of "
                 "that residual unit; SE goes at the end of the unit's branch, not inside it")


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return tuple(shape) if shape is not None else None


def is_add(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in catalog.ADD_FUNCTIONS
    return node.op == "call_method" and node.target in catalog.ADD_METHODS


def add_operands(node: fx.Node) -> list[fx.Node] | None:
    """The two tensor operands of an addition, or None when one is a Python number."""
    ops = list(node.args[:2])
    if len(ops) < 2 and "other" in node.kwargs:
        ops.append(node.kwargs["other"])
    if len(ops) != 2 or not all(isinstance(o, fx.Node) and _shape(o) is not None for o in ops):
        return None
    return ops


def tensor_adds(graph: fx.Graph) -> list[fx.Node]:
    """Additions of two graph values (whatever their shapes); additions of constants are not listed."""
    return [n for n in graph.nodes if is_add(n)
            and sum(isinstance(a, fx.Node) for a in list(n.args[:2]) + [n.kwargs.get("other")]) == 2]


class _Graph:
    """Per-graph facts the classification needs, computed once."""

    def __init__(self, graph: fx.Graph, owner: nn.Module, layouts: dict[fx.Node, Layout | None],
                 param_names: Iterable[str], ancestors: bool = True) -> None:
        self.graph = graph
        self.owner = owner
        self.layouts = layouts
        self.param_names = set(param_names)
        self.ancestors: dict[fx.Node, frozenset[fx.Node]] = {}
        self.input_dependent: dict[fx.Node, bool] = {}
        for node in graph.nodes:
            parents = node.all_input_nodes
            if ancestors:
                anc = {node}
                for p in parents:
                    anc |= self.ancestors[p]
                self.ancestors[node] = frozenset(anc)
            self.input_dependent[node] = node.op == "placeholder" or any(self.input_dependent[p] for p in parents)

    def module(self, node: fx.Node) -> nn.Module | None:
        return self.owner.get_submodule(node.target) if node.op == "call_module" else None

    def name(self, node: fx.Node) -> str:
        return catalog.target_name(node.target)

    def is_constant(self, node: fx.Node) -> bool:
        return not self.input_dependent[node]

    def tensor_input(self, node: fx.Node) -> fx.Node | None:
        """The one input-dependent operand of a unary-like op, or None if there is not exactly one."""
        deps = [a for a in node.all_input_nodes if self.input_dependent[a]]
        return deps[0] if len(deps) == 1 else None

    def is_passthrough(self, node: fx.Node) -> bool:
        """Ops that may trail a residual branch and that SE goes before: drop-path, dropout, layer scale."""
        if node.op == "call_module":
            m = self.module(node)
            return catalog.is_path_drop(m) or catalog.is_layer_scale(m)
        if node.op in ("call_function", "call_method"):
            name = self.name(node)
            if catalog.is_path_drop_function_name(name):
                return self.tensor_input(node) is not None
            if node.target in catalog.MUL_FUNCTIONS or (node.op == "call_method" and name in catalog.MUL_METHODS) \
                    or name in ("div", "truediv"):
                return self.tensor_input(node) is not None
        return False

    def is_sliced(self, node: fx.Node) -> bool:
        """Is ``node`` (looked at through elementwise ops) a slice of a larger tensor along some axis?"""
        seen = 0
        while seen < 16:
            seen += 1
            name = self.name(node)
            if node.op in ("call_function", "call_method"):
                if name == "getitem" or name in catalog.SLICE_FUNCTION_NAMES:
                    src = node.args[0] if node.args else None
                    if not isinstance(src, fx.Node):
                        return False
                    if self.name(src) in catalog.SLICE_FUNCTION_NAMES:
                        return True
                    return _shape(src) is not None and not self.crops_only(node, src)
                if catalog.is_elementwise_function_name(name) or self.is_passthrough(node):
                    nxt = self.tensor_input(node)
                    if nxt is None:
                        return False
                    node = nxt
                    continue
            if node.op == "call_module" and catalog.is_elementwise_leaf(self.module(node)):
                nxt = self.tensor_input(node)
                if nxt is None:
                    return False
                node = nxt
                continue
            return False
        return False

    def crops_only(self, node: fx.Node, src: fx.Node) -> bool:
        """Whether indexing ``src`` (``x[:, :, :-pad]``, a causal convolution's trim) keeps every channel of
        a map whose channel axis is known: a crop, after which the operand is still a whole feature map."""
        lay = self.layouts.get(src)
        shape = _shape(src)
        if lay is None or shape is None or lay.ndim != len(shape) or self.name(node) != "getitem":
            return False
        index = node.args[1] if len(node.args) > 1 else None
        index = index if isinstance(index, tuple) else (index,)
        if any(i is Ellipsis for i in index):
            cut = index.index(Ellipsis)
            index = index[:cut] + (slice(None),) * (len(shape) - len(index) + 1) + index[cut + 1:]
        if not all(isinstance(i, slice) for i in index):  # an int, None or tensor index changes the axes
            return False
        return lay.axis >= len(index) or index[lay.axis] == slice(None)

    def convs(self, nodes: Iterable[fx.Node]) -> int:
        total = 0
        for n in nodes:
            if n.op == "call_module":
                total += catalog.count_convs(self.module(n))
            elif n.op == "call_function" and n.target in catalog.CONV_FUNCTIONS:
                total += 1
        return total

    def is_light(self, nodes: Iterable[fx.Node], depth: int = 0) -> bool:
        """No activation and no unknown op: a projection (conv + norm, pooling, identity, scaling)."""
        for n in nodes:
            if n.op in ("placeholder", "get_attr", "output") or self.is_constant(n):
                continue
            if n.op == "call_module":
                if not light_module(self.module(n), depth):
                    return False
                continue
            name = self.name(n)
            if n.target in catalog.CONV_FUNCTIONS or is_add(n) or self.is_passthrough(n):
                continue
            if name in _LINEAR_FUNCTIONS:
                continue
            if name == "getattr" and len(n.args) == 2 and n.args[1] in _METADATA:  # x.shape: not a value of the map
                continue
            return False
        return True

    def holds_activation(self, nodes: Iterable[fx.Node], depth: int = 0) -> bool:
        """An activation among ``nodes``, a module's or a function: what makes a shortcut without a
        convolution (``F.relu(x) + branch(x)``) no linear map of the input."""
        for n in nodes:
            if n.op == "call_module" and activation_module(self.module(n), depth):
                return True
            if n.op in ("call_function", "call_method") and catalog.is_activation_function_name(self.name(n)):
                return True
        return False

    def attention_in(self, nodes: Iterable[fx.Node]) -> str | None:
        """A description of channel attention among ``nodes`` (a module, or a functional gate), if any."""
        for n in nodes:
            if n.op == "call_module":
                m = self.module(n)
                inner = catalog.find_channel_attention(m)
                if inner is not None:
                    where = f"{n.target}.{inner}" if inner else n.target
                    return f"{type(m.get_submodule(inner) if inner else m).__name__} at '{where}'"
            elif n.target in catalog.MUL_FUNCTIONS or (n.op == "call_method" and self.name(n) in catalog.MUL_METHODS):
                shapes = [(_shape(a), a) for a in n.args[:2] if isinstance(a, fx.Node)]
                if len(shapes) == 2 and all(s is not None for s, _ in shapes):
                    (sa, a), (sb, b) = shapes
                    for big, small, small_node in ((sa, sb, b), (sb, sa, a)):
                        if len(big) >= 3 and len(small) == len(big) and small[:2] == big[:2] and \
                                all(d == 1 for d in small[2:]) and any(d > 1 for d in big[2:]) and \
                                not self.is_constant(small_node):
                            return f"a channel gate (multiplication at node '{n.name}')"
        return None


# Functions and methods that are linear maps of the map (or read only its shape), as the linear leaves
# are: pooling, resizing, padding, normalisation, splitting and joining, layout. An FPN's or a helper's
# ``F.group_norm`` is as linear here as an ``nn.GroupNorm`` leaf.
_LINEAR_FUNCTIONS = {
    "avg_pool1d", "avg_pool2d", "avg_pool3d", "max_pool1d", "max_pool2d", "max_pool3d", "adaptive_avg_pool1d",
    "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d",
    "interpolate", "pad", "getitem", "contiguous", "batch_norm", "group_norm", "layer_norm", "instance_norm",
    "cat", "split", "chunk", "permute", "to", "float", "size", "dim",
}
_MAX_LIGHT_DEPTH = 4
_METADATA = {"shape", "ndim", "dtype", "device", "is_cuda", "layout", "requires_grad"}


def light_module(module: nn.Module, depth: int = 0) -> bool:
    """Whether ``module`` is a linear map of its input: no activation and no unknown op, in its leaves and
    in the forwards of the modules that hold them, which can call functions no leaf shows (a
    ``ConvBNReLU`` helper whose forward calls ``F.relu``). A forward fx cannot trace, or nested deeper
    than a few levels, counts as not linear: an unknown op. A TorchScript module's compiled graph tells."""
    if is_compiled(module):
        return is_linear(module)
    if not catalog.is_light_module(module):
        return False
    if catalog.is_leaf_like(module):
        return True
    if depth >= _MAX_LIGHT_DEPTH:
        return False
    if type(module) is nn.Sequential:
        return all(light_module(child, depth + 1) for child in module)
    g = _forward_graph(module)
    # only what the output is computed from: a shape check (``_assert(x.ndim == 4)``) is not an op on the map
    return g is not None and g.is_light(_output_ancestors(g.graph), depth + 1)


def _forward_graph(module: nn.Module) -> _Graph | None:
    """The traced forward of a module of the user's, to look into; None where fx cannot trace it."""
    from .tracing import TraceFailure, cached_trace

    try:
        graph, _ = cached_trace(module)
    except TraceFailure:
        return None
    return _Graph(graph, module, {}, (), ancestors=False)


def activation_module(module: nn.Module, depth: int = 0) -> bool:
    """Whether ``module`` holds an activation: a leaf of it, or a function the forward of a module of the
    user's calls (as in `light_module`). A forward fx cannot trace, or nested deeper than a few levels,
    is not looked into."""
    if any(catalog.is_activation(m) for m in module.modules()):
        return True
    if depth >= _MAX_LIGHT_DEPTH:
        return False
    if type(module) is nn.Sequential:
        return any(activation_module(child, depth + 1) for child in module)
    if type(module).__module__.startswith("torch."):  # torch's layers but its activations call none
        return False
    g = _forward_graph(module)
    return g is not None and g.holds_activation(_output_ancestors(g.graph), depth + 1)


def _output_ancestors(graph: fx.Graph) -> list[fx.Node]:
    seen: set[fx.Node] = set()
    todo = [n for n in graph.nodes if n.op == "output"]
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(node.all_input_nodes)
    return [n for n in graph.nodes if n in seen]


def _group_terms(g: _Graph, add: fx.Node, adds: set[fx.Node], inner: set[fx.Node]) -> list[fx.Node] | None:
    """The operands of a tree of additions rooted at ``add`` (``a + b + c``), or None if not all tensors."""
    operands = add_operands(add)
    if operands is None:
        return None
    # A sum that adds a constant (``x + branch(x) + self.beta``) is not one group: merged, the residual
    # ``x + branch(x)`` inside it would be rejected with the constant and vanish from the plan.
    merge = not _adds_constant(g, operands)
    terms: list[fx.Node] = []
    for op in operands:
        probe = op
        while g.is_passthrough(probe) and len(probe.users) == 1 and g.tensor_input(probe) is not None:
            probe = g.tensor_input(probe)
        if merge and probe in adds and len(probe.users) == 1 and not _adds_constant(g, add_operands(probe) or []):
            sub = _group_terms(g, probe, adds, inner)
            if sub is not None:
                inner.add(probe)
                terms.extend(sub)
                continue
        terms.append(op)
    return terms


def _adds_constant(g: _Graph, operands: list[fx.Node]) -> bool:
    return any(g.is_constant(op) for op in operands)


def _consumer(term: fx.Node, group: list[fx.Node]) -> fx.Node:
    """The node of the group that reads ``term`` (an addition, or a drop-path in front of one)."""
    for user in term.users:
        if user in group:
            return user
    return next(iter(term.users))


def analyze(graph: fx.Graph, owner: nn.Module, layouts: dict[fx.Node, Layout | None], position: str,
            param_names: Iterable[str]) -> tuple[list[Placement], list[Rejection]]:
    """Placements for every residual or multi-branch sum of ``graph``, and the reasons for the other adds.

    ``graph`` must carry ``tensor_meta`` (shape propagation) on its nodes.
    """
    g = _Graph(graph, owner, layouts, param_names)
    adds = [n for n in graph.nodes if is_add(n) and add_operands(n) is not None]
    add_set = set(adds)
    inner: set[fx.Node] = set()
    groups: dict[fx.Node, list[fx.Node]] = {}
    for add in reversed(adds):
        if add in inner:
            continue
        terms = _group_terms(g, add, add_set, inner)
        if terms is not None:
            groups[add] = terms
    placements: list[Placement] = []
    rejections: list[Rejection] = []
    for add in adds:
        if add in inner or add not in groups:
            continue
        result = _classify(g, add, groups[add], position)
        if isinstance(result, Placement):
            problem = _in_place_problem(g, result)
            if problem:
                result = Rejection(add.name, problem, result.branch)
        (placements if isinstance(result, Placement) else rejections).append(result)
    return _outside_units(graph, placements, rejections)


def _outside_units(graph: fx.Graph, placements: list[Placement], rejections: list[Rejection]
                   ) -> tuple[list[Placement], list[Rejection]]:
    """Reject linear sums that lie on the branch of a residual unit of the same graph.

    SE-ResNet gates each residual unit once; a RepVGG-style sum inside the unit is one of its layers.
    Every residual unit counts: one that gets SE, one that already has channel attention (so a second
    ``apply`` adds nothing there), and one that cannot take SE here (unknown channel axis, no place
    for the chosen position, an in-place write): its layers do not become units in its stead.
    """
    branches = [p.branch for p in placements] + [r.branch for r in rejections]
    inside = [p for p in placements if p.linear and any(p.add in b for b in branches)]
    if not inside:
        return placements, rejections
    order = {n.name: i for i, n in enumerate(graph.nodes)}
    rejections = sorted(rejections + [Rejection(p.add, NESTED_REASON) for p in inside], key=lambda r: order[r.add])
    return [p for p in placements if p not in inside], rejections


def _in_place_problem(g: _Graph, placement: Placement) -> str | None:
    """Why an in-place write keeps SE from reading ``placement.after`` and feeding its consumers (`mutation`)."""
    nodes = {n.name: n for n in g.graph.nodes}
    source = nodes[placement.after]
    readers = list(source.users) if placement.consumers is None else [nodes[c] for c in placement.consumers]
    if not readers:  # out.add_(x) with its result unused: the sum is read through `out`, not through the add
        return f"nothing reads the value of '{source.name}' (the sum of an in-place add is read through its target)"
    return moved_read_problem(g.graph, g.owner, source, readers)


def _group_nodes(g: _Graph, add: fx.Node, terms: list[fx.Node]) -> list[fx.Node]:
    """The additions and pass-through ops between the terms and the group's final addition."""
    anc_add = g.ancestors[add]
    term_anc = frozenset().union(*(g.ancestors[t] for t in terms))
    return [n for n in anc_add if n not in term_anc]


def _classify(g: _Graph, add: fx.Node, terms: list[fx.Node], position: str) -> Placement | Rejection:
    out_shape = _shape(add)
    shapes = [_shape(t) for t in terms]
    if out_shape is None or len(out_shape) < 3:
        return Rejection(add.name, f"not a feature map (output shape {out_shape})")
    if any(g.is_constant(t) for t in terms):  # at batch 1 a (1, C, H, W) parameter has the map's shape
        return Rejection(add.name, "adds a constant (a parameter or buffer: a position embedding, a bias), "
                                   "not a branch and its shortcut")
    if any(s != out_shape for s in shapes):
        return Rejection(add.name, f"broadcasting add of shapes {', '.join(str(list(s)) for s in shapes)}")
    group = _group_nodes(g, add, terms)
    anc = [g.ancestors[t] for t in terms]
    exclusive: list[set[fx.Node]] = []
    identity: list[bool] = []
    for i, t in enumerate(terms):
        others = frozenset().union(*(a for j, a in enumerate(anc) if j != i))
        excl = set(anc[i] - others)
        exclusive.append(excl)
        identity.append(t in others)
    for i, t in enumerate(terms):
        if t.op == "placeholder" and t.target not in g.param_names and not identity[i]:
            return Rejection(add.name, "sums separate inputs of a list argument (multi-input fusion, not a residual)")
    convs = [g.convs(e) for e in exclusive]
    light = [g.is_light(e) for e in exclusive]
    # A term with a convolution is "heavy" (a residual branch doing work) when it holds a non-linearity
    # or an op not known to be linear; a purely linear one (conv + norm, even two of them as in
    # GhostNet's strided shortcut) is a projection, or one arm of a re-parameterisable block.
    heavy = [i for i in range(len(terms)) if convs[i] >= 1 and not light[i]]
    light_conv = [i for i in range(len(terms)) if convs[i] >= 1 and light[i]]
    zero = [i for i in range(len(terms)) if convs[i] == 0]
    # only a sum with a convolution could have been a unit: without one, a slice (Swin's crop of its window
    # padding, a class token cut off) is not why it is left alone, and siblings without it get the same reason
    if (heavy or light_conv) and any(g.is_sliced(t) for t in terms):
        return Rejection(add.name, "partial add (an operand is a slice of a larger tensor: a channel split or a crop)")
    if len(heavy) >= 2:
        # an SE block already on one operand (apply after position="identity") is the reason that matters
        return _attention_rejection(g, add, exclusive, group) or \
            Rejection(add.name, f"{len(heavy)} operands carry work (no single residual branch)")
    if not heavy and not light_conv:
        lay = g.layouts.get(add)
        if lay is not None and lay.axis != 1:
            return Rejection(add.name, f"channels-last layout (channel axis {lay.axis} of {lay.ndim})")
        return Rejection(add.name, "no convolution on any operand (token or MLP residual)")
    if heavy or (len(light_conv) == 1 and zero):
        branch = heavy[0] if heavy else light_conv[0]
        if not heavy and _separate_inputs(g, terms, branch):
            return Rejection(add.name, "sums a linear projection of one input and another input (a fusion of "
                                       "two inputs, as in a feature pyramid; not a residual)")
        result = _residual(g, add, terms, exclusive, identity, branch, group, position)
        # a residual unit owns the layers on its branch whether or not it can take SE (see `_outside_units`)
        result.branch = result.branch | frozenset(n.name for n in exclusive[branch])
        if isinstance(result, Placement):
            result.linear = not heavy
        return result
    if len(light_conv) >= 2:
        return _multi_branch(g, add, terms, exclusive, group, position)
    return Rejection(add.name, "no branch with a convolution")


def _separate_inputs(g: _Graph, terms: list[fx.Node], branch: int) -> bool:
    """Whether a linear branch (one convolution: an FPN's lateral) and every other operand read disjoint
    inputs of the module: ``lateral(c4) + upsample(p5)`` fuses two levels; a residual's shortcut is the
    branch's own input or one derived from it (DLA hands it in, but its branch does work of its own)."""
    def inputs(node: fx.Node) -> set[fx.Node]:
        return {a for a in g.ancestors[node] if a.op == "placeholder"}

    mine = inputs(terms[branch])
    return bool(mine) and all(not (inputs(t) & mine) and inputs(t) for i, t in enumerate(terms) if i != branch)


def _layout_problem(lay: Layout | None) -> str | None:
    if lay is None:
        return "channel axis unknown (no convolution fixes it on the branch)"
    if lay.axis != 1:
        return f"channels-last layout (channel axis {lay.axis} of {lay.ndim})"
    if not lay.from_conv:
        return "channel axis not fixed by a convolution"
    return None


def _downstream(g: _Graph, node: fx.Node, limit: int = 3) -> list[fx.Node]:
    out = []
    while len(out) < limit and len(node.users) == 1:
        node = next(iter(node.users))
        if node.op == "output" or is_add(node):
            break
        out.append(node)
    return out


def _past_constant_adds(g: _Graph, add: fx.Node) -> fx.Node:
    """The last of the additions of a constant (a learned bias: ``x + branch(x) + self.beta``) that take
    ``add``'s sum alone and keep its shape: part of the sum for position ``"post"``, which goes after it."""
    node = add
    while len(node.users) == 1:
        user = next(iter(node.users))
        operands = add_operands(user) if is_add(user) else None
        if (operands is None or len(operands) != 2 or node not in operands or _shape(user) != _shape(add)
                or not _adds_constant(g, [op for op in operands if op is not node])):
            break
        node = user
    return node


def _activation_after(g: _Graph, node: fx.Node) -> fx.Node | None:
    if len(node.users) != 1:
        return None
    user = next(iter(node.users))
    if user.op == "call_module" and catalog.is_activation(g.module(user)):
        return user
    if user.op in ("call_function", "call_method") and catalog.is_activation_function_name(g.name(user)):
        return user
    return None


def _fork_of(g: _Graph, nodes: set[fx.Node]) -> tuple[fx.Node, tuple[str, ...]] | str:
    """The one input value the given (branch) nodes read from outside themselves, and its readers."""
    sources: dict[fx.Node, list[str]] = {}
    nodes = {n for n in nodes if n.op != "placeholder"}  # an input of the module is a branch input, not work
    for n in nodes:
        for a in n.all_input_nodes:
            if a not in nodes and g.input_dependent[a] and _shape(a) is not None:
                sources.setdefault(a, []).append(n.name)
    if len(sources) != 1:
        return f"the branch reads {len(sources)} outside values, not one input"
    fork, readers = next(iter(sources.items()))
    return fork, tuple(readers)


def _unit_rejection(g: _Graph, add: fx.Node, lay: Layout | None, exclusive: list[set[fx.Node]],
                    group: list[fx.Node]) -> Rejection | None:
    """The checks every residual unit must pass: a conv-fixed NC* layout, and no channel attention yet."""
    problem = _layout_problem(lay)
    unit = set().union(*exclusive) if lay is None else set()
    compiled = [".".join(filter(None, (n.target, name))) for n in g.graph.nodes if n in unit and n.op == "call_module"
                for name, m in g.module(n).named_modules() if is_compiled(m)]
    if compiled:  # the likely cause: code se_retrofit reads only in part
        problem += (f"; the branch runs '{compiled[0]}', a TorchScript module whose compiled code is followed only "
                    "through convolutions, norms and elementwise ops")
    if problem:
        return Rejection(add.name, problem)
    return _attention_rejection(g, add, exclusive, group)


def _attention_rejection(g: _Graph, add: fx.Node, exclusive: list[set[fx.Node]],
                         group: list[fx.Node]) -> Rejection | None:
    """Channel attention anywhere on the residual unit (either operand, the sum, just after it) means no SE:
    this is what makes ``apply`` idempotent, whatever position the first call used."""
    watched = set(group) | set(_downstream(g, add)) | set().union(*exclusive)
    attention = g.attention_in(watched)
    if not attention:
        return None
    # a gated unit, even one whose shortcut now holds the SE (position="identity"), owns what its operands hold
    return Rejection(add.name, f"already has channel attention: {attention}",
                     frozenset(n.name for n in set().union(*exclusive)))


def _through_identities(g: _Graph, node: fx.Node, depth: int = 0) -> fx.Node:
    """What a chain of identities and additions of a constant passes on. Identities are modules that return
    their input (timm's ``self.shortcut = nn.Identity()``, the empty ``nn.Sequential()`` of CIFAR ResNets)
    and copies of the value (``x.clone()``, ``x.detach()``) that nothing else reads, so no in-place write
    can make them differ from it. In ``beta + x + branch(x)`` the constant is a bias on the sum that
    Python's left-to-right grouping happens to add to ``x`` first, and the shortcut is still ``x`` itself."""
    while True:
        source = g.tensor_input(node)
        if source is None:
            return node
        if node.op == "call_module":
            if not (node.args == (source,) and not node.kwargs and _shape(node) == _shape(source)
                    and identity_module(g.module(node), depth)):
                return node
        elif node.op in ("call_function", "call_method") and g.name(node) in _COPIES:
            if node.args[:1] != (source,) or len(node.users) != 1:
                return node
        elif not ((is_add(node) or _is_sub(node)) and _shape(node) == _shape(source)
                  and _adds_only_constants(g, node, source)):
            return node
        node = source


# Calls that return their input's value (a copy or the tensor itself), whatever their other arguments
# (``memory_format``): a shortcut read through them is the input.
_COPIES = {"clone", "detach", "contiguous"}


def identity_module(module: nn.Module, depth: int = 0) -> bool:
    """Whether ``module`` returns its input: ``nn.Identity``, an ``nn.Sequential`` of such modules (the
    empty one included), or a module of the user's whose forward hands back its argument through
    identities (`_through_identities`). A forward fx cannot trace, or nested deeper than a few levels,
    does not count."""
    if isinstance(module, nn.Identity):
        return True
    if depth >= _MAX_LIGHT_DEPTH:
        return False
    if type(module) is nn.Sequential:
        return all(identity_module(child, depth + 1) for child in module)
    if type(module).__module__.startswith("torch."):  # torch's own layers compute something
        return False
    g = _forward_graph(module)
    if g is None:
        return False
    placeholders = [n for n in g.graph.nodes if n.op == "placeholder"]
    returned = next(n for n in g.graph.nodes if n.op == "output").args[0]
    if not placeholders or not isinstance(returned, fx.Node):
        return False
    return _through_identities(g, returned, depth + 1) is placeholders[0]


def _is_sub(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in (operator.sub, torch.sub, torch.Tensor.sub)
    return node.op == "call_method" and node.target in ("sub", "__sub__")


def _adds_only_constants(g: _Graph, add: fx.Node, source: fx.Node) -> bool:
    """Whether ``add`` is ``source`` plus or minus a constant (a Python number, a parameter, a buffer), with
    ``source`` itself unscaled: ``torch.add(beta, x, alpha=-1)`` is ``beta - x``, whose shortcut is ``-x``."""
    operands = list(add.args[:2]) + ([add.kwargs["other"]] if "other" in add.kwargs else [])
    scale = add.kwargs.get("alpha", add.args[2] if len(add.args) > 2 else 1)
    rest = [op for op in operands if op is not source]
    if len(rest) != 1 or len(operands) != 2 or (operands[0] is not source and (scale != 1 or _is_sub(add))):
        return False
    return not isinstance(rest[0], fx.Node) or g.is_constant(rest[0])


def _scaled_operand(add: fx.Node) -> fx.Node | None:
    """The operand ``torch.add(a, b, alpha=s)`` multiplies by ``s`` (``b``), where ``s`` is not 1."""
    if not is_add(add):
        return None
    scale = add.kwargs.get("alpha", add.args[2] if len(add.args) > 2 else 1)
    operand = add.kwargs.get("other", add.args[1] if len(add.args) > 1 else None)
    return operand if scale != 1 and isinstance(operand, fx.Node) else None


def _residual(g: _Graph, add: fx.Node, terms: list[fx.Node], exclusive: list[set[fx.Node]],
              identity: list[bool], b: int, group: list[fx.Node], position: str) -> Placement | Rejection:
    branch = terms[b]
    others = [i for i in range(len(terms)) if i != b]
    shortcut = "projection"
    source = _through_identities(g, terms[others[0]]) if len(others) == 1 else None
    if source is not None and any(_scaled_operand(node) is terms[others[0]] for node in (add, *group)):
        source = None  # torch.add(branch, x, alpha=0.5): the shortcut is 0.5 x, a scaling of x
    if source is not None and (identity[others[0]] or source in g.ancestors[branch]):
        shortcut = "identity"
    elif source is not None and source.op == "placeholder":
        shortcut = "argument"
    elif g.holds_activation(set().union(*(exclusive[i] for i in others))):
        shortcut = "activation"  # F.relu(x) + branch(x): no convolution (else it would carry work), not linear
    rejection = _unit_rejection(g, add, g.layouts.get(branch), exclusive, group)
    if rejection:
        return rejection
    shape = _shape(add)
    spatial = len(shape) - 2
    if position == "standard":
        anchor, chain = branch, []
        while g.is_passthrough(anchor) and g.tensor_input(anchor) is not None:
            chain.append(anchor)
            anchor = g.tensor_input(anchor)
        consumer = chain[-1] if chain else _consumer(branch, group + [add])
        return Placement(add.name, "residual", shortcut, _shape(anchor)[1], spatial, anchor.name, (consumer.name,))
    if position == "post":
        after = _past_constant_adds(g, add)
        anchor = _activation_after(g, after) or after
        return Placement(add.name, "residual", shortcut, shape[1], spatial, anchor.name, None)
    if position == "identity":
        if len(others) != 1:
            return Rejection(add.name, "position='identity' needs a single shortcut operand")
        s = terms[others[0]]
        return Placement(add.name, "residual", shortcut, shape[1], spatial, s.name,
                         (_consumer(s, group + [add]).name,))
    found = _fork_of(g, exclusive[b])
    if isinstance(found, str):
        return Rejection(add.name, f"position='pre': {found}")
    fork, readers = found
    fshape = _shape(fork)
    lay = g.layouts.get(fork)
    reads_channel_first = any(
        n.op == "call_module" and expects_channel_first(g.module(n)) for n in g.graph.nodes if n.name in readers)
    if len(fshape) != len(shape) or not ((lay is not None and lay.axis == 1) or reads_channel_first):
        return Rejection(add.name, "position='pre': the branch input's channel axis is not known")
    return Placement(add.name, "residual", shortcut, fshape[1], spatial, fork.name, readers)


def _multi_branch(g: _Graph, add: fx.Node, terms: list[fx.Node], exclusive: list[set[fx.Node]],
                  group: list[fx.Node], position: str) -> Placement | Rejection:
    rejection = _unit_rejection(g, add, merge_layouts([g.layouts.get(t) for t in terms]), exclusive, group)
    if rejection:
        return rejection
    found = _fork_of(g, set().union(*exclusive))
    if not isinstance(found, str) and found[0].op == "call_module" and isinstance(g.module(found[0]), SEBlock):
        # position="pre" put it on the input all arms read, which belongs to no single arm
        return Rejection(add.name, f"already has channel attention: SEBlock at '{found[0].target}' (on the arms' "
                                   "input)", frozenset(n.name for n in set().union(*exclusive)))
    shape = _shape(add)
    spatial = len(shape) - 2
    if position == "identity":
        return Rejection(add.name, "position='identity': a multi-branch sum has no single shortcut")
    if position == "pre":
        if isinstance(found, str):
            return Rejection(add.name, f"position='pre': {found}")
        fork, readers = found
        return Placement(add.name, "multi-branch", "none", _shape(fork)[1], spatial, fork.name, readers,
                         linear=True)
    anchor = add
    if position == "post":
        after = _past_constant_adds(g, add)
        anchor = _activation_after(g, after) or after
    return Placement(add.name, "multi-branch", "none", shape[1], spatial, anchor.name, None, linear=True)
