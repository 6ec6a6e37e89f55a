"""The pass on small hand-written networks: one feature of the analysis or the rewrite per test."""
from __future__ import annotations

import collections
import copy
import dataclasses
import functools
import io
import itertools
import pickle
import warnings

import pytest
import torch

import se_retrofit
from se_retrofit import SEBlock, SERetrofitWarning

from conftest import assert_original_state_kept, make_pretrained_like
from models_custom import (AddSpelling, BasicBlock, CalledTwice, FunctionalDropoutBlock, InPlaceInputNet, Net,
                           NotResidual, ParallelConvs, PlainNet, ShortcutArgBlock, ShortcutArgNet, conv_bn)

X = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))


def retrofit(model, **kwargs):
    make_pretrained_like(model).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SERetrofitWarning)
        se_model = se_retrofit.apply(model, **kwargs)
    return model, se_model


def assert_same_outputs(a, b, what):
    """Bit-identical outputs: under identity init the gate is exactly 1 and ``x * 1`` is exact, so any
    difference is a bug (a tolerance of 1e-5 let a gate of 1 + 5e-7 through). Copies and pickle round trips
    of one model run the same operations on the same weights, so they are held to this too."""
    a.eval()
    b.eval()
    with torch.no_grad():
        out_a, out_b = a(X), b(X)
    diff = (out_a - out_b).abs().max().item()
    assert torch.equal(out_a, out_b), f"{what}: outputs not bit-identical (max difference {diff})"


@pytest.mark.parametrize("spelling", ["plus", "iadd", "torch.add", "Tensor.add", "reversed"])
def test_every_spelling_of_the_addition_is_found(spelling):
    model, se_model = retrofit(Net([AddSpelling(16, spelling)]))
    blocks = se_retrofit.se_blocks(se_model)
    assert [n for n, _ in blocks] == ["blocks.0.se"], f"{spelling}: SE blocks {blocks}"
    assert_same_outputs(model, se_model, spelling)
    assert_original_state_kept(model, se_model)


def test_functional_dropout_and_training_branch_follow_the_mode():
    model, se_model = retrofit(Net([FunctionalDropoutBlock(16, p=0.5)]))
    assert len(se_retrofit.se_blocks(se_model)) == 1
    assert_same_outputs(model, se_model, "functional dropout block")
    se_model.train()
    a, b = se_model(X), se_model(X)
    assert not torch.equal(a, b), "functional dropout is off in train mode after the rewrite"
    se_model.eval()
    with torch.no_grad():
        assert torch.equal(se_model(X), se_model(X)), "dropout still active in eval mode after the rewrite"


def test_shortcut_handed_in_by_the_caller_counts_as_residual():
    model, se_model = retrofit(ShortcutArgNet())
    plan = se_retrofit.get_plan(se_model)
    assert [(s.se_name, s.shortcut) for s in plan.sites] == [("a.se", "argument"), ("b.se", "identity")]
    assert_same_outputs(model, se_model, "shortcut argument")
    with pytest.raises(AssertionError, match="rewritten for shortcut=None"):
        se_model.b(torch.rand(2, 16, 8, 8), torch.rand(2, 16, 8, 8))


def test_non_residual_additions_are_left_alone_with_reasons():
    model = NotResidual()
    with pytest.warns(SERetrofitWarning, match="no SE block inserted"):
        se_model = se_retrofit.apply(model, example_input=X)
    reasons = [s.reason for s in se_retrofit.get_plan(se_model).skipped]
    assert any("adds a constant" in r for r in reasons), reasons
    assert any("channels-last" in r for r in reasons), reasons
    assert any("no convolution" in r for r in reasons), reasons
    assert not se_retrofit.se_blocks(se_model)


def test_model_without_additions_comes_back_unchanged_with_a_warning():
    model = PlainNet()
    with pytest.warns(SERetrofitWarning, match="no tensor addition in any traced module") as caught:
        se_model = se_retrofit.apply(model)
    assert caught[0].filename == __file__, f"the warning should point at the caller, not at {caught[0].filename}"
    assert se_model is not model
    assert_original_state_kept(model, se_model)
    assert set(se_model.state_dict()) == set(model.state_dict())
    printed = str(se_retrofit.find_sites(model))
    assert "0 SE site(s), 0 skipped" in printed and "no tensor addition" in printed, \
        f"the dry run should say why nothing would change:\n{printed}"


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_a_scripted_model_is_refused_with_the_eager_one_asked_for():
    scripted = torch.jit.script(Net([AddSpelling(16, "plus")]))
    for call in (se_retrofit.apply, se_retrofit.find_sites):
        with pytest.raises(ValueError, match="TorchScript.*Pass the eager model") as info:
            call(scripted)
        # scripting the result fails (its generated forwards call Python): the hint must not suggest it
        assert "torch.jit.trace" in str(info.value) and "script or export" not in str(info.value), str(info.value)


def _compiled(kind, module):
    """``module`` as TorchScript: scripted, or traced on a 16-channel map."""
    if kind == "script":
        return torch.jit.script(module)
    return torch.jit.trace(module.eval(), torch.rand(1, 16, 8, 8))


def _resnet_like():
    """Two basic blocks, the second with a projection shortcut, with norms that are not identities."""
    torch.manual_seed(0)
    return make_pretrained_like(Net([BasicBlock(16, 16), BasicBlock(16, 16, stride=2)])).eval()


# which part of `_resnet_like` is compiled
_COMPILED_PARTS = {
    "a leaf conv on the branch": lambda m, c: m.blocks[0].conv2.__setitem__(0, c(m.blocks[0].conv2[0])),
    "a conv + norm Sequential on the branch": lambda m, c: setattr(m.blocks[0], "conv2", c(m.blocks[0].conv2)),
    "every conv of the branch": lambda m, c: [setattr(m.blocks[0], n, c(getattr(m.blocks[0], n)))
                                              for n in ("conv1", "conv2")],
    "the projection shortcut": lambda m, c: setattr(m.blocks[1], "down", c(m.blocks[1].down)),
}


