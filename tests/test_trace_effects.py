"""What a block's forward does while fx traces it that the graph cannot keep: random draws in Python,
writes to module state, branches on global autograd/autocast state and activation checkpointing. Such
blocks are left alone with the reason, and tracing leaves nothing behind (no proxy in a module, no move of
the random generators, no wrapped torch function). Also forwards fx cannot generate code for,
class attributes in the way of the new block's name, lazy modules, and helpers whose forward applies a
functional activation."""
from __future__ import annotations

import io
import random
import threading
import types
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from torch.utils.checkpoint import checkpoint as imported_checkpoint
from torchvision.ops import SqueezeExcitation

import se_retrofit
from se_retrofit import trace_effects
from se_retrofit.call_watch import WatchCalls


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
        assert se_model[1].calls.item() == 0, "apply's tracing or own forwards left the buffer moved"
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


class _StateBranchBlock(_Residual):
    """Branches on global state through ``self.state`` (a function fx traces into like the forward's own code)."""

    def __init__(self, state) -> None:
        super().__init__()
        self.state = state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branch(x)
        if self.state():
            out = out * 0.5
        return F.relu(out + x)


class _AutocastFloatBlock(_Residual):
    """Written for mixed precision: returns float32 under autocast, whatever its input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branch(x)
        if torch.is_autocast_enabled("cpu"):
            out, x = out.float(), x.float()
        return F.relu(out + x)


class _AutocastOffBlock(_Residual):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", enabled=False):
            out = self.branch(x.float())
        return F.relu(out + x)


class _NoGradBlock(_Residual):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            scale = torch.sigmoid(self.conv1(x))
        return F.relu(self.branch(x) * scale + x)


@pytest.mark.parametrize("block,read", [
    (_AutocastFloatBlock, "torch.is_autocast_enabled"),
    (lambda: _StateBranchBlock(lambda: torch.get_autocast_dtype("cpu") == torch.bfloat16), "torch.get_autocast_dtype"),
    (lambda: _StateBranchBlock(lambda: torch.is_grad_enabled()), "torch.is_grad_enabled"),
    (lambda: _StateBranchBlock(lambda: torch.is_inference_mode_enabled()), "torch.is_inference_mode_enabled"),
    (_AutocastOffBlock, "a torch.autocast block"),
    (_NoGradBlock, "a torch.no_grad, enable_grad or set_grad_enabled block"),
], ids=["is_autocast_enabled", "get_autocast_dtype", "is_grad_enabled", "is_inference_mode_enabled",
        "autocast-block", "no_grad-block"])
def test_a_forward_that_reads_global_autograd_or_autocast_state_is_left_alone(block, read):
    """fx decides such a branch once, by the state while it traces, and records no autocast or no_grad block."""
    model = _Net(block()).eval()
    se_model = _apply(model)
    reasons = _reasons(se_model, "block")
    assert any(f"reads global autograd or autocast state ({read})" in r for r in reasons), \
        f"the read of {read} was not reported: {se_retrofit.get_plan(se_model)}"
    assert [n for n, _ in se_retrofit.se_blocks(se_model)] == ["plain.se"], "the other block must still get SE"


@pytest.mark.parametrize("block", [_AutocastFloatBlock, _AutocastOffBlock])
def test_a_block_written_for_autocast_computes_as_before_under_autocast(block):
    """The review's case: the retrofit returned bfloat16 where the block returns float32."""
    model = _Net(block()).eval()
    se_model = _apply(model)
    h = torch.randn(2, 8, 16, 16, dtype=torch.bfloat16)  # what the layer before hands on under autocast
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected, got = model.block(h), se_model.block(h)
    assert got.dtype == expected.dtype == torch.float32, f"under autocast the block returned {got.dtype}"
    assert torch.equal(got, expected), "under autocast the block computes something else after apply"


_STATE_READERS = ("is_grad_enabled", "is_autocast_enabled", "get_autocast_dtype", "is_inference_mode_enabled")


class _ReadsThenFails(_Residual):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.sum() > 0:  # a test on a traced value: fx cannot trace it
            x = x * 2
        return F.relu(self.branch(x) + x)


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")
def test_tracing_puts_the_watched_torch_functions_back():
    """Also after a trace that fails, and after a checkpointed forward."""
    originals = {n: getattr(torch, n) for n in _STATE_READERS}
    checkpoint = torch.utils.checkpoint.checkpoint
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _ReadsThenFails(), _CheckpointedBlock("reentrant")).eval()
    plan = se_retrofit.find_sites(model)
    assert any("fx cannot trace" in s.reason for s in plan.skipped if s.block == "1"), plan
    left = [n for n, f in originals.items() if getattr(torch, n) is not f]
    assert not left and torch.utils.checkpoint.checkpoint is checkpoint, f"left wrapped: {left}"


