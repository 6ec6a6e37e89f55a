"""The SE block doing the residual addition (``fuse_add``): same function, one pass, only where safe."""
from __future__ import annotations

import copy
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import se_retrofit
from se_retrofit import SEBlock, SEConfig, SERetrofitWarning

from conftest import make_pretrained_like
from models_custom import AddSpelling, Net, conv_bn

X = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))


class IdentityDropPath(nn.Module):
    """timm's layout with drop-path disabled: ``drop_path`` is an ``nn.Identity`` between branch and add."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = conv_bn(channels, channels)
        self.conv2 = conv_bn(channels, channels)
        self.drop_path = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.drop_path(self.conv2(F.relu(self.conv1(x)))) + x)


class AddIntoShortcut(nn.Module):
    """The branch is added *into* the projected shortcut in place: folding would leave ``s`` unchanged."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = conv_bn(channels, channels)
        self.conv2 = conv_bn(channels, channels)
        self.proj = nn.Conv2d(channels, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.proj(x)
        s.add_(self.conv2(F.relu(self.conv1(x))))
        return F.relu(s) + s


class _SELeafTracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, SEBlock) or super().is_leaf_module(m, qualname)


def _se_calls(block: nn.Module) -> list[int]:
    """Number of arguments of each SE call in the block's generated forward."""
    graph = _SELeafTracer().trace(block)
    return [len(n.args) for n in graph.nodes
            if n.op == "call_module" and isinstance(block.get_submodule(n.target), SEBlock)]


def _adds(block: nn.Module) -> int:
    graph = _SELeafTracer().trace(block)
    return sum(1 for n in graph.nodes if "add" in str(n.target))


def _both(model: nn.Module, **kwargs) -> tuple[nn.Module, nn.Module]:
    make_pretrained_like(model).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SERetrofitWarning)
        fused = se_retrofit.apply(model, SEConfig(**kwargs))
        plain = se_retrofit.apply(model, SEConfig(fuse_add=False, **kwargs))
    return fused, plain


def _randomise_se(*models: nn.Module) -> None:
    """The same random SE weights in each model, so the gates are far from 1."""
    gen = torch.Generator().manual_seed(11)
    names = [n for n, _ in se_retrofit.se_blocks(models[0])]
    for name in names:
        values = {k: torch.randn(v.shape, generator=gen) * 0.5
                  for k, v in models[0].get_submodule(name).state_dict().items()}
        for model in models:
            model.get_submodule(name).load_state_dict(values)


@pytest.mark.parametrize("spelling", ["plus", "iadd", "torch.add", "Tensor.add", "reversed"])
def test_out_of_place_additions_are_folded_into_the_se_block(spelling):
    fused, plain = _both(Net([AddSpelling(16, spelling)]), init="paper")
    assert _se_calls(fused.blocks[0]) == [2], f"{spelling}: the addition should be done by the SE block"
    assert _adds(fused.blocks[0]) == 0, f"{spelling}: an addition is left next to the fused SE block"
    assert _se_calls(plain.blocks[0]) == [1] and _adds(plain.blocks[0]) == 1, "fuse_add=False must keep the add"
    _randomise_se(fused, plain)
    with torch.no_grad():
        a, b = fused(X), plain(X)
    assert torch.allclose(a, b, rtol=1e-6, atol=1e-6), f"{spelling}: fused output differs by {(a - b).abs().max()}"


def test_fused_and_plain_blocks_train_alike():
    fused, plain = _both(Net([AddSpelling(16, "plus"), AddSpelling(16, "reversed")]), init="paper")
    _randomise_se(fused, plain)
    grads = []
    for model in (fused, plain):
        model.train()
        F.cross_entropy(model(X), torch.tensor([1, 3])).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], rtol=1e-5, atol=1e-6), f"gradient of {name} differs when fused"


def test_identity_modules_between_se_and_add_are_seen_through():
    fused, plain = _both(Net([IdentityDropPath(16)]))
    assert _se_calls(fused.blocks[0]) == [2], "an nn.Identity drop-path should not stop the fold"
    with torch.no_grad():
        assert torch.equal(fused(X), plain(X)), "identity init: fused and plain must agree exactly"


def test_in_place_add_into_the_shortcut_is_not_folded():
    fused, plain = _both(Net([AddIntoShortcut(16)]), init="paper")
    assert _se_calls(fused.blocks[0]) == [1], "s.add_(se(x)) must stay: later reads of s need the sum"
    _randomise_se(fused, plain)
    with torch.no_grad():
        assert torch.equal(fused(X), plain(X))


def test_position_identity_folds_the_gated_shortcut():
    fused, plain = _both(Net([AddSpelling(16, "plus")]), init="paper", position="identity")
    assert _se_calls(fused.blocks[0]) == [2]
    _randomise_se(fused, plain)
    with torch.no_grad():
        assert torch.allclose(fused(X), plain(X), rtol=1e-6, atol=1e-6)


def test_fused_model_is_idempotent_and_reports_the_se():
    fused, _ = _both(Net([AddSpelling(16, "plus")]))
    with pytest.warns(SERetrofitWarning, match=r"already has channel attention: SEBlock .*\(doing the add\)"):
        again = se_retrofit.apply(fused)
    assert len(se_retrofit.se_blocks(again)) == 1, "a second apply added an SE block next to a fused one"


