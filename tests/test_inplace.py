"""``x += shortcut`` stays in place: in the traced graph, in the generated forward, and in the fused SE add."""
from __future__ import annotations

import warnings

import pytest
import timm
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import se_retrofit
from se_retrofit import SEBlock, SEConfig, SERetrofitWarning
from se_retrofit.augmented import iadd
from se_retrofit.tracing import BlockTracer

from conftest import make_pretrained_like, the_se_call
from models_custom import AddSpelling, Net

X = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))


class AliasedAdd(nn.Module):
    """``z`` is the same tensor as ``y``: in eager mode it sees the sum, an out-of-place trace would not."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        z = y
        y += x
        return torch.cat([z, y])


class NumberAdd(nn.Module):
    """``+=`` on a size: ``w`` must keep the old value (no rebinding of the name in generated code)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.shape[-1]
        w = h
        h += 1
        return x * w + h


def _traced(module: nn.Module) -> fx.GraphModule:
    return fx.GraphModule(module, BlockTracer().trace(module))


@pytest.mark.parametrize("module", [AliasedAdd(), NumberAdd()], ids=["tensor-alias", "number"])
def test_augmented_add_is_traced_as_it_runs(module):
    gm = _traced(module)
    assert any(n.target is iadd for n in gm.graph.nodes), "x += y was not recorded as an in-place add"
    with torch.no_grad():
        want, got = module(X), gm(X)
    assert torch.equal(want, got), f"generated forward differs from eager by {(want - got).abs().max()}"


def test_iadd_writes_into_tensors_and_returns_new_numbers():
    a = torch.ones(3)
    assert iadd(a, torch.ones(3)) is a and torch.equal(a, torch.full((3,), 2.0))
    n = 2
    assert iadd(n, 1) == 3 and n == 2


def _retrofit(spelling: str) -> nn.Module:
    """A one-block net (the same weights for every spelling) retrofitted with random SE weights."""
    torch.manual_seed(0)
    model = make_pretrained_like(Net([AddSpelling(16, spelling)])).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SERetrofitWarning)
        retro = se_retrofit.apply(model, SEConfig(init="paper"))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in retro.blocks[0].se.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return retro


@pytest.mark.parametrize("spelling,inplace", [("iadd", True), ("plus", False), ("torch.add", False)])
def test_only_an_in_place_original_lets_the_se_block_write_into_its_input(spelling, inplace):
    call = the_se_call(_retrofit(spelling).blocks[0])
    assert len(call.args) == 2, f"{spelling}: the add was not folded"
    assert call.kwargs.get("inplace", False) is inplace, f"{spelling}: inplace={call.kwargs} in the SE call"


def _shares_input_memory(model: nn.Module, grad: bool) -> bool:
    """Whether the SE output of the first block occupies the memory of its input (the branch output)."""
    seen = {}
    block = model.blocks[0]
    h1 = block.se.register_forward_hook(lambda m, args, out: seen.update(x=args[0].data_ptr(), out=out.data_ptr()))
    try:
        with torch.set_grad_enabled(grad):
            model(X)
    finally:
        h1.remove()
    return seen["x"] == seen["out"]


def test_in_place_fused_add_overwrites_only_without_autograd():
    retro = _retrofit("iadd")
    plain = _retrofit("plus")
    assert _shares_input_memory(retro, grad=False), "no_grad: the sum should go into the branch output"
    assert not _shares_input_memory(retro, grad=True), "with autograd the gate's gradient needs the branch output"
    with torch.no_grad():
        assert torch.allclose(retro(X), plain(X), rtol=1e-6, atol=1e-6), "in-place fused add changes the output"
    with torch.inference_mode():
        assert torch.allclose(retro(X), plain(X), rtol=1e-6, atol=1e-6), "inference_mode output differs"


def test_in_place_fused_add_trains_like_the_out_of_place_one():
    grads = []
    for spelling in ("iadd", "plus"):
        model = _retrofit(spelling).train()
        F.cross_entropy(model(X), torch.tensor([1, 3])).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], rtol=1e-5, atol=1e-6), f"gradient of {name} differs"


