"""What trains in each mode, and the optimizer's parameter groups that follow from it.

The "new" parameters are the SE blocks and the classifier head; everything else is the pretrained
backbone. Frozen means ``requires_grad=False`` (so no gradient is computed or stored for it), and by
default its batch-norm layers also stay in eval mode: with a frozen backbone, updating running
statistics would still change the backbone's function (PEFT leaves this to the user because
transformers have no batch norm; for CNNs, freezing them is the standard transfer-learning choice).
"""
from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..models import head_modules
from ..se_block import se_blocks


def new_parameter_names(model: nn.Module) -> set[str]:
    """Qualified names of the SE blocks' and the classifier head's parameters (every head module, see
    `~se_retrofit.models.head_modules`: a head that is not one linear layer is made anew too)."""
    names = set()
    prefixes = [name for name, _ in se_blocks(model)] + [name for name, _ in head_modules(model)]
    for name, _ in model.named_parameters():
        if any(name.startswith(prefix + ".") for prefix in prefixes):
            names.add(name)
    return names


def trains_backbone(mode: str, stage: int) -> bool:
    """Whether the pretrained weights learn in ``mode`` during ``stage`` (1 or 2)."""
    return mode == "all" or (mode == "staged" and stage == 2)


def stage_of(mode: str, epoch: int, stage1_epochs: int | None) -> int:
    """Stage (1 or 2) of 0-based ``epoch``; only ``"staged"`` ever reaches stage 2."""
    return 2 if mode == "staged" and stage1_epochs is not None and epoch >= stage1_epochs else 1


def set_trainable(model: nn.Module, new_names: set[str], backbone: bool) -> int:
    """Set ``requires_grad`` on every parameter; return how many tensors train."""
    count = 0
    for name, param in model.named_parameters():
        param.requires_grad_(backbone or name in new_names)
        count += param.requires_grad
    return count


def freeze_batchnorm(model: nn.Module, backbone_trains: bool = False) -> int:
    """Put the frozen part's batch-norm layers in eval mode; return how many.

    A layer is frozen when its affine weights are; one without (``affine=False``) has only its running
    statistics, which belong to the backbone (the SE blocks and the linear head have no batch norm), so
    it is frozen when the backbone is. Call after every ``model.train()``, which would otherwise switch
    them back.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, _BatchNorm):
            params = list(module.parameters(recurse=False))
            frozen = not any(p.requires_grad for p in params) if params else not backbone_trains
            if frozen:
                module.eval()
                count += 1
    return count


def parameter_groups(model: nn.Module, new_names: set[str], mode: str, weight_decay: float,
                     backbone_lr_scale: float) -> list[dict]:
    """Parameter groups for timm's optimizer factory: new vs backbone, decay vs no decay.

    Backbone groups exist only in the modes where the backbone ever trains; in ``"staged"`` they carry
    ``lr_scale`` (which timm's schedulers apply on every update) and simply have no gradient during
    the first stage, so one optimizer and one schedule cover the whole run. Biases and other 1-D
    tensors (norm weights) get no weight decay, timm's convention.
    """
    backbone_scale = backbone_lr_scale if mode == "staged" else 1.0
    buckets: dict[tuple[str, bool], list] = {}
    for name, param in model.named_parameters():
        part = "new" if name in new_names else "backbone"
        if part == "backbone" and mode not in ("all", "staged"):
            continue
        decay = param.ndim > 1 and not name.endswith(".bias")
        buckets.setdefault((part, decay), []).append(param)
    groups = []
    for (part, decay), params in sorted(buckets.items(), key=lambda kv: (kv[0][0] != "new", not kv[0][1])):
        group = {"params": params, "weight_decay": weight_decay if decay else 0.0,
                 "name": f"{part}/{'decay' if decay else 'no_decay'}"}
        if part == "backbone" and backbone_scale != 1.0:
            group["lr_scale"] = backbone_scale
        groups.append(group)
    if not groups:
        raise ValueError("no parameter would train: the model has no SE blocks and no classifier head; "
                         "retrofit it first or use train='all'")
    return groups
