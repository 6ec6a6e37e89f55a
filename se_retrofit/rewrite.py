"""Transformation: put SE modules into a block and regenerate its forward.

Analysis (``sites``) has already decided, per graph, which value each SE block takes and which
nodes read its output instead. Here the SE modules are registered on the block, ``call_module``
nodes are spliced into the graph, the graph is linted, and the block's class gets the new forward.
Nothing here decides anything: a change of where SE goes belongs in ``sites``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx
from torch import nn

from . import codegen
from .early_squeeze import hoist_squeezes
from .fusion import fold_residual_adds
from .sites import Placement


def free_name(module: nn.Module, taken: set[str], base: str = "se") -> str:
    """``se``, or ``se_1``, ``se_2``... : the first name the block does not use for anything but ``None``.

    Reusing a ``None`` slot (timm blocks declare ``self.se = None`` when built without attention)
    gives the new weights the very keys of timm's hand-written SE networks. A name the class defines
    (``se = None`` in the class body, a property) is not free: it would hide the registered submodule.
    """
    candidate, i = base, 0
    while candidate in taken or getattr(module, candidate, None) is not None or hasattr(type(module), candidate):
        i += 1
        candidate = f"{base}_{i}"
    return candidate


def splice(graph: fx.Graph, placement: Placement, target: str) -> None:
    """Insert ``call_module(target)`` on the value ``placement.after`` for the placement's consumers."""
    nodes = {n.name: n for n in graph.nodes}
    after = nodes[placement.after]
    anchor = after
    if after.op == "placeholder":
        anchor = [n for n in graph.nodes if n.op == "placeholder"][-1]
    with graph.inserting_after(anchor):
        se_node = graph.call_module(target, (after,))
    if placement.consumers is None:
        after.replace_all_uses_with(se_node, delete_user_cb=lambda user: user is not se_node)
    else:
        for name in placement.consumers:
            nodes[name].replace_input_with(after, se_node)


@dataclass
class Undo:
    """What it takes to put a block back as it was."""

    module: nn.Module
    previous_class: type
    added: list[str] = field(default_factory=list)
    replaced: dict[str, Any] = field(default_factory=dict)

    def __call__(self) -> None:
        for name in self.added:
            if name in self.module._modules:
                del self.module._modules[name]
        for name, value in self.replaced.items():
            object.__setattr__(self.module, name, value)
        self.module.__class__ = self.previous_class


@dataclass
class Rewritten:
    """What `rewrite_block` did: how to undo it, and which new SE blocks took the fast paths."""

    undo: Undo
    fused_add: set[str]      # SE blocks that do their residual addition, in train and eval mode (`fusion`)
    early_squeeze: set[str]  # SE blocks handed the gate from the conv's input in eval mode (`early_squeeze`)


def rewrite_block(module: nn.Module, graphs: list[fx.Graph], placements: list[list[Placement]],
                  new_modules: list[tuple[str, nn.Module]], fuse_add: bool = True,
                  early_squeeze: bool = True) -> Rewritten:
    """Register ``new_modules`` on ``module``, splice them into every graph, install the new forward.

    ``graphs`` is ``[eval_graph]`` or ``[eval_graph, train_graph]``; ``placements[g][i]`` is where
    ``new_modules[i]`` goes in graph ``g``. With ``fuse_add``, an addition fed directly by an SE
    output is done by the SE block (`fusion`); with ``early_squeeze``, an SE block fed by a 1x1 conv
    and a batch norm may take its squeeze from the conv's input (`early_squeeze`).
    """
    undo = Undo(module, type(module))
    fast: list[tuple[set[str], set[str]]] = []
    try:
        for name, new in new_modules:
            if name in module.__dict__:
                undo.replaced[name] = module.__dict__[name]
            setattr(module, name, new)
            undo.added.append(name)
        for graph, graph_placements in zip(graphs, placements):
            graph.owning_module = module  # fx checks call_module targets against the owner
            try:
                for placement, (name, _) in zip(graph_placements, new_modules):
                    splice(graph, placement, name)
                targets = {name for name, _ in new_modules}
                fused = fold_residual_adds(graph, module, targets) if fuse_add else set()
                hoisted = hoist_squeezes(graph, module, targets) if early_squeeze else set()
                fast.append((fused, hoisted))
                graph.lint()
            finally:
                graph.owning_module = None
        source, namespace = codegen.build_sources(graphs[0], graphs[1] if len(graphs) > 1 else None)
        codegen.install_forward(module, source, namespace)
    except Exception:
        undo()
        raise
    # an SE block does its add only if it does so in both modes; the early squeeze runs in eval mode only
    return Rewritten(undo, set.intersection(*(fused for fused, _ in fast)), fast[0][1])
