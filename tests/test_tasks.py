"""Beyond classifiers: detectors, segmenters, video networks and timm feature extractors (issue #8).

For each family: the retrofit finds every residual block of the backbone (the expected block names
are read from the model itself, e.g. every torchvision ``Bottleneck``, and the count is pinned too),
every output is unchanged in eval mode under the identity init, and the task's own training loss
reaches the new SE weights. All models are built with random weights made "pretrained-like"
(non-trivial norm statistics), at small input sizes. One model per family runs in the fast suite;
the rest are marked slow.
"""
from __future__ import annotations

import copy
import warnings
from collections import OrderedDict

import pytest
import timm
import torch
import torch.nn.functional as F
from torchvision.models import detection, segmentation, video
from torchvision.models.mobilenetv3 import InvertedResidual
from torchvision.models.resnet import Bottleneck
from torchvision.models.video.resnet import BasicBlock as VideoBasicBlock
from torchvision.ops.misc import SqueezeExcitation

import se_retrofit

from conftest import make_pretrained_like

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-5


# --------------------------------------------------------------------------------------------- helpers

def retrofit(model: torch.nn.Module, **kwargs) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", se_retrofit.SERetrofitWarning)
        return se_retrofit.apply(model, **kwargs)


def cases(values, fast, ids=None) -> list:
    """``values`` as pytest params, all but the ``fast`` ones marked slow (CI runs only the fast ones)."""
    ids = ids or [str(v) for v in values]
    return [pytest.param(v, id=i, marks=() if v in fast else pytest.mark.slow) for v, i in zip(values, ids)]


def blocks_of(model: torch.nn.Module, cls: type) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, cls)]


def mobilenet_residual_blocks(model: torch.nn.Module) -> tuple[list[str], list[str]]:
    """torchvision MobileNetV3 blocks with a residual add: (without SE, with their own SqueezeExcitation)."""
    plain, with_se = [], []
    for name, m in model.named_modules():
        if isinstance(m, InvertedResidual) and m.use_res_connect:
            has_se = any(isinstance(c, SqueezeExcitation) for c in m.modules())
            (with_se if has_se else plain).append(name)
    return plain, with_se


def assert_sites(se_model: torch.nn.Module, expected_blocks: list[str], count: int, label: str) -> None:
    """SE went into exactly the expected blocks, and their number is the one the architecture has."""
    plan = se_retrofit.get_plan(se_model)
    assert len(expected_blocks) == count, (
        f"{label}: the model has {len(expected_blocks)} residual blocks, the test expects {count}")
    got = sorted(s.block for s in plan.sites)
    assert got == sorted(expected_blocks), (
        f"{label}: SE sites differ from the model's residual blocks\n"
        f"  missing: {sorted(set(expected_blocks) - set(got))}\n  unexpected: {sorted(set(got) - set(expected_blocks))}\n{plan}")
    n = len(se_retrofit.se_blocks(se_model))
    assert n == count, f"{label}: expected {count} SE modules in the model, found {n}\n{plan}"


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


def assert_close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.shape == b.shape, f"{what}: shape changed from {tuple(a.shape)} to {tuple(b.shape)}"
    assert a.dtype == b.dtype, f"{what}: dtype changed from {a.dtype} to {b.dtype}"
    if a.is_floating_point():
        d = max_diff(a, b)
        assert d <= TOL, f"{what}: changed by up to {d:.3g} (tolerance {TOL})"
    else:
        assert torch.equal(a, b), f"{what}: values changed"


def assert_same_features(ref, got, what: str) -> None:
    """Feature lists, dicts and OrderedDicts: same container type, same keys, same tensors."""
    assert type(got) is type(ref), f"{what}: output type changed from {type(ref).__name__} to {type(got).__name__}"
    if isinstance(ref, dict):
        assert list(got) == list(ref), f"{what}: keys changed from {list(ref)} to {list(got)}"
        for k in ref:
            assert_close(ref[k], got[k], f"{what}[{k!r}]")
    elif isinstance(ref, (list, tuple)):
        assert len(got) == len(ref), f"{what}: {len(ref)} outputs became {len(got)}"
        for i, (a, b) in enumerate(zip(ref, got)):
            assert_close(a, b, f"{what}[{i}]")
    else:
        assert_close(ref, got, what)


