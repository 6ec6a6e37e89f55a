"""In-place writes that the graph's data flow does not show: the analysis must leave such additions
alone (or, where the rewrite is still exact, convert them), never return a block that computes
something else. `se_retrofit.mutation` is the analysis."""
from __future__ import annotations

import inspect
import warnings

import pytest
import torch
import torch.nn.functional as F

import se_retrofit
from se_retrofit import SERetrofitWarning

from conftest import make_pretrained_like
from models_custom import InPlaceWrites, Net, ScaledConv3Bottleneck

X = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))


def _apply(model, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SERetrofitWarning)
        return se_retrofit.apply(model, se_retrofit.SEConfig(**kwargs)).eval()


@pytest.mark.parametrize("kind,position,reason", [
    ("scaled", "standard", "is modified in place by 'mul_' before the addition reads it"),
    ("scaled_float", "standard", "is modified in place by 'mul_' before the addition reads it"),
    ("scaled_mT", "standard", "is modified in place by 'mul_' before the addition reads it"),
    ("scaled_data", "standard", "is modified in place by 'mul_' before the addition reads it"),
    ("scaled_atleast_3d", "standard", "is modified in place by 'mul_' before the addition reads it"),
    ("masked", "standard", "does not support item assignment"),  # fx cannot trace `out[:, 0] = 0`: skipped whole
    ("unbound", "standard", "reads 'conv2' after 'add_' wrote into it in place"),
    ("unbound", "post", "nothing reads the value of 'add_'"),
    ("into_clone", "identity", "reads 'clone' after 'add_' wrote into it in place"),
])
@pytest.mark.parametrize("init", ["identity", "paper"])
def test_additions_an_in_place_write_hides_are_left_alone(kind, position, reason, init):
    model = make_pretrained_like(Net([InPlaceWrites(16, kind)])).eval()
    se_model = _apply(model, init=init, position=position)
    plan = se_retrofit.get_plan(se_model)
    assert not plan.sites, f"{kind}/{position}: SE inserted where an in-place write hides the value: {plan.sites}"
    reasons = " | ".join(plan.reasons())
    assert reason in reasons, f"{kind}/{position}: expected a reason with {reason!r}, got {reasons!r}"
    with torch.no_grad():
        assert torch.equal(se_model(X), model(X)), f"{kind}/{position}: the model left alone changed its output"


@pytest.mark.parametrize("kind,position", [("unbound", "pre"), ("unbound", "identity"), ("into_clone", "standard")])
@pytest.mark.parametrize("fuse_add", [True, False])
def test_in_place_adds_that_stay_exact_are_converted(kind, position, fuse_add):
    """The SE reads and feeds values that no in-place write moves: compare with the SE written out by hand."""
    model = make_pretrained_like(Net([InPlaceWrites(16, kind)])).eval()
    se_model = _apply(model, init="paper", position=position, fuse_add=fuse_add)
    assert len(se_retrofit.get_plan(se_model).sites) == 1, f"{kind}/{position}: expected one site"
    block = se_model.blocks[0]
    with torch.no_grad():
        h = F.relu(se_model.stem(X))
        if position == "pre":
            expected = F.relu(block.branch(block.se(h)) + h)
        elif position == "identity":
            expected = F.relu(block.branch(h) + block.se(h))
        else:
            expected = F.relu(h + block.se(block.branch(h)))
        got = se_model.blocks(h)
    assert torch.allclose(got, expected, atol=1e-6), f"{kind}/{position}: off by {(got - expected).abs().max()}"


@pytest.mark.parametrize("alias", ["direct", "float", "mT", "data", "atleast_3d"])
@pytest.mark.parametrize("early_squeeze", [True, False])
def test_the_gate_is_not_taken_before_a_conv_output_written_in_place(early_squeeze, alias):
    """Also through a tensor sharing the output's memory: a conversion to its own dtype, a view."""
    model = make_pretrained_like(Net([ScaledConv3Bottleneck(16, alias)])).eval()
    se_model = _apply(model, init="paper", early_squeeze=early_squeeze)
    source = inspect.getsource(type(se_model.blocks[0]).forward)
    assert "gate_through" not in source, f"the gate was hoisted before an in-place write through {alias}"
    block = se_model.blocks[0]
    with torch.no_grad():
        h = F.relu(se_model.stem(X))
        c = block.conv3(block.conv1(h)) * 0.5
        expected = F.relu(h + block.se(block.bn3(c)))
        got = se_model.blocks(h)
    assert torch.allclose(got, expected, atol=1e-6), f"{alias}: off by {(got - expected).abs().max()}"
