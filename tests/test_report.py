"""The cost report: fvcore anchors, SE-scoped gate counting, a FlopCounterMode cross-check, the CLI."""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import se_retrofit
from se_retrofit import cli
from se_retrofit.commands import _options
from se_retrofit.commands._options import parse_input_size
from se_retrofit.report import Report, input_shape, report
from se_retrofit.se_block import SEBlock, se_blocks

REPO = Path(__file__).resolve().parents[1]

# Measured with fvcore 0.1.5 on torch 2.14.1, timm 1.0.31, one 3x224x224 image.
RESNET50_PARAMS = 25_557_032
RESNET50_MACS = 4_111_512_576  # fvcore's default count
SERESNET50_PARAMS = 28_088_024  # timm seresnet50
SERESNET50_CONV_MACS = 4_114_027_520  # fvcore's default count of timm seresnet50: SE convolutions only


def fvcore_default(model: nn.Module, shape: tuple[int, ...]) -> int:
    """fvcore's own count with nothing registered, the number the report's 'before' must equal."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fvcore.nn import FlopCountAnalysis

        analysis = FlopCountAnalysis(model.eval(), torch.randn(shape))
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
        with torch.no_grad():
            return int(analysis.total())


def se_input_shapes(model: nn.Module, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """The feature map each SE block sees, recorded independently of the report."""
    seen: dict[str, tuple[int, ...]] = {}

    def recorder(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            seen.setdefault(name, tuple(args[0].shape))

        return hook

    handles = [m.register_forward_pre_hook(recorder(n)) for n, m in se_blocks(model)]
    try:
        with torch.no_grad():
            model.eval()(torch.randn(shape))
    finally:
        for h in handles:
            h.remove()
    return seen


def gate_macs(block: SEBlock, shape: tuple[int, ...], adds_residual: bool = True) -> int:
    """Squeeze (one add per input element), gate (sigmoid, and the gain when it is not 1), rescale.

    A block that does the residual add applies the gain as ``addcmul``'s scalar: no op of its own.
    """
    n, c = shape[0], shape[1]
    elements = 1
    for d in shape:
        elements *= d
    return elements + n * c + (n * c if block.gain != 1.0 and not adds_residual else 0) + elements


def conv_macs(block: SEBlock, shape: tuple[int, ...]) -> int:
    return 2 * shape[0] * block.channels * block.hidden


class Tiny(nn.Module):
    """A model with its own sigmoid, mul and mean outside any SE block, and an optional SE block."""

    def __init__(self, se: SEBlock | None = None, spare: SEBlock | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.se = se
        self.spare = spare
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        x = x * torch.sigmoid(x)
        if self.se is not None:
            x = self.se(x)
        return self.head(x.mean((2, 3)))


def tiny_pair() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    original = Tiny()
    se_model = Tiny(se=SEBlock(16, 8, gain=2.0))
    se_model.load_state_dict(original.state_dict(), strict=False)
    return original, se_model


@pytest.fixture(scope="module")
def resnet18_pair() -> tuple[nn.Module, nn.Module]:
    original = timm.create_model("resnet18", pretrained=False)
    return original, se_retrofit.apply(original)


@pytest.fixture(scope="module")
def resnet18_report(resnet18_pair) -> Report:
    return report(*resnet18_pair, input_size=(1, 3, 64, 64))


@pytest.fixture(scope="module")
def resnet50_report() -> tuple[Report, nn.Module]:
    original = timm.create_model("resnet50", pretrained=False)
    se_model = se_retrofit.apply(original)
    return report(original, se_model, input_size=224, name="resnet50"), se_model


def test_resnet50_matches_fvcore_and_timm_anchors(resnet50_report):
    rep, se_model = resnet50_report
    assert rep.input_size == (1, 3, 224, 224)
    assert rep.params_before == RESNET50_PARAMS, (
        f"resnet50 params {rep.params_before:,} != fvcore's {RESNET50_PARAMS:,}")
    assert rep.macs_before == RESNET50_MACS, f"resnet50 MACs {rep.macs_before:,} != fvcore's default {RESNET50_MACS:,}"
    assert rep.params_after == SERESNET50_PARAMS, (
        f"SE resnet50 has {rep.params_after:,} params, timm's seresnet50 {SERESNET50_PARAMS:,}")
    assert len(rep.blocks) == 16, f"expected one SE block per bottleneck (16), got {len(rep.blocks)}"
    default_after = fvcore_default(se_model, rep.input_size)
    assert default_after == SERESNET50_CONV_MACS, (
        f"fvcore's default count of the SE model ({default_after:,}) should equal seresnet50's "
        f"({SERESNET50_CONV_MACS:,}): same SE convolutions at the same places")
    shapes = se_input_shapes(se_model, rep.input_size)
    gates = sum(gate_macs(m, shapes[n]) for n, m in se_blocks(se_model))
    assert rep.macs_after == default_after + gates, (
        f"MACs after {rep.macs_after:,} != fvcore default {default_after:,} + SE gate ops {gates:,}")
    assert 9.8 < rep.params_delta_pct < 10.0, (
        f"the paper says about +10% params for ResNet-50, got {rep.params_delta_pct:.2f}%")


def test_original_count_is_fvcore_default_even_with_gate_like_ops_outside_se():
    original, se_model = tiny_pair()
    shape = (1, 3, 8, 8)
    rep = report(original, se_model, input_size=shape)
    assert rep.macs_before == fvcore_default(original, shape), "ops outside SE blocks must be counted as fvcore does"
    (block,) = rep.blocks
    expected = fvcore_default(se_model, shape) + gate_macs(se_model.se, (1, 16, 8, 8), adds_residual=False)
    assert rep.macs_after == expected, f"only the SE block's gate ops may be added: {rep.macs_after:,} != {expected:,}"
    assert block.macs == conv_macs(se_model.se, shape) + gate_macs(se_model.se, (1, 16, 8, 8), adds_residual=False)
    for op in ("aten::sigmoid", "aten::mean"):
        assert rep.unsupported_ops.get(op) == 1, (
            f"{op} outside the SE block should be listed once: {rep.unsupported_ops}")
    assert rep.unsupported_ops.get("aten::mul") == 1, (
        f"the model's own x * sigmoid(x) stays uncosted: {rep.unsupported_ops}")


def test_block_rows_match_their_blocks_and_scale_with_batch(resnet18_pair):
    original, se_model = resnet18_pair
    shape = (2, 3, 64, 64)
    rep = report(original, se_model, input_size=shape)
    shapes = se_input_shapes(se_model, shape)
    modules = dict(se_blocks(se_model))
    assert [b.name for b in rep.blocks] == list(modules), "one row per SE block, in module order"
    for row in rep.blocks:
        block = modules[row.name]
        c, h = block.channels, block.hidden
        assert (row.channels, row.hidden) == (c, h), f"{row.name}: row says {row.channels}/{row.hidden}, block {c}/{h}"
        assert row.params == 2 * c * h + c + h, f"{row.name}: {row.params} params, expected {2 * c * h + c + h}"
        assert row.input_shape == shapes[row.name], f"{row.name}: recorded {row.input_shape}, saw {shapes[row.name]}"
        expected = conv_macs(block, shapes[row.name]) + gate_macs(block, shapes[row.name])
        assert row.macs == expected, f"{row.name}: {row.macs:,} MACs, analytic count {expected:,}"


def test_totals_add_up_and_shares_sum_to_one(resnet18_report):
    rep = resnet18_report
    assert sum(b.params for b in rep.blocks) == rep.params_delta, "SE block params must account for the whole delta"
    assert sum(b.macs for b in rep.blocks) == rep.macs_delta, "SE block MACs must account for the whole delta"
    assert sum(b.param_share for b in rep.blocks) == pytest.approx(1.0)
    assert sum(b.mac_share for b in rep.blocks) == pytest.approx(1.0)
    assert rep.params_delta_pct == pytest.approx(100 * rep.params_delta / rep.params_before)
    assert rep.macs_delta_pct == pytest.approx(100 * rep.macs_delta / rep.macs_before)


def test_se_convolutions_agree_with_torch_flop_counter(resnet18_pair, resnet18_report):
    """FlopCounterMode counts 2 per MAC and only convolutions and matmuls: compare on those."""
    original, se_model = resnet18_pair
    rep = resnet18_report
    shape = rep.input_size
    shapes = se_input_shapes(se_model, shape)
    counters = {}
    for key, model in (("before", original), ("after", se_model)):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model.eval()(torch.randn(shape))
        counters[key] = counter
    modules = dict(se_blocks(se_model))
    gates = sum(gate_macs(modules[b.name], shapes[b.name]) for b in rep.blocks)
    torch_delta = (counters["after"].get_total_flops() - counters["before"].get_total_flops()) // 2
    assert rep.macs_delta - gates == torch_delta, (
        f"SE convolution MACs: report {rep.macs_delta - gates:,}, FlopCounterMode {torch_delta:,}")
    per_module = counters["after"].get_flop_counts()
    for row in rep.blocks:
        keys = [k for k in per_module if k.endswith("." + row.name)]
        assert len(keys) == 1, f"FlopCounterMode has no single entry for {row.name}: {keys}"
        torch_macs = sum(per_module[keys[0]].values()) // 2
        block_gates = gate_macs(modules[row.name], shapes[row.name])
        assert row.macs - block_gates == torch_macs, (
            f"{row.name}: convs {row.macs - block_gates:,} MACs, FlopCounterMode {torch_macs:,}")


def test_models_are_untouched_and_modes_restored(resnet18_pair):
    original, se_model = resnet18_pair
    original.train()
    original.layer2.eval()
    se_model.eval()
    modes = {id(m): m.training for model in (original, se_model) for m in model.modules()}
    states = [{k: v.clone() for k, v in model.state_dict().items()} for model in (original, se_model)]
    report(original, se_model, input_size=32)
    for model, state in zip((original, se_model), states):
        for key, value in model.state_dict().items():
            assert torch.equal(value, state[key]), f"{key} changed while counting (batch norm ran in train mode?)"
    changed = [m for model in (original, se_model) for m in model.modules() if m.training != modes[id(m)]]
    assert not changed, f"{len(changed)} modules came back in another train/eval mode"
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in se_model.modules()), "hooks were left behind"


def test_bad_input_size_is_a_value_error_naming_the_size(resnet18_pair):
    original, se_model = resnet18_pair
    with pytest.raises(ValueError, match="1x5x32x32"):
        report(original, se_model, input_size=(1, 5, 32, 32))
    for bad in (0, -3, (64,), (1, 3, 0, 32), "224", (1.5, 2)):
        with pytest.raises(ValueError, match="input size"):
            input_shape(bad)
    assert input_shape(96) == (1, 3, 96, 96)
    assert input_shape((96, 64)) == (1, 3, 96, 64)
    assert input_shape((2, 1, 96, 64)) == (2, 1, 96, 64)


def test_trainable_and_frozen_parameters_use_requires_grad():
    original, se_model = tiny_pair()
    for name, param in se_model.named_parameters():
        param.requires_grad_(name.startswith("se."))
    rep = report(original, se_model, input_size=8)
    se_params = rep.blocks[0].params
    assert rep.trainable_params == se_params, f"only the SE block is trainable: {rep.trainable_params} != {se_params}"
    assert rep.frozen_params == rep.params_before
    expected = (f"trainable params: {se_params:,d} || all params: {rep.params_after:,d} "
                f"|| trainable%: {100 * se_params / rep.params_after:.4f}")
    assert rep.trainable_summary() == expected
    assert expected in str(rep) and expected in rep.to_markdown()


def test_uncalled_and_absent_se_blocks_are_reported():
    original = Tiny()
    idle = Tiny(spare=SEBlock(16, 8))
    rep = report(original, idle, input_size=8)
    assert rep.uncalled_blocks == ["spare"], f"a never-called SE block must be flagged: {rep.uncalled_blocks}"
    assert rep.blocks[0].macs == 0 and rep.blocks[0].input_shape is None
    assert "never called" in str(rep)
    same = report(original, Tiny(), input_size=8)
    assert same.blocks == [] and same.macs_delta == 0 and same.params_delta == 0
    assert "No SE blocks" in str(same)


def test_one_model_twice_or_swapped_arguments_are_refused():
    original, se_model = tiny_pair()
    with pytest.raises(ValueError, match=r"same model.*inplace=True.*deepcopy"):
        report(se_model, se_model, input_size=8)
    with pytest.raises(ValueError, match="same model"):
        report(original, torch.nn.DataParallel(original), input_size=8)
    with pytest.raises(ValueError, match="swapped"):
        report(se_model, original, input_size=8)


def test_meta_models_are_refused_with_a_hint():
    with torch.device("meta"):
        original, se_model = Tiny(), Tiny(se=SEBlock(16, 8))
    with pytest.raises(ValueError, match=r"original is on the meta device.*to_empty"):
        report(original, se_model, input_size=8)


@pytest.mark.filterwarnings("ignore:`torch.jit.script")
def test_models_holding_a_torchscript_module_are_refused_with_a_hint():
    """fvcore hooks every module, which a TorchScript module refuses: its error blamed the tracer."""
    original, se_model = tiny_pair()
    for model in (original, se_model):
        model.conv = torch.jit.script(model.conv)
    with pytest.raises(ValueError, match=r"original holds a TorchScript module \('conv'\).*eager model"):
        report(original, se_model, input_size=8)


def test_compiled_and_data_parallel_wrappers_count_the_network_inside():
    original, se_model = tiny_pair()
    plain = report(original, se_model, input_size=8).to_dict()
    compiled = torch.compile(se_model)  # compiles at its first call, which the report never makes
    for wrapped in (compiled, torch.nn.DataParallel(se_model)):
        got = report(original, wrapped, input_size=8).to_dict()
        assert got == plain, f"{type(wrapped).__name__}: the report differs from the unwrapped model's"


class Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn(self.conv(x)))


class Reused(nn.Module):
    """One residual block called at two resolutions."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.block = Residual(32)
        self.pool = nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.pool(self.block(self.stem(x))))


