"""fc1 folded through a bottleneck's conv3 and bn3: exact, and never stale when a tensor it came from changes."""
from __future__ import annotations

import copy
import gc
import io
import weakref

import pytest
import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from se_retrofit import SEBlock
from se_retrofit.early_excitation import fc1_through, gate_through

from conftest import make_pretrained_like

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def _parts(spatial_dims: int = 2, cin: int = 8, cout: int = 32, bias: bool = True, norm: nn.Module | None = None,
           dtype: torch.dtype = torch.float64) -> tuple[nn.Module, nn.Module, SEBlock, torch.Tensor]:
    torch.manual_seed(3)
    conv = _CONV[spatial_dims](cin, cout, 1, bias=bias)
    norm = make_pretrained_like(norm if norm is not None else _NORM[spatial_dims](cout)).eval()
    se = SEBlock(cout, 8, spatial_dims=spatial_dims)
    z = torch.randn(3, cin, *(6,) * spatial_dims)
    return conv.to(dtype), norm.to(dtype), se.to(dtype), z.to(dtype)


def _reference(z: torch.Tensor, conv: nn.Module, norm: nn.Module, se: SEBlock) -> torch.Tensor:
    x = norm(conv(z))
    return se.fc1(x.mean(tuple(range(2, x.dim())), keepdim=True)).flatten(1)


@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
@pytest.mark.parametrize("bias", [True, False], ids=["conv-bias", "no-conv-bias"])
def test_folded_fc1_equals_fc1_of_the_squeeze(spatial_dims, bias):
    conv, norm, se, z = _parts(spatial_dims, bias=bias)
    with torch.no_grad():
        got, want = fc1_through(z, conv, norm, se), _reference(z, conv, norm, se)
    assert got is not None, "a widening 1x1 conv with an eval batch norm must take the folded path"
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12), f"folded fc1 off by {(got - want).abs().max():.2e}"


def test_frozen_and_non_affine_norms_fold_exactly():
    for norm in (FrozenBatchNorm2d(32), nn.BatchNorm2d(32, affine=False)):
        conv, norm, se, z = _parts(norm=norm)
        with torch.no_grad():
            got = fc1_through(z, conv, norm, se)
            assert torch.allclose(got, _reference(z, conv, norm, se), rtol=1e-12, atol=1e-12), type(norm).__name__


def test_the_fold_follows_every_change_to_the_tensors_it_came_from():
    conv, norm, se, z = _parts()
    changes = {
        "conv weight in place": lambda: conv.weight.mul_(1.5),
        "bn running mean in place": lambda: norm.running_mean.add_(0.3),
        "bn eps": lambda: setattr(norm, "eps", 0.1),
        "fc1 bias in place": lambda: se.fc1.bias.sub_(0.2),
        "fc1 weight replaced": lambda: setattr(se.fc1, "weight", nn.Parameter(torch.randn_like(se.fc1.weight))),
        "conv weight .data swapped": lambda: setattr(conv.weight, "data", torch.randn_like(conv.weight)),
        "bn loaded from a state dict": lambda: norm.load_state_dict(
            {k: v + 0.5 if v.is_floating_point() else v for k, v in norm.state_dict().items()}),
    }
    with torch.no_grad():
        fc1_through(z, conv, norm, se)
        for what, change in changes.items():
            change()
            got, want = fc1_through(z, conv, norm, se), _reference(z, conv, norm, se)
            assert torch.allclose(got, want, rtol=1e-12, atol=1e-12), f"stale fold after: {what}"


def _gate_reference(z: torch.Tensor, conv: nn.Module, norm: nn.Module, se: SEBlock) -> torch.Tensor:
    x = norm(conv(z))
    return torch.sigmoid(se.fc2(se.act(se.fc1(x.mean(tuple(range(2, x.dim())), keepdim=True))))).flatten(1)


