"""What a block's forward does while fx traces it that the graph cannot keep: random draws in Python and
writes to module state. Such blocks are left alone with the reason, and tracing leaves nothing behind
(no proxy in a module, no move of the random generators). Also forwards fx cannot generate code for,
class attributes in the way of the new block's name, lazy modules, and helpers whose forward applies a
functional activation."""
from __future__ import annotations

import io
import random
import types
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import se_retrofit


def _conv(c: int) -> nn.Conv2d:
    return nn.Conv2d(c, c, 3, padding=1)


class _Residual(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv1, self.conv2 = _conv(c), _conv(c)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.relu(self.conv1(x)))


class _PythonDropBlock(_Residual):
    """Stochastic depth decided in Python: one draw per call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and random.random() < 0.5:
            return x
        return F.relu(self.branch(x) + x)


class _TorchItemDropBlock(_Residual):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.rand(1).item() < 0.5:  # no tensor argument: fx runs it for real
            return x
        return F.relu(self.branch(x) + x)


class _NumpyNoiseBlock(_Residual):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = 1.0 + 0.1 * np.random.rand() if self.training else 1.0
        return F.relu(self.branch(x) * scale + x)


class _FeatureCachingBlock(_Residual):
    def __init__(self) -> None:
        super().__init__()
        self.feat, self.calls, self.history = None, 0, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branch(x)
        self.feat = out
        self.calls += 1
        self.history.append(out)
        return F.relu(out + x)


class _PlainBlock(_Residual):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.branch(x) + x)


class _Net(nn.Module):
    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block, self.plain = block, _PlainBlock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.plain(self.block(self.stem(x))).mean((2, 3))


def _apply(model: nn.Module, **options) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", se_retrofit.SERetrofitWarning)
        return se_retrofit.apply(model, **options)


def _reasons(model: nn.Module, block: str) -> list[str]:
    return [s.reason for s in se_retrofit.get_plan(model).skipped if s.block == block]


@pytest.mark.parametrize("block", [_PythonDropBlock, _TorchItemDropBlock, _NumpyNoiseBlock])
def test_a_forward_that_draws_random_numbers_in_python_is_left_alone(block):
    model = _Net(block()).train()
    # (torch's generator moves anyway: the new SE blocks' weights are initialised from it)
    states = random.getstate(), np.random.get_state()[1].copy()
    se_model = _apply(model)
    assert random.getstate() == states[0] and (np.random.get_state()[1] == states[1]).all(), \
        "tracing moved Python's or NumPy's random generator"
    reasons = _reasons(se_model, "block")
    assert any("draws random numbers" in r for r in reasons), f"{block.__name__} was not refused: {reasons}"
    assert [n for n, _ in se_retrofit.se_blocks(se_model)] == ["plain.se"], "the other block must still get SE"


def test_python_stochastic_depth_still_drops_after_apply():
    """The block that fx would have fixed to one draw keeps drawing per call."""
    random.seed(0)  # whatever the draw while tracing, the block must keep drawing
    se_model = _apply(_Net(_PythonDropBlock())).train()
    h = torch.randn(1, 8, 8, 8)
    with torch.no_grad():
        dropped = sum(torch.equal(se_model.block(h), h) for _ in range(200))
    assert 60 < dropped < 140, f"the branch was dropped in {dropped} of 200 training calls, expected about 100"


def test_a_forward_that_writes_module_state_is_left_alone_and_keeps_no_proxy():
    model = _Net(_FeatureCachingBlock()).eval()
    se_model = _apply(model)
    reasons = _reasons(se_model, "block")
    assert any("writes module state (self.calls, self.feat, self.history)" in r for r in reasons), reasons
    block = se_model.block
    assert block.calls == 1 and len(block.history) == 1, "only the example forward may have run the block"
    assert isinstance(block.feat, torch.Tensor) and not isinstance(block.history[0], torch.fx.Proxy)
    with torch.no_grad():
        se_model(torch.randn(2, 3, 16, 16))
    assert block.calls == 2, "the block stopped counting its calls"
    torch.save(se_model, io.BytesIO())


class _FeatureKeepingNet(_Net):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.last = self.plain(self.block(self.stem(x)))
        return self.last.mean((2, 3))


class _MemoisingBlock(_Residual):
    """A per-device memo of a value the forward can always recompute (timm's ``attention_bias_cache``)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1, 8, 1, 1))
        self.scale_cache: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = str(x.device)
        if key not in self.scale_cache:
            self.scale_cache[key] = self.scale * 0.5
        return F.relu(self.branch(x) * self.scale_cache[key] + x)


def test_a_dict_named_as_a_cache_is_a_memo_not_state():
    """Its entries are dropped after tracing (they hold proxies); the rewritten forward recomputes the value."""
    model = _Net(_MemoisingBlock()).eval()
    se_model = _apply(model)
    assert "block.se" in dict(se_retrofit.se_blocks(se_model)), se_retrofit.get_plan(se_model)
    assert not any(isinstance(v, torch.fx.Proxy) for v in se_model.block.scale_cache.values())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), se_model(x))
    torch.save(se_model, io.BytesIO())


