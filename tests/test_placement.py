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


class _RepDw(nn.Module):
    """RepViT's RepVggDw: a re-parameterisable sum, returned through a norm."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c), nn.BatchNorm2d(c))
        self.conv1 = nn.Conv2d(c, c, 1, groups=c)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return self.bn(self.conv(x) + self.conv1(x) + x)


class _RepViTLike(nn.Module):
    def __init__(self, c: int, attention: nn.Module) -> None:
        super().__init__()
        self.token_mixer = _RepDw(c)
        self.se = attention
        self.channel_mixer = nn.Sequential(nn.Conv2d(c, 2 * c, 1), nn.ReLU(), nn.Conv2d(2 * c, c, 1))

    def forward(self, x):
        x = self.se(self.token_mixer(x))
        return x + self.channel_mixer(x)


def test_attention_the_parent_applies_to_a_blocks_sum_counts_as_the_units():
    """No second SE right before the parent's own (RepViT, RepGhostNet): nothing but a norm between them."""
    from torchvision.ops import SqueezeExcitation

    with_se = se_retrofit.find_sites(_RepViTLike(16, SqueezeExcitation(16, 8)))
    beside = [s for s in with_se.skipped if s.block == "token_mixer"]
    assert [s.block for s in with_se.sites] == [""], f"only the outer residual should get SE:\n{with_se}"
    assert beside and all("already has channel attention: SqueezeExcitation at 'se' in the parent, on this module's output" in s.reason for s in beside), \
        f"the mixer's sum should be left alone for the parent's SE:\n{with_se}"
    without = se_retrofit.find_sites(_RepViTLike(16, nn.Identity()))
    assert sorted(s.block for s in without.sites) == ["", "token_mixer"], f"control, no parent SE:\n{without}"


class _RepConv(nn.Module):
    """A RepVGG arm set (3x3 + 1x1 + identity norm) with an activation: one conv layer once re-parameterised."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.k3 = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.k1 = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))
        self.skip = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(self.k3(x) + self.k1(x) + self.skip(x))


class _GhostV3Like(nn.Module):
    """A residual block whose branch runs re-parameterisable layers (GhostNetV3, RepGhostNet, FastViT)."""

    def __init__(self, c: int, attention: nn.Module | None = None) -> None:
        super().__init__()
        self.pw = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.rep1, self.rep2 = _RepConv(c), _RepConv(c)
        self.se = attention or nn.Identity()

    def forward(self, x):  # a convolution first, so that position="pre" knows the branch input's channel axis
        return x + self.se(self.rep2(self.rep1(self.pw(x))))


class _InlineRep(nn.Module):
    """The same with the arms summed in the residual block's own forward."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.k3 = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.k1 = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))
        self.out = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return x + self.out(torch.relu(self.k3(x) + self.k1(x)))


