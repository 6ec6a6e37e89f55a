"""The hard cases of the timm zoo, one test each: what gets SE, what is left alone and why.

Expected counts come from the architectures (e.g. DLA-34 has 2+4+4+2 basic blocks); every model must
keep its outputs under the identity init. The slow ones (large fixed input sizes) are marked.
"""
from __future__ import annotations

import io
import warnings

import pytest
import timm
import torch

import se_retrofit
from se_retrofit.capture import candidate_described

from conftest import make_pretrained_like

# (model, SE inserted, a substring that must appear among the reasons for what was left alone, or None)
CASES = [
    ("repvgg_a0", 22, None),                               # re-parameterisable 3-branch sums: one SE per block
    ("mobileone_s0", 43, None),                            # same, with k over-parameterised branches
    ("ghostnet_100", 9, "already has channel attention"),  # 16 blocks, 7 with SE; 2-conv linear shortcuts
    ("dla34", 12, None),                                   # shortcut handed in by the tree: 2+4+4+2 blocks
    ("res2net50_14w_8s", 16, "partial add"),           # hierarchical inner adds are not residuals
    ("hrnet_w18_small", 23, "operands carry work"),        # fuse layers are not residuals; 1+4+6+8+4 blocks
    ("dpn48b", 0, "partial add"),                      # dual path adds channel slices
    ("rexnet_100", 0, "partial add"),                  # x[:, :c] += shortcut
    ("mobilevit_xxs", 3, "fx cannot trace"),               # shape control flow in the MobileViT blocks
    ("nfnet_l0", 0, "already has channel attention"),      # NormFreeBlock with its own SE
    ("nf_resnet26", 8, None),                              # NormFreeBlock without SE: SE before the alpha scale
    ("cpubone_nano", 8, "fx cannot trace"),                # shape control flow in some blocks, the rest converted
    ("tf_efficientnet_b0", 0, "already has channel attention"),  # TF "same" padding inside the convs
    ("tf_mobilenetv3_small_minimal_100", 6, None),         # TF "same" padding, no SE: every residual converted
    ("tf_mobilenetv3_small_100", 1, "already has channel attention"),  # 5 blocks with SE, 1 without
    ("efficientvit_m0", 32, "adds a constant"),            # conv residuals found; attention biases left alone
]
SLOW = [("inception_resnet_v2", 40, None)]                 # scaled residuals, 299x299 input


def check(name: str, expected: int, reason: str | None) -> None:
    model = make_pretrained_like(timm.create_model(name)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", se_retrofit.SERetrofitWarning)
        se_model = se_retrofit.apply(model)
    plan = se_retrofit.get_plan(se_model)
    n = len(se_retrofit.se_blocks(se_model))
    assert n == expected, f"{name}: expected {expected} SE blocks, got {n}\n{plan}"
    if reason is not None:
        assert any(reason in s.reason for s in plan.skipped), f"{name}: no skip reason containing {reason!r}\n{plan}"
    args, kwargs = candidate_described(model, plan.example_input)
    se_model.eval()
    with torch.no_grad():
        a, b = model(*args, **kwargs), se_model(*args, **kwargs)
    # exact: the gate is exactly 1 under identity init and x * 1 is exact (a tolerance let a gate of 1 + 5e-7 through)
    assert torch.equal(a, b), f"{name}: identity init changed the outputs by {(a - b).abs().max().item()}"
    try:  # nothing tracing made (a proxy cached by a forward) may be left in the model
        torch.save(se_model, io.BytesIO())
    except Exception as exc:
        raise AssertionError(f"{name}: the retrofitted model does not pickle: {exc}") from exc


@pytest.mark.parametrize("name,expected,reason", CASES, ids=[c[0] for c in CASES])
def test_hard_case(name, expected, reason):
    check(name, expected, reason)


@pytest.mark.slow
@pytest.mark.parametrize("name,expected,reason", SLOW, ids=[c[0] for c in SLOW])
def test_hard_case_slow(name, expected, reason):
    check(name, expected, reason)


@pytest.mark.parametrize("name", ["resnet50", "mobilenetv2_035"])
def test_frozen_batch_norm_gives_the_plan_of_batch_norm(name):
    # freeze_batch_norm_2d swaps BatchNorm2d for torchvision's FrozenBatchNorm2d and timm's BatchNormAct2d for
    # FrozenBatchNormAct2d, whose forward computes x * scale + bias with its activation as a child: each such
    # norm was analysed as a block and reported as "adds a constant"
    from timm.layers import freeze_batch_norm_2d

    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    plain = se_retrofit.find_sites(make_pretrained_like(timm.create_model(name)).eval(), example_input=x)
    frozen = se_retrofit.find_sites(freeze_batch_norm_2d(make_pretrained_like(timm.create_model(name))).eval(),
                                    example_input=x)

    def sites(plan):
        return [(s.se_name, s.kind, s.shortcut, s.channels) for s in plan.sites]

    assert sites(frozen) == sites(plain) and sites(plain), f"{name}: frozen norms changed the sites\n{plain}\n{frozen}"
    assert frozen.skipped == plain.skipped, f"{name}: frozen norms changed what is left alone\n{plain}\n{frozen}"
