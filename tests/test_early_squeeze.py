"""The squeeze taken before a bottleneck's last 1x1 conv and batch norm: same function, only where exact."""
from __future__ import annotations

import warnings

import pytest
import timm
import torch
import torch.fx as fx
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

import se_retrofit
from se_retrofit import SEConfig, SERetrofitWarning
from se_retrofit.early_excitation import gate_through, squeeze_through

from conftest import make_pretrained_like, the_se_call


class Bottleneck(nn.Module):
    """A bottleneck whose last conv and norm are chosen by the test."""

    def __init__(self, conv3: nn.Module, bn3: nn.Module, channels: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 8, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv3 = conv3
        self.drop = nn.Identity()
        self.bn3 = bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.drop(self.conv3(F.relu(self.bn1(self.conv1(x))))))
        out += x
        return F.relu(out)


class Net(nn.Module):
    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.block = block
        self.fc = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.block(self.stem(x)).mean((2, 3)))


X = torch.rand(2, 3, 24, 24, generator=torch.Generator().manual_seed(2))


def _randomise_se(model: nn.Module, seed: int = 4) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, se in se_retrofit.se_blocks(model):
            for p in se.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def _pair(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(early squeeze, plain squeeze) retrofits of ``model`` with the same random SE weights."""
    make_pretrained_like(model).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SERetrofitWarning)
        early = se_retrofit.apply(model, SEConfig(init="paper"))
        plain = se_retrofit.apply(model, SEConfig(init="paper", early_squeeze=False))
    _randomise_se(early)
    _randomise_se(plain)
    return early, plain


@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
def test_squeeze_through_equals_the_mean_of_the_output(spatial_dims):
    conv = [nn.Conv1d, nn.Conv2d, nn.Conv3d][spatial_dims - 1](16, 64, 1)
    norm = make_pretrained_like([nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d][spatial_dims - 1](64)).eval()
    z = torch.randn(2, 16, *({1: 64, 2: 12, 3: 8}[spatial_dims],) * spatial_dims)
    with torch.no_grad():
        want = norm(conv(z)).mean(tuple(range(2, 2 + spatial_dims)))
        got = squeeze_through(z, conv, norm)
    assert got is not None, "a 16 -> 64 conv on this map should take the early squeeze"
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), f"early squeeze off by {(got - want).abs().max()}"


def test_squeeze_through_declines_where_it_is_not_exact_or_not_cheaper():
    conv, z = nn.Conv2d(16, 64, 1), torch.randn(2, 16, 12, 12)
    assert squeeze_through(z, conv, nn.BatchNorm2d(64).train()) is None, "training mode uses batch statistics"
    assert squeeze_through(z, conv, nn.BatchNorm2d(64, track_running_stats=False).eval()) is None
    for n in (1, 64):
        assert squeeze_through(torch.randn(n, 16, 4, 4), conv, nn.BatchNorm2d(64).eval()) is None, \
            "a 4x4 map is cheaper to average than the conv weight is to read, whatever the batch"
    frozen = FrozenBatchNorm2d(64)
    with torch.no_grad():
        frozen.running_mean.uniform_(-1, 1)
        frozen.weight.uniform_(0.5, 2)
        got = squeeze_through(z, conv, frozen)
        assert torch.allclose(got, frozen(conv(z)).mean((2, 3)), rtol=1e-5, atol=1e-5)


def test_bottleneck_gets_the_early_squeeze_and_keeps_its_function():
    early, plain = _pair(Net(Bottleneck(nn.Conv2d(8, 32, 1, bias=True), nn.BatchNorm2d(32))))
    call = the_se_call(early.block)
    gate = call.kwargs["gate"]
    assert gate.target is gate_through, call.kwargs
    assert [a.target for a in gate.args[1:]] == ["conv3", "bn3", "se"], gate.args
    conv3 = next(n for n in call.graph.nodes if n.op == "call_module" and n.target == "conv3")
    order = list(call.graph.nodes)
    assert order.index(gate) < order.index(conv3), "the squeeze must be taken before conv3 (z freed after it)"
    z = gate.args[0]
    assert all(order.index(u) <= order.index(conv3) for u in z.users), "z must not live past conv3"
    assert "gate" not in the_se_call(plain.block).kwargs, "early_squeeze=False must not hoist"
    with torch.no_grad():
        a, b = early(X), plain(X)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), f"early squeeze changes the output by {(a - b).abs().max()}"


@pytest.mark.parametrize("conv3,bn3,why", [
    (nn.Conv2d(8, 32, 3, padding=1), nn.BatchNorm2d(32), "3x3 conv"),
    (nn.Conv2d(8, 32, 1, groups=8), nn.BatchNorm2d(32), "grouped conv"),
    (nn.Conv2d(8, 32, 1), nn.GroupNorm(4, 32), "group norm"),
    (nn.Conv2d(8, 32, 1), timm.layers.BatchNormAct2d(32, act_layer=nn.ReLU), "norm subclass with an activation"),
])
def test_other_chains_average_the_se_input(conv3, bn3, why):
    early, plain = _pair(Net(Bottleneck(conv3, bn3)))
    assert "gate" not in the_se_call(early.block).kwargs, f"{why}: the squeeze must not be hoisted"
    with torch.no_grad():
        assert torch.equal(early(X), plain(X))


def test_training_mode_and_gradients_match_the_plain_squeeze():
    for mode in ("train", "eval"):
        grads = []
        for model in _pair(Net(Bottleneck(nn.Conv2d(8, 32, 1), nn.BatchNorm2d(32)))):
            getattr(model, mode)()
            F.cross_entropy(model(X), torch.tensor([0, 3])).backward()
            grads.append({n: p.grad for n, p in model.named_parameters()})
        for name, g in grads[0].items():
            assert torch.allclose(g, grads[1][name], rtol=1e-4, atol=1e-6), f"{mode}: gradient of {name} differs"


@pytest.mark.parametrize("build", [lambda: timm.create_model("resnet26"), lambda: torchvision.models.resnet50()],
                         ids=["timm-resnet26", "torchvision-resnet50"])
def test_resnet_bottlenecks_keep_their_function(build):
    """In float64, so that the comparison sees the arithmetic and not float32 rounding amplified by
    16 random-weight gates (about 3e-4 relative in float32, 3e-13 in float64)."""
    early, plain = _pair(build())
    assert all("gate" in the_se_call(b).kwargs for b in early.layer1), "layer1 bottlenecks not hoisted"
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        a, b = early.double()(x), plain.double()(x)
    rel = ((a - b).abs().max() / b.abs().max()).item()
    assert rel <= 1e-10, f"early squeeze changes the output by {rel:.2e} (relative, float64)"


def test_jit_trace_records_the_plain_squeeze():
    """A trace fixes control flow: it must not fix the eval-only, input-size-dependent early squeeze."""
    early, plain = _pair(Net(Bottleneck(nn.Conv2d(8, 32, 1), nn.BatchNorm2d(32))))
    traced = torch.jit.trace(early, X)
    ops = {n.kind() for n in traced.inlined_graph.nodes()}
    assert "aten::linear" in ops and "aten::mean" in ops
    bigger = torch.rand(3, 3, 40, 40)
    with torch.no_grad():
        assert torch.allclose(traced(bigger), plain(bigger), rtol=1e-5, atol=1e-6)


def test_symbolic_trace_of_a_retrofitted_model_records_the_plain_squeeze():
    early, plain = _pair(Net(Bottleneck(nn.Conv2d(8, 32, 1), nn.BatchNorm2d(32))))
    traced = fx.symbolic_trace(early)
    with torch.no_grad():
        assert torch.equal(traced(X), plain(X)), "fx-traced retrofit should compute the plain squeeze"


def test_early_squeeze_must_be_a_bool():
    with pytest.raises(ValueError, match="early_squeeze"):
        SEConfig(early_squeeze=1)


def test_compile_and_export_see_the_plain_squeeze():
    """torch.compile and torch.export trace the plain SE ops: no guard on the input's size, one graph."""
    early, plain = _pair(Net(Bottleneck(nn.Conv2d(8, 32, 1), nn.BatchNorm2d(32))))
    torch._dynamo.reset()
    compiled = torch.compile(early, backend="aot_eager", fullgraph=True)
    program = torch.export.export(early, (X,), dynamic_shapes=({0: torch.export.Dim("batch", max=64)},))
    means = [n.args[0].meta["val"].shape[1] for n in program.graph.nodes if n.target == torch.ops.aten.mean.dim]
    assert means == [32, 32], f"channels of the averaged maps {means}: the SE must average bn3 (32), not z (8)"
    for x in (X, torch.rand(5, 3, 24, 24)):
        with torch.no_grad():
            want = plain(x)
            assert torch.equal(compiled(x), want), "compiled early-squeeze model differs from the plain one"
            assert torch.equal(program.module()(x), want), "exported early-squeeze model differs from the plain one"


def test_fusing_conv3_and_bn3_after_apply_falls_back_to_the_plain_squeeze():
    """Deployment often fuses each conv with its batch norm, leaving nn.Identity where bn3 was: the
    hoisted call still names ``self.bn3`` and must then let the SE block average its input."""
    early, plain = _pair(Net(Bottleneck(nn.Conv2d(8, 32, 1), nn.BatchNorm2d(32))))
    for model in (early, plain):
        model.block.conv3 = torch.nn.utils.fusion.fuse_conv_bn_eval(model.block.conv3, model.block.bn3)
        model.block.bn3 = nn.Identity()
    with torch.no_grad():
        a, b = early(X), plain(X)
    assert torch.equal(a, b), f"after fusion the early-squeeze model differs by {(a - b).abs().max()}"