def test_the_cached_gate_follows_every_change_made_after_it_ran():
    """The gate's fast path reads a cached fold and a view of ``fc2``'s weight; each change to what they
    came from, or to the modules around them, must be seen on the next call."""
    conv, norm, se, z = _parts(cin=8, cout=64)
    with torch.no_grad():
        se.fc2.weight.normal_(0, 0.5)
    changes = {
        "fc2 weight in place": lambda: se.fc2.weight.mul_(-1.5),
        "fc2 bias in place": lambda: se.fc2.bias.add_(0.7),
        "fc2 weight replaced": lambda: setattr(se.fc2, "weight", nn.Parameter(torch.randn_like(se.fc2.weight))),
        "fc2 replaced without bias": lambda: setattr(se, "fc2", nn.Conv2d(8, 64, 1, bias=False).double()),
        "act replaced by SiLU": lambda: setattr(se, "act", nn.SiLU()),
        "act back to ReLU": lambda: setattr(se, "act", nn.ReLU()),
        "conv weight in place": lambda: conv.weight.mul_(0.5),
        "norm running var in place": lambda: norm.running_var.mul_(3.0),
        "norm eps": lambda: setattr(norm, "eps", 0.5),
    }
    with torch.no_grad():
        gate_through(z, conv, norm, se)
        for what, change in changes.items():
            change()
            got, want = gate_through(z, conv, norm, se), _gate_reference(z, conv, norm, se)
            assert got is not None, f"the early gate declined after: {what}"
            assert torch.allclose(got, want, rtol=1e-12, atol=1e-12), \
                f"stale gate after: {what} (off by {(got - want).abs().max():.2e})"


def test_a_new_tensor_at_the_address_of_the_folded_one_refolds():
    """``.data`` replaced twice, or ``.half()`` then ``.float()``: the allocator tends to put the new
    storage where the folded one was freed, with the same dtype and the parameter's version counter
    unchanged. Only knowing that the folded storage was freed tells the fold is stale."""
    conv, norm, se, z = _parts(cin=8, cout=64, dtype=torch.float32)
    with torch.no_grad():
        se.fc2.weight.normal_(0, 0.5)
        for _ in range(50):
            gate_through(z, conv, norm, se)
            folded_at, shape = conv.weight.data_ptr(), conv.weight.shape
            conv.weight.data = torch.empty(0)  # frees the folded storage
            conv.weight.data = torch.randn(shape)  # the next allocation of its size
            if conv.weight.data_ptr() == folded_at:
                got, want = gate_through(z, conv, norm, se), _gate_reference(z, conv, norm, se)
                assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), \
                    f"stale gate from a freed storage (off by {(got - want).abs().max():.2e})"
                return
    pytest.skip("the allocator never put a new weight where the folded one was")


class _Shift(nn.Module):
    def forward(self, b: torch.Tensor) -> torch.Tensor:
        return b + 1.0


def _detach_into_attribute(module: nn.Module, name: str) -> None:
    value = getattr(module, name).detach() + 0.5
    delattr(module, name)
    setattr(module, name, value)  # a plain tensor attribute, not a registered parameter


@pytest.mark.parametrize("change", ["fc2 bias parametrized", "fc1 bias parametrized", "fc1 weight parametrized",
                                    "fc2 bias a plain attribute", "conv bias a plain attribute",
                                    "norm weight a plain attribute"])
def test_tensors_the_checks_cannot_follow_make_it_decline(change):
    """A parametrization computes its tensor on each access and a plain attribute is no registered
    tensor: the gate must not fold (or drop) what it cannot watch; the SE block then reads them itself."""
    conv, norm, se, z = _parts(cin=8, cout=64, bias=True)
    with torch.no_grad():
        se.fc2.weight.normal_(0, 0.5)
        assert gate_through(z, conv, norm, se) is not None  # a fold is cached before the change
    module, name = {"fc2": (se.fc2, "bias"), "fc1": (se.fc1, "bias"), "conv": (conv, "bias"),
                    "norm": (norm, "weight")}[change.split()[0]]
    if "weight parametrized" in change:
        nn.utils.parametrize.register_parametrization(se.fc1, "weight", _Shift())
    elif "parametrized" in change:
        nn.utils.parametrize.register_parametrization(module, name, _Shift())
    else:
        _detach_into_attribute(module, name)
    with torch.no_grad():
        assert gate_through(z, conv, norm, se) is None, f"the early gate folded around: {change}"
        assert fc1_through(z, conv, norm, se) is None, f"fc1_through folded around: {change}"


