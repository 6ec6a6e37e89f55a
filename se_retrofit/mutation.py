"""Analysis: in-place writes that make a block's data-flow graph say less than the code does.

fx records which value each node read, not when: ``out.mul_(0.2)`` or ``out.add_(x)`` changes
``out`` without making a new value, so a node that reads ``out`` afterwards sees what no edge of the
graph shows. Splicing SE in moves reads. The SE block reads its input where it is inserted, right
after the value is made; its consumers then read the SE output. A write into that value between the
two points would be lost to the SE. And where a consumer itself writes into the value (``out += x``,
``out.add_(x)``), a later node that reads ``out`` directly would no longer see the write, which now
lands in the SE output. `moved_read_problem` finds both; `sites` then leaves the addition alone, and
`early_squeeze` does not take the gate before a write into ``conv3``'s output.
"""
from __future__ import annotations

import operator
from typing import Iterable

import torch.fx as fx
from torch import nn

from . import catalog
from .augmented import iadd

_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                      operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
                      operator.ilshift, operator.irshift, operator.imatmul, operator.setitem, iadd}
# Ops whose result may share memory with their first input: a write through the result is a write to it.
# Views, and the conversions that return the tensor itself when there is nothing to convert (``.float()``
# of a float tensor, ``.cpu()`` on the CPU).
_VIEW_NAMES = {"view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "ravel", "squeeze", "unsqueeze",
               "transpose", "swapaxes", "swapdims", "movedim", "moveaxis", "permute", "t", "adjoint", "narrow",
               "select", "expand", "expand_as", "getitem", "contiguous", "detach", "alias", "as_strided", "split",
               "split_with_sizes", "chunk", "tensor_split", "hsplit", "vsplit", "dsplit", "unbind", "diagonal",
               "unfold", "real", "imag", "view_as_real", "view_as_complex", "conj", "resolve_conj", "resolve_neg",
               "positive", "atleast_1d", "atleast_2d", "atleast_3d", "type_as", "to", "type", "float", "double",
               "half", "bfloat16", "int", "long", "short", "char", "byte", "bool", "cfloat", "cdouble", "cpu",
               "cuda"}
# Tensor attributes that are views (``out.mT.mul_(2)`` writes into ``out``); fx records them as ``getattr``.
_VIEW_ATTRIBUTES = {"T", "mT", "H", "mH", "real", "imag", "data"}


def _first_input(node: fx.Node) -> fx.Node | None:
    first = node.args[0] if node.args else None
    return first if isinstance(first, fx.Node) else None


def _is_inplace_name(name: str) -> bool:
    if (name.startswith("__i") and name.endswith("__")) or name == "__setitem__":  # __iadd__, x[i] = v
        return True
    return name.endswith("_") and not name.startswith("_")


def written_input(node: fx.Node, owner: nn.Module) -> fx.Node | None:
    """The input ``node`` writes into, or None: in-place methods and functions (``add_``, ``torch.relu_``,
    ``+=``), ``inplace=True`` and ``out=`` arguments, and modules with ``inplace=True`` (``nn.ReLU``)."""
    if node.op == "call_module":
        module = owner.get_submodule(node.target)
        return _first_input(node) if getattr(module, "inplace", False) is True else None
    if node.op not in ("call_function", "call_method"):
        return None
    out = node.kwargs.get("out")
    if isinstance(out, fx.Node):
        return out
    if node.target in _INPLACE_OPERATORS or node.kwargs.get("inplace") is True \
            or _is_inplace_name(catalog.target_name(node.target)):
        return _first_input(node)
    return None


def _aliases(node: fx.Node, owner: nn.Module, aliases: set[fx.Node]) -> bool:
    """Whether ``node``'s value shares memory with one of ``aliases``."""
    source = _first_input(node)
    if source is None or source not in aliases:
        return False
    if written_input(node, owner) is source:  # an in-place op returns the tensor it wrote into
        return True
    if node.op == "call_module":
        return catalog.is_path_drop(owner.get_submodule(node.target))  # nn.Identity, eval-mode dropout
    if node.target is getattr:
        return len(node.args) > 1 and node.args[1] in _VIEW_ATTRIBUTES
    return node.op in ("call_function", "call_method") and catalog.target_name(node.target) in _VIEW_NAMES


def moved_read_problem(graph: fx.Graph, owner: nn.Module, source: fx.Node, readers: Iterable[fx.Node]
                       ) -> str | None:
    """Why SE must not take ``source``'s value where it is made and feed ``readers`` instead; None if it may.

    ``graph`` is ``owner``'s forward; ``readers`` are the nodes whose reads move: to the SE output, or,
    for the early squeeze, to a gate computed from ``source``'s value where it is made.
    """
    readers = set(readers)
    nodes = list(graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    last = max(position[r] for r in readers)
    aliases = {source}
    writer: fx.Node | None = None  # a reader that wrote into source: later direct reads would miss the write
    for node in nodes[position[source] + 1:]:
        if writer is not None:
            stale = [a for a in node.all_input_nodes if a in aliases]
            if stale:
                return (f"'{node.name}' reads '{stale[0].name}' after '{writer.name}' wrote into it in place; "
                        "with SE the write would go to the SE output")
            continue
        if written_input(node, owner) in aliases:
            if node in readers:
                writer = node
                continue
            if position[node] < last:
                return f"'{source.name}' is modified in place by '{node.name}' before the addition reads it"
        if position[node] > last:
            continue
        if _aliases(node, owner, aliases):
            aliases.add(node)
    return None

