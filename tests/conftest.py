"""Shared helpers for the tests: models that behave like trained ones, and state-dict comparisons."""
from __future__ import annotations

import pytest
import torch
from torch import nn


def make_pretrained_like(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every norm layer non-trivial affine weights and running statistics, in place.

    Freshly built timm ResNets zero the last BN of each branch, so the branch outputs exactly 0 and
    any "outputs unchanged" or "SE receives gradient" check would pass vacuously.
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
    return model


def assert_original_state_kept(original: nn.Module, retrofitted: nn.Module) -> None:
    before = original.state_dict()
    after = retrofitted.state_dict()
    missing = [k for k in before if k not in after]
    assert not missing, f"original state_dict keys lost by the retrofit: {missing[:5]}"
    changed = [k for k, v in before.items() if not torch.equal(v, after[k])]
    assert not changed, f"original tensors changed by the retrofit: {changed[:5]}"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