def test_se_block_in_place_falls_back_when_the_input_cannot_hold_the_sum():
    se = SEBlock(8, 4)
    x, r = torch.randn(2, 8, 5, 5), torch.randn(2, 8, 5, 5)
    with torch.no_grad():
        want = se(x.clone(), r)
        xi = x.clone()
        out = se(xi, r, inplace=True)
        assert out.data_ptr() == xi.data_ptr() and torch.equal(out, want), "in-place result differs"
        wide = torch.randn(2, 8, 1, 1)
        xb = x.clone()
        out = se(wide, xb, inplace=True)  # the sum is 5x5: it cannot go into the 1x1 input
        assert out.shape == (2, 8, 5, 5) and out.data_ptr() != wide.data_ptr()
        xf, want = x.clone(), x.clone()
        want += se(x.clone()).double() - x.double() + r.double()  # x += r64 sums in float64, keeps x's dtype
        out = se(xf, r.double(), inplace=True)  # float64 shortcut: a new tensor, in x's dtype as x += r gives
        assert out.dtype == torch.float32 and out.data_ptr() != xf.data_ptr()
        assert torch.allclose(out, want, rtol=1e-6, atol=1e-6), "mixed-dtype fused add differs from x += r"
    x.requires_grad_()
    out = se(x, r, inplace=True)
    out.sum().backward()
    assert out.data_ptr() != x.data_ptr() and x.grad is not None, "autograd path must not overwrite its input"


def test_timm_resnet_writes_the_sum_where_timm_does():
    """timm's Bottleneck does ``x += shortcut`` on bn3's output; the retrofit's fused add does the same."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SERetrofitWarning)
        retro = se_retrofit.apply(timm.create_model("resnet26"), init="paper").eval()
    block = retro.layer1[1]
    ptr = {}
    block.bn3.register_forward_hook(lambda m, a, out: ptr.update(bn3=out.data_ptr()))
    block.se.register_forward_hook(lambda m, a, out: ptr.update(se=out.data_ptr()))
    with torch.inference_mode():
        retro(torch.rand(1, 3, 32, 32))
    assert ptr["bn3"] == ptr["se"], "the fused SE add allocated a new feature map in inference"


def test_a_mixed_dtype_in_place_add_keeps_the_branch_dtype_under_autocast():
    """``out += x`` with a bfloat16 branch (autocast) and a float32 shortcut (a block's input that no
    autocast op made) stays bfloat16; so must the fused add, or identity init would not reproduce the
    original."""
    model = make_pretrained_like(Net([AddSpelling(16, "iadd")])).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SERetrofitWarning)
        retro = se_retrofit.apply(model)
    features = torch.rand(2, 16, 8, 8, generator=torch.Generator().manual_seed(4))  # a float32 shortcut
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for grad in (False, True):
            with torch.set_grad_enabled(grad):
                want, got = model.blocks[0](features), retro.blocks[0](features)
            assert got.dtype == want.dtype, f"grad={grad}: output dtype {got.dtype}, original {want.dtype}"
            assert torch.equal(got, want), f"grad={grad}: identity retrofit differs by {(got - want).abs().max()}"


@pytest.mark.parametrize("transform", ["forward AD", "jvp", "vmap"])
def test_the_in_place_add_steps_aside_for_forward_ad_and_torch_func(transform):
    """An ``out=`` op has no forward derivative and no batching rule: under forward-mode AD and
    ``torch.func`` transforms the fused add must compute out of place, as the original's ``+=`` allows."""
    from torch.autograd import forward_ad
    from torch.func import jvp, vmap

    model = make_pretrained_like(Net([AddSpelling(16, "iadd")])).eval().requires_grad_(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SERetrofitWarning)
        retro = se_retrofit.apply(model)
    tangent = torch.rand_like(X)

    def run(m: nn.Module) -> torch.Tensor:
        if transform == "forward AD":
            with torch.no_grad(), forward_ad.dual_level():
                return forward_ad.unpack_dual(m(forward_ad.make_dual(X, tangent))).tangent
        if transform == "jvp":
            return jvp(m, (X,), (tangent,))[1]
        with torch.no_grad():
            return vmap(lambda xi: m(xi.unsqueeze(0)).squeeze(0))(X)

    want, got = run(model), run(retro)
    assert torch.equal(got, want), f"{transform}: identity retrofit differs by {(got - want).abs().max()}"


def test_a_recorded_in_place_add_is_out_of_place():
    """Under a dispatch mode (``make_fx``) the fused add records the out-of-place ``addcmul``: a graph
    that overwrote its input would do so for every later caller, whatever their autograd needs."""
    from torch.fx.experimental.proxy_tensor import make_fx

    se = SEBlock(16, 8).eval()
    x, residual = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)
    with torch.no_grad():
        graph = make_fx(lambda a, b: se(a, b, inplace=True))(x.clone(), residual)
        ops = {str(n.target) for n in graph.graph.nodes if n.op == "call_function"}
        kept = x.clone()
        graph(kept, residual)
    assert "aten.addcmul.default" in ops and not any("out" in op or "addcmul_" in op for op in ops), ops
    assert torch.equal(kept, x), "the recorded graph wrote the sum into its input"