@pytest.mark.filterwarnings("ignore:`torch.jit.(script|trace)")
@pytest.mark.parametrize("kind", ["script", "trace"])
@pytest.mark.parametrize("part", list(_COMPILED_PARTS))
def test_a_torchscript_layer_in_a_block_is_called_as_it_is_and_the_block_gets_se(part, kind):
    """A TorchScript submodule is an opaque leaf read from its compiled graph: the find_sites/apply of
    such a model crashed inside the layout analysis (a scripted conv), or the example forward failed on
    the hooks TorchScript modules refuse, blamed on the input (a compiled module with children)."""
    model = _resnet_like()
    _COMPILED_PARTS[part](model, functools.partial(_compiled, kind))
    assert [s.se_name for s in se_retrofit.find_sites(model, example_input=X).sites] == \
        ["blocks.0.se", "blocks.1.se"], f"{kind}d {part}: find_sites"
    se_model = se_retrofit.apply(model, example_input=X)
    plan = se_retrofit.get_plan(se_model)
    assert [s.se_name for s in plan.sites] == ["blocks.0.se", "blocks.1.se"] and not plan.skipped, \
        f"{kind}d {part}: both blocks should get SE as in the eager model:\n{plan}"
    compiled = [n for n, m in se_model.named_modules() if isinstance(m, torch.jit.ScriptModule)]
    assert compiled == [n for n, m in model.named_modules() if isinstance(m, torch.jit.ScriptModule)], \
        f"{kind}d {part}: the compiled modules should be kept as they are, got {compiled}"
    assert_same_outputs(model, se_model, f"{kind}d {part}, eval mode")
    model.train()
    se_model.train()
    with torch.no_grad():
        assert torch.equal(model(X), se_model(X)), f"{kind}d {part}: outputs differ in train mode"
    saved = io.BytesIO()
    torch.save(se_model.state_dict(), saved)
    saved.seek(0)
    rebuilt = se_retrofit.apply(model, se_retrofit.get_config(se_model), example_input=X)
    rebuilt.load_state_dict(torch.load(saved))
    assert_same_outputs(se_model, rebuilt, f"{kind}d {part}, state_dict saved and loaded into a new retrofit")


@pytest.mark.filterwarnings("ignore:`torch.jit.(script|trace)")
@pytest.mark.parametrize("kind", ["script", "trace"])
def test_a_torchscript_block_is_left_alone_with_the_reason(kind):
    model = _resnet_like()
    model.blocks[0] = _compiled(kind, model.blocks[0])
    se_model = se_retrofit.apply(model, example_input=X)  # NoExampleInput before: the hooks on it failed
    plan = se_retrofit.get_plan(se_model)
    assert [s.se_name for s in plan.sites] == ["blocks.1.se"], f"{kind}d block: {plan}"
    assert [(s.block, s.reason.split(",")[0]) for s in plan.skipped] == \
        [("blocks.0", "module skipped: a TorchScript module (torch.jit.script or torch.jit.trace)")], \
        f"{kind}d block: the plan should say why it has no SE:\n{plan}"
    assert "apply to the eager module before scripting or tracing it" in plan.skipped[0].reason
    assert_same_outputs(model, se_model, f"{kind}d block")


@pytest.mark.filterwarnings("ignore:`torch.jit.script")
def test_a_scripted_channel_attention_on_the_branch_gets_no_se_beside_it():
    """The compiled graph is followed through convolutions, norms and elementwise ops only: a squeeze
    (a mean) makes the branch's channel axis unknown, so no second SE block, and the reason says where."""
    from timm.layers import SqueezeExcite

    model = _resnet_like()
    model.blocks[0].conv2.append(torch.jit.script(SqueezeExcite(16)))
    plan = se_retrofit.find_sites(model, example_input=X)
    assert [s.se_name for s in plan.sites] == ["blocks.1.se"], f"SE beside a scripted SE module:\n{plan}"
    reasons = [s.reason for s in plan.skipped if s.block == "blocks.0"]
    assert any("channel axis unknown" in r and "'conv2.2'" in r and "TorchScript" in r for r in reasons), reasons


@pytest.mark.filterwarnings("ignore:`torch.jit.script")
def test_a_scripted_stem_does_not_hide_the_input_channels():
    """The first *eager* convolution (16 input channels, after the stem) told the example input's channels."""
    model = _resnet_like()
    model.stem = torch.jit.script(model.stem)
    plan = se_retrofit.find_sites(model)
    assert plan.example_input.startswith("Tensor(2, 3,"), plan.example_input
    assert len(plan.sites) == 2, plan


@pytest.mark.filterwarnings("ignore:`torch.jit.script")
def test_tracing_a_torchscript_module_is_a_trace_failure():
    """The layout pass traces leaves it does not know; a compiled one raised AttributeError from inspect."""
    from se_retrofit.tracing import TraceFailure, cached_trace, clear_cache

    clear_cache()
    with pytest.raises(TraceFailure, match="TorchScript module"):
        cached_trace(torch.jit.script(conv_bn(3, 8)))
    clear_cache()


def test_multi_branch_sum_gets_one_se_after_the_sum():
    model, se_model = retrofit(Net([ParallelConvs(16), ParallelConvs(16)]))
    plan = se_retrofit.get_plan(se_model)
    assert [(s.se_name, s.kind) for s in plan.sites] == [("blocks.0.se", "multi-branch"), ("blocks.1.se", "multi-branch")]
    assert_same_outputs(model, se_model, "multi-branch")


def test_apply_is_idempotent():
    model, se_model = retrofit(Net([AddSpelling(16, "plus"), FunctionalDropoutBlock(16)]))
    with pytest.warns(SERetrofitWarning, match=r"already retrofitted.*already has channel attention: SEBlock"):
        again = se_retrofit.apply(se_model, reduction=4)
    assert len(se_retrofit.se_blocks(again)) == 2, "a second apply added more SE blocks"
    assert se_retrofit.get_config(again) == se_retrofit.get_config(se_model), \
        "a second apply that inserted nothing replaced the config that made the blocks"
    assert se_retrofit.get_plan(again).sites == se_retrofit.get_plan(se_model).sites, "the plan was replaced"


def test_an_apply_that_inserted_nothing_does_not_count_as_a_retrofit():
    """``exclude="*"`` inserts nothing and warns; the model must not then be refused as already retrofitted."""
    import timm

    model = timm.create_model("resnet10t", pretrained=False)
    with pytest.warns(SERetrofitWarning, match="no SE block inserted"):
        nothing = se_retrofit.apply(model, exclude="*")
    se_model = se_retrofit.apply(nothing, reduction=8)
    assert len(se_retrofit.se_blocks(se_model)) == 4 and se_retrofit.get_config(se_model).reduction == 8


def test_a_second_apply_that_would_add_blocks_is_refused():
    """SE stage by stage (``apply(apply(m, include="layer1"), include="layer2")``) made a model no single
    config describes: save_adapter wrote an adapter that load refused, blaming the base model."""
    import timm

    model = timm.create_model("resnet10t", pretrained=False)
    first = se_retrofit.apply(model, include="layer1*")
    with pytest.raises(ValueError, match=r"already retrofitted .* would add 1 more SE block\(s\) \(layer2.0.se\).*once"):
        se_retrofit.apply(first, include="layer2*", inplace=True)
    assert [n for n, _ in se_retrofit.se_blocks(first)] == ["layer1.0.se"], "the refused call changed the model"


@pytest.mark.parametrize("option", ["include", "exclude"])
def test_apply_again_with_a_pattern_says_the_model_is_already_retrofitted(option):
    # the pattern names blocks that hold the first call's SE: once refused as matching "no block"
    model, se_model = retrofit(Net([AddSpelling(16, "plus"), FunctionalDropoutBlock(16)]))
    with pytest.warns(SERetrofitWarning, match=r"already retrofitted.*retrofit the original model.*"
                                               r"already has channel attention: SEBlock"):
        again = se_retrofit.apply(se_model, **{option: "blocks.0"})
    assert [n for n, _ in se_retrofit.se_blocks(again)] == ["blocks.0.se", "blocks.1.se"], \
        f"apply(retrofitted, {option}=...) changed the SE blocks"
    assert se_retrofit.get_config(again) == se_retrofit.get_config(se_model), f"{option}: the config was replaced"
    plan = se_retrofit.find_sites(se_model, **{option: "blocks.0"})
    assert not plan.sites and "already has channel attention" in str(plan), plan


