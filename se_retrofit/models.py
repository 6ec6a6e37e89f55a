"""Build a model from the command line's MODEL argument: a timm name, or ``torchvision:NAME``.

Kept apart from the CLI so that every command (report, coverage, convert-and-finetune) resolves names
the same way and gives the same hint for a misspelt one.
"""
from __future__ import annotations

import contextlib
import difflib
import inspect
import os
import socket
from typing import Any, Iterator
from urllib.parse import urlparse

from torch import nn

TORCHVISION_PREFIX = "torchvision:"
TIMM_PREFIX = "timm:"


def _suggest(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.6)
    return f" Did you mean: {', '.join(close)}?" if close else ""


def parse_model_spec(spec: str) -> tuple[str, str]:
    """Split ``spec`` into ``(library, name)``; a bare name is a timm name."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"MODEL must be a timm name or 'torchvision:NAME', got {spec!r}")
    spec = spec.strip()
    if spec.startswith(TORCHVISION_PREFIX):
        return "torchvision", spec[len(TORCHVISION_PREFIX):]
    if spec.startswith(TIMM_PREFIX):
        return "timm", spec[len(TIMM_PREFIX):]
    return "timm", spec


def create_model(spec: str, pretrained: bool = False, num_classes: int | None = None, *,
                 offline_hint: str | None = None, **kwargs: Any) -> nn.Module:
    """Create the model named by ``spec``.

    ``pretrained=True`` downloads the library's weights; without a network that fails, and the error
    ends with ``offline_hint``, what the caller offers instead (default: convert-and-finetune's
    ``--no-pretrained --checkpoint FILE``). ``num_classes`` replaces the classifier at creation time
    (only meaningful without pretrained weights; with them, use `reset_classifier`).
    """
    library, name = parse_model_spec(spec)
    unknown = unknown_model_message(library, name)
    if unknown:
        raise ValueError(unknown)
    if library == "torchvision":
        import torchvision

        if num_classes is not None and not pretrained:
            kwargs["num_classes"] = num_classes
        if not pretrained and _takes(torchvision.models.get_model_builder(name), "weights_backbone"):
            # detectors and segmenters default to an ImageNet backbone, a download "no weights" must not start
            kwargs.setdefault("weights_backbone", None)
        weights = "DEFAULT" if pretrained else None
        try:
            model = torchvision.models.get_model(name, weights=weights, **kwargs)
        except (OSError, RuntimeError) as exc:
            if pretrained:
                raise RuntimeError(_offline_hint(spec, exc, offline_hint)) from exc
            raise
        if num_classes is not None and pretrained:
            reset_classifier(model, num_classes)
        return model

    import timm

    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        with _hub_offline_when_unreachable() if pretrained else contextlib.nullcontext():
            return timm.create_model(name, pretrained=pretrained, **kwargs)
    except (OSError, RuntimeError) as exc:
        if pretrained:
            raise RuntimeError(_offline_hint(spec, exc, offline_hint)) from exc
        raise


def unknown_model_message(library: str, name: str) -> str | None:
    """Why ``name`` is no model of ``library`` (with the closest names), or None when it is one.

    One wording for every command, so a misspelt name gets the same hint wherever it is typed.
    """
    if library == "torchvision":
        import torchvision

        names = torchvision.models.list_models()
        if name in names:
            return None
        return (f"unknown torchvision model {name!r}.{_suggest(name, names)} "
                "List them with torchvision.models.list_models().")
    import timm

    if timm.is_model(name):
        return None
    return f"unknown timm model {name!r}.{_suggest(name, timm.list_models())} List them with timm.list_models('pattern*')."


def _takes(builder: Any, parameter: str) -> bool:
    try:
        return parameter in inspect.signature(builder).parameters
    except (TypeError, ValueError):
        return False


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the Hugging Face Hub (or the ``HF_ENDPOINT`` mirror) opens in ``timeout`` s.

    Behind a proxy a direct connection proves nothing, so then the hub counts as reachable.
    """
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _hub_offline_when_unreachable() -> Iterator[None]:
    """Hub offline mode while timm fetches weights, when the hub cannot be reached.

    Without a network huggingface_hub retries each candidate file with back-off, about a minute
    before it fails; in offline mode it answers at once, from the local cache when the weights are
    there (so cached weights still load) and with an error otherwise.
    """
    try:
        from huggingface_hub import constants
    except ImportError:  # timm without huggingface_hub downloads from URLs, which fail fast
        yield
        return
    if constants.HF_HUB_OFFLINE or hub_reachable():
        yield
        return
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = False


def _offline_hint(spec: str, exc: Exception, hint: str | None) -> str:
    hint = hint or ("Without a network, create the model with --no-pretrained and pass your weights with "
                    "--checkpoint FILE (a .safetensors or .pth state dict).")
    return f"could not fetch pretrained weights for {spec!r} ({type(exc).__name__}: {exc}). {hint}"


