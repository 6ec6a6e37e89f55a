"""The pass over the models the core issue names: count, outputs, gradients, state, train/eval.

Every model is built with random weights, made "pretrained-like" (non-trivial norm statistics), and
checked at a small input size (vit_b_16 takes exactly 224).
"""
from __future__ import annotations

import warnings

import pytest
import timm
import torch
import torchvision

import se_retrofit
from se_retrofit import SEBlock

from conftest import assert_original_state_kept, make_pretrained_like

# (spec, expected number of new SE blocks, input size)
ZOO = [
    ("torchvision:resnet18", 8, 64),
    ("torchvision:resnet50", 16, 64),
    ("torchvision:convnext_tiny", 18, 64),
    ("torchvision:mobilenet_v2", 10, 64),
    ("torchvision:regnet_x_400mf", 22, 64),
    ("torchvision:efficientnet_b0", 0, 64),
    ("torchvision:densenet121", 0, 64),
    ("torchvision:vit_b_16", 0, 224),
    ("timm:resnet50", 16, 64),
    ("timm:seresnet50", 0, 64),
    ("timm:convnext_atto", 12, 64),
    ("timm:repvgg_a0", 22, 64),
    ("timm:tf_efficientnet_b0", 0, 64),
]


def build(spec: str) -> torch.nn.Module:
    lib, name = spec.split(":")
    model = torchvision.models.get_model(name) if lib == "torchvision" else timm.create_model(name)
    return make_pretrained_like(model).eval()


@pytest.fixture(scope="module", params=ZOO, ids=[z[0] for z in ZOO])
def case(request):
    spec, expected, size = request.param
    model = build(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", se_retrofit.SERetrofitWarning)
        se_model = se_retrofit.apply(model)
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    return spec, expected, model, se_model, x


def test_se_count(case):
    spec, expected, _, se_model, _ = case
    n = len(se_retrofit.se_blocks(se_model))
    assert n == expected, f"{spec}: expected {expected} SE blocks, got {n}"


def test_identity_init_keeps_outputs(case):
    spec, _, model, se_model, x = case
    se_model.eval()
    with torch.no_grad():
        a, b = model(x), se_model(x)
    assert a.shape == b.shape, f"{spec}: output shape {tuple(b.shape)} != {tuple(a.shape)}"
    # exact: the gate is exactly 1 under identity init and x * 1 is exact (a tolerance let a gate of 1 + 5e-7 through)
    assert torch.equal(a, b), f"{spec}: identity init changed the outputs by {(a - b).abs().max().item()}"


def test_original_state_preserved_and_class_kept(case):
    spec, _, model, se_model, _ = case
    assert_original_state_kept(model, se_model)
    assert type(se_model) is type(model), f"{spec}: the top-level class changed to {type(se_model).__name__}"
    assert se_model is not model
    assert not any(isinstance(m, SEBlock) for m in model.modules()), f"{spec}: apply modified its input model"
    new_keys = set(se_model.state_dict()) - set(model.state_dict())
    se_names = [name for name, _ in se_retrofit.se_blocks(se_model)]
    bad = [k for k in new_keys if not any(k.startswith(f"{name}.") for name in se_names)]
    assert not bad, f"{spec}: new parameters outside SE modules: {bad[:5]}"


def _grads(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    model.train()
    out = model(x)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    (out.float() * weight).sum().backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model.eval()
    return grads


def test_backward_reaches_se_and_backbone(case):
    import copy

    spec, _, model, se_model, x = case
    reference = {k for k, g in _grads(copy.deepcopy(model), x).items() if g.abs().sum() > 0}
    grads = _grads(copy.deepcopy(se_model), x)  # a train-mode forward moves BN statistics: keep the fixture's
    for name, se in se_retrofit.se_blocks(se_model):
        g = grads.get(f"{name}.fc2.weight")
        assert g is not None and g.abs().sum() > 0, f"{spec}: {name}.fc2 got no gradient on the first step"
    lost = sorted(k for k in reference if k not in grads or grads[k].abs().sum() == 0)
    assert not lost, f"{spec}: parameters that train in the original get no gradient after the retrofit: {lost[:5]}"


def test_train_mode_matches_original(case):
    """BatchNorm must use batch statistics in train mode and update its buffers, as in the original.

    SE draws no random numbers, so with the same seed dropout and stochastic depth drop the same
    units in both models and the outputs must still agree.
    """
    spec, _, model, se_model, x = case
    import copy

    m1, m2 = copy.deepcopy(model).train(), copy.deepcopy(se_model).train()
    with torch.no_grad():
        torch.manual_seed(0)
        a = m1(x)
        torch.manual_seed(0)
        b = m2(x)
    assert torch.equal(a, b), f"{spec}: train-mode outputs differ by {(a - b).abs().max().item()}"
    statistics = [k for k in model.state_dict() if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    moved = [k for k in statistics if not torch.equal(m1.state_dict()[k], model.state_dict()[k])]
    assert bool(moved) == bool(statistics), f"{spec}: control: the original's BatchNorm statistics did not move"
    after = m2.state_dict()
    differ = [k for k in statistics if k not in after or not torch.equal(after[k], m1.state_dict()[k])]
    assert not differ, f"{spec}: BatchNorm statistics after a train-mode forward differ from the original's: {differ[:5]}"