@pytest.mark.parametrize("position", ["pre", "post", "identity"])
def test_apply_again_after_any_position_names_the_se_block_already_there(position):
    import timm

    _, se_model = retrofit(timm.create_model("resnet10t", pretrained=False), position=position)
    with pytest.warns(SERetrofitWarning) as caught:
        again = se_retrofit.apply(se_model)
    assert len(se_retrofit.se_blocks(again)) == 4, f"{position}: a second apply added more SE blocks"
    reasons = str(caught[-1].message).partition("): ")[2].rpartition(". The model")[0].split("; ")
    assert reasons and all("already has channel attention: SEBlock" in r for r in reasons), f"{position}: {reasons}"


@pytest.mark.parametrize("position,channels", [("standard", 16), ("pre", 16), ("post", 16), ("identity", 16)])
def test_positions(position, channels):
    model, se_model = retrofit(Net([AddSpelling(16, "plus")]), position=position)
    (site,) = se_retrofit.get_plan(se_model).sites
    assert site.position == position and site.channels == channels
    assert_same_outputs(model, se_model, f"position={position}")
    se = se_model.blocks[0].se
    seen = {}
    se.register_forward_hook(lambda m, i, o: seen.setdefault("input", i[0]))
    with torch.no_grad():
        se_model(X)
    block_in = {}
    se_model.blocks[0].register_forward_pre_hook(lambda m, a: block_in.setdefault("x", a[0]))
    with torch.no_grad():
        se_model(X)
    is_block_input = torch.equal(seen["input"], block_in["x"])
    assert is_block_input == (position in ("pre", "identity")), \
        f"position={position}: SE input is {'' if is_block_input else 'not '}the block input"


def test_post_goes_after_the_activation():
    _, se_model = retrofit(Net([AddSpelling(16, "plus")]), position="post")
    seen = {}
    se_model.blocks[0].se.register_forward_hook(lambda m, i, o: seen.setdefault("input", i[0]))
    with torch.no_grad():
        se_model(X)
    assert seen["input"].min() >= 0, "position='post' should take the output of the ReLU after the addition"


def test_include_and_exclude_select_blocks():
    net = Net([AddSpelling(16, "plus") for _ in range(4)])
    _, se_model = retrofit(net, include=["blocks.1", "blocks.3"])
    assert [n for n, _ in se_retrofit.se_blocks(se_model)] == ["blocks.1.se", "blocks.3.se"]
    _, se_model = retrofit(net, exclude="blocks.[01]")
    assert [n for n, _ in se_retrofit.se_blocks(se_model)] == ["blocks.2.se", "blocks.3.se"]
    _, se_model = retrofit(net, include="blocks")
    assert len(se_retrofit.se_blocks(se_model)) == 4, "a pattern on a parent module selects all blocks under it"


def test_include_matching_nothing_is_an_error():
    with pytest.raises(ValueError, match=r"include pattern 'layer9\.\*' matches no block"):
        se_retrofit.apply(Net([AddSpelling(16, "plus")]), include="layer9.*")


@pytest.mark.parametrize("kwargs,match", [
    (dict(reduction=0), "reduction"), (dict(reduction="16"), "reduction"), (dict(init="zeros"), "init must be one of"),
    (dict(position="after"), "position must be one of 'standard', 'pre', 'post', 'identity'"),
    (dict(include=[""]), "include"), (dict(exclude=5), "exclude"), (dict(reduction=float("nan")), "reduction"),
    (dict(reduction=float("inf")), "reduction"),
])
def test_bad_options_name_the_option(kwargs, match):
    with pytest.raises(ValueError, match=match):
        se_retrofit.apply(Net([AddSpelling(16, "plus")]), **kwargs)


def test_config_object_and_keywords_do_not_mix():
    net = Net([AddSpelling(16, "plus")])
    with pytest.raises(ValueError, match="either in config or as keywords"):
        se_retrofit.apply(net, se_retrofit.SEConfig(), reduction=8)
    # a keyword equal to its default still conflicts with a config that says otherwise
    for call in (se_retrofit.apply, se_retrofit.find_sites):
        with pytest.raises(ValueError, match=r"not both \(got config and \['reduction'\]\)"):
            call(net, se_retrofit.SEConfig(reduction=8), reduction=16)
        with pytest.raises(ValueError, match="init"):
            call(net, config=se_retrofit.SEConfig(init="paper"), init="identity")
    unset = se_retrofit.apply(net, se_retrofit.SEConfig(reduction=8), include=None, exclude=None)
    assert se_retrofit.get_config(unset).reduction == 8, "None for include/exclude is 'not given'"
    with pytest.raises(TypeError, match="config must be an SEConfig.*SEConfig.from_dict"):
        se_retrofit.apply(net, {"reduction": 8})


def test_options_only_an_seconfig_takes_say_so_as_keywords():
    net = Net([AddSpelling(16, "plus")])
    for call in (se_retrofit.apply, se_retrofit.find_sites):
        with pytest.raises(TypeError, match=r"takes fuse_add only in an SEConfig.*SEConfig\(fuse_add=\.\.\.\)"):
            call(net, fuse_add=False)
    with pytest.raises(TypeError, match="takes divisor, min_hidden only in an SEConfig"):
        se_retrofit.apply(net, min_hidden=4, divisor=4)
    with pytest.raises(TypeError, match="unexpected keyword argument 'reductoin'"):  # a misspelling stays Python's
        se_retrofit.apply(net, reductoin=8)


def test_get_config_is_a_copy_an_edit_cannot_change_the_record():
    """``save_adapter`` writes the record for ``load`` to rebuild the blocks: an edited record wrote an
    adapter that no model could load (review r19a)."""
    se_model = se_retrofit.apply(Net([AddSpelling(16, "plus")]), reduction=8)
    edited = se_retrofit.get_config(se_model)
    edited.reduction = 2
    assert se_retrofit.get_config(se_model).reduction == 8, "editing get_config's result changed the model's record"
    assert se_retrofit.get_config(se_model) is not se_retrofit.get_config(se_model)
    se_retrofit.get_plan(se_model).config.reduction = 2
    assert se_retrofit.get_config(se_model).reduction == 8, "editing the plan's config changed the model's record"


def test_reduction_and_floor_set_the_hidden_width():
    _, se_model = retrofit(Net([AddSpelling(64, "plus")], channels=64), reduction=4)
    assert se_model.blocks[0].se.hidden == 16
    _, se_model = retrofit(Net([AddSpelling(64, "plus")], channels=64), reduction=64)
    assert se_model.blocks[0].se.hidden == 8, "the hidden width must not go below min_hidden"


