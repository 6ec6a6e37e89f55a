"""Linear sums (RepVGG-style arms) that a parent module runs on one of its residual branches.

`sites` leaves a RepVGG-style sum alone when it lies on a residual branch of the same graph: the
unit gets one SE, at the end of its branch, as in SE-ResNet. GhostNetV3, RepGhostNet and FastViT put
the sum in a child module (a ghost module, a ``MobileOneBlock``) that the residual block calls on its
branch, so the sum and the residual addition are in different graphs. This pass records, for each
residual unit of each traced block, the modules its branch calls and every module they hold, and
tells whether a block with linear-sum sites is one of them.
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
                 rejections: Iterable[Rejection]) -> list[frozenset[int]]:
    """For each residual unit of ``graph``: the ``id`` of every module its branch calls, and of theirs.

    Modules, not names: a module registered under two names is the same module under either.
    """
    nodes = {n.name: n for n in graph.nodes}
    branches = [{nodes[name] for name in unit.branch} for unit in [*placements, *rejections] if unit.branch]
    branches += _fused_branches(graph, module)
    return [frozenset(id(sub) for n in branch if n.op == "call_module"
                      for sub in module.get_submodule(n.target).modules()) for branch in branches]


def on_a_branch(block: nn.Module, units: Mapping[str, list[frozenset[int]]]) -> str | None:
    """A block whose residual unit runs ``block`` (or a module holding it) on its branch, or None.

    Judged by the module tree below what the branch calls: a module held by a branch's module but
    called from elsewhere would be taken for one on the branch.
    """
    for name, unit_list in units.items():
        if any(id(block) in unit for unit in unit_list):
            return name
    return None
