"""Is this forward being run, or recorded or transformed?

The SE block makes two choices from run-time values: overwrite ``x`` with the sum when nothing else
needs it (`se_block`), and compute the gate from a cached fold of the block's last conv and norm
(`early_excitation`). A recording would fix such a choice for every later input or capture the
fold's cached tensors as constants, and a transform's wrapped tensors cannot follow them. Both
take the plain path wherever `recording` says so.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch._C._functorch import peek_interpreter_stack


def recording(x: torch.Tensor) -> bool:
    """Whether ops on ``x`` are being recorded or transformed rather than only run.

    fx symbolic tracing (no values to decide with), ``torch.jit.trace``, ``torch.compile`` and
    ``torch.export`` (whose graphs plan their own memory and fuse the plain ops themselves), a
    dispatch mode (``make_fx``, fake tensors, ``FlopCounterMode``: a FLOP count must be the block's
    own), or a ``torch.func`` transform (``vmap``, ``grad``, ``jvp``).
    """
    return (isinstance(x, fx.Proxy) or torch.jit.is_tracing() or torch.compiler.is_compiling()
            or torch._C._len_torch_dispatch_stack() > 0 or peek_interpreter_stack() is not None)
