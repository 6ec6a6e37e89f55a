"""load_into: a state dict put into a model, with errors that say what does not fit and guess why."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from se_retrofit.fitting import WeightsMismatchError, load_into
from se_retrofit.se_block import SEBlock


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


def test_load_into_fits_and_reports_what_does_not(tmp_path):
    source, target = tiny_net(), tiny_net()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(1)
    load_into(target, source.state_dict())
    assert torch.equal(target[0].weight, source[0].weight), "weights should have been loaded"

    other = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5), nn.Linear(5, 5))
    with pytest.raises(WeightsMismatchError) as info:
        load_into(other, source.state_dict())
    message = str(info.value)
    assert "missing" in message and "4.weight" in message, message
    assert "not in the model" in message and "1.running_mean" in message, message
    assert "different architecture" in message, f"a hint is expected: {message}"
    assert isinstance(info.value, ValueError)


def test_a_checkpoint_without_batch_counts_loads_as_load_state_dict_allows():
    """Checkpoints from before PyTorch 0.4.1 (torchvision's ImageNet ResNets) have no
    ``num_batches_tracked``; a batch norm fills it in, so it is not missing."""
    source, target = tiny_net(), tiny_net()
    with torch.no_grad():
        source[1].running_mean.add_(1)
    old = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    load_into(target, old)
    assert torch.equal(target[1].running_mean, source[1].running_mean), "the statistics should have been loaded"
    with pytest.raises(WeightsMismatchError, match="missing from the checkpoint: 1.running_mean"):
        load_into(tiny_net(), {k: v for k, v in old.items() if k != "1.running_mean"})


def test_load_into_shape_mismatch_points_at_the_classifier():
    wide = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 1000))
    narrow = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 10))
    for strict in (True, False):
        with pytest.raises(WeightsMismatchError, match=r"1\.weight.*\[1000, 8\].*\[10, 8\]") as info:
            load_into(narrow, wide.state_dict(), strict=strict)
        assert "classifier" in str(info.value), str(info.value)


def test_load_into_base_weights_into_se_model():
    base = nn.Sequential(nn.Conv2d(3, 8, 1))
    with_se = nn.Sequential(nn.Conv2d(3, 8, 1))
    with_se.add_module("se", SEBlock(8, 4))
    with pytest.raises(WeightsMismatchError, match="se_retrofit.apply"):
        load_into(with_se, base.state_dict())
    result = load_into(with_se, base.state_dict(), strict=False)
    assert sorted(result.missing_keys) == ["se.fc1.bias", "se.fc1.weight", "se.fc2.bias", "se.fc2.weight"], result
    assert torch.equal(with_se[0].weight, base[0].weight)


def test_load_into_hints_at_a_key_prefix():
    net = tiny_net()
    prefixed = {f"backbone.{k}": v for k, v in net.state_dict().items()}
    with pytest.raises(WeightsMismatchError, match="'backbone.'"):
        load_into(tiny_net(), prefixed)


def test_an_se_models_weights_given_for_a_base_model_get_a_hint():
    import se_retrofit
    from torchvision.models import resnet18

    weights = se_retrofit.apply(resnet18()).state_dict()
    with pytest.raises(WeightsMismatchError, match="holds SE blocks"):
        load_into(resnet18(), weights)