@pytest.mark.parametrize("inplace", [False, True])
def test_tracing_leaves_no_proxy_in_a_module_it_does_not_rewrite(inplace):
    """The root module stores a feature map: not rewritten (no addition), and its attribute must stay a tensor."""

    model = _FeatureKeepingNet(_PlainBlock()).eval()
    model.last = None
    out = _apply(model, inplace=inplace)
    assert not isinstance(out.last, torch.fx.Proxy), "a proxy was left on the root module"
    assert sorted(n for n, _ in se_retrofit.se_blocks(out)) == ["block.se", "plain.se"]
    torch.save(out, io.BytesIO())
    se_retrofit.find_sites(model)
    assert not isinstance(model.last, torch.fx.Proxy), "find_sites left a proxy on the user's model"


def test_fx_code_generation_failure_skips_only_that_module():
    """fx cannot print a tuple default into the generated code: that block is skipped, the pass goes on."""

    class TupleDefault(_Residual):
        def forward(self, x: torch.Tensor, kernel=(3, 3)) -> torch.Tensor:
            return x + self.branch(x)

    se_model = _apply(_Net(TupleDefault()))
    assert any("fx cannot generate code" in r for r in _reasons(se_model, "block")), se_retrofit.get_plan(se_model)
    assert [n for n, _ in se_retrofit.se_blocks(se_model)] == ["plain.se"]


def test_a_class_attribute_named_se_is_not_taken_for_a_free_slot():
    class OptionalAttention(_Residual):
        se = None  # class-level default: an instance's registered submodule of that name would be hidden

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.branch(x)
            if self.se is not None:
                out = self.se(out)
            return F.relu(out + x)

    model = _Net(OptionalAttention()).eval()
    se_model = _apply(model)
    assert "block.se_1" in dict(se_retrofit.se_blocks(se_model)), se_retrofit.get_plan(se_model)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), se_model(x))


def test_lazy_modules_are_refused_with_a_hint():
    model = nn.Sequential(nn.LazyConv2d(8, 3), _PlainBlock())
    with pytest.raises(ValueError, match="lazy modules.*Run the model once"):
        se_retrofit.apply(model)


class _ConvBNReLU(nn.Module):
    """A helper whose activation is a function call in its forward: no activation module to see."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class _Down(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(_ConvBNReLU(8, 16, 2), _ConvBNReLU(16, 16))
        self.down = nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False), nn.BatchNorm2d(16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.down(x)


class _Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cb1, self.cb2 = _ConvBNReLU(16, 16), _ConvBNReLU(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cb2(self.cb1(x)) + x


class _Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner, self.conv = _Inner(), nn.Conv2d(16, 16, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(F.relu(self.inner(x)))) + x


def test_a_functional_activation_inside_a_helper_module_makes_its_branch_a_residual_branch():
    """Not a linear (RepVGG-style) sum: a downsampling block gets SE on its branch, with a projection
    shortcut, and a residual block on another block's branch gets its own SE."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _Down(), _Outer())
    plan = se_retrofit.find_sites(model)
    found = {s.block: (s.kind, s.shortcut) for s in plan.sites}
    assert found == {"1": ("residual", "projection"), "2": ("residual", "identity"),
                     "2.inner": ("residual", "identity")}, plan


def test_a_sequential_of_helpers_with_functional_activations_is_not_light():
    from se_retrofit.sites import light_module

    assert not light_module(nn.Sequential(_ConvBNReLU(8, 8))), "F.relu inside a Sequential's child was missed"
    assert light_module(nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))), "conv + norm is a projection"


class _MaskedBlock(_Residual):
    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        out = self.branch(x)
        if mask is not None:
            out = out * mask
        return F.relu(out + x)


class _MaskedNet(_Net):
    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.plain(self.block(self.stem(x), mask)).mean((2, 3))


def test_a_call_with_another_value_of_a_specialised_argument_says_where_it_came_from():
    """fx fixes ``mask=None`` (the example forward's value) in the graph; its check's message is se_retrofit's."""
    model = _MaskedNet(_MaskedBlock()).eval()
    se_model = _apply(model)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), se_model(x))
        with pytest.raises(AssertionError, match=r"se_retrofit: _MaskedBlock.forward was rewritten for mask=None.*"
                                                 r"example_input"):
            se_model(x, torch.ones(2, 1, 16, 16))