def assert_se_trained(se_model: torch.nn.Module, label: str) -> None:
    """After one backward: every SE block got finite gradients, and the loss depends on each block's gate."""
    blocks = se_retrofit.se_blocks(se_model)
    assert blocks, f"{label}: no SE block to check"
    missing = [n for n, b in blocks if b.fc2.weight.grad is None or b.fc2.bias.grad is None]
    assert not missing, f"{label}: SE blocks without a gradient (not on the training path): {missing}"
    bad = [n for n, b in blocks if not (torch.isfinite(b.fc2.weight.grad).all() and torch.isfinite(b.fc2.bias.grad).all())]
    assert not bad, f"{label}: non-finite SE gradients in {bad}"
    # d loss / d fc2.bias is the gradient at the gate's logit: zero only if the gate does not reach the loss.
    dead = [n for n, b in blocks if not b.fc2.bias.grad.abs().sum() > 0]
    assert not dead, f"{label}: the training loss does not depend on the SE gate of {dead}"
    assert any(b.fc2.weight.grad.abs().sum() > 0 for _, b in blocks), f"{label}: every fc2.weight gradient is zero"


# ------------------------------------------------------------------------------------------- detection

_TWO_STAGE = dict(box_score_thresh=0.0, box_detections_per_img=20, rpn_pre_nms_top_n_test=200,
                  rpn_post_nms_top_n_test=100, rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100,
                  box_batch_size_per_image=64)
_ONE_STAGE = dict(score_thresh=0.0, detections_per_img=20, topk_candidates=100)

# (builder, options beyond the small sizes, expected SE blocks)
DETECTORS = {
    "fasterrcnn_resnet50_fpn": (detection.fasterrcnn_resnet50_fpn, _TWO_STAGE, 16),
    "maskrcnn_resnet50_fpn": (detection.maskrcnn_resnet50_fpn, _TWO_STAGE, 16),
    "retinanet_resnet50_fpn": (detection.retinanet_resnet50_fpn, _ONE_STAGE, 16),
    "fcos_resnet50_fpn": (detection.fcos_resnet50_fpn, _ONE_STAGE, 16),
    # 10 inverted residual blocks with an add; 5 of them already have SqueezeExcitation and are skipped
    "fasterrcnn_mobilenet_v3_large_fpn": (detection.fasterrcnn_mobilenet_v3_large_fpn, _TWO_STAGE, 5),
}
FAST_DETECTOR = "fasterrcnn_mobilenet_v3_large_fpn"


def build_detector(name: str) -> torch.nn.Module:
    builder, options, _ = DETECTORS[name]
    # min_size/max_size keep the transform from upscaling the images to 800 pixels
    model = builder(weights=None, weights_backbone=None, min_size=128, max_size=160, **options)
    return make_pretrained_like(model).eval()


def expected_detector_blocks(name: str, model: torch.nn.Module) -> list[str]:
    if "mobilenet" in name:
        plain, _ = mobilenet_residual_blocks(model)
        return plain
    return blocks_of(model, Bottleneck)


def detection_images() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.rand(3, 128, 160, generator=gen), torch.rand(3, 112, 144, generator=gen)]


