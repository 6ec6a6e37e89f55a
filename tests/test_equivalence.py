"""A retrofitted timm ResNet is the hand-written SE network: same parameters, same function."""
from __future__ import annotations

import pytest
import timm
import torch

import se_retrofit

from conftest import make_pretrained_like

PAIRS = [("resnet50", "seresnet50", 25_557_032, 28_088_024),
         ("resnext50_32x4d", "seresnext50_32x4d", 25_028_904, 27_559_896)]


@pytest.mark.parametrize("base,se_name,base_params,se_params", PAIRS, ids=[p[0] for p in PAIRS])
def test_paper_init_equals_timm_hand_written_se(base, se_name, base_params, se_params):
    model = timm.create_model(base).eval()
    assert sum(p.numel() for p in model.parameters()) == base_params
    retro = se_retrofit.apply(model, init="paper").eval()
    n = sum(p.numel() for p in retro.parameters())
    assert n == se_params, f"{base}: retrofitted parameter count {n:,} != {se_name} {se_params:,}"

    reference = make_pretrained_like(timm.create_model(se_name), seed=4).eval()
    for p in reference.parameters():  # non-zero SE weights, so the gate really gates
        if p.dim() == 4 and p.shape[-1] == 1:
            torch.nn.init.normal_(p, std=0.05)
    retro.load_state_dict(reference.state_dict(), strict=True)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = reference(x), retro(x)
    rel = ((a - b).abs().max() / a.abs().max()).item()
    assert rel <= 1e-5, f"{base} + SE vs {se_name}: relative difference {rel}"
