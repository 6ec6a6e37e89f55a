"""Where SE goes on a residual branch: before drop-path and layer scale, as SE-ResNet and timm have it.

Stochastic depth zeroes whole samples of the branch in training; an SE block after it would squeeze
those zeros (and values rescaled by 1 / keep_prob), which eval mode never shows it. The check runs the
retrofitted model in train mode with a high drop rate and looks at what every SE block receives.
"""
from __future__ import annotations

import warnings

import pytest
import timm
import torch
from torch import nn

import se_retrofit
from se_retrofit import catalog
from se_retrofit.testing import perturb_norms


def _zeroed_inputs(name: str) -> tuple[int, int]:
    # trained-like norms: timm zero-initialises the last norm of each branch, whose output would read as dropped
    model = perturb_norms(timm.create_model(name, pretrained=False, drop_path_rate=0.9)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", se_retrofit.SERetrofitWarning)
        se_model = se_retrofit.apply(model).train()
    seen = {"zeroed": 0, "calls": 0}

    def look(module: nn.Module, args: tuple) -> None:
        seen["calls"] += 1
        seen["zeroed"] += int((args[0].flatten(1).abs().amax(1) == 0).any())

    for _, block in se_retrofit.se_blocks(se_model):
        block.register_forward_pre_hook(look)
    torch.manual_seed(0)
    with torch.no_grad():
        se_model(torch.randn(8, 3, 32, 32))
    return seen["zeroed"], seen["calls"]


@pytest.mark.parametrize("name", ["resnet10t", "convnext_atto", "poolformer_s12"])
def test_se_sees_the_branch_before_drop_path(name):
    """poolformer's layer scale is timm's ``Scale``: the walk to the branch output must pass it."""
    zeroed, calls = _zeroed_inputs(name)
    assert calls > 0, f"{name}: no SE block ran"
    assert zeroed == 0, f"{name}: {zeroed} of {calls} SE calls got a sample zeroed by drop-path (SE is after it)"


class Scale(nn.Module):
    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(shape))

    def forward(self, x):
        return x * self.scale


def test_a_module_called_scale_must_look_like_a_layer_scale():
    assert catalog.is_layer_scale(Scale((16,))), "a leaf with one per-channel vector is a layer scale"
    assert not catalog.is_layer_scale(Scale((16, 3, 3))), "a Scale with a spatial weight is no layer scale"
    with_child = Scale((16,))
    with_child.inner = nn.Conv2d(16, 16, 1)
    assert not catalog.is_layer_scale(with_child), "a Scale with submodules is no layer scale"


@pytest.mark.parametrize("name, expected", [("convnext_atto", {"identity": 12}),
                                            ("resnet33ts", {"identity": 6, "projection": 4})])
def test_an_identity_module_on_the_shortcut_is_an_identity_shortcut(name, expected):
    """timm writes ``self.shortcut = nn.Identity()``; only a real projection (conv + norm) is one."""
    from collections import Counter

    plan = se_retrofit.find_sites(timm.create_model(name, pretrained=False))
    found = dict(Counter(s.shortcut for s in plan.sites))
    assert found == expected, f"{name}: shortcut labels {found}, expected {expected}"
