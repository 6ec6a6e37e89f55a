"""Does calling a module run more than its class's ``forward``?

The early squeeze (`early_excitation`) and its cached fold (`excitation_fold`) redo the arithmetic of
a 1x1 conv, a batch norm and the SE block's activation instead of calling them, which is only the
same computation when nothing else runs at the call.
"""
from __future__ import annotations

from torch import nn
from torch.nn.modules import module as _module_state


def hooked(*modules: nn.Module) -> bool:
    """Whether calling these modules runs code besides their class's forward: forward or backward hooks
    or pre-hooks (their own or global ones), or a ``forward`` set on the instance. The early squeeze
    redoes their arithmetic itself and would miss what such code changes (a calibration hook, a
    clipping hook), and under autograd its gradient would go around a backward hook's module."""
    if (_module_state._global_forward_hooks or _module_state._global_forward_pre_hooks
            or _module_state._global_backward_hooks or _module_state._global_backward_pre_hooks):
        return True
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
               or "forward" in m.__dict__ for m in modules)