def test_a_block_called_twice_says_so_and_counts_both_calls():
    original = Reused().eval()
    se_model = se_retrofit.apply(original)
    rep = report(original, se_model, input_size=16)
    (block,) = rep.blocks
    assert block.calls == 2 and block.input_shape == (1, 32, 16, 16), f"calls {block.calls}, {block.input_shape}"

    def one_call(side: int) -> int:  # squeeze and rescale per element, two 1x1 convolutions, the sigmoid
        return 2 * 32 * side * side + 2 * 32 * block.hidden + 32

    assert block.macs == one_call(16) + one_call(8), f"MACs {block.macs}, expected {one_call(16)} + {one_call(8)}"
    assert "32x16x16 (2 calls)" in str(rep), str(rep)
    assert rep.to_dict()["blocks"][0]["calls"] == 2


@pytest.mark.parametrize("size", [np.int64(32), torch.tensor(32), (np.int32(32), np.int64(32))])
def test_integer_scalars_of_numpy_and_torch_are_sizes(size):
    assert input_shape(size) == (1, 3, 32, 32)


@pytest.mark.parametrize("size", [True, torch.tensor(True), (torch.tensor(True), 32)])
def test_booleans_are_no_sizes(size):
    with pytest.raises(ValueError, match="input size"):
        input_shape(size)