def test_inplace_modifies_and_returns_the_same_model():
    model = make_pretrained_like(Net([AddSpelling(16, "plus")]))
    out = se_retrofit.apply(model, inplace=True)
    assert out is model and isinstance(model.blocks[0].se, SEBlock)


def test_input_model_is_untouched():
    model = make_pretrained_like(Net([AddSpelling(16, "plus")])).train()
    before = copy.deepcopy(model.state_dict())
    classes = [type(m) for m in model.modules()]
    se_retrofit.apply(model)
    assert model.training and all(m.training for m in model.modules()), "apply changed the caller's train mode"
    assert [type(m) for m in model.modules()] == classes
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())



class _RunningCenter(torch.nn.Module):
    """Subtracts a running mean of its input that it updates on every call, in eval mode too (test-time
    adaptation): in place, through ``.data`` (which moves no version counter) or by rebinding the buffer."""

    def __init__(self, channels: int, update: str) -> None:
        super().__init__()
        self.update = update
        self.register_buffer("mean", torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch_mean = x.detach().mean((0, 2, 3))
        if self.update == "in place":
            with torch.no_grad():
                self.mean.mul_(0.9).add_(batch_mean, alpha=0.1)
        elif self.update == ".data":
            self.mean.data.mul_(0.9).add_(batch_mean, alpha=0.1)
        else:
            self.mean = self.mean * 0.9 + batch_mean * 0.1
        return x - self.mean[:, None, None]


class _CenteredBlock(torch.nn.Module):
    """A residual block whose branch runs a `_RunningCenter`."""

    def __init__(self, channels: int, update: str) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(channels, channels, 3, padding=1)
        self.norm = _RunningCenter(channels, update)
        self.conv2 = torch.nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv2(torch.relu(self.norm(self.conv1(x)))) + x)


class _EmaBlock(torch.nn.Module):
    """A residual block that keeps an EMA of its branch's output in a buffer of its own (so it is skipped:
    the generated forward would not repeat the write)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(channels, channels, 3, padding=1)
        self.register_buffer("ema", torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(torch.relu(self.conv1(x)))
        self.ema.mul_(0.9).add_(out.detach().mean((0, 2, 3)), alpha=0.1)
        return torch.relu(out + x)


class _BufferNet(torch.nn.Module):
    def __init__(self, block: torch.nn.Module) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.b = block
        self.fc = torch.nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.b(torch.relu(self.stem(x))).mean((2, 3)))


_BUFFER_BLOCKS = {"ema": lambda: _EmaBlock(16), **{f"child, {u}": functools.partial(_CenteredBlock, 16, u)
                                                      for u in ("in place", ".data", "rebound")}}


@pytest.mark.parametrize("block", list(_BUFFER_BLOCKS))
@pytest.mark.parametrize("inplace", [False, True])
def test_buffers_a_forward_updates_in_eval_mode_come_back_as_they_were(inplace, block):
    """apply's own forwards (the example forward, the graph's replay, the check of a rewritten block) may
    move a buffer even in eval mode: each puts it back, bit-identical and in the same tensor object, so the
    caller's model (inplace=True) is not changed and the retrofit's state_dict is the original's."""
    model = _BufferNet(_BUFFER_BLOCKS[block]()).eval()
    original = copy.deepcopy(model)
    buffers = {name: t for name, t in model.named_buffers()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SERetrofitWarning)
        se_model = se_retrofit.apply(model, inplace=inplace)
    assert_original_state_kept(original, model)
    assert_original_state_kept(original, se_model)
    if inplace:
        moved = [name for name, t in model.named_buffers() if t is not buffers[name]]
        assert not moved, f"apply left other tensor objects as the caller's buffers {moved}"
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(original(x), se_model(x)), "the retrofit's next output differs from the original's"


@pytest.mark.parametrize("update", ["in place", ".data", "rebound"])
def test_a_block_running_a_buffer_updating_module_on_its_branch_gets_se_and_computes_the_same(update):
    """The replay of the traced graph and the check of the rewritten block start from the buffers the example
    forward was recorded with, so the block is not refused as control flow fx cannot follow; the retrofit
    computes what the original does, in eval and train mode, and updates the buffer alike."""
    model = make_pretrained_like(_BufferNet(_CenteredBlock(16, update))).eval()
    original = copy.deepcopy(model)
    se_model = se_retrofit.apply(model)
    plan = se_retrofit.get_plan(se_model)
    assert [s.se_name for s in plan.sites] == ["b.se"], f"no SE in the block: {plan}"
    for mode in ("eval", "train"):
        original.train(mode == "train")
        se_model.train(mode == "train")
        for step in range(3):
            x = torch.randn(2, 3, 16, 16)
            with torch.no_grad():
                out, se_out = original(x), se_model(x)
            assert torch.equal(out, se_out), f"{mode} mode, call {step}: outputs differ"
            assert torch.equal(original.b.norm.mean, se_model.b.norm.mean), f"{mode} mode, call {step}: buffers differ"


def test_an_example_input_that_fails_midway_leaves_no_buffer_moved():
    """A candidate input that fails after a buffer moved (only 224 px run here) is followed by the next one
    from the same state: the recorded call and the returned model see the buffer as it was."""
    class OnlyLarge(_BufferNet):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.b(torch.relu(self.stem(x)))
            if x.shape[-1] != 224:
                raise ValueError("this model takes 224 px images")
            return self.fc(out.mean((2, 3)))

    model = make_pretrained_like(OnlyLarge(_CenteredBlock(16, "in place"))).eval()
    original = copy.deepcopy(model)
    se_retrofit.apply(model, inplace=True)
    assert "224" in se_retrofit.get_plan(model).example_input
    assert [s.se_name for s in se_retrofit.get_plan(model).sites] == ["b.se"], se_retrofit.get_plan(model)
    assert_original_state_kept(original, model)


