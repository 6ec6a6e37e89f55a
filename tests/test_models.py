"""Model names and pretrained weights: offline, cached weights load at once and missing ones fail at once."""
from __future__ import annotations

import socket
from pathlib import Path

import huggingface_hub.constants
import pytest
import timm
import torch
from safetensors.torch import save_file

import se_retrofit.models as models

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub probe fails, and any later attempt to resolve a host is an error of its own."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"a network lookup was attempted: {args[:2]}")

    monkeypatch.setattr(models, "hub_reachable", lambda *a, **k: False)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


def _cache_timm_weights(cache: Path, model: torch.nn.Module, repo: str) -> None:
    """Lay the weights out as huggingface_hub's cache does after a download."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(COMMIT)
    snapshot = folder / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(snapshot / "model.safetensors"))


def test_cached_pretrained_weights_load_without_network(no_network, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    reference = timm.create_model("resnet18")
    with torch.no_grad():
        for i, p in enumerate(reference.parameters()):
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
    _cache_timm_weights(tmp_path, reference, reference.pretrained_cfg["hf_hub_id"])
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    model = models.create_model("resnet18", pretrained=True)
    for (name, got), want in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(got, want), f"{name} was not loaded from the local hub cache"
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False, "offline mode must not outlive the call"


def test_missing_pretrained_weights_fail_at_once_with_a_hint(no_network, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(RuntimeError, match="--no-pretrained.*--checkpoint FILE"):
        models.create_model("resnet18", pretrained=True)


def test_the_offline_hint_is_the_callers(no_network, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(RuntimeError, match="could not fetch.*resnet18.*run without --pretrained") as caught:
        models.create_model("resnet18", pretrained=True, offline_hint="Costs need no weights: run without --pretrained.")
    assert "--checkpoint" not in str(caught.value), "the default hint names options the caller may not have"


@pytest.mark.parametrize("name", ["fasterrcnn_mobilenet_v3_large_320_fpn", "lraspp_mobilenet_v3_large"])
def test_torchvision_detectors_without_weights_download_no_backbone(name: str, no_network, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no cached backbone to hide a download attempt
    model = models.create_model(f"torchvision:{name}")
    assert isinstance(model, torch.nn.Module), f"{name} was not built"
    assert not any(tmp_path.rglob("*.pth")), f"{name}: a backbone checkpoint was fetched"


def test_unknown_names_get_suggestions() -> None:
    with pytest.raises(ValueError, match="Did you mean.*resnet18"):
        models.create_model("resnet18x")
    with pytest.raises(ValueError, match="Did you mean.*resnet18"):
        models.create_model("torchvision:resnet19")


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "efficientvit_m0", "levit_128s", "resnet10t"])
def test_a_model_built_without_classifier_has_no_head(name: str) -> None:
    """``num_classes=0`` (a feature extractor): no head, rather than the model's last linear layer, which is
    inside a block (a ViT's last MLP) and would be trained under --train se and saved as the head."""
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, num_classes=0)
    assert models.head_modules(model) == [], f"{name} without a classifier: head {models.head_modules(model)}"
    assert models.classifier_of(model) is None, f"{name}: classifier {models.classifier_of(model)}"
    assert models.num_classes_of(model) is None, f"{name}: {models.num_classes_of(model)} classes"
    with torch.device("meta"):
        model.reset_classifier(7)
    assert models.num_classes_of(model) == 7, f"{name} with a 7-class head: {models.num_classes_of(model)} classes"
    heads = [head for head, _ in models.head_modules(model)]
    assert heads and all(not head.startswith(("blocks.", "stages.", "layer")) for head in heads), (
        f"{name}: the head found is {heads}")