def detection_targets(name: str, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    targets = []
    for img in images:
        t = {"boxes": torch.tensor([[10.0, 20.0, 90.0, 100.0]]), "labels": torch.tensor([1])}
        if "mask" in name:
            mask = torch.zeros(1, *img.shape[-2:], dtype=torch.uint8)
            mask[0, 20:100, 10:90] = 1
            t["masks"] = mask
        targets.append(t)
    return targets


def check_detector(name: str) -> None:
    count = DETECTORS[name][2]
    model = build_detector(name)
    se_model = retrofit(model, example_input=[torch.rand(3, 128, 160)])
    assert type(se_model) is type(model), f"{name}: class changed to {type(se_model).__name__}"
    assert_sites(se_model, expected_detector_blocks(name, model), count, name)
    plan = se_retrofit.get_plan(se_model)
    assert all(s.block.startswith("backbone.body.") for s in plan.sites), f"{name}: SE outside the backbone\n{plan}"
    if "mobilenet" in name:
        _, with_se = mobilenet_residual_blocks(model)
        skipped = {s.block for s in plan.skipped if "already has channel attention" in s.reason}
        assert skipped == set(with_se), (
            f"{name}: blocks with their own SqueezeExcitation should be skipped for it: expected {with_se}\n{plan}")

    # eval: the same detections, image by image, and the same backbone features
    images = detection_images()
    se_model.eval()
    with torch.no_grad():
        ref, again, got = model(images), model(images), se_model(images)
    for i, (a, b) in enumerate(zip(ref, again)):
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}: the original detector is not deterministic ({k} of image {i})"
    assert len(got) == len(ref) == len(images), f"{name}: {len(images)} images gave {len(ref)} and {len(got)} results"
    assert any(len(r["boxes"]) for r in ref), f"{name}: no boxes at all, so the comparison would be vacuous"
    for i, (a, b) in enumerate(zip(ref, got)):
        assert set(a) == set(b), f"{name}: image {i}: output keys {sorted(a)} became {sorted(b)}"
        for k in a:
            assert_close(a[k], b[k], f"{name}: image {i} {k}")
    batch = torch.stack([torch.rand(3, 128, 160, generator=torch.Generator().manual_seed(2)) for _ in range(2)])
    with torch.no_grad():
        assert_same_features(model.backbone(batch), se_model.backbone(batch), f"{name}: backbone features")

    # train: the same losses (same sampling seed), and they reach the SE weights
    targets = detection_targets(name, images)
    model.train()
    se_model.train()
    torch.manual_seed(3)
    with torch.no_grad():
        ref_losses = model(images, copy.deepcopy(targets))
    torch.manual_seed(3)
    losses = se_model(images, copy.deepcopy(targets))
    assert set(losses) == set(ref_losses), f"{name}: loss names {sorted(ref_losses)} became {sorted(losses)}"
    for k in ref_losses:
        assert_close(ref_losses[k].detach(), losses[k].detach(), f"{name}: train-mode {k}")
    sum(losses.values()).backward()
    assert_se_trained(se_model, name)


@pytest.mark.parametrize("name", cases(list(DETECTORS), [FAST_DETECTOR]))
def test_detector(name):
    check_detector(name)


def check_detector_without_example_input(name: str) -> None:
    """``apply(model)`` finds an input on its own (torchvision detectors also take a batched tensor)."""
    model = build_detector(name)
    se_model = retrofit(model)
    plan = se_retrofit.get_plan(se_model)
    assert plan.example_input, f"{name}: the plan does not say which example input ran"
    assert_sites(se_model, expected_detector_blocks(name, model), DETECTORS[name][2], f"{name} (no example input)")
    images = detection_images()[:1]
    with torch.no_grad():
        ref, got = model(images), se_model.eval()(images)
    assert len(ref[0]["boxes"]) > 0, f"{name}: no boxes at all, so the comparison would be vacuous"
    for k in ref[0]:
        assert_close(ref[0][k], got[0][k], f"{name} (no example input): {k}")


@pytest.mark.parametrize("name", cases(list(DETECTORS), [FAST_DETECTOR]))
def test_detector_without_example_input(name):
    check_detector_without_example_input(name)


def test_default_size_detector_is_analysed_small_and_keeps_its_transform():
    """At torchvision's default 800 px the example forward would be a full-size detection; it runs at 128 px."""
    model = detection.fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None).eval()
    sizes = (model.transform.min_size, model.transform.max_size)
    se_model = retrofit(model)
    assert (model.transform.min_size, model.transform.max_size) == sizes, "the user's model transform was changed"
    assert (se_model.transform.min_size, se_model.transform.max_size) == sizes, "the returned transform differs"
    assert len(se_retrofit.se_blocks(se_model)) == DETECTORS[FAST_DETECTOR][2]


# ---------------------------------------------------------------------------------------- segmentation

# (builder, expected SE blocks); aux_loss gives the OrderedDict a second entry where the model has one
SEGMENTERS = {
    "deeplabv3_resnet50": (segmentation.deeplabv3_resnet50, 16),
    "fcn_resnet50": (segmentation.fcn_resnet50, 16),
    # 10 inverted residual blocks with an add; 5 of them already have SqueezeExcitation and are skipped
    "lraspp_mobilenet_v3_large": (segmentation.lraspp_mobilenet_v3_large, 5),
}
FAST_SEGMENTER = "lraspp_mobilenet_v3_large"