def test_formats_label_macs_and_round_trip():
    original, se_model = tiny_pair()
    rep = report(original, se_model, input_size=8, name="tiny")
    text, markdown = str(rep), rep.to_markdown()
    for rendered in (text, markdown):
        assert "tiny" in rendered and "1x3x8x8" in rendered
        assert "MACs" in rendered and "one fused multiply-add = 1" in rendered, "the unit must be stated"
        assert "FLOPs would be" in rendered and "GFLOPs" not in rendered
        assert f"{rep.macs_after:,}" in rendered and "se" in rendered
        assert "aten::sigmoid x1" in rendered, "uncosted ops must be listed"
    assert "| SE block" in markdown and "|:" in markdown
    assert "by design, for ReLU" in text, "the ops fvcore ignores without saying so must be named"
    data = json.loads(rep.to_json())
    for key in ("params_before", "params_after", "macs_before", "macs_after", "trainable_params", "unsupported_ops"):
        assert data[key] == getattr(rep, key), f"JSON {key} differs from the report"
    assert data["macs_delta"] == rep.macs_delta and data["input_size"] == [1, 3, 8, 8]
    assert data["blocks"][0]["name"] == "se" and data["blocks"][0]["input_shape"] == [1, 16, 8, 8]


def test_fvcore_noise_does_not_reach_the_user(caplog):
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.DEBUG):
        warnings.simplefilter("always")
        report(*tiny_pair(), input_size=8)
    assert not [r for r in caplog.records if r.name.startswith("fvcore")], "fvcore logged to the user"
    assert not caught, f"warnings escaped: {[str(w.message) for w in caught]}"
    script = ("from torch import nn\n"
              "from se_retrofit.report import report\n"
              "from se_retrofit.se_block import SEBlock\n"
              "head = [nn.Conv2d(3, 16, 3), nn.Sigmoid(), nn.MaxPool2d(2)]\n"
              "rep = report(nn.Sequential(*head), nn.Sequential(*head, SEBlock(16, 8)), input_size=16)\n"
              "assert rep.unsupported_ops == {'aten::max_pool2d': 1, 'aten::sigmoid': 1}, rep.unsupported_ops\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "", f"a fresh process printed noise, fvcore's import included:\n{done.stderr}"


def run_report_command(argv: list[str]) -> int:
    """The subcommand's own function, so that its errors arrive as exceptions to match."""
    args = cli.build_parser().parse_args(argv)
    return args.func(args)


def test_cli_report_json_with_conversion_options(capsys):
    rc = run_report_command(["report", "resnet10t", "--input-size", "64", "--format", "json",
                             "--reduction", "8", "--include", "layer4*"])
    assert rc == 0
    data = json.loads(capsys.readouterr().out)
    assert data["blocks"], "--include layer4* should still convert layer4"
    assert all(b["name"].startswith("layer4.") for b in data["blocks"]), [b["name"] for b in data["blocks"]]
    assert all(b["hidden"] == b["channels"] // 8 for b in data["blocks"]), "--reduction 8 was not applied"
    assert data["input_size"] == [1, 3, 64, 64]


def test_cli_report_table_for_a_torchvision_model(capsys):
    assert run_report_command(["report", "torchvision:resnet18", "--input-size", "32x48"]) == 0
    out = capsys.readouterr().out
    assert "trainable params:" in out and "1x3x32x48" in out and "MACs" in out


def test_cli_report_keeps_a_video_models_frames(capsys):
    """S means height and width: a video model keeps its frames (with S read as one 3-channel image, its
    first convolution failed on a 4-D input)."""
    assert run_report_command(["report", "torchvision:r3d_18", "--input-size", "32", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["input_size"] == [1, 3, 8, 32, 32]


def test_blocks_the_original_already_had_are_not_listed_as_added():
    """A model with more SE blocks than another: the report lists those it adds, and its rows add up to the deltas."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.c2(torch.relu(self.c1(x)))

    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), Block(), Block()).eval()
    first = se_retrofit.apply(model, include="1")
    second = se_retrofit.apply(model)
    result = report(first, second, (1, 3, 16, 16))
    assert [b.name for b in result.blocks] == ["2.se"], [b.name for b in result.blocks]
    assert sum(b.params for b in result.blocks) == result.params_after - result.params_before
    assert sum(b.macs for b in result.blocks) == result.macs_after - result.macs_before


def test_cli_options_and_errors(capsys):
    assert parse_input_size("224") == 224
    assert parse_input_size("224x192") == (224, 192)
    assert parse_input_size("2x1x64x64") == (2, 1, 64, 64)
    for bad in ("", "abc", "0", "224x-1"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_input_size(bad)
    with pytest.raises(SystemExit):
        run_report_command(["report", "resnet10t", "--input-size", "huge"])
    parser = argparse.ArgumentParser()
    _options.add_conversion_options(parser)
    assert _options.conversion_kwargs(parser.parse_args([])) == {}, "unset flags must leave SEConfig's defaults"
    given = parser.parse_args(["--reduction", "8", "--init", "paper", "--include", "layer3", "--include", "layer4"])
    assert _options.conversion_kwargs(given) == {"reduction": 8, "init": "paper", "include": ["layer3", "layer4"]}
    assert _options.conversion_kwargs(parser.parse_args(["--no-fuse-add"])) == {"fuse_add": False}
    with pytest.raises(ValueError, match="reduction"):
        run_report_command(["report", "resnet10t", "--reduction", "0.5"])
    with pytest.raises(ValueError, match="1x5x32x32"):
        run_report_command(["report", "resnet10t", "--input-size", "1x5x32x32"])


def test_cli_main_dispatches_report(capsys):
    assert cli.main(["report", "resnet10t", "--input-size", "32", "--format", "markdown"]) == 0
    assert "| SE block" in capsys.readouterr().out
    assert cli.main(["report", "resnet10t", "--input-size", "1x5x32x32"]) == 2
    assert "1x5x32x32" in capsys.readouterr().err


def test_ops_the_original_leaves_uncosted_are_listed_too():
    """A residual ``add`` fvcore cannot cost is in the original's total as little as in the SE model's."""
    original = timm.create_model("resnet10t", pretrained=False).eval()
    rep = report(original, se_retrofit.apply(original), input_size=32)
    assert rep.unsupported_ops_before.get("aten::add_", 0) >= 4, \
        f"the original's residual adds should be listed as uncosted: {rep.unsupported_ops_before}"
    assert "aten::add_" not in rep.unsupported_ops, f"fused blocks cost their add: {rep.unsupported_ops}"
    assert "ops of the original" in str(rep) and "aten::add_ x" in str(rep), str(rep)
    assert json.loads(rep.to_json())["unsupported_ops_before"] == rep.unsupported_ops_before


def test_a_detector_that_resizes_its_input_says_which_size_was_counted():
    """A torchvision detector scales every image to its transform's min_size (64 here) and pads it to a
    multiple of 32: the counts are the same whatever size is asked, so the report must name the size
    counted; it used to print only the size asked for, as if the counts were at it."""
    from torchvision.models import detection

    torch.manual_seed(0)
    original = detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, min_size=64,
                                                 max_size=96).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        se_model = se_retrofit.apply(original, example_input=[torch.rand(3, 64, 96)])
    small, odd, native = (report(original, se_model, size) for size in (32, (40, 50), 64))
    assert small.resized_to == (64, 64), f"a 32x32 image runs at 64x64, the report says {small.resized_to}"
    assert odd.resized_to == (64, 96), f"40x50 runs scaled to 64x80 and padded to 64x96, not {odd.resized_to}"
    assert native.resized_to is None, f"64x64 is the size the detector runs at, yet resized_to={native.resized_to}"
    assert small.macs_delta == native.macs_delta, "SE's cost at 32 px should be its cost at 64 px, which it ran at"
    text = str(small)
    assert text.splitlines()[0].endswith("at input 1x3x32x32, resized by the model to 64x64"), text.splitlines()[0]
    assert "every count is at 64x64" in text and "model.transform.min_size" in text, text
    assert json.loads(small.to_json())["resized_to"] == [64, 64], small.to_json()
    assert json.loads(native.to_json())["resized_to"] is None
    assert "resized" not in str(native) and "resized" not in native.to_markdown(), str(native)


class _Stem(nn.Module):
    """A first convolution behind an input transform: fixed-size resizing, or space-to-depth (TResNet)."""

    def __init__(self, resize: bool) -> None:
        super().__init__()
        self.resize = resize
        self.conv = nn.Conv2d(3 if resize else 12, 16, 3, padding=1)
        self.se = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.interpolate(x, size=(20, 24)) if self.resize else nn.functional.pixel_unshuffle(x, 2)
        x = self.conv(x)
        if self.se is not None:
            x = self.se(x)
        return x.mean((2, 3))


@pytest.mark.parametrize("resize, expected", [(True, (20, 24)), (False, None)])
def test_resized_to_is_the_first_convolutions_size_only_when_it_sees_the_input(resize, expected):
    original = _Stem(resize)
    se_model = _Stem(resize)
    se_model.load_state_dict(original.state_dict())
    se_model.se = SEBlock(16, 8)
    rep = report(original, se_model, (1, 3, 16, 16))
    assert rep.resized_to == expected, (f"resize={resize}: the first convolution saw "
                                        f"{'an interpolated' if resize else 'a space-to-depth'} input; "
                                        f"resized_to={rep.resized_to}, expected {expected}")
    assert ("resized by the model to 20x24" in str(rep)) == resize, str(rep)