def test_a_forward_that_writes_a_parameter_is_refused_and_the_callers_model_kept():
    """Parameters are not copied (that would cost the model's memory again) but checked: a write apply
    cannot undo is an error, not a retrofit whose weights silently differ."""
    class ScaleDecay(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(16))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                self.scale.mul_(0.99)
            return x * self.scale[:, None, None]

    class Block(_CenteredBlock):
        def __init__(self) -> None:
            super().__init__(16, "in place")
            self.norm = ScaleDecay()

    model = _BufferNet(Block()).eval()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match=r"wrote parameter 'b\.norm\.scale'.*register_buffer"):
        se_retrofit.apply(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "apply changed the caller's model"


@pytest.mark.parametrize("inplace", [False, True])
def test_apply_under_inference_mode_gives_a_model_that_trains(inplace):
    # the copy and the SE parameters were made as inference tensors: the first backward failed
    model = make_pretrained_like(Net([AddSpelling(16, "plus"), FunctionalDropoutBlock(16)])).eval()
    originals = {k: (v, v.detach().clone()) for k, v in model.state_dict(keep_vars=True).items()}
    with torch.inference_mode():
        x = X.clone()
        se_model = se_retrofit.apply(model, inplace=inplace, example_input=x)
        with torch.no_grad():
            expected = model(x) if not inplace else None
    inference = [n for n, t in itertools.chain(se_model.named_parameters(), se_model.named_buffers())
                 if t.is_inference()]
    assert not inference, f"inplace={inplace}: apply under inference_mode left inference tensors: {inference[:5]}"
    assert len(se_retrofit.se_blocks(se_model)) == 2, se_retrofit.get_plan(se_model)
    after = model.state_dict(keep_vars=True)
    assert all(after[k] is obj and torch.equal(obj, value) for k, (obj, value) in originals.items()), \
        f"inplace={inplace}: apply under inference_mode replaced or changed the model's own tensors"
    if expected is not None:
        assert_same_outputs(model, se_model, "apply under inference_mode")
        assert torch.equal(model(X), expected), "the caller's model changed"
    assert_original_state_kept(model, se_model)
    se_model.train()
    se_model(X).sum().backward()
    se = se_retrofit.se_blocks(se_model)[0][1]
    assert all(p.grad is not None for p in se.parameters()), "backward did not reach the SE parameters"


@pytest.mark.parametrize("inplace", [False, True])
def test_a_model_built_under_inference_mode_trains_only_from_a_copy(inplace):
    # what apply's docstring says: inplace=False copies the inference-tensor weights into ordinary ones;
    # inplace=True has no copy to make, and the model's own weights stay inference tensors
    with torch.inference_mode():
        model = make_pretrained_like(Net([AddSpelling(16, "plus")])).eval()
        se_model = se_retrofit.apply(model, inplace=inplace, example_input=X)
    se_model.train()
    if inplace:
        with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
            se_model(X).sum().backward()
    else:
        se_model(X).sum().backward()
        assert all(p.grad is not None for p in se_model.parameters() if p.requires_grad), "backward missed weights"


@dataclasses.dataclass
class _Batch:
    """A batch class pytree does not look into (as a data pipeline's own batch type)."""

    image: torch.Tensor


class _BatchInPlaceInputNet(InPlaceInputNet):
    def forward(self, batch: _Batch) -> torch.Tensor:
        return super().forward(batch.image)


def _example_input_of_form(x, form):
    return {"tensor": x, "tuple": (x,), "dict": {"x": x}, "object": _Batch(x)}[form]


@pytest.mark.parametrize("form", ["tensor", "tuple", "dict", "object"])
@pytest.mark.parametrize("call", ["apply", "find_sites"])
def test_the_callers_example_input_is_not_changed(call, form):
    # the example forward ran on the caller's tensors: a model that changes its input in place
    # (ReLU(inplace=True) first) cleared every negative value of the caller's example_input; a tensor
    # inside an object pytree does not know was still changed after containers were copied
    model = make_pretrained_like(_BatchInPlaceInputNet() if form == "object" else InPlaceInputNet()).eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    before = x.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SERetrofitWarning)
        found = getattr(se_retrofit, call)(model, example_input=_example_input_of_form(x, form))
    assert torch.equal(x, before), f"{call} changed the caller's example_input ({form}) in place"
    plan = found if call == "find_sites" else se_retrofit.get_plan(found)
    assert [s.se_name for s in plan.sites] == ["net.blocks.0.se"], plan


@pytest.mark.parametrize("inplace", [False, True])
def test_an_inference_tensor_example_input_runs_a_model_that_changes_its_input(inplace):
    # apply runs outside the caller's inference_mode, where an in-place update of the caller's inference
    # tensor is refused: the example forward failed and the message asked for the example_input it was given
    model = make_pretrained_like(InPlaceInputNet()).eval()
    with torch.inference_mode():
        x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        before = x.clone()
        se_model = se_retrofit.apply(model, inplace=inplace, example_input=x)
    assert torch.equal(x, before), "apply changed the caller's example_input in place"
    assert [n for n, _ in se_retrofit.se_blocks(se_model)] == ["net.blocks.0.se"], se_retrofit.get_plan(se_model)


def test_find_sites_is_a_dry_run():
    model = Net([AddSpelling(16, "plus"), AddSpelling(16, "iadd")])
    plan = se_retrofit.find_sites(model)
    assert [s.se_name for s in plan.sites] == ["blocks.0.se", "blocks.1.se"]
    assert not any(isinstance(m, SEBlock) for m in model.modules())
    assert "blocks.0.se" in str(plan) and plan.to_dict()["sites"][0]["channels"] == 16


def test_retrofitted_model_pickles_and_deep_copies(tmp_path):
    model, se_model = retrofit(Net([AddSpelling(16, "plus"), FunctionalDropoutBlock(16)]), init="paper")
    clone = pickle.loads(pickle.dumps(se_model))
    twin = copy.deepcopy(se_model)
    for other, what in ((clone, "pickle"), (twin, "deepcopy")):
        assert_same_outputs(se_model, other, what)
        assert type(other.blocks[0]).__name__ == "SEAddSpelling"


def test_unpicklable_forward_still_deep_copies_and_reapplies(monkeypatch):
    """A forward calling a function with no importable name cannot be pickled, but copies must still work."""
    from se_retrofit import codegen

    def no_imports(*args, **kwargs):
        raise ValueError("pretend a global of the forward has no importable name")

    monkeypatch.setattr(codegen, "_format_import_block", no_imports)
    model, se_model = retrofit(Net([AddSpelling(16, "plus"), FunctionalDropoutBlock(16)]), init="paper")
    assert type(se_model.blocks[0])._se_retrofit_globals, "the unimportable globals must be kept as objects"
    twin = copy.deepcopy(se_model)
    assert_same_outputs(se_model, twin, "deepcopy of an unpicklable retrofit")
    assert type(twin.blocks[0]) is type(se_model.blocks[0]), "deepcopy must keep the generated class"
    with pytest.warns(SERetrofitWarning):
        again = se_retrofit.apply(se_model)  # apply deep-copies its input
    assert len(se_retrofit.se_blocks(again)) == 2
    with pytest.raises(TypeError, match="cannot be pickled; save its state_dict"):
        pickle.dumps(se_model)


def test_string_annotations_pickle_with_an_fx_that_cannot_import_them(monkeypatch):
    """Under ``from __future__ import annotations`` fx emits ``_torch_Tensor_ = 'torch.Tensor'`` globals,
    which torch <= 2.11's import formatter rejects; the generated class must stay picklable anyway."""
    from se_retrofit import codegen

    real = codegen._format_import_block

    def old_fx(globals_, importer):
        if any(isinstance(v, str) for v in globals_.values()):
            raise ValueError("old fx: cannot import a str")
        return real(globals_, importer)

    monkeypatch.setattr(codegen, "_format_import_block", old_fx)
    model, se_model = retrofit(Net([AddSpelling(16, "plus")]), init="paper")
    assert not type(se_model.blocks[0])._se_retrofit_globals, "string annotations need no local globals"
    assert_same_outputs(se_model, pickle.loads(pickle.dumps(se_model)), "pickle round trip")