def _quiet(call, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", se_retrofit.SERetrofitWarning)
        return call(*args, **kwargs)


@pytest.mark.parametrize("model", [_GhostV3Like(16), _InlineRep(16)], ids=["child-module", "same-graph"])
def test_a_linear_sum_on_a_residual_branch_is_a_layer_of_that_unit(model):
    """SE-ResNet gates each residual unit once, at the end of its branch; the arms inside are one conv."""
    plan = se_retrofit.find_sites(model)
    assert [(s.block, s.kind) for s in plan.sites] == [("", "residual")], f"one SE for the unit:\n{plan}"
    nested = [s for s in plan.skipped if s.reason == se_retrofit.sites.NESTED_REASON]
    assert len(nested) == (2 if isinstance(model, _GhostV3Like) else 1), f"inner sums not reported:\n{plan}"
    alone = se_retrofit.find_sites(_RepConv(16))
    assert [s.kind for s in alone.sites] == ["multi-branch"], f"control: a RepVGG block of its own is a unit:\n{alone}"


@pytest.mark.parametrize("fuse_add", [True, False])
@pytest.mark.parametrize("position", ["standard", "pre", "post", "identity"])
def test_apply_again_adds_nothing_inside_a_gated_unit(position, fuse_add):
    """The second apply sees the unit's SE (doing the add, or beside it, or on the shortcut as a second
    operand that now holds convolutions) and still leaves the arms alone."""
    config = se_retrofit.SEConfig(position=position, fuse_add=fuse_add)
    once = _quiet(se_retrofit.apply, perturb_norms(_GhostV3Like(16)).eval(), config)
    assert len(se_retrofit.se_blocks(once)) == 1, f"{position}: first apply"
    twice = _quiet(se_retrofit.apply, once)
    assert len(se_retrofit.se_blocks(twice)) == 1, \
        f"{position}, fuse_add={fuse_add}: a second apply added SE inside the gated unit:\n{se_retrofit.get_plan(twice)}"


class _NoConvFirst(nn.Module):
    """A ghost bottleneck's shape: the branch starts in a child module, so position="pre" has no channel axis."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.rep1, self.rep2 = _RepConv(c), _RepConv(c)

    def forward(self, x):
        return x + self.rep2(self.rep1(x))


def test_a_unit_that_cannot_take_se_at_the_position_still_owns_its_layers():
    plan = se_retrofit.find_sites(_NoConvFirst(16), position="pre")
    assert not plan.sites, f"the unit's layers should not become units in its stead:\n{plan}"
    reasons = {s.block: s.reason for s in plan.skipped}
    assert reasons[""].startswith("position='pre'") and reasons["rep1"] == reasons["rep2"] == \
        se_retrofit.sites.NESTED_REASON, reasons


def test_include_can_ask_for_se_in_the_layers_instead_of_the_unit():
    plan = se_retrofit.find_sites(_GhostV3Like(16), include="rep1")
    assert [(s.block, s.kind) for s in plan.sites] == [("rep1", "multi-branch")], \
        f"the unit is not selected, so its layer is a unit for this call:\n{plan}"


class _SharedLayer(nn.Module):
    """The same RepVGG layer registered twice, first outside the unit that runs it."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.rep = _RepConv(c)
        self.unit = _GhostV3Like(c)
        self.unit.rep1 = self.rep

    def forward(self, x):
        return self.unit(x)


def test_a_layer_registered_under_two_names_is_judged_by_where_it_runs():
    plan = se_retrofit.find_sites(_SharedLayer(16))
    assert [s.block for s in plan.sites] == ["unit"], f"one SE for the one unit:\n{plan}"


def test_a_unit_with_its_own_attention_gets_none_inside():
    from torchvision.ops import SqueezeExcitation

    plan = se_retrofit.find_sites(_GhostV3Like(16, SqueezeExcitation(16, 8)))
    assert not plan.sites, f"the unit already has SE; its inner sums are its layers:\n{plan}"


@pytest.mark.parametrize("name", ["ghostnetv3_050", "repghostnet_050"])
def test_ghost_bottlenecks_get_one_se_each_and_none_in_their_ghost_modules(name):
    """16 bottlenecks, 7 with timm's own SE: 9 SE blocks (there were 65 and 36, inside every ghost module)."""
    model = timm.create_model(name, pretrained=False)
    bottlenecks = {n for n, m in model.named_modules() if type(m).__name__.endswith("Bottleneck")
                   or type(m).__name__.endswith("BottleneckV3")}
    gated = {n for n in bottlenecks if not isinstance(getattr(model.get_submodule(n), "se", None), (type(None), nn.Identity))}
    plan = se_retrofit.find_sites(model)
    assert sorted(s.block for s in plan.sites) == sorted(bottlenecks - gated), \
        f"{name}: SE should go once on each bottleneck without its own SE:\n{plan}"


@pytest.mark.parametrize("position", ["standard", "pre", "post"])
def test_apply_again_adds_nothing_to_a_gated_repvgg_block(position):
    """position="pre" puts a multi-branch block's SE on the input all its arms read: no arm holds it alone."""
    once = _quiet(se_retrofit.apply, perturb_norms(_RepConv(16)).eval(), position=position)
    assert len(se_retrofit.se_blocks(once)) == 1, f"{position}: first apply"
    twice = _quiet(se_retrofit.apply, once)
    assert len(se_retrofit.se_blocks(twice)) == 1, \
        f"{position}: a second apply added another SE block:\n{se_retrofit.get_plan(twice)}"


class _PositionEmbedded(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.pos_embed = nn.Parameter(torch.zeros(1, 8, 16, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem(x) + self.pos_embed


@pytest.mark.parametrize("batch", [1, 2])
def test_a_position_embedding_is_not_a_shortcut_even_at_batch_1(batch):
    """At batch 1 a (1, C, H, W) parameter has the feature map's shape; it is still not a residual."""
    plan = se_retrofit.find_sites(_PositionEmbedded(), example_input=torch.randn(batch, 3, 16, 16))
    assert not plan.sites, f"batch {batch}: a position embedding got SE\n{plan}"
    assert any(s.reason.startswith("adds a constant") for s in plan.skipped), plan


class _TopDown(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lateral = nn.Conv2d(8, 8, 1)

    def forward(self, c4: torch.Tensor, p5: torch.Tensor) -> torch.Tensor:
        return self.lateral(c4) + nn.functional.interpolate(p5, scale_factor=2.0)


class _Neck(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.down, self.top_down = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, 2, 1), _TopDown()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c4 = torch.relu(self.stem(x))
        return self.top_down(c4, torch.relu(self.down(c4)))


def test_a_feature_pyramid_fusion_of_two_inputs_is_not_a_residual():
    plan = se_retrofit.find_sites(_Neck(), example_input=torch.randn(2, 3, 16, 16))
    assert not plan.sites, f"lateral(c4) + upsample(p5) got SE\n{plan}"
    assert any("a fusion of two inputs, as in a feature pyramid" in s.reason for s in plan.skipped), plan


class _CausalBlock(nn.Module):
    """A TCN block (Bai et al. 2018): each causal convolution's padding trimmed inline, then the residual add."""

    def __init__(self, c: int = 16, k: int = 3, d: int = 2) -> None:
        super().__init__()
        self.pad = (k - 1) * d
        self.conv1 = nn.Conv1d(c, c, k, padding=self.pad, dilation=d)
        self.conv2 = nn.Conv1d(c, c, k, padding=self.pad, dilation=d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.conv1(x)[:, :, :-self.pad])
        out = torch.relu(self.conv2(out)[:, :, :-self.pad])
        return torch.relu(out + x)


class _ChannelSliceBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(16, 32, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))[:, :16] + x


def test_a_crop_that_keeps_every_channel_is_not_a_partial_add():
    x = torch.randn(2, 16, 50)
    model = nn.Sequential(nn.Conv1d(16, 16, 1), _CausalBlock()).eval()
    plan = se_retrofit.find_sites(model, example_input=x)
    assert [(s.block, s.kind, s.shortcut) for s in plan.sites] == [("1", "residual", "identity")], plan
    se_model = se_retrofit.apply(model, example_input=x)
    with torch.no_grad():
        assert torch.equal(model(x), se_model(x)), "identity init changed the TCN block's output"
    sliced = se_retrofit.find_sites(nn.Sequential(nn.Conv1d(16, 16, 1), _ChannelSliceBlock()), example_input=x)
    assert not sliced.sites and any("partial add" in s.reason for s in sliced.skipped), sliced


class _WindowCropBlock(nn.Module):
    """Swin-like (timm's ``SwinTransformerBlock``): channels-last tokens padded to whole windows, mixed by a linear
    layer, the padding cropped off (``x[:, :H, :W, :]``), rolled back in a shifted block, and added to the input."""

    def __init__(self, c: int = 16, window: int = 4, shift: int = 0) -> None:
        super().__init__()
        self.window, self.shift = window, shift
        self.mix = nn.Linear(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, h, w, _ = x.shape
        pad_h, pad_w = (-h) % self.window, (-w) % self.window
        out = self.mix(nn.functional.pad(x, (0, 0, 0, pad_w, 0, pad_h)))
        out = out[:, :h, :w, :]
        return x + (torch.roll(out, (self.shift, self.shift), (1, 2)) if self.shift else out)


@pytest.mark.parametrize("size", [8, 6], ids=["no_padding", "padding"])
def test_a_token_residual_with_a_window_crop_is_reported_as_having_no_convolution(size):
    """Swin's unshifted blocks crop their window padding before the residual add; they were reported as a
    "partial add" (a channel split or a crop of a larger tensor), even where the crop removes nothing, while
    the shifted blocks, whose roll follows the crop, said what they all are."""
    model = nn.Sequential(_WindowCropBlock(), _WindowCropBlock(shift=2)).eval()
    plan = se_retrofit.find_sites(model, example_input=torch.randn(2, size, size, 16))
    reasons = {s.block: s.reason for s in plan.skipped}
    expected = "no convolution on any operand (token or MLP residual)"
    assert not plan.sites and reasons == {"0": expected, "1": expected}, \
        f"a token residual with a crop is not reported as having no convolution:\n{plan}"


class _GroupNormConv(nn.Module):
    """A projection helper normalising with a function call, as timm's GroupNormAct and MixedConv2d do."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, 2, bias=False)
        self.weight, self.bias = nn.Parameter(torch.ones(cout)), nn.Parameter(torch.zeros(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.split(self.conv(x), x.shape[1], dim=1)
        return nn.functional.group_norm(torch.cat([a, b], 1), 4, self.weight, self.bias)


class _ProjectedBlock(nn.Module):
    def __init__(self, shortcut: nn.Module) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


@pytest.mark.parametrize("shortcut", ["group_norm_helper", "frozen_batch_norm"])
def test_a_projection_with_a_functional_norm_or_a_frozen_norm_is_a_projection(shortcut):
    """Linear helpers are judged by their own forward now: its norm and split/cat calls are linear ops."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    module = (_GroupNormConv(8, 16) if shortcut == "group_norm_helper"
              else nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False), FrozenBatchNorm2d(16)))
    plan = se_retrofit.find_sites(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _ProjectedBlock(module)),
                                  example_input=torch.randn(2, 3, 16, 16))
    assert [(s.kind, s.shortcut) for s in plan.sites] == [("residual", "projection")], plan


class _EllipsisTrim(_CausalBlock):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.conv1(x)[..., :-self.pad])
        return torch.relu(self.conv2(out)[..., :-self.pad] + x)


