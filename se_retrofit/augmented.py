"""Keep ``x += y`` in place when a block's forward is regenerated from its graph.

fx's ``Proxy`` has no ``__iadd__``, so Python falls back to ``__add__`` and ``x += shortcut`` is
recorded as ``x + shortcut``: the regenerated forward allocates a new feature map where the
original wrote into ``x``, which on the CPU can cost as much as the SE blocks themselves, and it
changes what aliases of ``x`` see. Our tracer records the augmented assignment as a call of ``iadd``
instead, which does exactly what the original line did.

fx's own ``operator.iadd`` node is not used: fx prints it as ``a += b; c = a``, which rebinds the
name ``a`` and so changes the value later readers of a Python number see.
"""
from __future__ import annotations

from typing import Any

import torch.fx as fx


def iadd(a: Any, b: Any) -> Any:
    """``a += b``: in place for tensors (as the traced forward wrote it), a new value for numbers."""
    a += b
    return a


class AugmentedProxy(fx.Proxy):
    """A ``Proxy`` that records ``+=`` as ``iadd`` rather than as an out-of-place addition."""

    def __iadd__(self, other: Any) -> fx.Proxy:
        return self.tracer.create_proxy("call_function", iadd, (self, other), {})
