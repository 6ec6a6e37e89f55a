import pytest
import torch

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
