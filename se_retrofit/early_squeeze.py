"""Transformation: let an SE block take its gate from before the branch's last 1x1 conv and norm.

In a bottleneck the SE input is ``bn3(conv3(z))`` with ``conv3`` a 1x1 convolution that widens
``z`` four times. Averaging that wide map is one more pass over the largest tensor of the block, and
on the CPU most of what SE costs at inference: the map has just been written and no longer sits in
cache. Averaging ``z`` and mapping the average through ``conv3`` and ``bn3`` gives the same squeeze,
and without autograd ``fc1 . bn3 . conv3`` is one small folded map (`early_excitation.fc1_through`,
which also decides at run time whether that is exact and cheaper). Here a call
``gate_through(z, self.conv3, self.bn3, self.se)`` (the squeeze, ``fc1`` and the rest of the
excitation) is put just before ``conv3`` and its result handed to the SE call as ``gate``, which
then only does the gated residual add. Averaging ``z`` right there reads it while it is still in
cache, and leaves ``z`` free to be released after ``conv3`` as before, so its memory is reused as in
the original block (held until the SE call, it made every forward map fresh memory for it). The
excitation's small kernels run in the same place, one cluster of small ops instead of two: on the
CPU the first small kernels after a large one pay for refilling caches, wherever they run.

Only modules whose arithmetic is known qualify (`early_excitation.is_pointwise_conv` and
`early_excitation.norm_types`; checked again at run time), with only ``nn.Identity`` modules between them
and nothing writing into the convolution's output in place before the norm reads it (`sites` has
already checked the same for the norm's output, the SE input).
"""
from __future__ import annotations

import torch.fx as fx
from torch import nn

from .early_excitation import gate_through, is_pointwise_conv, norm_types
from .mutation import moved_read_problem


def _single_input(node: fx.Node) -> fx.Node | None:
    if node.kwargs or len(node.args) != 1 or not isinstance(node.args[0], fx.Node):
        return None
    return node.args[0]


def _producer(node: fx.Node, module: nn.Module) -> tuple[fx.Node, nn.Module] | None:
    """The module call that produced ``node``'s value, looking through ``nn.Identity`` calls."""
    while node.op == "call_module":
        sub = module.get_submodule(node.target)
        if type(sub) is not nn.Identity:
            return node, sub
        source = _single_input(node)
        if source is None:
            return None
        node = source
    return None


def hoist_squeezes(graph: fx.Graph, module: nn.Module, targets: set[str]) -> set[str]:
    """Hand ``gate=gate_through(z, conv, norm, se)`` to each SE call of ``targets`` whose input is
    ``norm(conv(z))``; return those targets."""
    norms = norm_types()
    hoisted: set[str] = set()
    for se_node in [n for n in graph.nodes if n.op == "call_module" and n.target in targets]:
        spatial_dims = module.get_submodule(se_node.target).spatial_dims
        found = _producer(se_node.args[0], module)
        if found is None or type(found[1]) not in norms or _single_input(found[0]) is None:
            continue
        norm_node = found[0]
        found = _producer(_single_input(norm_node), module)
        if found is None or not is_pointwise_conv(found[1], spatial_dims) or _single_input(found[0]) is None:
            continue
        out_channels, in_channels = found[1].weight.shape[:2]
        if out_channels <= in_channels:
            continue  # averaging the conv's input would read no less: the run-time checks always decline
        conv_node = found[0]
        if (moved_read_problem(graph, module, conv_node, [norm_node]) is not None
                or moved_read_problem(graph, module, norm_node, [se_node]) is not None):
            continue  # a value changed in place before the next reads it: the gate from z would not see the change
        with graph.inserting_before(conv_node):
            conv_ref = graph.get_attr(conv_node.target)
            norm_ref = graph.get_attr(norm_node.target)
            se_ref = graph.get_attr(se_node.target)
            gate = graph.call_function(gate_through, (_single_input(conv_node), conv_ref, norm_ref, se_ref))
        se_node.kwargs = {**se_node.kwargs, "gate": gate}
        hoisted.add(se_node.target)
    return hoisted