def check_segmenter(name: str) -> None:
    builder, count = SEGMENTERS[name]
    options = {} if "lraspp" in name else {"aux_loss": True}
    model = make_pretrained_like(builder(weights=None, weights_backbone=None, num_classes=5, **options)).eval()
    se_model = retrofit(model)
    expected = mobilenet_residual_blocks(model)[0] if "mobilenet" in name else blocks_of(model, Bottleneck)
    assert_sites(se_model, expected, count, name)

    x = torch.rand(2, 3, 64, 80, generator=torch.Generator().manual_seed(1))
    se_model.eval()
    with torch.no_grad():
        ref, got = model(x), se_model(x)
    assert isinstance(ref, OrderedDict), f"{name}: expected an OrderedDict output, got {type(ref).__name__}"
    assert list(ref) == (["out"] if "lraspp" in name else ["out", "aux"]), f"{name}: unexpected outputs {list(ref)}"
    assert_same_features(ref, got, f"{name}: eval output")

    se_model.train()
    target = torch.randint(0, 5, (2, 64, 80), generator=torch.Generator().manual_seed(2))
    out = se_model(x)
    loss = sum(F.cross_entropy(v, target) for v in out.values())
    loss.backward()
    assert_se_trained(se_model, name)


@pytest.mark.parametrize("name", cases(list(SEGMENTERS), [FAST_SEGMENTER]))
def test_segmenter(name):
    check_segmenter(name)


# ----------------------------------------------------------------------------------------------- video

VIDEO = {"r3d_18": video.r3d_18, "mc3_18": video.mc3_18, "r2plus1d_18": video.r2plus1d_18}
FAST_VIDEO = "r3d_18"


def check_video(name: str, example_input: bool) -> None:
    model = make_pretrained_like(VIDEO[name](weights=None, num_classes=7)).eval()
    x = torch.rand(1, 3, 4, 32, 32, generator=torch.Generator().manual_seed(1))
    se_model = retrofit(model, example_input=x if example_input else None)
    assert_sites(se_model, blocks_of(model, VideoBasicBlock), 8, name)
    plan = se_retrofit.get_plan(se_model)
    dims = {s.se_name: s.spatial_dims for s in plan.sites if s.spatial_dims != 3}
    assert not dims, f"{name}: sites planned for non-video feature maps: {dims}"
    for se_name, block in se_retrofit.se_blocks(se_model):
        assert block.spatial_dims == 3, f"{name}: {se_name} has spatial_dims={block.spatial_dims}, expected 3"
        assert isinstance(block.fc1, torch.nn.Conv3d) and isinstance(block.fc2, torch.nn.Conv3d), (
            f"{name}: {se_name} excitation is {type(block.fc1).__name__}, expected Conv3d")

    # The squeeze pools over time as well as space: with a non-trivial excitation, every channel of
    # a 5-D input is scaled by one factor across all of T, H and W.
    se = copy.deepcopy(se_retrofit.se_blocks(se_model)[0][1])
    torch.nn.init.normal_(se.fc2.weight, std=1.0)
    feat = torch.rand(2, se.channels, 3, 5, 6) + 0.5
    with torch.no_grad():
        ratio = se(feat) / feat
    assert ratio.shape == feat.shape, f"{name}: SE changed the shape {tuple(feat.shape)} to {tuple(ratio.shape)}"
    spread = (ratio - ratio[:, :, :1, :1, :1]).abs().max().item()
    assert spread <= 1e-5, f"{name}: the SE gate varies over T, H, W by {spread:.3g}: it does not squeeze all of them"
    assert (ratio[:, :, 0, 0, 0] - ratio[0, 0, 0, 0, 0]).abs().max() > 1e-4, f"{name}: the gate is one constant"

    xb = torch.rand(2, 3, 4, 32, 32, generator=torch.Generator().manual_seed(2))
    se_model.eval()
    with torch.no_grad():
        assert_close(model(xb), se_model(xb), f"{name}: logits")
    se_model.train()
    F.cross_entropy(se_model(xb), torch.tensor([1, 4])).backward()
    assert_se_trained(se_model, name)