def test_an_excite_of_its_own_is_called():
    class HardSE(SEBlock):
        def excite(self, hidden: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.hardsigmoid(torch.nn.functional.linear(
                self.act(hidden), self.fc2.weight.flatten(1), self.fc2.bias))

    conv, norm, se, z = _parts(cin=8, cout=64)
    hard = HardSE(64, 8).double()
    hard.load_state_dict(se.state_dict())
    with torch.no_grad():
        hard.fc2.weight.normal_(0, 0.5)
        got = gate_through(z, conv, norm, hard)
        want = hard.excite(hard.fc1(norm(conv(z)).mean((2, 3), keepdim=True)).flatten(1))
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12), "a subclass's excite was bypassed"


def test_a_slice_through_data_at_the_same_address_refolds():
    """Pruning hidden units by slicing ``.data`` from 0 keeps each tensor's address and version."""
    conv, norm, se, z = _parts(cin=8, cout=64)
    with torch.no_grad():
        se.fc2.weight.normal_(0, 0.5)
        gate_through(z, conv, norm, se)
        se.fc1.weight.data, se.fc1.bias.data = se.fc1.weight.data[:4], se.fc1.bias.data[:4]
        se.fc2.weight.data = se.fc2.weight.data[:, :4]
        got, want = gate_through(z, conv, norm, se), _gate_reference(z, conv, norm, se)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12), f"stale gate after a slice (off by {(got - want).abs().max():.2e})"


def test_running_statistics_refreshed_in_training_mode_refold():
    """Re-estimating a norm's statistics (AdaBN, recalibration after pruning) updates them inside the
    kernel, without moving their version counters; the batch count moves."""
    conv, norm, se, z = _parts(cin=8, cout=64)
    with torch.no_grad():
        se.fc2.weight.normal_(0, 0.5)
        gate_through(z, conv, norm, se)
        norm.train()
        norm(conv(3 * z + 1))
        norm.eval()
        got, want = gate_through(z, conv, norm, se), _gate_reference(z, conv, norm, se)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12), f"stale statistics (off by {(got - want).abs().max():.2e})"


def test_module_conversion_by_swapping_tensors_works_after_a_cached_call():
    """``torch.utils.swap_tensors`` refuses a tensor that has a weak reference to it: the fold keeps none."""
    conv, norm, se, z = _parts(cin=8, cout=64, dtype=torch.float32)
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        with torch.no_grad():
            gate_through(z, conv, norm, se)
        for module in (conv, norm, se):
            module.double()
    finally:
        torch.__future__.set_swap_module_params_on_conversion(previous)
    with torch.no_grad():
        got, want = gate_through(z.double(), conv, norm, se), _gate_reference(z.double(), conv, norm, se)
    assert got.dtype == torch.float64 and torch.allclose(got, want, rtol=1e-12, atol=1e-12)


def test_a_cached_fold_keeps_no_tensor_of_the_model_alive():
    conv, norm, se, z = _parts(cin=8, cout=64)
    with torch.no_grad():
        gate_through(z, conv, norm, se)
    old = weakref.ref(se.fc2.weight)
    se.fc2 = nn.Conv2d(8, 64, 1).double()
    gc.collect()
    assert old() is None, "the cached fold keeps the replaced fc2 weight alive"


def test_make_fx_records_the_plain_ops_even_with_a_fold_cached():
    from torch.fx.experimental.proxy_tensor import make_fx

    conv, norm, se, z = _parts(cin=8, cout=64)

    def block(z: torch.Tensor) -> torch.Tensor:
        return se(norm(conv(z)), gate=gate_through(z, conv, norm, se))

    with torch.no_grad():
        se.fc2.weight.normal_(0, 0.5)
        block(z)  # a fold is cached
        graph = make_fx(block)(z)
        se.fc2.weight.mul_(-1)
        conv.weight.mul_(2)
        assert torch.allclose(graph(z), se(norm(conv(z))), rtol=1e-12, atol=1e-12), \
            "make_fx baked the cached fold into its graph"


