"""Channel attention just outside a block: the parent applies SE to what the block returns.

`sites` sees one module's graph, so it finds an SE module on a residual unit only inside the module
that does the addition. RepViT's ``RepVggDw`` returns ``bn(conv(x) + conv1(x) + x)`` and its parent
``RepViTBlock`` runs ``self.se`` on that; RepGhostNet's ghost module and bottleneck do the same. A new SE
after the sum would then run right before the existing one, with no convolution between them. This
pass looks one level up: when the sum reaches the block's output without a convolution, and the
parent feeds the block's output to channel attention without one, the site is rejected with the
reason it would get inside one module.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch.fx as fx
from torch import nn

from . import catalog
from .tracing import TraceFailure, cached_trace

_MAX_STEPS = 64  # nodes followed from one value; residual units are short


def _has_conv(owner: nn.Module, node: fx.Node) -> bool:
    if node.op == "call_module":
        return catalog.count_convs(owner.get_submodule(node.target)) > 0
    return node.op == "call_function" and node.target in catalog.CONV_FUNCTIONS


def _reaches(owner: nn.Module, start: Iterable[fx.Node], stop: Callable[[fx.Node], bool]) -> fx.Node | None:
    """The first node after ``start`` (following users, never through a convolution) for which ``stop`` holds."""
    seen: set[fx.Node] = set()
    todo = [u for n in start for u in n.users]
    while todo and len(seen) < _MAX_STEPS:
        node = todo.pop(0)
        if node in seen:
            continue
        seen.add(node)
        if stop(node):
            return node
        if _has_conv(owner, node):
            continue
        todo.extend(node.users)
    return None


def _attention_after_call(parent: nn.Module, graph: fx.Graph, child: str) -> str | None:
    """``"SEModule at 'se'"``: channel attention the parent applies to ``child``'s output before any convolution."""
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target == child]

    def is_attention(node: fx.Node) -> bool:
        return node.op == "call_module" and catalog.is_channel_attention(parent.get_submodule(node.target))

    found = _reaches(parent, calls, is_attention)
    if found is None:
        return None
    return f"{type(parent.get_submodule(found.target)).__name__} at '{found.target}'"


def attention_after(model: nn.Module, name: str, module: nn.Module, graph: fx.Graph,
                    adds: Iterable[str]) -> dict[str, str]:
    """For each add (node name in ``graph``, the eval graph of block ``name``) whose value reaches the
    block's output without a convolution: the channel attention the parent applies to that output
    before any convolution (``"SEModule at 'se'"``, named in the parent). Adds without one are left out."""
    if not name:
        return {}
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    try:
        parent_graph, _ = cached_trace(parent)
    except TraceFailure:
        return {}
    attention = _attention_after_call(parent, parent_graph, child)
    if attention is None:
        return {}
    nodes = {n.name: n for n in graph.nodes}
    found = {}
    for add in adds:
        if add in nodes and _reaches(module, [nodes[add]], lambda n: n.op == "output") is not None:
            found[add] = attention
    return found
