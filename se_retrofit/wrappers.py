"""The user's model inside the wrappers that training and deployment put around it.

``torch.compile`` and (Distributed)DataParallel hold the model as a submodule, so its names carry a
prefix (``_orig_mod.``, ``module.``) and tracers meet the wrapper instead of the network: saving an
adapter, loading one and counting costs all want the model inside.
"""
from __future__ import annotations

from torch import nn


def unwrapped(model: nn.Module) -> nn.Module:
    """``model`` without ``torch.compile`` and (Distributed)DataParallel wrappers, however nested."""
    for _ in range(4):
        # torch.compile's OptimizedModule, known by name: importing torch._dynamo to check costs seconds
        if type(model).__name__ == "OptimizedModule" and isinstance(model._modules.get("_orig_mod"), nn.Module):
            model = model._modules["_orig_mod"]
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            break
    return model