VIDEO_CASES = [(n, e) for n in VIDEO for e in (True, False)]


@pytest.mark.parametrize("case", cases(VIDEO_CASES, [(FAST_VIDEO, True)],
                                       [f"{n}-{'example_input' if e else 'no_example_input'}" for n, e in VIDEO_CASES]))
def test_video(case):
    check_video(*case)


# ------------------------------------------------------------------------------ timm feature extractors

# (model, create_model options, wrapper class, expected SE blocks, output container)
FEATURES = [
    ("resnet18", {}, "FeatureListNet", 8, list),
    ("resnet18", {"feature_cls": "dict"}, "FeatureDictNet", 8, OrderedDict),
    ("resnet50", {"out_indices": (1, 2)}, "FeatureListNet", 7, list),  # layer3/4 pruned: 3 + 4 blocks
    ("resnet50", {"feature_cls": "dict", "out_indices": (1, 3)}, "FeatureDictNet", 13, OrderedDict),
    ("resnet18", {"feature_cls": "hook"}, "FeatureHookNet", 8, list),
    ("convnext_atto", {}, "FeatureListNet", 12, list),
    ("mobilenetv3_large_100", {}, "MobileNetV3Features", 5, list),  # 10 residual blocks, 5 with their own SE
]
FAST_FEATURES = FEATURES[:3]


def _feature_id(case) -> str:
    name, options, *_ = case
    return name + "".join(f"-{k}={v}" for k, v in options.items()).replace(" ", "")


def check_features(name: str, options: dict, wrapper: str, count: int, container: type) -> None:
    model = make_pretrained_like(timm.create_model(name, pretrained=False, features_only=True, **options)).eval()
    label = f"{name} features_only {options}"
    assert type(model).__name__ == wrapper, f"{label}: timm built {type(model).__name__}, the test expects {wrapper}"
    se_model = retrofit(model)
    assert type(se_model) is type(model), f"{label}: wrapper class changed to {type(se_model).__name__}"
    plan = se_retrofit.get_plan(se_model)
    n = len(se_retrofit.se_blocks(se_model))
    assert n == count, f"{label}: expected {count} SE blocks, got {n}\n{plan}"
    if name.startswith("resnet"):
        expected = [n for n, m in model.named_modules() if type(m).__name__ in ("BasicBlock", "Bottleneck")]
        assert_sites(se_model, expected, count, label)
    assert se_model.feature_info.channels() == model.feature_info.channels(), f"{label}: feature_info changed"

    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    se_model.eval()
    with torch.no_grad():
        ref, got = model(x), se_model(x)
    assert isinstance(ref, container), f"{label}: expected a {container.__name__} of features, got {type(ref).__name__}"
    assert_same_features(ref, got, f"{label}: features")

    se_model.train()
    out = se_model(x)
    feats = list(out.values()) if isinstance(out, dict) else list(out)
    sum(f.pow(2).mean() for f in feats).backward()
    assert_se_trained(se_model, label)


def test_features_only_fx_is_refused_with_the_reason_and_keeps_its_mode():
    """FeatureGraphNet is one fx GraphModule whose forward is regenerated on train()/eval(): SE would vanish."""
    model = timm.create_model("resnet18", pretrained=False, features_only=True, feature_cls="fx").eval()
    se_model = retrofit(model)
    assert not se_retrofit.se_blocks(se_model), "SE must not go into a GraphModule's regenerated forward"
    reasons = [s.reason for s in se_retrofit.get_plan(se_model).skipped]
    assert any("GraphModule" in r and "before tracing" in r for r in reasons), reasons
    assert not se_model.training and not any(m.training for m in se_model.modules()), "the copy left eval mode"


@pytest.mark.parametrize("case", cases(FEATURES, FAST_FEATURES, [_feature_id(c) for c in FEATURES]))
def test_features_only(case):
    check_features(*case)


# (model, expected SE blocks)
FORWARD_FEATURES = [("resnet18", 8), ("resnet50", 16), ("convnext_atto", 12)]