def test_a_crop_written_with_an_ellipsis_is_a_crop():
    plan = se_retrofit.find_sites(nn.Sequential(nn.Conv1d(16, 16, 1), _EllipsisTrim()),
                                  example_input=torch.randn(2, 16, 50))
    assert [(s.kind, s.shortcut) for s in plan.sites] == [("residual", "identity")], plan


class _ReturnsInput(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class _CallsRelu(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.relu(x)


_SHORTCUT_MODULES = {"empty_sequential": nn.Sequential,
                     "sequential_of_identities": lambda: nn.Sequential(nn.Identity()),
                     "module_returning_its_input": _ReturnsInput, "relu_module": nn.ReLU,
                     "relu_in_sequential": lambda: nn.Sequential(nn.ReLU()), "module_calling_relu": _CallsRelu}


class _ShortcutForm(nn.Module):
    """A basic block whose shortcut is written as ``form`` (a module's name in `_SHORTCUT_MODULES`, or a call)."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.shortcut = _SHORTCUT_MODULES.get(form, nn.Identity)()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        if self.form == "added_twice":  # out + 2x
            out = out + x
            return torch.relu(out + x)
        if self.form == "clone_written":  # a copy scaled in place before the add reads it
            shortcut = x.clone()
            shortcut.mul_(2)
            return torch.relu(out + shortcut)
        calls = {"plain": lambda: x, "clone": x.clone, "torch_clone": lambda: torch.clone(x), "detach": x.detach,
                 "contiguous": x.contiguous, "clone_detach": lambda: x.clone().detach(),
                 "relu": lambda: torch.relu(x), "functional_relu": lambda: nn.functional.relu(x)}
        shortcut = calls[self.form]() if self.form in calls else self.shortcut(x)
        return torch.relu(out + shortcut)


def _shortcut_net(form: str) -> nn.Module:
    torch.manual_seed(0)
    return perturb_norms(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _ShortcutForm(form))).eval()


@pytest.mark.parametrize("position", ["standard", "pre", "post", "identity"])
@pytest.mark.parametrize("form", ["clone", "torch_clone", "detach", "contiguous", "clone_detach", "empty_sequential",
                                  "sequential_of_identities", "module_returning_its_input"])
def test_a_shortcut_that_passes_the_input_on_is_an_identity(form, position):
    """``x.clone()``, an empty ``nn.Sequential()`` (CIFAR ResNets' shortcut where no projection is needed) or
    a module whose forward returns ``x`` hand on ``x`` itself: they were labelled projection. Only the label
    differs from the plain ``x + branch(x)``: SE goes to the same place and the outputs are the same bits."""
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    config = se_retrofit.SEConfig(position=position, init="paper")
    plan = se_retrofit.find_sites(_shortcut_net(form), config)
    assert [(s.kind, s.shortcut) for s in plan.sites] == [("residual", "identity")], f"{form}/{position}:\n{plan}"
    plain = se_retrofit.apply(_shortcut_net("plain"), config)
    se_model = se_retrofit.apply(_shortcut_net(form), config)
    se_model.load_state_dict(plain.state_dict())
    with torch.no_grad():
        assert torch.equal(se_model(x), plain(x)), f"{form}/{position}: not the plain identity block's output"


@pytest.mark.parametrize("position", ["standard", "pre", "post", "identity"])
@pytest.mark.parametrize("form", ["relu", "functional_relu", "relu_module", "relu_in_sequential",
                                  "module_calling_relu"])
def test_an_activation_alone_on_the_shortcut_is_labelled_activation(form, position):
    """``F.relu(x) + branch(x)`` is a residual (its shortcut has no convolution, so carries no work of its own),
    but its shortcut is not a projection, which the docs define as linear."""
    plan = se_retrofit.find_sites(_shortcut_net(form), position=position)
    assert [(s.kind, s.shortcut) for s in plan.sites] == [("residual", "activation")], f"{form}/{position}:\n{plan}"


@pytest.mark.parametrize("form", ["added_twice", "clone_written"])
def test_a_shortcut_scaled_by_adding_it_twice_or_in_place_is_a_projection(form):
    """``out + x + x`` is one unit whose shortcut is ``2 x``, a scaling like ``torch.add(out, x, alpha=2)``;
    a copy multiplied in place before the add reads it is no longer ``x``."""
    plan = se_retrofit.find_sites(_shortcut_net(form))
    assert [(s.kind, s.shortcut) for s in plan.sites] == [("residual", "projection")], f"{form}:\n{plan}"