def test_forward_mode_tangents_reach_the_gate():
    import torch.autograd.forward_ad as fwAD

    conv, norm, se, z = _parts(cin=8, cout=64)
    tangent = torch.randn_like(conv.weight)
    with torch.no_grad():
        gate_through(z, conv, norm, se)  # a fold is cached
        with fwAD.dual_level():
            conv._parameters["weight"] = fwAD.make_dual(conv.weight.detach(), tangent)  # as functional_call does
            got = fwAD.unpack_dual(gate_through(z, conv, norm, se)).tangent
            want = fwAD.unpack_dual(_gate_reference(z, conv, norm, se)).tangent
    assert got is not None and torch.allclose(got, want, rtol=1e-10, atol=1e-12), "the weight's tangent was dropped"


def test_the_cached_gate_has_the_bits_of_the_excitation():
    """The fast path runs ``addmm`` where `SEBlock.excite` runs ``F.linear``: the same kernel, the same bits."""
    conv, norm, se, z = _parts(cin=8, cout=64, dtype=torch.float32)
    with torch.no_grad():
        se.fc2.weight.normal_(0, 0.5)
        for _ in range(2):  # the first call folds, the second reads the cache
            got = gate_through(z, conv, norm, se)
        assert torch.equal(got, se.excite(fc1_through(z, conv, norm, se))), "the fast path changed the gate's bits"


@pytest.mark.parametrize("change", ["conv stride", "conv groups", "norm to training", "norm class", "act hook",
                                    "se pre-hook", "parameters need grad", "another conv"])
def test_a_cached_fold_is_not_used_where_the_checks_now_fail(change):
    """Every condition `_declines` checks before a fold is made is checked again once it is cached."""
    conv, norm, se, z = _parts(cin=8, cout=64)
    with torch.no_grad():
        assert gate_through(z, conv, norm, se) is not None
    other_conv = copy.deepcopy(conv)
    if change == "conv stride":
        conv.stride = (2, 2)
    elif change == "conv groups":
        conv.groups = 2
    elif change == "norm to training":
        norm.train()
    elif change == "norm class":
        norm.__class__ = type("ScaledNorm", (nn.BatchNorm2d,), {"forward": lambda self, x: 2 * super().forward(x)})
    elif change == "act hook":
        se.act.register_forward_hook(lambda module, args, out: out * 3.0)
    elif change == "se pre-hook":
        se.register_forward_pre_hook(lambda module, args: (args[0] * 2.0,))
    elif change == "another conv":
        with torch.no_grad():
            other_conv.weight.mul_(2.0)
        conv = other_conv
    grad = change == "parameters need grad"
    with torch.set_grad_enabled(grad):
        got = gate_through(z, conv, norm, se)
    if change in ("conv stride", "conv groups", "norm to training", "norm class", "se pre-hook"):
        assert got is None, f"a cached fold was used after: {change}"
        return
    assert got is not None, change
    with torch.set_grad_enabled(grad):
        want = _gate_reference(z, conv, norm, se)
    assert got.requires_grad == grad, f"after {change}: requires_grad {got.requires_grad}"
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12), f"after {change}: off by {(got - want).abs().max():.2e}"


def test_a_change_through_data_is_seen_after_a_train_eval_switch():
    """``.data`` writes bypass the version counter; the fold is redone when the SE block switches mode."""
    conv, norm, se, z = _parts()
    se.eval()
    with torch.no_grad():
        fc1_through(z, conv, norm, se)
        conv.weight.data.mul_(3.0)
        norm.running_var.data.mul_(0.1)
        se.train()
        se.eval()
        got, want = fc1_through(z, conv, norm, se), _reference(z, conv, norm, se)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12), f"stale fold after a mode switch: {(got - want).abs().max()}"