class DictOut(torch.nn.Module):
    """A residual block that returns a dict: fx's replay gives an immutable_dict, the block a dict."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.inner = AddSpelling(channels, "plus")

    def forward(self, x):
        return {"y": self.inner.conv2(torch.relu(self.inner.conv1(x))) + x}


class DictNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.block = DictOut(16)

    def forward(self, x):
        return self.block(self.stem(x))["y"].mean((2, 3))


def test_block_returning_a_dict_is_converted():
    model, se_model = retrofit(DictNet())
    assert [n for n, _ in se_retrofit.se_blocks(se_model)] == ["block.se"], se_retrofit.get_plan(se_model)
    assert_same_outputs(model, se_model, "dict-returning block")


class AuxOut(torch.nn.Module):
    """A residual block that also hands out a feature: a tuple holding a dict, or an OrderedDict."""

    def __init__(self, channels: int, container: str) -> None:
        super().__init__()
        self.container = container
        self.inner = AddSpelling(channels, "plus")

    def forward(self, x):
        feat = torch.relu(self.inner.conv1(x))
        out = self.inner.conv2(feat) + x
        if self.container == "ordered":
            return collections.OrderedDict(y=out, aux=feat)
        return out, {"aux": [feat]}


class AuxNet(torch.nn.Module):
    def __init__(self, container: str) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.block = AuxOut(16, container)

    def forward(self, x):
        out = self.block(self.stem(x))
        return (out["y"] if isinstance(out, dict) else out[0]).mean((2, 3))


def test_block_returning_a_tuple_holding_a_dict_is_converted():
    # fx's replay builds the inner dict as an immutable_dict: a comparison blind to that once skipped the
    # block as "control flow that fx cannot follow"
    model, se_model = retrofit(AuxNet("tuple"))
    assert [n for n, _ in se_retrofit.se_blocks(se_model)] == ["block.se"], se_retrofit.get_plan(se_model)
    assert_same_outputs(model, se_model, "block returning (out, {'aux': [feat]})")
    with torch.no_grad():
        out = se_model.block(torch.rand(1, 16, 8, 8))
    assert type(out) is tuple and type(out[1]) is dict and type(out[1]["aux"]) is list, \
        f"the rewritten block returns {type(out).__name__} of {[type(v).__name__ for v in out]}, not the original's types"


def test_block_returning_an_ordered_dict_is_skipped_for_its_container():
    model = make_pretrained_like(AuxNet("ordered")).eval()
    plan = se_retrofit.find_sites(model)
    reasons = [s.reason for s in plan.skipped if s.block == "block"]
    assert not plan.sites and len(reasons) == 1, plan
    assert "OrderedDict" in reasons[0] and "control flow" not in reasons[0], \
        f"the skip reason should name the OrderedDict fx rebuilds as a dict, got {reasons[0]!r}"


def test_saved_model_loads_in_a_fresh_process(tmp_path):
    import subprocess
    import sys

    _, se_model = retrofit(Net([AddSpelling(16, "plus"), FunctionalDropoutBlock(16)]), init="paper")
    path = tmp_path / "model.pt"
    torch.save(se_model, path)
    torch.save(X, tmp_path / "x.pt")
    with torch.no_grad():
        torch.save(se_model.eval()(X), tmp_path / "y.pt")
    code = (f"import sys, torch; sys.path.insert(0, {str(__import__('pathlib').Path(__file__).parent)!r}); "
            f"m = torch.load({str(path)!r}, weights_only=False).eval(); "
            f"x = torch.load({str(tmp_path / 'x.pt')!r}); y = torch.load({str(tmp_path / 'y.pt')!r}); "
            "print(float((m(x) - y).abs().max()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.strip()) == 0.0


def test_timm_and_torchvision_model_api_survives():
    import timm
    import torchvision

    model = make_pretrained_like(timm.create_model("resnet18")).eval()
    se_model = se_retrofit.apply(model).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        feats = se_model.forward_features(x)
        assert torch.equal(feats, model.forward_features(x)), "forward_features changed"
        assert torch.equal(se_model.forward_head(feats), model.forward_head(feats)), "forward_head changed"
    assert se_model.pretrained_cfg == model.pretrained_cfg
    se_model.reset_classifier(7)
    assert se_model(x).shape == (2, 7)
    assert isinstance(se_model.layer1[0], type(model.layer1[0])), "blocks must stay instances of their class"

    tv = torchvision.models.resnet18(num_classes=4)
    se_tv = se_retrofit.apply(tv)
    assert isinstance(se_tv.fc, torch.nn.Linear) and se_tv.fc.out_features == 4
    assert se_retrofit.get_config(se_tv) == se_retrofit.SEConfig()


def test_example_input_follows_the_first_convolution():
    import timm

    model = timm.create_model("resnet10t", in_chans=1)
    plan = se_retrofit.find_sites(model)
    assert plan.example_input.startswith("Tensor(2, 1,"), plan.example_input
    assert len(plan.sites) == 4


def test_numpy_numbers_are_accepted_as_plain_numbers():
    np = pytest.importorskip("numpy")
    config = se_retrofit.SEConfig(reduction=np.float32(8), divisor=np.int64(8), min_hidden=np.int64(4))
    assert type(config.reduction) is float and type(config.divisor) is int and type(config.min_hidden) is int
    assert config.to_dict()["reduction"] == 8.0


@pytest.mark.parametrize("flags", [(True, False), (torch.float32, torch.float64)], ids=["bool", "dtype"])
def test_a_block_called_with_other_constants_is_left_alone(flags):
    """fx fixes a traced call's non-tensor arguments; a block called again with others cannot take one graph."""
    model, se_model = retrofit(CalledTwice(flag=flags[0], other=flags[1]))
    plan = se_retrofit.get_plan(se_model)
    assert not plan.sites, f"SE inserted into a block whose calls differ: {plan.sites}"
    assert any("called again with other non-tensor arguments" in r for r in plan.reasons()), plan.reasons()
    with torch.no_grad():
        assert torch.equal(se_model(X), model(X))


def test_a_block_called_twice_alike_is_still_converted():
    _, se_model = retrofit(CalledTwice(flag=True, other=True))
    assert [s.se_name for s in se_retrofit.get_plan(se_model).sites] == ["block.se"]


def test_a_class_with_init_subclass_is_left_alone_and_its_registry_untouched():
    registry = {}

    class Registered(AddSpelling):
        def __init_subclass__(cls, **kwargs):
            super().__init_subclass__(**kwargs)
            registry[cls.__name__] = cls

    registry.clear()
    _, se_model = retrofit(Net([Registered(16, "plus")]))
    assert not registry, f"apply created subclasses that ran the user's __init_subclass__: {list(registry)}"
    assert any("__init_subclass__" in r for r in se_retrofit.get_plan(se_model).reasons())


