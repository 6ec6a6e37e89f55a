"""What the analysis reads of a TorchScript submodule (``torch.jit.script`` or ``torch.jit.trace``).

Such a module is compiled code: fx cannot trace it, hooks refuse it, and no generated forward could
replace its own. So it is an opaque leaf of its parent's graph, called as it is, and never rewritten.
The parent still needs to know what the module does to the map it is given, and TorchScript keeps a
graph of the operations it runs (its submodules' calls inlined): the channel axis of its output
(`layout`), how many convolutions it runs (`conv_count`), whether it is a linear map of its input
(`is_linear`), and whether it adds two tensors (`adds_tensors`). They are read from the operations,
never from class names, and only a few operations are known: anything else makes the layout unknown
and the module "not linear", which leaves a residual unit around it alone rather than guess.
"""
from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from . import catalog
from .layout import Layout, merge_layouts

_CONVOLUTIONS = {f"aten::{name}" for name in (
    "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "_convolution",
    "convolution")}
_CHANNEL_NORMS = {"aten::batch_norm", "aten::instance_norm", "aten::group_norm"}
_BINARY = {f"aten::{name}" for name in ("add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_")}
# linear maps of the map, as `catalog`'s linear leaves and `sites`' linear functions are
_LINEAR = _CONVOLUTIONS | _CHANNEL_NORMS | {f"aten::{name}" for name in (
    "layer_norm", "avg_pool1d", "avg_pool2d", "avg_pool3d", "max_pool1d", "max_pool2d", "max_pool3d",
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d",
    "adaptive_max_pool2d", "adaptive_max_pool3d", "dropout", "feature_dropout", "contiguous", "clone", "detach",
    "to", "constant_pad_nd", "pad")}
# ops that read only the map's metadata: not an operation on its values
_METADATA = {"aten::size", "aten::dim", "aten::len", "aten::numel", "prim::shape", "prim::dtype", "prim::device",
             "prim::is_cuda", "prim::layout"}

_GRAPHS: weakref.WeakKeyDictionary[nn.Module, Any] = weakref.WeakKeyDictionary()


def is_compiled(module: nn.Module) -> bool:
    return isinstance(module, torch.jit.ScriptModule)


def _graph(module: nn.Module) -> Any:
    """The module's forward graph with every submodule call inlined, or None (a module without forward)."""
    if module not in _GRAPHS:
        try:
            _GRAPHS[module] = module.inlined_graph
        except (AttributeError, RuntimeError):  # no compiled forward (a ModuleList)
            _GRAPHS[module] = None
    return _GRAPHS[module]


def _nodes(block: Any) -> Iterator[Any]:
    """Every node of a graph or block, those inside ``if`` and loop bodies too."""
    for node in block.nodes():
        yield node
        for inner in node.blocks():
            yield from _nodes(inner)


def _is_tensor(value: Any) -> bool:
    return isinstance(value.type(), torch._C.TensorType)


def _map_input(graph: Any) -> Any | None:
    """The forward's first argument after ``self``: the map a parent's layout is given for."""
    inputs = list(graph.inputs())
    return inputs[1] if len(inputs) > 1 and _is_tensor(inputs[1]) else None


def conv_count(module: nn.Module) -> int:
    graph = _graph(module)
    return 0 if graph is None else sum(node.kind() in _CONVOLUTIONS for node in _nodes(graph))


def adds_tensors(module: nn.Module) -> bool:
    """Whether the compiled code adds two tensors (a residual addition, perhaps); a count kept in a
    buffer (a batch norm's ``num_batches_tracked.add_(1)``) adds a number and does not count."""
    graph = _graph(module)
    return graph is not None and any(
        node.kind() in ("aten::add", "aten::add_") and sum(_is_tensor(v) for v in list(node.inputs())[:2]) == 2
        for node in _nodes(graph))


def is_linear(module: nn.Module) -> bool:
    """No operation on the map but known linear ones (convolutions, norms, pooling, dropout, padding)
    from the first argument on: a projection shortcut, like a conv + norm ``Sequential`` in eager code.
    A map that an ``if`` or a loop returns is not followed, and counts as not linear."""
    graph = _graph(module)
    start = None if graph is None else _map_input(graph)
    if start is None:
        return False
    todo, seen = [start], set()
    while todo:
        value = todo.pop()
        if value.unique() in seen:
            continue
        seen.add(value.unique())
        for use in value.uses():
            kind = use.user.kind()
            if kind == "prim::Return" and use.user.owningBlock().owningNode() is None:  # the forward's result
                continue
            if kind in _METADATA:
                continue
            if kind not in _LINEAR:
                return False
            todo.extend(out for out in use.user.outputs() if _is_tensor(out))
    return True


def layout(module: nn.Module, inp: Layout | None, ndim: int | None) -> Layout | None:
    """Layout of ``module(x)`` given that of ``x``, as `layout.module_layout` derives it for eager code;
    ``ndim`` is that of the module's output, for a convolution whose rank its graph does not say."""
    graph = _graph(module)
    start = None if graph is None else _map_input(graph)
    if start is None:
        return None
    layouts: dict[int, Layout | None] = {start.unique(): inp}
    for node in graph.nodes():  # the top level only: what an ``if`` or a loop returns stays unknown
        inputs = [layouts.get(v.unique()) for v in node.inputs() if _is_tensor(v)]
        result = _op_layout(node, inputs, ndim)
        for out in node.outputs():
            layouts[out.unique()] = result
    outputs = list(graph.outputs())
    return layouts.get(outputs[0].unique()) if len(outputs) == 1 else None


def _op_layout(node: Any, inputs: list[Layout | None], ndim: int | None) -> Layout | None:
    kind = node.kind()
    first = inputs[0] if inputs else None
    if kind in _CONVOLUTIONS:
        rank = _rank(node) or ndim
        return Layout(1, rank, True) if rank else None
    if kind in _CHANNEL_NORMS:
        return first if first is not None and first.axis == 1 else None
    if kind in _BINARY:
        # every tensor operand known (a buffer or parameter operand is not): broadcasting is not followed
        return merge_layouts(inputs) if inputs and all(lay is not None for lay in inputs) else None
    if kind.startswith("aten::") and catalog.is_elementwise_function_name(kind[len("aten::"):]):
        return first
    return None


def _rank(node: Any) -> int | None:
    """Rank of a convolution's output: from its recorded type (traced code) or from its name (``conv2d``)."""
    out = node.output().type()
    if isinstance(out, torch._C.TensorType) and out.dim() is not None:
        return out.dim()
    digits = [c for c in node.kind() if c.isdigit()]
    return int(digits[0]) + 2 if len(digits) == 1 else None
