"""Linear sums (RepVGG-style arms) that a parent module runs on one of its residual branches.

`sites` leaves a RepVGG-style sum alone when it lies on a residual branch of the same graph: the
unit gets one SE, at the end of its branch, as in SE-ResNet. GhostNetV3, RepGhostNet and FastViT put
the sum in a child module (a ghost module, a ``MobileOneBlock``) that the residual block calls on its
branch, so the sum and the residual addition are in different graphs. This pass records, for each
traced block, which children its residual units call on their branches, and looks the module tree up
from a block with linear-sum sites for an ancestor that calls it there.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch.fx as fx
from torch import nn

from .fusion import fused_calls
from .sites import Placement, Rejection


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    todo = [node]
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return seen


def _fused_branches(graph: fx.Graph, module: nn.Module) -> list[set[fx.Node]]:
    """What each SE call that does its unit's addition (an earlier ``apply``) has on either operand alone.

    ``se(branch, shortcut)`` after the standard position, ``se(shortcut, branch)`` after ``"identity"``:
    the nodes on one operand only are the branch's (and a projection's, which holds no sum of arms).
    """
    return [_ancestors(n.args[0]) ^ _ancestors(n.args[1]) for n in fused_calls(graph, module)
            if all(isinstance(a, fx.Node) for a in n.args)]


def branch_calls(graph: fx.Graph, module: nn.Module, placements: Iterable[Placement],
                 rejections: Iterable[Rejection]) -> list[frozenset[str]]:
    """For each residual unit of ``graph`` that gets SE or already has it: the submodules its branch calls."""
    nodes = {n.name: n for n in graph.nodes}
    branches = [{nodes[name] for name in unit.branch} for unit in [*placements, *rejections] if unit.branch]
    branches += _fused_branches(graph, module)
    return [frozenset(n.target for n in branch if n.op == "call_module") for branch in branches]


def enclosing_unit(name: str, units: Mapping[str, list[frozenset[str]]]) -> str | None:
    """The nearest ancestor of block ``name`` that calls it (or a container holding it) on a residual branch."""
    if not name:
        return None
    parts = name.split(".")
    for depth in range(len(parts) - 1, -1, -1):
        ancestor = ".".join(parts[:depth])
        relative = ".".join(parts[depth:])
        for targets in units.get(ancestor, ()):
            if any(relative == t or relative.startswith(t + ".") for t in targets):
                return ancestor
    return None