def test_meta_and_uncopyable_models_are_refused_with_a_hint():
    with torch.device("meta"):
        meta = Net([AddSpelling(16, "plus")])
    with pytest.raises(ValueError, match="meta device.*to_empty"):
        se_retrofit.apply(meta)
    from torch.nn.utils import prune

    pruned = Net([AddSpelling(16, "plus")])
    prune.l1_unstructured(pruned.blocks[0].conv1[0], "weight", 0.5)
    for call in (se_retrofit.apply, se_retrofit.find_sites):
        with pytest.raises(ValueError, match="cannot copy Net.*prune.remove.*inplace=True"):
            call(pruned)
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        se_retrofit.apply("resnet50")


def test_wrapped_models_are_refused_with_the_model_inside_named():
    """A compiled model would check each rewrite against compiled outputs (last-bit differences read as
    untraceable blocks); DataParallel would not see the new parameters."""
    model = Net([AddSpelling(16, "plus")])
    for wrapped, inner in ((torch.compile(model), "_orig_mod"), (torch.nn.DataParallel(model), "module")):
        for call in (se_retrofit.apply, se_retrofit.find_sites):
            with pytest.raises(ValueError, match=rf"wrapped \({type(wrapped).__name__}\).*model\.{inner}"):
                call(wrapped)


def test_new_blocks_take_the_mode_of_the_block_they_join():
    _, se_model = retrofit(Net([AddSpelling(16, "plus")]))  # retrofit() puts the model in eval mode first
    assert not se_model.blocks[0].se.training, "an SE block in an eval-mode model was left in training mode"


def test_weight_normed_convs_still_count_as_linear_projections():
    import torchvision

    model = torchvision.models.resnet18()
    for m in list(model.modules()):
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.utils.parametrizations.weight_norm(m)
    plan = se_retrofit.find_sites(model)
    assert len(plan.sites) == 8, f"expected 8 sites with weight-normed convs, got {len(plan.sites)}: {plan.reasons()}"


def test_hooks_on_a_block_neither_skip_it_nor_run_twice_in_the_check():
    model = make_pretrained_like(Net([AddSpelling(16, "plus")])).eval()
    model.blocks[0].register_forward_pre_hook(lambda m, args: (args[0] * 2.0,))
    model.blocks[0].register_forward_hook(lambda m, args, out: out + 1.0)
    se_model = se_retrofit.apply(model)
    assert [s.se_name for s in se_retrofit.get_plan(se_model).sites] == ["blocks.0.se"], \
        se_retrofit.get_plan(se_model).reasons()
    with torch.no_grad():
        assert torch.equal(se_model(X), model(X)), "the hooked block computes something else after the retrofit"


def test_a_block_whose_forward_is_replaced_on_the_instance_is_skipped_with_that_reason():
    """accelerate-style hooks set ``module.forward``; the rewrite changes the class's forward, which such a
    wrapper (holding the old bound method) would never run."""
    import types

    import torchvision

    model = torchvision.models.resnet18(num_classes=4).eval()
    block = model.layer1[0]
    block.forward = types.MethodType(lambda self, x: type(self).forward(self, x) * 0.5, block)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SERetrofitWarning)
        se_model = se_retrofit.apply(model)
    reasons = [s.reason for s in se_retrofit.get_plan(se_model).skipped if s.block == "layer1.0"]
    assert reasons and "forward is replaced on the instance" in reasons[0], f"layer1.0 skipped for {reasons}"


def test_a_failed_example_forward_names_an_objects_type_not_its_tensors():
    # the list of inputs tried printed repr() of a user's batch object, every value of its tensors included
    from se_retrofit.capture import describe

    text = describe((_Batch(torch.randn(2, 3, 64, 64)),), {"extra": {"mask": torch.ones(2, 64)}})
    assert text == "<_Batch>, extra={'mask': Tensor(2, 64)}", text


def test_apply_from_several_threads_takes_turns():
    """fx patches ``nn.Module.__call__`` process-wide while it traces: two traces at once left the patch in
    place, every thread's apply inserted nothing, and every later forward of the process failed."""
    import threading

    import timm

    # pretrained-like: a fresh timm ResNet zeroes each branch's last BN, so the identity check below would
    # compare branches that output 0 whatever the gate is
    models = [make_pretrained_like(timm.create_model("resnet10t", pretrained=False, num_classes=5)).eval()
              for _ in range(4)]
    x = torch.randn(1, 3, 32, 32)
    results: list = [None] * len(models)

    def work(i: int) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SERetrofitWarning)
            results[i] = se_retrofit.apply(models[i], example_input=x)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(models))]
    call = torch.nn.Module.__call__
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        patched = torch.nn.Module.__call__ is not call
    finally:
        torch.nn.Module.__call__ = call  # a failure here must not break the tests that follow
    counts = [len(se_retrofit.get_plan(r).sites) if r is not None else None for r in results]
    assert counts == [4] * len(models), f"SE blocks inserted per thread: {counts}, expected 4 each"
    assert not patched, "fx's patch of Module.__call__ was left in place"
    with torch.no_grad():
        assert torch.equal(results[0](x), models[0](x)), "identity init changed the output"


def test_the_model_keeps_its_own_copy_of_the_config(tmp_path):
    """The caller's SEConfig, changed for the next experiment, must not change what an earlier result says it
    was made with: get_config and save_adapter recorded the caller's object, and a changed position loaded
    silently into other places."""
    net = Net([AddSpelling(16, "plus"), AddSpelling(16, "plus")]).eval()
    config = se_retrofit.SEConfig(reduction=4)
    se_model = se_retrofit.apply(net, config)
    config.position, config.reduction = "post", 8
    recorded = se_retrofit.get_config(se_model)
    assert (recorded.position, recorded.reduction) == ("standard", 4), f"the recorded config followed: {recorded}"
    assert se_retrofit.get_plan(se_model).config == recorded, "the plan and get_config disagree"
    for block in se_retrofit.se_blocks(se_model):
        torch.nn.init.normal_(block[1].fc2.weight)
    se_retrofit.save_adapter(se_model, tmp_path / "adapter")
    loaded = se_retrofit.load(tmp_path / "adapter", copy.deepcopy(net))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), se_model(x)), "the adapter does not rebuild the model it was saved from"


@pytest.mark.parametrize("field, value, match", [("reduction", -5, "reduction"), ("init", "paper ", "init"),
                                                 ("include", 7, "include")])
def test_a_config_changed_after_construction_is_validated_again(field, value, match):
    """Checks ran only in __post_init__: a typo set afterwards (init='paper ') silently gave another block."""
    config = se_retrofit.SEConfig()
    setattr(config, field, value)
    for call in (se_retrofit.apply, se_retrofit.find_sites):
        with pytest.raises(ValueError, match=match):
            call(Net([AddSpelling(16, "plus")]), config)


def test_a_pattern_string_set_after_construction_is_one_pattern():
    config = se_retrofit.SEConfig()
    config.include = "blocks.1"
    se_model = se_retrofit.apply(Net([AddSpelling(16, "plus"), AddSpelling(16, "plus")]), config)
    assert [name for name, _ in se_retrofit.se_blocks(se_model)] == ["blocks.1.se"], (
        f"include set as a string after construction selected {se_retrofit.se_blocks(se_model)}")