def test_watched_calls_count_in_their_thread_only_and_the_last_context_restores():
    """Two threads with a context open at once: neither sees the other's calls, nor removes the wrapper the other
    uses."""
    original = torch.is_grad_enabled
    entered, leave = threading.Event(), threading.Event()
    seen: list = []

    def other() -> None:
        with WatchCalls(torch, ("is_grad_enabled",)) as watch:
            entered.set()
            leave.wait(10)
            torch.is_grad_enabled()
        seen.append(len(watch.calls))

    thread = threading.Thread(target=other)
    with WatchCalls(torch, ("is_grad_enabled",)) as mine:
        thread.start()
        entered.wait(10)
        torch.is_grad_enabled()  # both contexts open: counts for this thread's only
    torch.is_grad_enabled()  # the other thread's context is still open: the wrapper must still be there
    wrapped = torch.is_grad_enabled is not original
    leave.set()
    thread.join(10)
    assert len(mine.calls) == 1, f"expected the one call made inside, got {len(mine.calls)}"
    assert wrapped and seen == [1], f"the other thread's context lost its wrapper or saw this thread's call " \
                                    f"(wrapped={wrapped}, calls={seen})"
    assert torch.is_grad_enabled is original, "the original was not put back when the last context closed"


class _CheckpointedBlock(_Residual):
    """Checkpoints its branch, one way or another."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        if how == "sequential":
            self.seq = nn.Sequential(self.conv1, nn.ReLU(), self.conv2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.how == "reentrant":
            out = torch.utils.checkpoint.checkpoint(self.branch, x, use_reentrant=True)
        elif self.how == "imported":
            out = imported_checkpoint(self.branch, x, use_reentrant=False)
        elif self.how == "sequential":
            out = torch.utils.checkpoint.checkpoint_sequential(self.seq, 2, x, use_reentrant=False)
        else:
            out = torch.utils.checkpoint.checkpoint(self.branch, x, use_reentrant=False)
        return F.relu(out + x)


def _count_checkpoints(monkeypatch: pytest.MonkeyPatch, model: nn.Module, x: torch.Tensor) -> int:
    """Checkpointed forwards run in a training step: each records the autocast state once, reentrant or not,
    through this helper of torch's (there in every supported version, unlike ``_checkpoint_impl``)."""
    if not hasattr(torch.utils.checkpoint, "_get_autocast_kwargs"):
        pytest.skip("this torch's checkpoint has no _get_autocast_kwargs to count its calls by")
    calls = []
    helper = torch.utils.checkpoint._get_autocast_kwargs

    def counted(*args, **kwargs):
        calls.append(1)
        return helper(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(torch.utils.checkpoint, "_get_autocast_kwargs", counted)
        model(x).sum().backward()
    return len(calls)


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")  # reentrant, in apply's no-grad forward
@pytest.mark.parametrize("how", ["non-reentrant", "reentrant", "imported", "sequential"])
def test_a_block_that_checkpoints_is_left_alone_and_keeps_checkpointing(how, monkeypatch):
    """fx inlines the checkpointed function: the rewritten block would silently keep every activation."""
    model = _Net(_CheckpointedBlock(how)).train()
    se_model = _apply(model)
    reasons = _reasons(se_model, "block")
    assert any("calls torch.utils.checkpoint" in r for r in reasons), \
        f"the checkpoint call was not reported: {se_retrofit.get_plan(se_model)}"
    # timm's own checkpointing (set_grad_checkpointing) never causes this skip: the hint is for the block's own
    assert all("set_grad_checkpointing" not in r for r in reasons) and \
        any("checkpoint the rewritten block from the module that calls it" in r for r in reasons), \
        f"the hint does not say what to do with the block's own checkpointing: {reasons}"
    assert [n for n, _ in se_retrofit.se_blocks(se_model)] == ["plain.se"], "the other block must still get SE"
    x = torch.randn(2, 3, 16, 16)
    assert _count_checkpoints(monkeypatch, se_model, x) == _count_checkpoints(monkeypatch, model, x) > 0, \
        "the retrofitted model checkpoints less than the original"


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")
@pytest.mark.parametrize("how", ["non-reentrant", "reentrant", "imported", "sequential"])
def test_a_checkpoint_call_is_seen_without_watching_torchs_checkpoint_functions(how, monkeypatch):
    """Older torch has no _checkpoint_impl, and checkpoint imported by name before apply is not seen through
    the module's attributes: the state reads checkpoint itself makes show the call on every version."""
    monkeypatch.setattr(trace_effects, "_CHECKPOINT_FUNCTIONS", ())
    model = _Net(_CheckpointedBlock(how)).train()
    reasons = _reasons(_apply(model), "block")
    assert any("calls torch.utils.checkpoint" in r for r in reasons), \
        f"a block that checkpoints ({how}) was not seen to: {reasons}"


def test_timm_grad_checkpointing_is_kept_and_costs_no_site(monkeypatch):
    """timm checkpoints in the model's forward_features, which has no addition and is not rewritten: the
    blocks it checkpoints get SE, and checkpointing goes on (also after turning it on on the result)."""
    timm = pytest.importorskip("timm")
    plain = timm.create_model("resnet10t", pretrained=False).train()
    model = timm.create_model("resnet10t", pretrained=False).train()
    model.set_grad_checkpointing(True)
    expected = [s.se_name for s in se_retrofit.find_sites(plain).sites]
    plan = se_retrofit.find_sites(model)
    assert [s.se_name for s in plan.sites] == expected and not plan.skipped, plan
    x = torch.randn(2, 3, 32, 32)
    se_model = _apply(model)
    assert _count_checkpoints(monkeypatch, se_model, x) == _count_checkpoints(monkeypatch, model, x) == len(expected)
    se_plain = _apply(plain)
    se_plain.set_grad_checkpointing(True)
    assert _count_checkpoints(monkeypatch, se_plain, x) == len(expected), "turned on after apply, it does not work"


class _LinearArms(nn.Module):
    """RepVGG-style: parallel arms summed without an activation."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.a, self.b = _conv(c), nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x)


class _CheckpointedUnit(nn.Module):
    """A residual unit that checkpoints its branch (which runs a linear sum) and adds a bias to its input."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.branch = nn.Sequential(_LinearArms(c), nn.ReLU(), _conv(c))
        self.bias = nn.Parameter(torch.zeros(1, c, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.bias
        return F.relu(x + torch.utils.checkpoint.checkpoint(self.branch, x, use_reentrant=False))


def test_a_block_skipped_for_checkpointing_keeps_its_units_and_its_other_reasons():
    """The skipped unit still runs its branch: the linear sum there is no site of its own (SE goes at the end of
    a unit's branch, not inside it), and the unit's other additions keep their reasons."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _CheckpointedUnit()).train()
    plan = se_retrofit.find_sites(model)
    reasons = {(s.block, s.reason.split(" (")[0].split(":")[0]) for s in plan.skipped}
    assert not plan.sites, f"SE went inside the branch of a unit skipped for checkpointing: {plan}"
    assert ("1.branch.0", "linear sum on a residual branch") in reasons, plan
    assert ("1", "adds a constant") in reasons and ("1", "module skipped") in reasons, \
        f"the unit's own reasons were dropped: {plan.skipped}"


class _OptInCheckpointBranch(nn.Module):
    """Checkpoints its layers while grad is on (a common opt-in pattern); has no addition of its own."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.seq = nn.Sequential(_conv(c), nn.BatchNorm2d(c), nn.ReLU(), _conv(c), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self.seq, x, use_reentrant=False)
        return self.seq(x)


class _UnitAroundBranch(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.branch = _OptInCheckpointBranch(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.branch(x))


def test_a_child_that_reads_grad_state_but_gets_no_se_leaves_its_parent_unit_alone(monkeypatch):
    """The child is never rewritten (no addition): its read must not hide its graph from the unit's
    analysis (the channel axis of the unit's branch), and it keeps checkpointing."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _UnitAroundBranch()).train()
    plan = se_retrofit.find_sites(model)
    assert [s.se_name for s in plan.sites] == ["1.se"] and not plan.skipped, \
        f"a read in a child that is not rewritten changed its parent's site: {plan}"
    se_model = _apply(model)
    x = torch.randn(2, 3, 16, 16)
    assert _count_checkpoints(monkeypatch, se_model, x) == _count_checkpoints(monkeypatch, model, x) == 1, \
        "the retrofitted model no longer checkpoints in the child"


class _StageGatedInFloat(nn.Module):
    """Gates its unit's output with SE, in float32 under autocast: reads autocast state, has no addition."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.unit, self.se = _PlainBlock(c), SqueezeExcitation(c, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.unit(x)
        if torch.is_autocast_enabled():
            y = y.float()
        return self.se(y)


def test_a_parent_that_reads_autocast_state_still_counts_as_the_units_channel_attention():
    """The parent is never rewritten (no addition): its read must not hide the SE it applies to the unit."""
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), _StageGatedInFloat()).eval()
    plan = se_retrofit.find_sites(model)
    assert not plan.sites, f"a unit already gated by its parent's SE got a second one: {plan}"
    reasons = {s.block: s.reason for s in plan.skipped}
    assert list(reasons) == ["1.unit"] and reasons["1.unit"].startswith("already has channel attention"), \
        f"expected only the unit, as already gated by the parent: {plan.skipped}"


class _GradReadingUnit(_CheckpointedUnit):
    """`_CheckpointedUnit` that branches on grad mode instead of checkpointing."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.bias
        out = self.branch(x)
        if not torch.is_grad_enabled():
            out = out.detach()
        return F.relu(x + out)


def test_a_block_skipped_for_reading_state_keeps_its_units_and_its_other_reasons():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _GradReadingUnit()).train()
    plan = se_retrofit.find_sites(model)
    reasons = {(s.block, s.reason.split(" (")[0].split(":")[0]) for s in plan.skipped}
    assert not plan.sites, f"SE went inside the branch of a unit skipped for reading grad state: {plan}"
    assert ("1.branch.0", "linear sum on a residual branch") in reasons, plan
    assert ("1", "adds a constant") in reasons, f"the unit's own reasons were dropped: {plan.skipped}"
    assert any(s.block == "1" and "reads global autograd or autocast state (torch.is_grad_enabled)" in s.reason
               for s in plan.skipped), plan.skipped


class _TrainOnlyBlock(_Residual):
    """Checkpoints, or reads grad state, only in training: the eval graph shows nothing, and the train graph's
    code is the eval graph's (the checkpointed ops are inlined), so that graph is not kept for the rewrite."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.how == "checkpoint" and self.training:
            out = torch.utils.checkpoint.checkpoint(self.branch, x, use_reentrant=False)
        elif self.how == "checkpoint when grad is on" and self.training and torch.is_grad_enabled():
            out = torch.utils.checkpoint.checkpoint(self.branch, x, use_reentrant=False)
        else:
            out = self.branch(x)
            if self.how == "grad read" and self.training and not torch.is_grad_enabled():
                out = out * 0
        return F.relu(out + x)


@pytest.mark.parametrize("how", ["checkpoint", "checkpoint when grad is on", "grad read"])
def test_a_checkpoint_or_state_read_made_only_in_training_is_seen(how, monkeypatch):
    """What only the train trace notes counts, though that trace's code equals the eval one's and is dropped."""
    model = _Net(_TrainOnlyBlock(how)).train()
    plan = se_retrofit.find_sites(model)
    assert [s.block for s in plan.sites] == ["plain"], \
        f"{how}: a block that checkpoints or reads grad state in training got SE: {plan.sites}"
    reasons = [s.reason for s in plan.skipped if s.block == "block"]
    expected = "torch.utils.checkpoint" if how == "checkpoint" else "global autograd or autocast state"
    assert any(expected in r for r in reasons), f"{how}: no reason names {expected!r}: {reasons}"
    if how != "grad read":
        x = torch.randn(2, 3, 8, 8)
        se_model = se_retrofit.apply(model).train()
        assert _count_checkpoints(monkeypatch, se_model, x) == _count_checkpoints(monkeypatch, model, x) == 1, \
            f"{how}: the retrofitted model does not checkpoint as the original does"


def test_preserved_tensors_puts_every_kind_of_buffer_write_back_even_when_the_forward_fails():
    """A buffer shared by two modules, one resized in place, one replaced, one registered by the forward, an
    inference tensor written in inference mode: all as before (same objects, same values), exception or not."""
    parent, child = nn.Module(), nn.Module()
    parent.child = child
    shared = torch.arange(4.0)
    parent.register_buffer("shared", shared)
    child.register_buffer("shared", shared)
    parent.register_buffer("queue", torch.zeros(3))
    parent.register_buffer("replaced", torch.ones(2))
    with torch.inference_mode():
        child.register_buffer("frozen", torch.ones(2))
    tensors = {name: t for name, t in parent.named_buffers(remove_duplicate=False)}
    values = {name: t.clone() for name, t in tensors.items()}

    def writes() -> None:
        shared.add_(1)
        parent.queue.resize_(5).fill_(7)
        parent.replaced = torch.zeros(2)
        child.register_buffer("new", torch.ones(1), persistent=False)
        with torch.inference_mode():
            child.frozen.mul_(3)
        raise ValueError("the forward failed")

    with pytest.raises(ValueError, match="the forward failed"), trace_effects.preserved_tensors(parent):
        writes()
    now = dict(parent.named_buffers(remove_duplicate=False))
    assert now.keys() == tensors.keys(), f"buffers registered or dropped: {now.keys() ^ tensors.keys()}"
    assert all(now[k] is tensors[k] for k in now), "a buffer is another tensor object than before"
    changed = [k for k in now if not torch.equal(now[k], values[k])]
    assert not changed, f"buffers not put back: {changed}"
    assert "new" not in child._non_persistent_buffers_set


def test_preserved_tensors_refuses_a_written_parameter_after_putting_buffers_back():
    m = nn.Linear(2, 2)
    m.register_buffer("count", torch.zeros(()))
    with pytest.raises(trace_effects.ParameterWritten, match="'bias'"), trace_effects.preserved_tensors(m):
        m.count += 1
        with torch.no_grad():
            m.bias.zero_()
    assert m.count.item() == 0, "the buffer was not put back"
