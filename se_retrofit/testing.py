"""Helpers for checking a retrofit on untrained models, shared by the tests and the coverage sweep."""
from __future__ import annotations

import torch
from torch import nn


def perturb_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every norm layer non-trivial affine weights and running statistics, in place.

    Freshly built timm ResNets zero the last BN of each residual branch, so the branch outputs
    exactly 0 and any "outputs unchanged" or "SE receives gradient" check passes vacuously. Layer
    scales (``gamma``, 1e-6 at init in ConvNeXt) are raised for the same reason, and so are gains
    initialised to zero (NF-ResNets' last ``ScaledStdConv2d.gain``, NFNets' ``skipinit_gain``).
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)):
                if getattr(m, "weight", None) is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_(torch.rand(m.bias.shape, generator=gen) * 0.2 - 0.1)
                if getattr(m, "running_mean", None) is not None:
                    m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=gen) * 0.2 - 0.1)
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
            for name, p in m.named_parameters(recurse=False):
                if "gamma" in name or name in ("layer_scale", "ls", "scale"):
                    p.copy_(torch.rand(p.shape, generator=gen) * 0.5 + 0.5)
                elif name in ("gain", "skipinit_gain") and not p.any():
                    # NF-ResNets zero their last ScaledStdConv2d's gain (or a skip-init gain) the same way
                    p.copy_(torch.rand(p.shape, generator=gen) * 0.5 + 0.5)
    return model