def test_the_result_keeps_no_reference_to_the_example_input():
    """The plan kept the caller's example tensors: the model held them (and their autograd graph) for life, put
    them in every pickle, and a non-leaf example made the result refuse deepcopy (and timm's ModelEma)."""
    net = Net([AddSpelling(16, "plus")]).eval()
    leaf = torch.randn(2, 3, 64, 64, requires_grad=True)
    example = leaf * 2  # not a leaf: refuses deepcopy
    se_model = se_retrofit.apply(net, example_input=example)
    copy.deepcopy(se_model)
    held = [v for v in pickle.loads(pickle.dumps(se_retrofit.get_plan(se_model))).__dict__.values()
            if isinstance(v, (tuple, torch.Tensor))]
    assert not held, f"the plan holds tensors or arguments: {held}"
    assert len(pickle.dumps(se_model)) < len(pickle.dumps(net)) + 64 * 1024, "the pickle carries the example input"


def test_a_call_that_inserts_nothing_leaves_the_model_not_retrofitted():
    """get_config is None 'if it was not retrofitted'; get_plan still says why nothing was inserted."""
    with pytest.warns(SERetrofitWarning, match="no SE block inserted"):
        result = se_retrofit.apply(Net([AddSpelling(16, "plus")]), exclude="*")
    assert se_retrofit.get_config(result) is None, f"get_config of an unchanged model: {se_retrofit.get_config(result)}"
    assert se_retrofit.get_plan(result) is not None and not se_retrofit.get_plan(result).sites


def test_inplace_must_be_a_bool():
    with pytest.raises(TypeError, match="inplace must be True or False"):
        se_retrofit.apply(Net([AddSpelling(16, "plus")]), inplace=None)


def test_config_from_dict_and_set_patterns():
    with pytest.raises(TypeError, match="takes a dict"):
        se_retrofit.SEConfig.from_dict([("reduction", 8)])
    assert se_retrofit.SEConfig(include={"b", "a"}).include == ("a", "b"), "a set of patterns is not sorted"


class _BiasAfterSum(torch.nn.Module):
    """A residual sum with a learned bias added in the same expression, in three orders."""

    def __init__(self, channels: int, form: int) -> None:
        super().__init__()
        self.form = form
        self.a = torch.nn.Sequential(torch.nn.Conv2d(channels, channels, 3, 1, 1), torch.nn.BatchNorm2d(channels),
                                     torch.nn.ReLU())
        self.b = torch.nn.Conv2d(channels, channels, 3, 1, 1)
        self.beta = torch.nn.Parameter(torch.randn(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.form == 0:
            return x + self.b(self.a(x)) + self.beta
        if self.form == 1:
            return self.beta + x + self.b(self.a(x))
        return self.b(self.a(x)) + self.beta + x


def test_a_residual_summed_with_a_constant_in_one_expression_gets_se():
    """``x + branch(x) + self.beta`` was one group of three terms, rejected whole for its constant: the residual
    inside it was neither a site nor in the plan's skipped list."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, 1, 1), *[_BiasAfterSum(16, form) for form in range(3)]).eval()
    se_model = se_retrofit.apply(net)
    plan = se_retrofit.get_plan(se_model)
    assert [s.se_name for s in plan.sites] == ["1.se", "2.se", "3.se"], f"a residual with a bias was lost:\n{plan}"
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(se_model(x), net(x)), "identity init changed the output"


class _BiasedShortcut(_BiasAfterSum):
    """A residual whose bias Python's grouping adds to the shortcut first; forms 3 and 4 have a real projection."""

    def __init__(self, channels: int, form: int) -> None:
        super().__init__(channels, form)
        self.proj = torch.nn.Sequential(torch.nn.Conv2d(channels, channels, 1), torch.nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.b(self.a(x))
        return [lambda: self.beta + x + branch, lambda: x + self.beta + branch, lambda: branch + (x + 1.0),
                lambda: self.proj(x) + branch, lambda: self.beta + self.proj(x) + branch,
                lambda: x - self.beta + branch, lambda: torch.add(self.beta, x, alpha=-1) + branch,
                lambda: torch.sub(self.beta, x) + branch, lambda: torch.add(x, branch, alpha=0.5),
                lambda: torch.add(branch, x, alpha=0.5)][self.form]()


@pytest.mark.parametrize("position", ["standard", "post", "pre", "identity"])
def test_a_bias_added_to_the_shortcut_first_leaves_it_an_identity(position):
    """``beta + x + branch(x)`` sums ``(beta + x)`` and the branch: its shortcut was labelled a projection,
    though it is ``x`` itself; a constant is no linear map of the input."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, 1, 1), *[_BiasedShortcut(16, form) for form in range(10)])
    plan = se_retrofit.find_sites(net.eval(), position=position)
    found = {s.block: s.shortcut for s in plan.sites}
    # x - beta is x plus a constant too; beta - x (torch.add with alpha=-1, or torch.sub) is -x, not x itself;
    # torch.add(branch, x, alpha=0.5) scales the shortcut, torch.add(x, branch, alpha=0.5) the branch
    assert found == {"1": "identity", "2": "identity", "3": "identity", "4": "projection", "5": "projection",
                     "6": "identity", "7": "projection", "8": "projection", "9": "identity", "10": "projection"}, \
        f"wrong shortcut labels with a bias on the shortcut:\n{plan}"


def test_a_bias_added_to_a_shortcut_argument_first_leaves_it_an_argument():
    """``beta + shortcut + branch(x)`` with ``shortcut`` handed in by the caller: labelled a projection."""
    class Block(ShortcutArgBlock):
        def __init__(self, channels: int) -> None:
            super().__init__(channels)
            self.beta = torch.nn.Parameter(torch.randn(1, channels, 1, 1))

        def forward(self, x: torch.Tensor, shortcut: torch.Tensor | None = None) -> torch.Tensor:
            shortcut = x if shortcut is None else shortcut
            return torch.relu(self.beta + shortcut + self.conv2(torch.relu(self.conv1(x))))

    net = ShortcutArgNet()
    net.a, net.b = Block(16), Block(16)
    plan = se_retrofit.find_sites(net.eval())
    found = [(s.se_name, s.shortcut) for s in plan.sites]
    assert found == [("a.se", "argument"), ("b.se", "identity")], f"wrong shortcut labels:\n{plan}"


def test_position_post_goes_after_a_bias_added_to_the_sum_and_its_activation():
    """``relu(x + branch(x) + self.beta)`` with position="post": SE went between the residual sum and its bias,
    before the ReLU, where "post" means after the addition and the activation that follows it."""
    class Block(_BiasAfterSum):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(x + self.b(self.a(x)) + self.beta)

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, 1, 1), Block(16, 0)).eval()
    se_model = se_retrofit.apply(net, position="post")
    seen = []
    se_model[1].se.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(se_model(x), net(x)), "identity init changed the output"
    assert seen and seen[0].min() >= 0, "the SE block's input is not the ReLU's output (it has negative values)"