@pytest.mark.parametrize("optimizer", [torch.optim.SGD, torch.optim.AdamW])
def test_a_fused_optimizer_step_refolds(optimizer):
    """Fused optimizers write the parameters without moving their version counters: any optimizer step
    makes the fold stale (training SE in eval mode, then evaluating, never switches mode)."""
    conv, norm, se, z = _parts()
    params = [*conv.parameters(), *norm.parameters(), *se.parameters()]
    opt = optimizer(params, lr=0.1, fused=True)
    with torch.no_grad():
        fc1_through(z, conv, norm, se)
    _gate_reference(z, conv, norm, se).square().sum().backward()
    opt.step()
    with torch.no_grad():
        got, want = fc1_through(z, conv, norm, se), _reference(z, conv, norm, se)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12), f"stale fold after a fused step: {(got - want).abs().max()}"


@pytest.mark.parametrize("where", ["conv forward hook", "norm forward hook", "norm pre-hook", "se pre-hook",
                                   "fc1 pre-hook", "fc2 forward hook", "global forward hook", "instance forward", "conv backward hook",
                                   "norm backward pre-hook", "global backward hook"])
def test_hooks_on_the_modules_it_redoes_make_it_decline(where):
    """A hook may change what the conv or the norm returns (calibration, clipping); the early gate,
    which redoes their arithmetic, would not see it, and its gradient would go around a backward hook."""
    conv, norm, se, z = _parts()
    hook = lambda module, args, out: out * 3.0  # noqa: E731
    pre = lambda module, args: (args[0] * 2.0,)  # noqa: E731
    handle = {
        "conv forward hook": lambda: conv.register_forward_hook(hook),
        "norm forward hook": lambda: norm.register_forward_hook(hook),
        "norm pre-hook": lambda: norm.register_forward_pre_hook(pre),
        "se pre-hook": lambda: se.register_forward_pre_hook(pre),
        "fc1 pre-hook": lambda: se.fc1.register_forward_pre_hook(pre),
        "fc2 forward hook": lambda: se.fc2.register_forward_hook(hook),
        "global forward hook": lambda: nn.modules.module.register_module_forward_hook(hook),
        "conv backward hook": lambda: conv.register_full_backward_hook(lambda m, gi, go: None),
        "norm backward pre-hook": lambda: norm.register_full_backward_pre_hook(lambda m, go: None),
        "global backward hook": lambda: nn.modules.module.register_module_full_backward_hook(lambda m, gi, go: None),
    }.get(where, lambda: None)()
    if where == "instance forward":
        norm.forward = lambda x: nn.BatchNorm2d.forward(norm, x) + 1.0
    try:
        with torch.no_grad():
            assert fc1_through(z, conv, norm, se) is None, f"the early squeeze ignored a {where}"
            assert gate_through(z, conv, norm, se) is None, f"the early gate ignored a {where}"
    finally:
        if handle is not None:
            handle.remove()
    if handle is not None:
        with torch.no_grad():
            assert fc1_through(z, conv, norm, se) is not None, f"still declining after the {where} was removed"


def test_a_dtype_change_refolds():
    conv, norm, se, z = _parts(dtype=torch.float32)
    with torch.no_grad():
        fc1_through(z, conv, norm, se)
        for m in (conv, norm, se):
            m.double()
        got = fc1_through(z.double(), conv, norm, se)
    assert got.dtype == torch.float64, got.dtype


def test_autograd_takes_the_plain_chain_and_reaches_conv_and_norm():
    conv, norm, se, z = _parts()
    got = fc1_through(z, conv, norm, se)
    want = _reference(z, conv, norm, se)
    assert got.requires_grad, "with parameters needing grad the result must carry the graph"
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    got.sum().backward()
    assert conv.weight.grad is not None and norm.weight.grad is not None, "no gradient reached conv3 / bn3"


@pytest.mark.parametrize("grad", [False, True], ids=["folded", "autograd"])
def test_the_early_gate_is_the_gate_of_the_se_input(grad):
    conv, norm, se, z = _parts(cin=8, cout=64)
    with torch.no_grad():
        se.fc2.weight.normal_(0, 0.5)  # a gate that is not the same everywhere
    with torch.set_grad_enabled(grad):
        x = norm(conv(z))
        got = gate_through(z, conv, norm, se)
        want = torch.sigmoid(se.fc2(torch.relu(se.fc1(x.mean((2, 3), keepdim=True))))).flatten(1)
    assert got is not None and got.shape == (z.shape[0], 64), got
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12), f"early gate off by {(got - want).abs().max():.2e}"
    assert got.requires_grad == grad
    with torch.no_grad():
        assert torch.allclose(se(x, gate=got.detach()), x * want[..., None, None], rtol=1e-12, atol=1e-12)


