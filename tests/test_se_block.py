import pytest
import torch
import torch.nn.utils.prune

from se_retrofit import SEBlock
from se_retrofit.se_block import hidden_width


@pytest.mark.parametrize("dims,shape", [(1, (2, 16, 9)), (2, (2, 16, 5, 7)), (3, (2, 16, 3, 4, 5))])
def test_identity_init_is_exact_identity_in_every_dimensionality(dims, shape):
    se = SEBlock(16, 8, spatial_dims=dims, gain=2.0)
    se.init_identity()
    x = torch.randn(shape)
    assert torch.equal(se(x), x), f"identity-initialised {dims}-D SE block changed its input"


def test_paper_block_gates_between_zero_and_one():
    se = SEBlock(16, 4, gain=1.0)
    x = torch.randn(2, 16, 5, 5).abs() + 0.1
    y = se(x)
    ratio = y / x
    assert ratio.min() > 0 and ratio.max() < 1, f"sigmoid gate left (0, 1): {ratio.min()} .. {ratio.max()}"
    assert torch.allclose(ratio[:, :, 0, 0], ratio[:, :, 3, 4]), "the gate must be one value per channel"


def test_identity_init_fc2_gets_gradient_on_first_step():
    se = SEBlock(8, 8, gain=2.0)
    se.init_identity()
    x = torch.randn(2, 8, 4, 4)
    (se(x) * torch.randn_like(x)).sum().backward()
    assert se.fc2.weight.grad.abs().sum() > 0, "fc2 received no gradient on the first step"


def test_bad_spatial_dims():
    with pytest.raises(ValueError, match="spatial_dims"):
        SEBlock(8, 8, spatial_dims=4)


@pytest.mark.parametrize("channels,r,expected", [(256, 16, 16), (2048, 16, 128), (64, 16, 8), (24, 16, 8), (100, 4, 24)])
def test_hidden_width_follows_timm_make_divisible(channels, r, expected):
    assert hidden_width(channels, r) == expected


def _reference_gate_output(se: SEBlock, x: torch.Tensor) -> torch.Tensor:
    """The block as timm's SEModule computes it: calling fc1 and fc2, so that their hooks run."""
    s = x.mean((2, 3), keepdim=True)
    return x * torch.sigmoid(se.fc2(se.act(se.fc1(s)))) * se.gain


@pytest.mark.parametrize("wrap", ["prune", "weight_norm", "spectral_norm"])
def test_excitation_layers_whose_weight_a_hook_recomputes_are_called(wrap):
    """Pruning and the old-style weight/spectral norms make ``weight`` a plain attribute recomputed in a
    forward pre-hook: read without calling the layer it was stale after a load, and its graph was freed by
    the first backward ("backward through the graph a second time" on the second step)."""
    torch.manual_seed(0)
    se = SEBlock(16, 8)
    for fc in (se.fc1, se.fc2):
        if wrap == "prune":
            torch.nn.utils.prune.l1_unstructured(fc, "weight", amount=0.3)
        elif wrap == "weight_norm":
            torch.nn.utils.weight_norm(fc)
        else:
            torch.nn.utils.spectral_norm(fc)
    x = torch.randn(2, 16, 5, 5)
    optimizer = torch.optim.SGD(se.parameters(), lr=0.5)
    for step in range(2):
        optimizer.zero_grad()
        se(x).square().sum().backward()
        optimizer.step()
    se.eval()  # spectral_norm's power iteration moves the weight at each training-mode call
    with torch.no_grad():
        got, want = se(x), _reference_gate_output(se, x)
    assert torch.allclose(got, want, atol=1e-6), f"{wrap}: SE output left the called layers' by {(got - want).abs().max()}"


def test_forward_hooks_on_the_excitation_layers_run():
    se = SEBlock(16, 8)
    calls = []
    se.fc1.register_forward_hook(lambda module, args, out: calls.append("fc1"))
    se.fc2.register_forward_hook(lambda module, args, out: out * 0.0)
    x = torch.randn(2, 16, 5, 5)
    assert torch.allclose(se(x), x * 0.5), "the hook zeroing fc2's output was not applied (gate sigmoid(0) = 0.5)"
    assert calls == ["fc1"], f"fc1's forward hook ran {calls.count('fc1')} times, not once"
