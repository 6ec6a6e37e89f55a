"""Transformation: let an SE block do the residual addition its output goes into.

SE-ResNet computes ``shortcut + x * gate``: a multiply that writes a temporary feature map, then an
add that reads it back. ``SEBlock(x, residual)`` computes the same in one ``torch.addcmul`` pass, so
where a spliced SE node feeds an addition directly (possibly through ``nn.Identity`` modules, timm's
disabled drop-path), the addition is folded into the SE call. An in-place ``se += shortcut`` (the
original ``x += shortcut``, ``augmented``) becomes ``se(x, shortcut, inplace=True)``: the sum goes
into ``x``'s memory, as the original line put it there, when ``x`` has no other reader. An in-place
``shortcut.add_(se)`` is not folded: it must still update ``shortcut`` for later readers.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch import nn

from .augmented import iadd
from .se_block import SEBlock

_OUT_OF_PLACE = {("call_function", operator.add), ("call_function", torch.add), ("call_function", torch.Tensor.add),
                 ("call_method", "add"), ("call_method", "__add__")}
_IN_PLACE = {("call_function", operator.iadd), ("call_function", iadd), ("call_function", torch.Tensor.add_),
             ("call_method", "add_"), ("call_method", "__iadd__")}


def _sole_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _is_identity_call(node: fx.Node, module: nn.Module) -> bool:
    if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
        return False
    return type(module.get_submodule(node.target)) is nn.Identity


def _other_operand(add: fx.Node, operand: fx.Node) -> fx.Node | None:
    """The tensor ``operand`` is added to by ``add``, if the add can be folded; else None."""
    kind = (add.op, add.target)
    if add.kwargs or len(add.args) != 2 or kind not in _OUT_OF_PLACE | _IN_PLACE:
        return None
    first, second = add.args
    if kind in _IN_PLACE and first is not operand:  # a.add_(se) must still update a
        return None
    other = second if first is operand else first if second is operand else None
    if not isinstance(other, fx.Node) or other is operand:
        return None
    return other


def fold_residual_adds(graph: fx.Graph, module: nn.Module, targets: set[str]) -> set[str]:
    """Replace ``add(se(x), other)`` by ``se(x, other)`` for the SE call nodes of ``targets``; return the
    targets whose addition was folded.

    The sum may overwrite ``x`` only where the original added in place and ``x`` has no other reader
    in the graph (a forward argument or an attribute is never overwritten, though the original may have done so).
    """
    folded: set[str] = set()
    for se_node in [n for n in graph.nodes if n.op == "call_module" and n.target in targets and len(n.args) == 1]:
        chain, value = [], se_node
        user = _sole_user(value)
        while user is not None and _is_identity_call(user, module):
            chain.append(user)
            value, user = user, _sole_user(user)
        other = _other_operand(user, value) if user is not None else None
        if other is None:
            continue
        user.prepend(se_node)  # the other operand may be computed after the SE call: move the call to the add
        source = se_node.args[0]
        se_node.args = (source, other)
        if (user.op, user.target) in _IN_PLACE and len(source.users) == 1 and source.op not in ("placeholder", "get_attr"):
            se_node.kwargs = {"inplace": True}
        se_node.meta = dict(user.meta)
        user.replace_all_uses_with(se_node)
        for node in [user, *reversed(chain)]:
            graph.erase_node(node)
        folded.add(se_node.target)
    return folded


def fused_calls(graph: fx.Graph, module: nn.Module) -> list[fx.Node]:
    """SE calls that already do a residual addition (a retrofitted block seen again)."""
    return [n for n in graph.nodes if n.op == "call_module" and len(n.args) == 2
            and isinstance(module.get_submodule(n.target), SEBlock)]