def test_float16_does_not_overflow_in_the_folded_squeeze():
    """The folded path sums the map and scales by 1/HW; a float16 sum of 64x64 values of 100 is
    409,600, past float16's 65,504, where the mean (100) is not."""
    conv, norm, se, _ = _parts(cin=8, cout=32)
    z = torch.full((2, 8, 64, 64), 100.0)
    with torch.no_grad():
        want = _reference(z.double(), conv, norm, se)
        got = fc1_through(z.half(), conv.half(), norm.half(), se.half())
    assert got is not None and torch.isfinite(got).all(), "float16 squeeze overflowed"
    assert torch.allclose(got.double(), want, rtol=2e-2, atol=2e-2), f"off by {(got.double() - want).abs().max():.2e}"


def test_declines_where_not_exact_or_not_cheaper():
    conv, norm, se, z = _parts()
    with torch.no_grad():
        assert fc1_through(z, conv, norm.train(), se) is None, "training mode normalises with batch statistics"
        narrowing = _parts(cin=32, cout=16)
        narrow_se = SEBlock(16, 8).double()
        assert fc1_through(narrowing[3], narrowing[0], _NORM[2](16).double().eval(), narrow_se) is None, \
            "a narrowing conv's input is no cheaper to average"


def test_parameters_made_under_inference_mode_fall_back_to_the_plain_squeeze():
    """Inference tensors have no version counter, so a fold of them could not be kept up to date."""
    with torch.inference_mode():
        conv, norm, se, z = _parts()
        assert fc1_through(z, conv, norm, se) is None


def test_a_model_that_ran_pickles_and_deep_copies_without_the_cache():
    conv, norm, se, z = _parts()
    model = nn.ModuleDict({"conv": conv, "norm": norm, "se": se})
    with torch.no_grad():
        want = fc1_through(z, conv, norm, se)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin["conv"].weight.mul_(2)
        assert torch.equal(fc1_through(z, loaded["conv"], loaded["norm"], loaded["se"]), want)
        assert torch.allclose(fc1_through(z, twin["conv"], twin["norm"], twin["se"]),
                              _reference(z, twin["conv"], twin["norm"], twin["se"]), rtol=1e-12, atol=1e-12)
        assert torch.equal(fc1_through(z, conv, norm, se), want), "changing a deep copy changed the original"



def _shared_memory_writer(norm: nn.Module) -> None:
    with torch.no_grad():
        norm.running_var.mul_(4.0)


@pytest.mark.parametrize("share", ["before the first call", "after a cached call"])
def test_tensors_in_shared_memory_are_not_folded(share):
    """Hogwild: ``share_memory()`` and other processes training the model. Their writes never move this
    process's version counters, so a fold kept the old map and gave a stale gate, silently."""
    import multiprocessing

    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("needs the fork start method")
    conv, norm, se, z = _parts(cin=8, cout=64)
    with torch.no_grad():
        se.fc2.weight.normal_(0, 0.5)
        if share == "after a cached call":
            assert gate_through(z, conv, norm, se) is not None, "the early gate declined before sharing"
        for module in (conv, norm, se):
            module.share_memory()
        first = gate_through(z, conv, norm, se)
        process = torch.multiprocessing.get_context("fork").Process(target=_shared_memory_writer, args=(norm,))
        process.start()
        process.join()
        assert process.exitcode == 0, "the writer process failed"
        got, want = gate_through(z, conv, norm, se), _gate_reference(z, conv, norm, se)
    assert first is None or not torch.equal(first, want), "the other process's write changed nothing: vacuous"
    assert got is None or torch.allclose(got, want, rtol=1e-12, atol=1e-12), \
        f"stale gate after another process wrote a shared tensor (off by {(got - want).abs().max():.2e})"
