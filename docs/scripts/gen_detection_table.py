"""Run ``se_retrofit.find_sites`` on torchvision's detectors, segmenters and video models and timm's
feature extractors, and record what gets SE: ``docs/generated/detection_table.md``.

    python docs/scripts/gen_detection_table.py [--check]

Random weights (``weights=None, weights_backbone=None``; detectors with ``min_size=128,
max_size=160``), no example input: the table also shows the input ``find_sites`` found by itself.
"with own SE" counts residual adds left alone as ``already has channel attention``; "modules not
traced" counts entries whose reason starts with ``module skipped:``.
"""
from __future__ import annotations

import warnings

import timm
import torch
import torchvision
from torchvision.models import detection, segmentation, video

import se_retrofit

from _gen import GENERATED, header, write

SCRIPT = "gen_detection_table.py"


def models() -> dict[str, torch.nn.Module]:
    tv = dict(weights=None, weights_backbone=None)
    small = dict(tv, min_size=128, max_size=160)  # detectors: no upscaling to 800 px
    return {
        "fasterrcnn_resnet50_fpn": detection.fasterrcnn_resnet50_fpn(**small),
        "maskrcnn_resnet50_fpn": detection.maskrcnn_resnet50_fpn(**small),
        "retinanet_resnet50_fpn": detection.retinanet_resnet50_fpn(**small),
        "fcos_resnet50_fpn": detection.fcos_resnet50_fpn(**small),
        "fasterrcnn_mobilenet_v3_large_fpn": detection.fasterrcnn_mobilenet_v3_large_fpn(**small),
        "deeplabv3_resnet50 (`aux_loss=True`)": segmentation.deeplabv3_resnet50(**tv, aux_loss=True),
        "fcn_resnet50 (`aux_loss=True`)": segmentation.fcn_resnet50(**tv, aux_loss=True),
        "lraspp_mobilenet_v3_large": segmentation.lraspp_mobilenet_v3_large(**tv),
        "r3d_18": video.r3d_18(weights=None),
        "mc3_18": video.mc3_18(weights=None),
        "r2plus1d_18": video.r2plus1d_18(weights=None),
        "timm resnet50, features_only": timm.create_model("resnet50", features_only=True),
        "timm resnet50, features_only, out_indices=(1, 2)":
            timm.create_model("resnet50", features_only=True, out_indices=(1, 2)),
        "timm resnet50, features_only, feature_cls='dict'":
            timm.create_model("resnet50", features_only=True, feature_cls="dict"),
        "timm resnet50, features_only, feature_cls='hook'":
            timm.create_model("resnet50", features_only=True, feature_cls="hook"),
        "timm resnet50, features_only, feature_cls='fx'":
            timm.create_model("resnet50", features_only=True, feature_cls="fx"),
        "timm mobilenetv3_large_100, features_only": timm.create_model("mobilenetv3_large_100", features_only=True),
    }


def row(name: str, model: torch.nn.Module) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", se_retrofit.SERetrofitWarning)
        plan = se_retrofit.find_sites(model.eval())
    attention = sum("already has channel attention" in s.reason for s in plan.skipped)
    modules = sum(s.reason.startswith("module skipped") for s in plan.skipped)
    other = len(plan.skipped) - attention - modules
    counts = [(attention, "with own SE"), (modules, "module not traced" if modules == 1 else "modules not traced"),
              (other, "other add" if other == 1 else "other adds")]
    alone = ", ".join(f"{n} {what}" for n, what in counts if n) or "-"
    return f"| {name} | {type(model).__name__} | {len(plan.sites)} | {alone} | `{plan.example_input}` |"


def main() -> int:
    torch.manual_seed(0)
    lines = ["| model | class | SE blocks | left alone | example input found |", "|---|---|---:|---|---|"]
    lines += [row(name, model) for name, model in models().items()]
    versions = (f"torch {torch.__version__.split('+')[0]}, torchvision {torchvision.__version__.split('+')[0]}, "
                f"timm {timm.__version__}")
    text = header(SCRIPT) + "\n".join(lines) + f"\n\nMade by `docs/scripts/{SCRIPT}` with {versions}.\n"
    return write(GENERATED / "detection_table.md", text)


if __name__ == "__main__":
    raise SystemExit(main())
