"""The fine-tuning engine and ``convert-and-finetune``: what trains, what is written, what is refused.

Models are timm ``resnet10t`` at 32 px with a few dozen images, so the whole file runs in well under
a minute on two CPU cores. Weights are made "pretrained-like" (random BN statistics) first: a fresh
timm ResNet zeroes each branch's last BN, which would make every SE block see zeros.
"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import Dataset

from se_retrofit.finetune import finetune
from se_retrofit.models import create_model, num_classes_of
from se_retrofit.se_block import se_blocks
from se_retrofit.training.freeze import (freeze_batchnorm, new_parameter_names, parameter_groups, set_trainable,
                                         stage_of)
from se_retrofit.training.options import TrainOptions, parse_checkpoint_every

MODEL = "resnet10t"
SIZE = 32


# ----------------------------------------------------------------------------------------------- helpers

class Quadrants(Dataset):
    """Noise images whose class is a bright patch in a class-specific quadrant: learnable in a few steps."""

    def __init__(self, n: int, classes: int = 3, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 3, SIZE, SIZE, generator=gen) * 0.3
        self.targets = [i % classes for i in range(n)]
        half = SIZE // 2
        for i, target in enumerate(self.targets):
            top, left = divmod(target % 4, 2)
            self.images[i, :, top * half:(top + 1) * half, left * half:(left + 1) * half] += 1.5
        self.classes = [f"class{c}" for c in range(classes)]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], self.targets[index]


def pretrained_like(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=gen) * 0.2 - 0.1)
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=gen) * 0.2 - 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return model


def write_image_folder(root: Path, classes: int = 3, train_per_class: int = 8, val_per_class: int = 3) -> Path:
    """``root/train/CLASS/*.png`` and ``root/val/CLASS/*.png``, each class a colour with noise."""
    gen = torch.Generator().manual_seed(1)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = torch.rand(SIZE, SIZE, 3, generator=gen) * 80
                pixels[..., c % 3] += 150
                Image.fromarray(pixels.clamp(0, 255).to(torch.uint8).numpy()).save(folder / f"{i}.png")
    return root


def run_cli(argv: list[str]) -> int:
    """``se-retrofit ARGV`` in-process, errors handled as the installed command handles them."""
    from se_retrofit import cli

    return cli.main(argv)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("data") / "images")


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ImageNet-shaped resnet10t with pretrained-like BN, as the user's ``--checkpoint`` file."""
    torch.manual_seed(0)
    model = pretrained_like(create_model(MODEL))
    path = tmp_path_factory.mktemp("weights") / "base.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def fast_args(image_folder: Path, out: Path, *extra: str) -> list[str]:
    return ["convert-and-finetune", MODEL, "--data", str(image_folder), "--out", str(out), "--image-size", str(SIZE),
            "--batch-size", "8", "--workers", "0", "--epochs", "2", "--no-progress", "--no-pretrained", *extra]


# ----------------------------------------------------------------------------------------------- options

def test_options_resolve_defaults_and_refuse_typos() -> None:
    assert TrainOptions(train="se").lr == 1e-3, "SE-only training should default to AdamW lr 1e-3"
    assert TrainOptions(train="all").lr == 1e-4, "full fine-tuning should default to a 10x lower lr"
    assert TrainOptions(opt="sgd").weight_decay == 1e-4
    assert TrainOptions(train="staged", epochs=6).stage1_epochs == 3, "staged: first stage should be half the epochs"
    with pytest.raises(ValueError, match="train must be one of"):
        TrainOptions(train="se_only")
    with pytest.raises(ValueError, match="at least 2 epochs"):
        TrainOptions(train="staged", epochs=1)
    with pytest.raises(ValueError, match=r"unknown training option\(s\) \['lrate'\]"):
        TrainOptions.from_kwargs({"lrate": 0.1})
    with pytest.raises(ValueError, match="warmup_epochs"):
        TrainOptions(epochs=2, warmup_epochs=3)
    assert TrainOptions(epochs=1, warmup_epochs=1.0).warmup_epochs == 1.0, "asked for, as older one-epoch runs recorded it"
    assert (TrainOptions(epochs=1).warmup_epochs, TrainOptions(epochs=3).warmup_epochs) == (0.1, 1.0)
    with pytest.raises(ValueError, match=r"seed must be below 2\*\*32"):
        TrainOptions(seed=2**32)  # the per-epoch seeds overflowed after the run folder was written
    with pytest.raises(ValueError, match=r"amp_dtype='float16' only applies with amp=True \(--amp\)"):
        TrainOptions(amp_dtype="float16")  # recorded in the config, it used to change nothing
    assert TrainOptions(amp=True, amp_dtype="bfloat16").amp_dtype == "bfloat16"


FLOAT_OPTIONS = ("lr", "weight_decay", "momentum", "warmup_epochs", "min_lr", "label_smoothing", "clip_grad",
                 "ema_decay", "backbone_lr_scale", "checkpoint_every_seconds")


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("name", FLOAT_OPTIONS)
def test_options_refuse_non_finite_numbers(name: str, value: float) -> None:
    with pytest.raises(ValueError, match=rf"^{name} must be a finite number, got -?(nan|inf);.*option out"):
        TrainOptions(**{name: value})


@pytest.mark.parametrize("flag,value", [("--lr", "inf"), ("--clip-grad", "nan"), ("--min-lr", "nan"),
                                        ("--warmup-epochs", "nan")])
def test_cli_refuses_non_finite_options_before_writing(flag: str, value: str, image_folder: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    code = run_cli(fast_args(image_folder, out, flag, value))
    err = capsys.readouterr().err
    option = flag[2:].replace("-", "_")
    assert code == 2, f"{flag} {value}: expected exit code 2, got {code}; stderr:\n{err}"
    assert f"{option} must be a finite number" in err, f"{flag} {value}: {err}"
    assert not out.exists() or not any(out.iterdir()), f"{flag} {value}: files were written before the error"


def test_checkpoint_every_accepts_steps_and_durations() -> None:
    assert parse_checkpoint_every("200") == (200, 0.0)
    assert parse_checkpoint_every("30s") == (0, 30.0)
    assert parse_checkpoint_every("10m") == (0, 600.0)
    assert parse_checkpoint_every("0") == (0, 0.0)
    with pytest.raises(ValueError, match="step count"):
        parse_checkpoint_every("often")


# ------------------------------------------------------------------------------------------------ freeze

def test_modes_select_new_parameters_and_freeze_bn() -> None:
    import se_retrofit

    model = se_retrofit.apply(pretrained_like(create_model(MODEL, num_classes=3)))
    new = new_parameter_names(model)
    se_names = {f"{name}.{p}" for name, block in se_blocks(model) for p, _ in block.named_parameters()}
    assert se_names and se_names <= new, "every SE parameter must count as new"
    assert {"fc.weight", "fc.bias"} <= new, "the classifier head must count as new"
    assert not any(n.startswith("conv1") for n in new), "stem weights must not count as new"

    set_trainable(model, new, backbone=False)
    model.train()
    frozen = freeze_batchnorm(model, backbone_trains=False)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert frozen == len(bns) and not any(m.training for m in bns), "frozen BN layers must be in eval mode"

    groups = parameter_groups(model, new, "staged", weight_decay=0.05, backbone_lr_scale=0.1)
    scales = {g["name"]: g.get("lr_scale", 1.0) for g in groups}
    assert scales["backbone/decay"] == 0.1 and scales["new/decay"] == 1.0, f"staged lr scales wrong: {scales}"
    assert all(g["weight_decay"] == 0.0 for g in groups if g["name"].endswith("no_decay"))
    se_groups = parameter_groups(model, new, "se", weight_decay=0.05, backbone_lr_scale=0.1)
    assert all(g["name"].startswith("new/") for g in se_groups), "train=se must not give the backbone to the optimizer"
    assert [stage_of("staged", e, 2) for e in range(4)] == [1, 1, 2, 2]


# ------------------------------------------------------------------------------------------- python API

def test_finetune_se_trains_only_se_and_head() -> None:
    torch.manual_seed(0)
    model = pretrained_like(create_model(MODEL))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = finetune(model, Quadrants(24), Quadrants(9, seed=1), epochs=2, batch_size=8, lr=1e-2,
                      warmup_epochs=0, verbose=False, progress=False)
    trained = {k: v.cpu() for k, v in result.model.state_dict().items()}  # the model stays on the training device
    assert result.model.get_classifier().out_features == 3, "the head must be resized to the data's 3 classes"
    for key, value in before.items():
        if not key.startswith("fc."):
            assert torch.equal(value, trained[key]), f"frozen backbone tensor {key} changed under train='se'"
    assert torch.equal(model.state_dict()["fc.weight"], before["fc.weight"]), "the caller's model must be untouched"
    se_keys = [k for k in trained if ".se." in k]
    assert se_keys and any(not torch.equal(trained[k], torch.zeros_like(trained[k])) for k in se_keys
                           if k.endswith("fc2.weight")), "SE blocks received no update (fc2 still zero)"
    assert len(result.history) == 2 and set(result.history[0]) >= {"epoch", "train_loss", "train_acc", "val_loss",
                                                                    "val_top1", "val_top5", "lr", "seconds"}
    assert result.best_top1 is not None and 0 <= result.best_top1 <= 100
    assert not result.interrupted and result.out_dir is None and result.files == {}


def test_top5_is_reported_only_with_more_than_5_classes() -> None:
    torch.manual_seed(0)
    for classes, reported in ((5, False), (6, True)):
        model = pretrained_like(create_model(MODEL, num_classes=classes))
        result = finetune(model, Quadrants(12, classes=classes), Quadrants(12, classes=classes, seed=1), epochs=1,
                          batch_size=6, warmup_epochs=0, verbose=False, progress=False)
        top5 = result.history[0]["val_top5"]
        assert math.isnan(top5) != reported, f"{classes} classes: val_top5 {top5}, expected {'a value' if reported else 'none'}"


class _NonAffineNormNet(nn.Module):
    """A residual net whose batch norms have no affine weights: only running statistics to keep."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16, affine=False), nn.ReLU())
        self.conv = nn.Conv2d(16, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16, affine=False)
        self.fc = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.bn(self.conv(x)))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("train", ["se", "all"])
def test_batch_norms_without_affine_weights_follow_the_backbone(train) -> None:
    """``--train se`` promised a backbone bit-identical to the pretrained one, but batch norms built with
    ``affine=False`` (no weights to freeze) kept updating their running statistics."""
    import se_retrofit

    torch.manual_seed(0)
    model = se_retrofit.apply(_NonAffineNormNet())
    assert se_retrofit.se_blocks(model), "the test net must get an SE block"
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    result = finetune(model, Quadrants(16), Quadrants(6, seed=1), epochs=1, batch_size=8, lr=1e-2, train=train,
                      warmup_epochs=0, verbose=False, progress=False)
    trained = {k: v.cpu() for k, v in result.model.state_dict().items()}
    changed = sorted(k for k, v in stats.items() if not torch.equal(v, trained[k]))
    if train == "se":
        assert not changed, f"train='se' changed the backbone's running statistics {changed}"
    else:
        assert len(changed) == len(stats), f"train='all' left running statistics unchanged: {set(stats) - set(changed)}"


def test_the_cli_defaults_are_the_librarys_but_for_loader_workers() -> None:
    """The CLI states every default again (for --help); a change to one side alone would make the command and
    ``finetune`` train differently. Loader workers differ on purpose: the library keeps 0 (a resumed run
    repeats itself bit for bit), the command uses 2 (speed)."""
    import dataclasses

    from se_retrofit.cli import build_parser
    from se_retrofit.commands.convert_and_finetune import conversion_kwargs, training_options
    from se_retrofit.config import SEConfig

    args = build_parser().parse_args(["convert-and-finetune", "resnet18", "--data", "digits", "--out", "run"])
    cli, library = training_options(args), TrainOptions()
    differ = {f.name: (getattr(cli, f.name), getattr(library, f.name)) for f in dataclasses.fields(TrainOptions)
              if getattr(cli, f.name) != getattr(library, f.name)}
    assert differ == {"workers": (2, 0)}, f"CLI and TrainOptions defaults (cli, library) differ: {differ}"
    assert SEConfig(**conversion_kwargs(args)) == SEConfig(), "the CLI's conversion defaults are not SEConfig's"


def test_every_conversion_option_is_a_keyword_of_finetune() -> None:
    """``fuse_add`` and ``early_squeeze`` were refused as unknown training options."""
    from se_retrofit import get_config

    result = finetune(pretrained_like(create_model(MODEL)), Quadrants(8), epochs=1, batch_size=8, fuse_add=False,
                      early_squeeze=False, reduction=8, verbose=False, progress=False)
    config = get_config(result.model)
    assert (config.fuse_add, config.early_squeeze, config.reduction) == (False, False, 8), config


@pytest.mark.parametrize("width", [3, 5])
def test_a_head_with_one_output_per_class_is_kept_and_said_so(width: int, capsys: pytest.CaptureFixture) -> None:
    """A model trained on the data's classes keeps its head (identity retrofit: it starts where it was);
    any other width gets a new head."""
    model = pretrained_like(create_model(MODEL, num_classes=width))
    head = model.get_classifier().weight.detach().clone()
    result = finetune(model, Quadrants(8), epochs=1, batch_size=8, lr=1e-12, progress=False)
    said = "keeping the model's classifier head" in capsys.readouterr().out
    new_head = result.model.get_classifier().weight.detach()
    if width == 3:
        assert said and torch.allclose(new_head, head, atol=1e-6), "a fitting head should be kept, and the log say so"
    else:
        assert not said and new_head.shape[0] == 3, f"a {width}-output head should be replaced by a 3-output one"


def test_finetune_all_and_staged_change_the_backbone() -> None:
    torch.manual_seed(0)
    model = pretrained_like(create_model(MODEL, num_classes=3))
    stem = model.state_dict()["conv1.0.weight"].clone()
    running = model.state_dict()["bn1.running_mean"].clone()
    result = finetune(model, Quadrants(16), None, epochs=2, batch_size=8, train="staged", stage1_epochs=1,
                      verbose=False, progress=False)
    trained = {k: v.cpu() for k, v in result.model.state_dict().items()}
    assert not torch.equal(trained["conv1.0.weight"], stem), "stage 2 of train='staged' must update the backbone"
    assert not torch.equal(trained["bn1.running_mean"], running), "stage 2 must update BN statistics"
    assert math.isnan(result.history[-1]["val_top1"]) and result.best_top1 is None, "no val set -> no val metrics"


def test_plain_model_without_retrofit_needs_train_all() -> None:
    model = create_model(MODEL, num_classes=3)
    with pytest.raises(ValueError, match="retrofit=False"):
        finetune(model, Quadrants(8), None, retrofit=False, train="se", verbose=False)
    result = finetune(model, Quadrants(8), None, retrofit=False, train="all", epochs=1, batch_size=8,
                      verbose=False, progress=False)
    assert not se_blocks(result.model), "retrofit=False must not add SE blocks"


def test_plain_baseline_trains_a_copy_and_leaves_the_callers_model() -> None:
    model = create_model(MODEL, num_classes=10).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = finetune(model, Quadrants(8), None, retrofit=False, train="all", epochs=1, batch_size=8,
                      verbose=False, progress=False)
    changed = [k for k, v in model.state_dict().items() if k not in before or not torch.equal(v, before[k])]
    assert result.model is not model and not changed and not model.training, (
        f"retrofit=False must train a copy (the docs say so); the caller's model changed in {changed[:5]}, "
        f"training={model.training}")
    assert result.model.get_classifier().out_features == 3, "the copy gets the data's 3 classes"


@pytest.mark.parametrize("refusal", ["batch", "resume"])
def test_refused_finetune_leaves_an_se_models_head(refusal: str, tmp_path: Path) -> None:
    import se_retrofit

    model = se_retrofit.apply(create_model(MODEL, num_classes=10))
    head = model.get_classifier()
    if refusal == "batch":
        with pytest.raises(ValueError, match="fewer than one batch"):
            finetune(model, Quadrants(6), None, epochs=1, batch_size=64, verbose=False, progress=False)
    else:
        finetune(se_retrofit.apply(create_model(MODEL, num_classes=3)), Quadrants(8), None, out_dir=tmp_path,
                 epochs=1, batch_size=8, verbose=False, progress=False)
        with pytest.raises(ValueError, match="different run"):
            finetune(model, Quadrants(8), None, out_dir=tmp_path, resume=True, epochs=2, batch_size=8,
                     verbose=False, progress=False)
    assert model.get_classifier() is head and head.out_features == 10, (
        f"a refused finetune() replaced the caller's head: now {model.get_classifier()}")
    assert all(p.requires_grad for p in model.parameters()), "a refused finetune() froze the caller's parameters"


def test_amp_on_cpu_uses_bfloat16_and_refuses_float16() -> None:
    result = finetune(create_model(MODEL, num_classes=3), Quadrants(8), Quadrants(3), epochs=1, batch_size=8,
                      amp=True, device="cpu", verbose=False, progress=False)
    assert result.config["runtime"]["amp_dtype_used"] == "bfloat16"
    assert all(p.dtype == torch.float32 for p in result.model.parameters()), "AMP must keep float32 master weights"
    with pytest.raises(ValueError, match="float16 AMP is not supported on the CPU"):
        finetune(create_model(MODEL), Quadrants(8), None, amp=True, amp_dtype="float16", device="cpu", verbose=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_refused() -> None:
    with pytest.raises(RuntimeError, match="CUDA is not available.*--device cpu"):
        finetune(create_model(MODEL), Quadrants(8), None, device="cuda", verbose=False)


# -------------------------------------------------------------------------------------------------- CLI

def test_cli_writes_the_run_and_the_adapter_rebuilds_the_model(image_folder: Path, base_checkpoint: Path,
                                                               tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import se_retrofit
    from se_retrofit.adapter import load

    out = tmp_path / "run"
    code = run_cli(fast_args(image_folder, out, "--checkpoint", str(base_checkpoint), "--lr", "0.01",
                             "--warmup-epochs", "0"))
    printed = capsys.readouterr().out
    assert code == 0, f"convert-and-finetune failed:\n{printed}"
    for name in ("config.json", "metrics.csv", "curves.png", "report.md", "report.json", "model.safetensors",
                 "best.safetensors", "last.pt", "se_adapter.safetensors", "se_adapter_config.json"):
        assert (out / name).is_file(), f"{name} missing from the run folder: {sorted(p.name for p in out.iterdir())}"
    assert "best top-1" in printed and str(out) in printed, f"no one-line summary in:\n{printed}"

    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0] == "epoch,train_loss,train_acc,val_loss,val_top1,val_top5,lr,seconds", rows[0]
    assert len(rows) == 3, f"expected a header and 2 epoch rows, got {rows}"
    assert rows[1].split(",")[5] == "" and "val_top5" not in printed, \
        f"top-5 of 3 classes is always 100 % and must be left empty: {rows[1]}"
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", "curves.png is not a PNG"
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["name"] == MODEL and config["model"]["num_classes"] == 3
    assert config["train"]["train"] == "se" and config["se"]["reduction"] == 16
    assert config["data"]["class_names"] == ["class0", "class1", "class2"]
    adapter_config = json.loads((out / "se_adapter_config.json").read_text())
    assert adapter_config["class_names"] == ["class0", "class1", "class2"], "the adapter should carry the classes"
    assert "params" in (out / "report.md").read_text()

    weights = load_file(str(out / "model.safetensors"))
    base = load_file(str(base_checkpoint))
    changed = [k for k, v in base.items() if not k.startswith("fc.") and not torch.equal(v, weights[k])]
    assert not changed, f"--train se changed backbone tensors: {changed[:5]}"

    def base_model() -> nn.Module:
        model = create_model(MODEL)
        model.load_state_dict(base)
        return model

    from_adapter = load(out, base_model()).eval()
    full = se_retrofit.apply(base_model())
    full.reset_classifier(3)
    full.load_state_dict(weights)
    full.eval()
    untrained = se_retrofit.apply(base_model()).eval()
    untrained.reset_classifier(3)
    x = torch.randn(4, 3, SIZE, SIZE)
    with torch.no_grad():
        expected, got = full(x), from_adapter(x)
    assert torch.equal(expected, got), f"adapter model differs from the trained one by {(expected - got).abs().max()}"
    se_trained = {k: v for k, v in weights.items() if ".se." in k and k.endswith("fc2.weight")}
    assert any(v.abs().sum() > 0 for v in se_trained.values()), "the trained SE blocks are still the identity"


CUDA_CASE = pytest.param("cuda without CUDA", marks=pytest.mark.skipif(torch.cuda.is_available(),
                                                                      reason="needs a machine without CUDA"))


@pytest.mark.parametrize("case", ["missing data", "unknown model", "pretrained offline", "bad checkpoint path",
                                  "batch larger than the data", CUDA_CASE])
def test_cli_refuses_bad_input_before_writing(case: str, image_folder: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    args = fast_args(image_folder, out)
    expected = {"missing data": "does not exist", "unknown model": "Did you mean",
                "pretrained offline": "--checkpoint", "bad checkpoint path": "does not exist",
                "batch larger than the data": "fewer than one batch", "cuda without CUDA": "CUDA is not available"}[case]
    if case == "missing data":
        args[args.index("--data") + 1] = str(tmp_path / "nowhere")
    elif case == "unknown model":
        args[1] = "resnet10x"
    elif case == "pretrained offline":
        import socket

        import se_retrofit.models

        def refuse(*a, **k):
            raise AssertionError("a network lookup was attempted despite the failed hub probe")

        monkeypatch.setattr(se_retrofit.models, "hub_reachable", lambda *a, **k: False)
        monkeypatch.setattr(socket, "getaddrinfo", refuse)
        args.append("--pretrained")
    elif case == "bad checkpoint path":
        args += ["--checkpoint", str(tmp_path / "missing.pth")]
    elif case == "batch larger than the data":
        args += ["--batch-size", "512"]
    else:
        args += ["--device", "cuda"]
    code = run_cli(args)
    err = capsys.readouterr().err
    assert code == 2, f"{case}: expected exit code 2, got {code}; stderr:\n{err}"
    assert err.startswith("se-retrofit convert-and-finetune: error:") and expected in err, f"{case}: {err}"
    assert not out.exists() or not any(out.iterdir()), f"{case}: files were written before the error"


def test_cli_never_overwrites_another_run(image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"se_retrofit_version": "0.1.0", "model": {"name": "resnet18"},
                                                 "train": {"epochs": 90}}))
    (out / "notes.txt").write_text("my earlier run")
    assert run_cli(fast_args(image_folder, out)) == 2
    err = capsys.readouterr().err
    assert "already holds a run of 'resnet18'" in err and "--resume" in err, err

    assert run_cli(fast_args(image_folder, out, "--resume")) == 2
    err = capsys.readouterr().err
    assert "holds a different run" in err and "model.name: 'resnet18' -> 'resnet10t'" in err, err
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "notes.txt"], "the earlier run was modified"
    assert (out / "notes.txt").read_text() == "my earlier run"


def test_cli_refuses_unwritable_out_and_empty_resume(image_folder: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert run_cli(fast_args(image_folder, blocker / "run")) == 2
    err = capsys.readouterr().err
    assert "is a file" in err and "folder" in err, err

    assert run_cli(fast_args(image_folder, tmp_path / "fresh", "--resume")) == 2
    err = capsys.readouterr().err
    assert "nothing to resume" in err and "drop --resume" in err, err


def test_the_summary_tells_a_run_stopped_in_its_first_epoch_from_one_without_validation() -> None:
    from se_retrofit.finetune import FinetuneResult

    common = dict(model=nn.Identity(), best_top1=None, best_epoch=None, seconds=1.0, out_dir=None, config={})
    stopped = FinetuneResult(history=[], epochs=0, interrupted=True, **common)
    unvalidated = FinetuneResult(history=[{"epoch": 1, "train_loss": 0.5}], epochs=1, interrupted=False, **common)
    assert "no epoch validated yet" in stopped.summary(), stopped.summary()
    assert "no validation set" in unvalidated.summary(), unvalidated.summary()


def test_an_empty_val_data_warns_a_python_caller_naming_the_argument(tmp_path: Path) -> None:
    """The command warns of an empty validation split (build_datasets); finetune() given an empty val_data
    trained without validation without a word."""
    import warnings

    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = finetune(pretrained_like(create_model(MODEL)), Quadrants(8), torch.utils.data.Subset(Quadrants(3), []),
                          out_dir=tmp_path / "run", epochs=1, batch_size=8, verbose=False, progress=False)
    said = [w for w in caught if "val_data" in str(w.message)]
    assert len(said) == 1, f"expected one warning naming val_data, got {[str(w.message) for w in caught]}"
    message = str(said[0].message)
    assert "empty" in message and "best.safetensors" in message and "val_data=None" in message, message
    assert Path(said[0].filename).name == "test_finetune.py", f"the warning points at {said[0].filename}"
    assert result.best_top1 is None and not (tmp_path / "run" / "best.safetensors").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # val_data=None is training without validation on purpose
        finetune(pretrained_like(create_model(MODEL)), Quadrants(8), None, epochs=1, batch_size=8, verbose=False,
                 progress=False)


def test_the_command_warns_of_an_empty_validation_split_once_in_its_own_terms(tmp_path: Path) -> None:
    import warnings

    for name, colour in (("a", 0), ("b", 2)):
        (tmp_path / "data" / name).mkdir(parents=True)
        pixels = torch.zeros(SIZE, SIZE, 3, dtype=torch.uint8)
        pixels[..., colour] = 200
        Image.fromarray(pixels.numpy()).save(tmp_path / "data" / name / "0.png")
    argv = ["convert-and-finetune", MODEL, "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"),
            "--image-size", str(SIZE), "--batch-size", "2", "--workers", "0", "--epochs", "1", "--no-progress",
            "--no-pretrained"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert run_cli(argv) == 0, "the run without validation failed"
    empty = [str(w.message) for w in caught if "empty" in str(w.message)]
    assert len(empty) == 1 and "--val-split" in empty[0] and "val_data" not in empty[0], (
        f"expected the command's one warning of the empty split, got {empty}")


def test_no_verify_images_skips_the_scan_and_a_bad_file_stops_the_run_naming_it(tmp_path: Path,
                                                                                 capsys: pytest.CaptureFixture[str]
                                                                                 ) -> None:
    data = write_image_folder(tmp_path / "images", classes=2, train_per_class=8, val_per_class=2)
    (data / "train" / "class0" / "broken.png").write_bytes(b"not a png")
    with pytest.warns(UserWarning, match="skipped 1 unreadable image file"):
        assert run_cli(fast_args(data, tmp_path / "checked", "--epochs", "1")) == 0, "a checked run skips the file"
    capsys.readouterr()
    assert run_cli(fast_args(data, tmp_path / "unchecked", "--epochs", "1", "--no-verify-images")) == 2
    err = capsys.readouterr().err
    assert "broken.png" in err and "could not decode image" in err, f"the error should name the file:\n{err}"
    assert "were not checked before training (--no-verify-images" in err and "up-front check" not in err, \
        f"the error should say that verification was off, not blame a check that did not run:\n{err}"


def test_one_image_per_batch_with_training_batch_norms_says_what_to_change(tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    data = write_image_folder(tmp_path / "images", classes=2, train_per_class=2, val_per_class=1)
    args = fast_args(data, tmp_path / "run", "--epochs", "1", "--train", "all", "--image-size", "8")
    args[args.index("--batch-size") + 1] = "1"
    assert run_cli(args) == 2
    err = capsys.readouterr().err
    assert "raise --batch-size" in err and "--train se" in err, f"no hint in:\n{err}"


def test_a_loss_that_is_nan_from_the_start_stops_the_run_with_an_error_and_writes_no_weights(
        base_checkpoint: Path, image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A checkpoint whose outputs are not finite (a bad export, weights of the wrong scale) trained on to a
    "done" and exit code 0, with NaN weights in best, model and adapter files."""
    weights = {k: torch.full_like(v, 1e38) if k.endswith("bn1.weight") else v
               for k, v in load_file(str(base_checkpoint)).items()}
    bad = tmp_path / "overflowing.safetensors"
    save_file(weights, str(bad))
    out = tmp_path / "run"
    assert run_cli(fast_args(image_folder, out, "--checkpoint", str(bad))) == 2, "the run should fail"
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "training loss is NaN or inf at epoch 1/2, step 1 (of 3)" in err, f"no epoch and step in:\n{err}"
    assert err.endswith("Lower the learning rate (--lr), check the --checkpoint weights (a model whose outputs are "
                        "already inf or NaN gives such a loss from the first step) and the input data for NaN or inf "
                        "values, or train without mixed precision (--amp), in a new run (--out)."), err
    assert "done:" not in captured.out, captured.out
    written = sorted(p.name for p in out.iterdir())
    assert written == ["config.json", "report.json", "report.md"], f"weights or metrics were written: {written}"
    assert "holds no last.pt, weights or metrics" in err, err


def test_weights_overflowed_by_a_step_with_a_finite_loss_are_not_saved(tmp_path: Path) -> None:
    """One step per epoch at lr 1e30: the loss of the step that overflows the weights is finite, so the loss
    check passed and the epoch's end saved NaN weights to last.pt (and, on the last epoch, model.safetensors
    and the adapter, with exit code 0). The error names finetune()'s own arguments."""
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match=r"trainable weights are NaN or inf at epoch 2/3, step 1 \(of 1\)") as info:
        finetune(create_model(MODEL), Quadrants(8), Quadrants(4), out_dir=out, epochs=3, batch_size=8, lr=1e30,
                 opt="sgd", warmup_epochs=0, verbose=False, progress=False)
    assert "(lr=)" in str(info.value) and "--lr" not in str(info.value), f"CLI names to a Python caller: {info.value}"
    assert not (out / "model.safetensors").exists(), "final weights were written"
    saved = torch.load(out / "last.pt", weights_only=False)["model"]
    broken = [k for k, v in saved.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    assert not broken, f"last.pt holds non-finite tensors: {broken[:5]}"


class _Reads(Quadrants):
    """Images whose loss is NaN, counting how many the training reads."""

    reads = 0

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, target = super().__getitem__(index)
        self.reads += 1
        return torch.full_like(image, float("nan")), target


def test_a_nan_loss_is_found_within_a_few_steps_without_a_checkpoint_due() -> None:
    """With no checkpoint due in a long epoch, the loss is still read every LOSS_CHECK_EVERY steps: a NaN
    run does not train on to the end of the epoch."""
    from se_retrofit.training.loop import LOSS_CHECK_EVERY

    data = _Reads(40)
    with pytest.raises(RuntimeError, match=r"NaN or inf at epoch 1/1, step 1 \(of 20\)"):
        finetune(create_model(MODEL), data, None, epochs=1, batch_size=2, verbose=False, progress=False)
    assert data.reads <= 2 * LOSS_CHECK_EVERY + 2, f"{data.reads} images read: the run went on past the check"


@pytest.mark.parametrize("name, head", [("dla34", "fc"), ("caformer_s18", "head.fc"), ("efficientvit_m0", "head"),
                                        ("shvit_s1", "head")])
def test_a_head_that_is_not_one_linear_layer_trains_and_is_saved(name: str, head: str, tmp_path: Path) -> None:
    """timm's reset_classifier makes these heads anew (a 1x1 convolution, an MLP, a batch norm and the linear
    layer get_classifier returns): they must train under --train se, not stay frozen at their random init,
    and go into the adapter."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=10)
    result = finetune(model, Quadrants(8), None, out_dir=tmp_path / "run", epochs=1, batch_size=8, verbose=False,
                      progress=False)
    trained = result.model.get_submodule(head)
    frozen = [n for n, p in trained.named_parameters() if not p.requires_grad]
    assert not frozen, f"{name}: the new head's {frozen} stayed frozen under --train se"
    config = json.loads((tmp_path / "run" / "se_adapter_config.json").read_text())
    assert config["extra_modules"] == [head], f"{name}: the adapter's extra modules are {config['extra_modules']}"
    import se_retrofit

    rebuilt = se_retrofit.load(tmp_path / "run", model).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    assert torch.equal(rebuilt(x), result.model.eval()(x)), f"{name}: the adapter on the 10-class base does not rebuild"


def test_a_baseline_of_a_model_that_does_not_copy_says_what_to_do() -> None:
    """A pruned model does not deep-copy; finetune has no inplace option to suggest."""
    from torch.nn.utils import prune

    model = create_model(MODEL, num_classes=3)
    prune.l1_unstructured(model.conv1[0], "weight", amount=0.5)
    with pytest.raises(ValueError, match=r"prune.remove") as info:
        finetune(model, Quadrants(8), None, retrofit=False, train="all", epochs=1, batch_size=8, verbose=False)
    assert "inplace" not in str(info.value), f"the advice names an option finetune does not have: {info.value}"


def _made_anew_outside_the_head(name: str) -> list[str]:
    """Modules with weights that ``reset_classifier`` replaces in a model with a classifier but `head_modules`
    does not name (built on the meta device: no memory, no initialisation)."""
    import timm

    from se_retrofit.models import head_modules

    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
        model.reset_classifier(5)  # encoders are created without a head (num_classes=0)
    heads = [head for head, _ in head_modules(model)]
    before = {key: id(module) for key, module in model.named_modules()}
    with torch.device("meta"):
        model.reset_classifier(7)
    return [key for key, module in model.named_modules()
            if before.get(key) != id(module) and next(module.parameters(recurse=False), None) is not None
            and not any(key == head or key.startswith(f"{head}.") for head in heads)]


@pytest.mark.parametrize("name", ["efficientvit_m0", "shvit_s1", "volo_d1_224", "resnet10t", "convnext_atto"])
def test_the_head_is_every_module_reset_classifier_makes_anew(name: str) -> None:
    """EfficientViT-MSRA and SHViT make ``head.bn`` anew beside ``get_classifier()``'s linear layer, VOLO its
    ``aux_head``: left out of the head, they would stay frozen at their random init under --train se."""
    missed = _made_anew_outside_the_head(name)
    assert not missed, f"{name}: reset_classifier makes {missed} anew, but head_modules leaves them out"


@pytest.mark.slow
def test_no_timm_architecture_makes_anew_more_than_its_head() -> None:
    """One model per timm module and class: `_ALSO_RESET` must name whatever else a new classifier replaces."""
    import timm
    from timm.models import _registry

    missed, seen = {}, set()
    for name in timm.list_models():
        module = _registry._model_to_module.get(name)
        if (module, name.split("_")[0]) in seen:
            continue
        seen.add((module, name.split("_")[0]))
        try:
            found = _made_anew_outside_the_head(name)
        except Exception:  # encoders without a classifier, models that need arguments
            continue
        if found:
            missed[name] = found
    assert not missed, f"reset_classifier makes modules anew that head_modules leaves out: {missed}"


def test_ema_on_a_model_that_does_not_copy_is_refused_before_writing(tmp_path: Path) -> None:
    """--ema keeps a deep copy of the model; a pruned one (weight_orig, weight_mask and a forward pre-hook)
    refuses it with PyTorch's note on weight_norm, which names neither the option nor the fix."""
    from torch.nn.utils import prune

    import se_retrofit

    model = se_retrofit.apply(pretrained_like(create_model(MODEL, num_classes=3)))
    prune.l1_unstructured(model.conv1[0], "weight", amount=0.5)
    with pytest.raises(ValueError, match=r"ema=True keeps a copy .*prune\.remove") as info:
        finetune(model, Quadrants(8), None, out_dir=tmp_path / "run", epochs=1, batch_size=8, ema=True,
                 verbose=False, progress=False)
    assert "without ema" in str(info.value), f"no way on in: {info.value}"
    assert not (tmp_path / "run").exists(), "the refused run wrote its folder"


def test_ema_on_a_model_with_a_buffer_computed_with_gradients_is_refused_before_writing(tmp_path: Path) -> None:
    """A buffer with a ``grad_fn`` refuses timm's deep copy; the trial copy shared every buffer through its memo,
    so it passed, and the run failed later in ModelEmaV3 with PyTorch's note on weight_norm."""
    import se_retrofit

    model = se_retrofit.apply(pretrained_like(create_model(MODEL, num_classes=3)))
    model.fc.register_buffer("scaled", model.fc.weight * 2)
    assert model.fc.scaled.grad_fn is not None, "the premise changed: the buffer has no grad_fn"
    with pytest.raises(ValueError, match=r"ema=True keeps a copy .*detached") as info:
        finetune(model, Quadrants(8), None, out_dir=tmp_path / "run", epochs=1, batch_size=8, ema=True,
                 verbose=False, progress=False)
    assert "without ema" in str(info.value), f"no way on in: {info.value}"
    assert not (tmp_path / "run").exists(), "the refused run wrote its folder"


def test_ema_refusal_of_a_filled_levit_cache_says_what_clears_it() -> None:
    """LeViT caches attention biases computed with gradients on in an eval forward: the refusal's hint must fit
    that cause (the buffer hint alone did not), and what it says to do must make the copy work."""
    import timm

    from se_retrofit.finetune import _check_ema_copies

    model = timm.create_model("levit_128s", pretrained=False, num_classes=3).eval()
    model(torch.randn(1, 3, 224, 224))
    with pytest.raises(ValueError, match=r"attention_bias_cache") as info:
        _check_ema_copies(model)
    assert "model.train()" in str(info.value), f"the hint does not say what clears the cache: {info.value}"
    model.train()
    _check_ema_copies(model)


def test_data_without_classes_keeps_the_head_with_a_warning_that_says_how_to_choose():
    """A TensorDataset has no .classes: the model's 1000-way head used to be trained on 3 labels without a
    word (review r19a). num_classes= equal to the head keeps it quietly; the data's count gives a new head."""
    from torch.utils.data import TensorDataset

    source = Quadrants(8)
    data = TensorDataset(source.images, torch.tensor(source.targets))
    options = dict(epochs=1, batch_size=8, verbose=False, progress=False)
    with pytest.warns(UserWarning, match=r"no \.classes.*keeps its 1000-output head.*num_classes=1000"):
        finetune(create_model(MODEL), data, None, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = finetune(create_model(MODEL), data, None, num_classes=3, **options)
    assert num_classes_of(result.model) == 3, "num_classes=3 must give the data's head"