@pytest.mark.parametrize("case", cases(FORWARD_FEATURES, FORWARD_FEATURES[:1], [c[0] for c in FORWARD_FEATURES]))
def test_forward_features(case):
    """The timm methods around the trunk (forward_features, forward_head, forward_intermediates) see the SE."""
    name, count = case
    model = make_pretrained_like(timm.create_model(name, pretrained=False, num_classes=10)).eval()
    se_model = retrofit(model)
    n = len(se_retrofit.se_blocks(se_model))
    assert n == count, f"{name}: expected {count} SE blocks, got {n}"
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    se_model.eval()
    with torch.no_grad():
        ref, got = model.forward_features(x), se_model.forward_features(x)
        assert_close(ref, got, f"{name}: forward_features")
        assert_close(model.forward_head(ref), se_model.forward_head(got), f"{name}: forward_head")
        assert_close(model.forward_head(ref, pre_logits=True), se_model.forward_head(got, pre_logits=True),
                     f"{name}: forward_head(pre_logits=True)")
        ref_final, ref_inter = model.forward_intermediates(x)
        got_final, got_inter = se_model.forward_intermediates(x)
        assert_close(ref_final, got_final, f"{name}: forward_intermediates final")
        assert_same_features(ref_inter, got_inter, f"{name}: forward_intermediates")
    se_model.train()
    se_model.forward_features(x).pow(2).mean().backward()
    assert_se_trained(se_model, f"{name}.forward_features")


def test_se_blocks_are_used_by_forward_features():
    """Not vacuous: a non-identity SE changes forward_features (the method runs the rewritten blocks)."""
    model = make_pretrained_like(timm.create_model("resnet18", pretrained=False)).eval()
    se_model = retrofit(model, init="paper")
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        d = max_diff(model.forward_features(x), se_model.eval().forward_features(x))
    assert d > 1e-3, f"resnet18: forward_features ignores the SE blocks (changed by only {d:.3g} with init='paper')"


def test_a_traced_root_is_named_as_every_other_model_itself():
    """``Skipped.block`` is '' for the model itself (its docstring; the JSON of ``se-retrofit sites``)."""
    import torch.fx as fx

    plan = se_retrofit.find_sites(fx.symbolic_trace(timm.create_model("resnet10t", pretrained=False)))
    roots = [s for s in plan.skipped if "GraphModule" in s.reason]
    assert [s.block for s in roots] == [""], f"the traced root should be skipped once, as '': {roots}"
    assert "<root>" in str(plan), "the printed plan still shows the root as <root>"


def test_eager_quantizable_blocks_are_left_alone_with_the_float_model_named():
    """Their adds go through FloatFunctional, which quantization's convert swaps for quantized adds: an SE
    block folded into the add would bypass it, and convert would break the SE block's float weights."""
    import torchvision.models.quantization as quantizable

    model = quantizable.resnet18(weights=None, quantize=False).eval()
    with pytest.warns(se_retrofit.SERetrofitWarning, match="FloatFunctional"):
        se_model = se_retrofit.apply(model)
    assert not se_retrofit.se_blocks(se_model), "no SE block should go into an eager-quantizable block"
    reasons = {s.reason for s in se_retrofit.get_plan(se_model).skipped}
    assert any("'add_relu'" in r and "torchvision.models.NAME" in r for r in reasons), reasons


def test_a_converted_int8_model_is_told_to_retrofit_the_float_one():
    """After quantization's convert the adds are quantized ops, not additions: the reason must still name
    the quantized add, not say the network only concatenates."""
    import torchvision.models.quantization as quantizable

    plan = se_retrofit.find_sites(quantizable.resnet18(weights=None, quantize=True))
    reasons = {s.reason for s in plan.skipped}
    assert not plan.sites and any("QFunctional" in r and "torchvision.models.NAME" in r for r in reasons), (
        f"a converted int8 model got {reasons or str(plan)}")
    # a network that only concatenates (its FloatFunctional does `cat`) has no additions to speak of
    for quantize in (False, True):
        plan = se_retrofit.find_sites(quantizable.googlenet(weights=None, quantize=quantize, aux_logits=False,
                                                            init_weights=False))
        assert not any("additions go through" in s.reason for s in plan.skipped), (quantize, str(plan)[:300])