def num_classes_of(model: nn.Module) -> int | None:
    """Number of outputs of the classifier head, or None when there is no recognisable one: the linear
    head's width, else timm's own count for a head of another kind (a 1x1 convolution, an MLP)."""
    head = classifier_of(model)
    if head is not None:
        return head[1].out_features
    count = getattr(model, "num_classes", None) if hasattr(model, "reset_classifier") else None
    return count if isinstance(count, int) and not isinstance(count, bool) and count > 0 else None


def _timm_heads(model: nn.Module) -> list[nn.Module] | None:
    """What timm's ``get_classifier()`` returns, as a list of modules; None for a model without it.

    Empty where it has no module to return: some timm models built with ``num_classes=0`` raise
    ``AttributeError`` there (EfficientViT-MSRA returns ``self.head.linear`` of an ``nn.Identity`` head)."""
    if not callable(getattr(model, "get_classifier", None)):
        return None
    try:
        heads = model.get_classifier()
    except AttributeError:
        return []
    heads = heads if isinstance(heads, (tuple, list)) else (heads,)
    return [h for h in heads if isinstance(h, nn.Module)]


def classifier_of(model: nn.Module) -> tuple[str, nn.Linear] | None:
    """The classifier head: timm's ``get_classifier()`` where it is a linear layer, else the last
    ``nn.Linear`` inside what it returns (an MLP head, LeViT's norm-and-linear heads), else None; the last
    ``nn.Linear`` of the whole model only for models without ``get_classifier`` (torchvision).

    A timm model built with ``num_classes=0`` returns ``nn.Identity``: it has no classifier, and the
    model's last linear layer is then inside a block (a ViT's last MLP), not a head to resize or train."""
    heads = _timm_heads(model)
    if heads is not None:
        if not heads:
            return None
        head = heads[0]
        prefix = next((name for name, module in model.named_modules() if module is head), None)
        if prefix is None:
            return None
        found = None
        for name, module in head.named_modules():
            if isinstance(module, nn.Linear):
                found = (f"{prefix}.{name}" if prefix and name else prefix or name, module)
        return found
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = (name, module)
    return last


# timm models whose ``reset_classifier`` makes anew more than ``get_classifier()`` returns, by the class that
# defines it: the norm-and-linear head whose linear layer alone is "the classifier" (EfficientViT-MSRA, SHViT:
# ``head.bn`` is new too), the token-labelling head beside the classifier (VOLO). A survey of every timm
# architecture (tests/test_finetune.py, marked slow) keeps this list complete.
_ALSO_RESET = {
    ("timm.models.efficientvit_msra", "EfficientVitMsra"): ("head",),
    ("timm.models.shvit", "SHViT"): ("head",),
    ("timm.models.volo", "VOLO"): ("aux_head",),
}


def _also_reset(model: nn.Module) -> list[nn.Module]:
    """The modules `_ALSO_RESET` names for ``model``'s class (or the timm class it derives from)."""
    names = next((_ALSO_RESET[key] for key in ((c.__module__, c.__qualname__) for c in type(model).__mro__)
                  if key in _ALSO_RESET), ())
    found = []
    for name in names:
        try:
            found.append(model.get_submodule(name))
        except AttributeError:
            continue
    return found


def head_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every module of the classifier head, by qualified name: what timm's ``get_classifier()`` returns
    (one module or a tuple, of any kind: a linear layer, a 1x1 convolution (DLA, DPN), an MLP head
    (MetaFormer), a head and a distillation head (LeViT)) and what its ``reset_classifier`` makes anew
    beside it (`_ALSO_RESET`: a head's norm, an auxiliary head); for models without ``get_classifier``,
    `classifier_of`'s linear layer. These are the layers ``reset_classifier`` makes anew, which must train
    with the SE blocks; none for a timm model built with ``num_classes=0``."""
    heads = _timm_heads(model)
    if heads is not None:
        heads = [*heads, *_also_reset(model)]
        wanted = {id(h) for h in heads if isinstance(h, nn.Module) and next(h.parameters(), None) is not None}
        found = [(name, module) for name, module in model.named_modules() if id(module) in wanted]
        return [(name, m) for name, m in found if not any(name.startswith(f"{other}.") for other, _ in found)]
    head = classifier_of(model)
    return [head] if head is not None else []


def reset_classifier(model: nn.Module, num_classes: int) -> bool:
    """Give ``model`` a fresh head with ``num_classes`` outputs; return whether it changed.

    timm models do this themselves (``reset_classifier``); for torchvision the last ``nn.Linear`` is
    replaced by a new one of the same input width.
    """
    if num_classes_of(model) == num_classes:
        return False
    if hasattr(model, "reset_classifier"):
        model.reset_classifier(num_classes)
        return True
    found = classifier_of(model)
    if found is None:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier to resize to {num_classes} classes; "
                         f"create the model with num_classes={num_classes} (timm, torchvision), or replace its head "
                         "yourself before fine-tuning")
    name, head = found
    new = nn.Linear(head.in_features, num_classes, bias=head.bias is not None)
    new.to(device=head.weight.device, dtype=head.weight.dtype)
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)
    return True
