"""Which axis of a tensor is the channel axis, derived from the operations that made it.

A same-shape add of ``[B, H, W, C]`` tensors (Swin) or ``[B, N, C]`` tokens (ViT) looks like a
residual, but an SE block there would squeeze the wrong axis. So the channel axis is never guessed
from a shape: a convolution (module or function) fixes it at 1, and it is carried through ops whose
effect on axes is known (elementwise ops, norms, ``permute``/``transpose``, ``nn.Linear`` on the last
axis). Anything else makes it unknown. Leaf modules that are not known by type are traced in turn
(a ``Sequential`` of conv, ``Permute``, ``LayerNorm``, ``Linear``, ``Permute`` ends channel-first), and
TorchScript modules are read from their compiled graph (`compiled`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from . import catalog

_MAX_DEPTH = 4


@dataclass(frozen=True)
class Layout:
    """``axis`` is the channel axis of an ``ndim``-D tensor; ``from_conv`` says a convolution fixed it."""

    axis: int
    ndim: int
    from_conv: bool


def _normalize(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def _tensor_ndim(node: fx.Node) -> int | None:
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return len(shape) if shape is not None else None


def module_layout(module: nn.Module, inp: Layout | None, ndim: int | None, depth: int = 0) -> Layout | None:
    """Layout of ``module(x)`` given the layout of ``x`` (None when unknown)."""
    if catalog.is_conv(module):
        nd = len(module.kernel_size) + 2
        return Layout(1, nd, True)
    if catalog.is_channel_first_norm(module):
        if inp is not None and inp.axis != 1:
            return None
        return inp if inp is not None else None
    if isinstance(module, nn.Linear):
        return _linear(inp)
    if catalog.is_elementwise_leaf(module) or catalog.is_channel_attention(module):
        return inp
    if isinstance(module, (nn.modules.pooling._AvgPoolNd, nn.modules.pooling._MaxPoolNd,
                           nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
                           nn.Upsample)):
        return inp if inp is not None and inp.axis == 1 else None
    if isinstance(module, nn.Sequential):
        layout = inp
        for child in module:
            layout = module_layout(child, layout, layout.ndim if layout else ndim, depth + 1)
        return layout
    from .compiled import is_compiled, layout as compiled_layout  # compiled reads layouts: imported here

    if is_compiled(module):  # compiled code: read from its TorchScript graph
        return compiled_layout(module, inp, ndim)
    if depth >= _MAX_DEPTH:
        return None
    return _traced_module_layout(module, inp, ndim, depth)


def _linear(inp: Layout | None) -> Layout | None:
    # nn.Linear mixes the last axis: it is the channel axis only if it already was.
    if inp is None or inp.axis != inp.ndim - 1:
        return None
    return inp


def _traced_module_layout(module: nn.Module, inp: Layout | None, ndim: int | None, depth: int) -> Layout | None:
    from .tracing import TraceFailure, cached_trace

    try:
        graph, _ = cached_trace(module)
    except TraceFailure:  # an opaque leaf: its layout stays unknown
        return None
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if not placeholders:
        return None
    layouts = infer_layouts(graph, module, {placeholders[0]: inp}, depth + 1, default_ndim=ndim)
    outputs = [n for n in graph.nodes if n.op == "output"]
    result = outputs[0].args[0] if outputs else None
    return layouts.get(result) if isinstance(result, fx.Node) else None


def _node_args(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.args if isinstance(a, fx.Node)]


def merge_layouts(layouts: list[Layout | None]) -> Layout | None:
    known = [lay for lay in layouts if lay is not None]
    if not known:
        return None
    first = known[0]
    if any(lay.axis != first.axis or lay.ndim != first.ndim for lay in known):
        return None
    return Layout(first.axis, first.ndim, any(lay.from_conv for lay in known))


def _dims_arg(node: fx.Node) -> list[int] | None:
    rest = list(node.args[1:])
    if "dims" in node.kwargs:
        rest = [node.kwargs["dims"]]
    if len(rest) == 1 and isinstance(rest[0], (list, tuple)):
        rest = list(rest[0])
    return rest if all(isinstance(d, int) for d in rest) else None


def _keeps_axes(index: object, ndim: int) -> bool:
    """Is ``x[index]`` a plain slice (``x[:, :c]``) that keeps every axis where it was?"""
    items = index if isinstance(index, tuple) else (index,)
    rest = [i for i in items if i is not Ellipsis]
    return len(items) - len(rest) <= 1 and len(rest) <= ndim and all(isinstance(i, slice) for i in rest)


def _function_layout(node: fx.Node, layouts: dict[fx.Node, Layout | None], ndim: int | None) -> Layout | None:
    name = catalog.target_name(node.target)
    inputs = _node_args(node)
    first = layouts.get(inputs[0]) if inputs else None
    if node.target in catalog.CONV_FUNCTIONS:
        return Layout(1, ndim or 4, True)
    if name in ("batch_norm", "instance_norm", "group_norm"):
        return first if first is not None and first.axis == 1 else None
    if node.target is F.linear or name == "linear":
        return _linear(first)
    if name == "permute":
        dims = _dims_arg(node)
        if first is None or dims is None or len(dims) != first.ndim:
            return None
        dims = [_normalize(d, first.ndim) for d in dims]
        return Layout(dims.index(first.axis), first.ndim, first.from_conv)
    if name in ("transpose", "swapaxes", "swapdims"):
        if first is None or len(node.args) < 3 or not all(isinstance(d, int) for d in node.args[1:3]):
            return None
        a, b = (_normalize(d, first.ndim) for d in node.args[1:3])
        axis = b if first.axis == a else a if first.axis == b else first.axis
        return Layout(axis, first.ndim, first.from_conv)
    if name == "cat":
        tensors = node.args[0] if node.args else node.kwargs.get("tensors", ())
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        parts = [layouts.get(t) for t in tensors if isinstance(t, fx.Node)]
        merged = merge_layouts(parts)
        if merged is None or not all(p is not None for p in parts):
            return None
        return merged if isinstance(dim, int) and _normalize(dim, merged.ndim) == merged.axis else None
    if name == "getitem" and first is not None and _keeps_axes(node.args[1] if len(node.args) > 1 else None,
                                                               first.ndim):
        return first
    if name in ("mean", "sum", "amax", "amin") and node.kwargs.get("keepdim", len(node.args) > 2 and node.args[2]):
        return first
    if node.target in catalog.BINARY_ELEMENTWISE_FUNCTIONS or (
            node.op == "call_method" and name in catalog.BINARY_ELEMENTWISE_METHODS):
        full = [layouts.get(a) for a in inputs if _tensor_ndim(a) in (None, ndim)]
        return merge_layouts(full)
    if catalog.is_elementwise_function_name(name):
        return first
    return None


def infer_layouts(graph: fx.Graph, owner: nn.Module, given: dict[fx.Node, Layout | None] | None = None,
                  depth: int = 0, default_ndim: int | None = None) -> dict[fx.Node, Layout | None]:
    """Channel-axis layout of every node of ``graph`` (a graph of ``owner``'s forward)."""
    layouts: dict[fx.Node, Layout | None] = dict(given or {})
    for node in graph.nodes:
        if node in layouts:
            continue
        ndim = _tensor_ndim(node)
        if node.op == "call_module":
            inputs = _node_args(node)
            inp = layouts.get(inputs[0]) if inputs else None
            sub = owner.get_submodule(node.target)
            layouts[node] = module_layout(sub, inp, ndim if ndim is not None else default_ndim, depth)
        elif node.op in ("call_function", "call_method"):
            layouts[node] = _function_layout(node, layouts, ndim if ndim is not None else default_ndim)
        else:
            layouts[node] = None
    return layouts


def expects_channel_first(module: nn.Module) -> bool:
    """True when ``module`` reads its input as channel-first: it starts with a convolution or a norm."""
    if catalog.is_conv(module) or catalog.is_channel_first_norm(module):
        return True
    if isinstance(module, nn.Sequential) and len(module) > 0:
        return expects_channel_first(module[0])
    children = list(module.children())
    return bool(children) and catalog.is_conv(children[0])


__all__ = ["Layout", "infer_layouts", "module_layout", "expects_channel_first", "merge_layouts"]