class _ChildModeBlock(_Residual):
    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branch(x)
        if self.drop.training:  # the child's mode, which can differ from the block's
            out = out * 0.5
        return F.relu(out + x)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_a_forward_that_reads_a_submodules_mode_is_left_alone(mode):
    """fx would fix ``self.drop.training`` to its value at apply time; the generated forward could only
    dispatch on the block's own mode."""
    model = _Net(_ChildModeBlock())
    model.train(mode == "train")
    se_model = _apply(model)
    assert any("train/eval flag of a submodule (self.drop.training)" in r for r in _reasons(se_model, "block")), \
        se_retrofit.get_plan(se_model)
    assert all(isinstance(m.training, bool) for m in se_model.modules()), "a stand-in for a flag was left behind"
    x = torch.randn(2, 3, 16, 16)
    for train in (False, True):
        model.train(train), se_model.train(train)
        with torch.no_grad():
            assert torch.equal(model.block(model.stem(x)), se_model.block(se_model.stem(x))), f"train={train}"


class _BufferCounter(_Residual):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1  # fx hands buffers over as real tensors: this runs while tracing
        return F.relu(self.branch(x) + x)


class _NestedWrites(_Residual):
    def __init__(self) -> None:
        super().__init__()
        self.stats = {"feats": []}
        self.rec = types.SimpleNamespace(last=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branch(x)
        self.stats["feats"].append(out)
        self.rec.last = out
        return F.relu(out + x)


class _ConstantKeyCache(_Residual):
    """A dict named as a cache, filled under a fixed key: apply's own forward fills it before tracing."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(1, 8, 1, 1))
        self.gain_cache: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if "g" not in self.gain_cache:
            self.gain_cache["g"] = self.gain * 2
        return F.relu(self.branch(x) * self.gain_cache["g"] + x)


class _FlagArgument(_Residual):
    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(F.dropout(self.branch(x), 0.5, self.drop.training) + x)


@pytest.mark.parametrize("block,reason", [
    (_BufferCounter, "writes module state (self.block.calls)"),
    (_NestedWrites, "writes module state (self.block.rec, self.block.stats)"),
    (_ConstantKeyCache, "reads a tensor it keeps in self.block.gain_cache['g']"),
    (_FlagArgument, "passes the train/eval flag of a submodule"),
], ids=["buffer", "nested", "filled-cache", "flag-argument"])
def test_state_the_graph_would_drop_or_fix_is_found_and_put_back(block, reason):
    """Writes fx does not see as attribute changes (a buffer's value, a list in a dict, a helper object's
    attribute), a tensor an earlier call cached, a submodule's flag passed on: skipped, state restored."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), block()).eval()
    x = torch.randn(2, 3, 16, 16)
    se_model = _apply(model, example_input=x, inplace=True)
    reasons = [s.reason for s in se_retrofit.get_plan(se_model).skipped]
    assert any(reason.replace("self.block.", "self.") in r for r in reasons), reasons
    torch.save(se_model, io.BytesIO())
    if isinstance(se_model[1], _BufferCounter):
        assert se_model[1].calls.item() == 1, "tracing changed the buffer (only apply's own forward may count)"
    if isinstance(se_model[1], _NestedWrites):
        assert len(se_model[1].stats["feats"]) == 1 and isinstance(se_model[1].rec.last, torch.Tensor)


def test_tracer_constants_stay_only_where_a_rewritten_forward_reads_them():
    """fx stores a tensor the forward makes (``torch.tensor([2.0])``) on the module it traces; a module left
    as it was kept it, on the user's own model with ``inplace=True``."""

    class Scaled(nn.Module):  # no addition: traced, not rewritten
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x) * torch.tensor([2.0])

    class Residual(Scaled):  # rewritten: its generated forward reads the constant
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.conv(x) * torch.tensor([0.5])

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), Scaled(), Residual()).eval()
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", se_retrofit.SERetrofitWarning)
        se_retrofit.apply(model, inplace=True)
    left = {name: [k for k in vars(m) if k.startswith("_tensor_constant")] for name, m in model.named_modules()}
    assert left["1"] == [] and left["2"] == ["_tensor_constant0"], f"tracer constants left on {left}"
    with torch.no_grad():
        assert torch.equal(model(x), expected), "the rewritten model lost a constant it reads"


def test_a_refused_in_place_apply_leaves_no_tracer_constant() -> None:
    """fx stores torch.tensor(...) made in a forward on the traced module; a refused apply(inplace=True)
    (a pattern matching nothing) must take them off the user's model as a successful one does."""
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.conv(x) * torch.tensor([0.5])

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), Residual()).eval()
    with pytest.raises(ValueError, match="nonexistent"):
        se_retrofit.apply(model, inplace=True, include=["nonexistent"])
    left = {name: [k for k in vars(m) if k.startswith("_tensor_constant")] for name, m in model.named_modules()}
    assert not any(left.values()), f"a refused apply left tracer constants on the user's model: {left}"