def test_resnets_fold_every_block_and_keep_seresnet50_function():
    tv = se_retrofit.apply(torchvision.models.resnet18())
    assert all(_se_calls(b) == [2] for b in (*tv.layer1, *tv.layer4)), "torchvision BasicBlock not folded"
    hand = make_pretrained_like(timm.create_model("seresnet50")).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SERetrofitWarning)
        retro = se_retrofit.apply(timm.create_model("resnet50"), init="paper").eval()
    retro.load_state_dict(hand.state_dict())
    assert _se_calls(retro.layer3[0]) == [2]
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        a, b = hand(x), retro(x)
    rel = ((a - b).abs().max() / a.abs().max()).item()
    assert rel <= 1e-5, f"fused retrofit differs from seresnet50 by {rel:.2e} (relative)"


def test_fuse_add_must_be_a_bool():
    with pytest.raises(ValueError, match="fuse_add"):
        SEConfig(fuse_add="yes")
    assert SEConfig.from_dict(SEConfig(fuse_add=False).to_dict()).fuse_add is False


def test_se_block_with_residual_is_addcmul():
    se = SEBlock(8, 4, gain=1.0)
    x, r = torch.randn(2, 8, 5, 5), torch.randn(2, 8, 5, 5)
    assert torch.allclose(se(x, r), se(x) + r, atol=1e-6)
    deep = copy.deepcopy(se)
    assert torch.equal(deep(x, r), se(x, r))


def _block_errors(device: str, fuse: bool) -> tuple[float, float]:
    """Relative error of an SE block's bf16 output and gradients against float32, fused or not."""
    gen = torch.Generator().manual_seed(0)
    se = SEBlock(64, 8, gain=1.0)
    with torch.no_grad():
        for p in se.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    se = se.to(device)
    x0, r0, w = (torch.randn(8, 64, 28, 28, generator=gen).to(device) for _ in range(3))

    def run(dtype: torch.dtype | None, fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
        se.zero_grad(set_to_none=True)
        x, r = x0.clone().requires_grad_(), r0.clone().requires_grad_()
        xs, rs = (x.to(dtype), r.to(dtype)) if dtype else (x, r)
        with torch.autocast(device, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            out = se(xs, rs) if fused else se(xs) + rs
        (out.float() * w).sum().backward()
        grads = torch.cat([x.grad.flatten(), r.grad.flatten(), se.fc1.weight.grad.flatten()])
        return out.float().detach(), grads

    ref_out, ref_grads = run(None, True)
    out, grads = run(torch.bfloat16, fuse)
    return ((out - ref_out).norm() / ref_out.norm()).item(), ((grads - ref_grads).norm() / ref_grads.norm()).item()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_fused_add_is_no_less_accurate_in_bfloat16(device):
    """bf16 rounds ``shortcut + x * gate`` once when fused and twice (multiply, add) when not."""
    fused_out, fused_grad = _block_errors(device, fuse=True)
    plain_out, plain_grad = _block_errors(device, fuse=False)
    assert fused_out <= plain_out * 1.01, f"fused bf16 output error {fused_out:.5f} > unfused {plain_out:.5f}"
    assert fused_grad <= plain_grad * 1.1, f"fused bf16 gradient error {fused_grad:.5f} > unfused {plain_grad:.5f}"


@pytest.mark.parametrize("name, fused, early", [("resnet26", True, True), ("resnet10t", True, False)])
def test_the_plan_says_which_blocks_took_the_fast_paths(name, fused, early):
    """A bottleneck ends in a 1x1 conv + BN (early squeeze); a basic block in a 3x3 conv (no early squeeze)."""
    model = timm.create_model(name, pretrained=False).eval()
    assert all(s.fused_add is None and s.early_squeeze is None for s in se_retrofit.find_sites(model).sites), \
        "a dry run decides nothing about the rewrite"
    plan = se_retrofit.get_plan(se_retrofit.apply(model))
    assert {(s.fused_add, s.early_squeeze) for s in plan.sites} == {(fused, early)}, str(plan)
    assert ("fused add" in str(plan)) is fused and ("early squeeze" in str(plan)) is early, str(plan)
    off = se_retrofit.get_plan(se_retrofit.apply(model, SEConfig(fuse_add=False, early_squeeze=False)))
    assert {(s.fused_add, s.early_squeeze) for s in off.sites} == {(False, False)}, str(off)
    post = se_retrofit.get_plan(se_retrofit.apply(model, position="post"))
    assert not any(s.fused_add or s.early_squeeze for s in post.sites), f"after the add there is nothing to fuse:\n{post}"


class _NarrowingBottleneck(nn.Module):
    """The SE input is ``bn3(conv3(z))`` with ``conv3`` narrowing: averaging ``z`` would read more, not less."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.conv3 = conv_bn(c, 2 * c), nn.Conv2d(2 * c, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)

    def forward(self, x):
        return x + self.bn3(self.conv3(F.relu(self.conv1(x))))


class _AddByMode(nn.Module):
    """``torch.add(..., alpha=1.0)`` in training (not folded), ``+`` in eval (folded)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.conv2 = conv_bn(c, c), conv_bn(c, c)

    def forward(self, x):
        out = self.conv2(F.relu(self.conv1(x)))
        return torch.add(x, out, alpha=1.0) if self.training else out + x


def test_the_plan_claims_a_fast_path_only_where_it_runs():
    narrowing = se_retrofit.get_plan(se_retrofit.apply(make_pretrained_like(Net([_NarrowingBottleneck(16)])).eval()))
    assert [s.early_squeeze for s in narrowing.sites] == [False], f"a narrowing conv never squeezes early:\n{narrowing}"
    by_mode = se_retrofit.get_plan(se_retrofit.apply(make_pretrained_like(Net([_AddByMode(16)])).eval()))
    assert [s.fused_add for s in by_mode.sites] == [False], f"the training forward does its own add:\n{by_mode}"
