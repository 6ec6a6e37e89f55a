"""Atomic saves, and weights-only loads that refuse code-running pickles (training state and RNG state included)."""
from __future__ import annotations

import argparse
import pickle
import random
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from se_retrofit.checkpoint import (
    UnsafeCheckpointError,
    atomic_save,
    atomic_save_safetensors,
    load_checkpoint,
    load_weights,
)
from se_retrofit.fitting import load_into
from se_retrofit.training.rng import rng_state, set_rng_state


class CreatesMarker:
    """A pickle payload: unpickling it calls ``open(marker, "w")``, i.e. runs code chosen by the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


def leftovers(folder: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


# --------------------------------------------------------------------------------------------- atomic writes

def test_atomic_save_round_trips_and_leaves_no_temp_file(tmp_path):
    state = {"w": torch.arange(6.0).view(2, 3), "epoch": 3, "names": ["a", "b"], "best": None}
    path = atomic_save(state, tmp_path / "sub" / "last.pt")
    assert path == tmp_path / "sub" / "last.pt" and path.is_file(), f"saved to {path}"
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["w"], state["w"]) and loaded["epoch"] == 3 and loaded["names"] == ["a", "b"]
    assert leftovers(path.parent, {"last.pt"}) == [], "the temporary file should have been renamed away"


def test_saved_files_get_the_mode_of_a_plain_write(tmp_path):
    """mkstemp makes its file 0600; renamed into place it would hide the weights from the user's group."""
    import os

    old = os.umask(0o022)
    try:
        atomic_save({"w": torch.ones(2)}, tmp_path / "a.pt")
        atomic_save_safetensors({"w": torch.ones(2)}, tmp_path / "a.safetensors")
    finally:
        os.umask(old)
    for name in ("a.pt", "a.safetensors"):
        mode = (tmp_path / name).stat().st_mode & 0o777
        assert mode == 0o644, f"{name}: mode {oct(mode)}, expected 0o644 under umask 022"
    (tmp_path / "a.pt").chmod(0o640)
    atomic_save({"w": torch.zeros(2)}, tmp_path / "a.pt")
    assert (tmp_path / "a.pt").stat().st_mode & 0o777 == 0o640, "replacing a file must keep its mode"


def test_failed_save_keeps_the_old_file_and_removes_the_temp_file(tmp_path):
    path = tmp_path / "last.pt"
    atomic_save({"epoch": 1}, path)
    # the pickler's own refusal of the lambda: AttributeError before Python 3.14, PicklingError from it on
    with pytest.raises((AttributeError, pickle.PicklingError), match="Can't pickle local object"):
        atomic_save({"epoch": 2, "fn": lambda: None}, path)
    assert torch.load(path, weights_only=True) == {"epoch": 1}, "a failed save must leave the previous checkpoint"
    assert leftovers(tmp_path, {"last.pt"}) == [], "the temporary file must be removed on failure"


@pytest.mark.parametrize("bad, where", [
    ({"best": np.float64(0.5)}, "best"),
    ({"rng": {"numpy": np.random.get_state()}}, "numpy"),
])
def test_atomic_save_refuses_what_weights_only_load_would_refuse(tmp_path, bad, where):
    path = tmp_path / "last.pt"
    with pytest.raises(TypeError, match=where) as info:
        atomic_save(bad, path)
    assert "weights_only" in str(info.value), str(info.value)
    assert not path.exists() and leftovers(tmp_path, set()) == [], "nothing may be written for a refused state"
    atomic_save(bad, path, check_weights_only=False)
    assert path.exists(), "check_weights_only=False should save anything torch.save can"


def test_safetensors_save_handles_shared_and_non_contiguous_tensors(tmp_path):
    base = torch.arange(12.0).view(3, 4)
    tensors = {"tied_a": base, "tied_b": base, "row": base[1], "t": base.t()}
    path = atomic_save_safetensors(tensors, tmp_path / "w.safetensors", metadata={"format": "pt", "note": "x"})
    loaded = load_weights(path)
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor), f"{name} did not round-trip"
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "note": "x"}, f"metadata {f.metadata()}"
    assert leftovers(tmp_path, {"w.safetensors"}) == []
    assert torch.equal(base, torch.arange(12.0).view(3, 4)), "saving must not modify the caller's tensors"


def test_safetensors_saves_of_the_same_tensors_and_metadata_are_the_same_bytes(tmp_path):
    """safetensors writes the metadata in a random order (a Rust HashMap): a finished run resumed rewrote its
    adapter with other bytes. Twelve saves of four keys in random order would all agree once in 24**11."""
    tensors = {"b": torch.arange(3), "a": torch.ones(2, 2)}
    metadata = {"format": "pt", "epoch": "3", "val_top1": "91.2500", "note": "\u00e9t\u00e9"}
    saved = set()
    for i in range(12):
        path = atomic_save_safetensors(tensors, tmp_path / f"w{i}.safetensors", metadata=metadata)
        saved.add(path.read_bytes())
    assert len(saved) == 1, f"{len(saved)} different files from 12 saves of the same tensors and metadata"
    with safe_open(str(tmp_path / "w0.safetensors"), framework="pt") as f:
        assert f.metadata() == metadata, f"the metadata did not round-trip: {f.metadata()}"
    assert torch.equal(load_weights(tmp_path / "w0.safetensors")["b"], torch.arange(3)), "the tensors moved"


def test_safetensors_metadata_must_be_strings(tmp_path):
    with pytest.raises(TypeError, match="metadata"):
        atomic_save_safetensors({"w": torch.zeros(1)}, tmp_path / "w.safetensors", metadata={"epoch": 3})


# --------------------------------------------------------------------------------------------- loading weights

def test_load_weights_unwraps_training_checkpoints_and_strips_ddp_prefix(tmp_path):
    net = tiny_net()
    sd = net.state_dict()
    ddp = {f"module.{k}": v for k, v in sd.items()}
    ema = {k: v + 1 for k, v in sd.items()}
    cases = {
        "plain.pth": sd,
        "wrapped.pth": {"state_dict": ddp, "epoch": 7, "arch": "tiny", "best_acc1": torch.tensor(0.5)},
        "model.pt": {"model": sd, "optimizer": {"state": {}, "param_groups": []}},
        "msd.pt": {"model_state_dict": sd},
    }
    for name, obj in cases.items():
        torch.save(obj, tmp_path / name)
        loaded = load_weights(tmp_path / name)
        assert loaded.keys() == sd.keys(), f"{name}: keys {list(loaded)[:3]}"
        assert all(torch.equal(loaded[k], sd[k]) for k in sd), f"{name}: values differ"
    torch.save({"state_dict": sd, "state_dict_ema": ema}, tmp_path / "ema.pth")
    with pytest.warns(UserWarning, match="holds raw weights .* and EMA weights"):
        assert torch.equal(load_weights(tmp_path / "ema.pth")["0.weight"], sd["0.weight"]), "raw weights by default"
    assert torch.equal(load_weights(tmp_path / "ema.pth", prefer_ema=True)["0.weight"], ema["0.weight"]), \
        "prefer_ema should pick the EMA weights"


def test_timm_train_py_checkpoint_loads_with_its_args_namespace(tmp_path):
    """timm's train.py saves ``args`` (an argparse.Namespace) next to ``state_dict`` and ``state_dict_ema``."""
    weights = {"fc.weight": torch.randn(3, 4)}
    ema = {"fc.weight": torch.randn(3, 4)}
    path = tmp_path / "model_best.pth.tar"
    torch.save({"epoch": 7, "arch": "resnet18", "state_dict": weights, "state_dict_ema": ema,
                "optimizer": {"state": {}, "param_groups": []}, "version": 2, "metric": 71.2,
                "args": argparse.Namespace(model="resnet18", lr=0.1, aa="rand-m9", layers=[1, 2])}, path)
    with pytest.warns(UserWarning, match=r"raw weights \(state_dict\) and EMA weights.*--checkpoint-ema.*"
                                         r"prefer_ema=False \(--no-checkpoint-ema\) to silence"):
        assert torch.equal(load_weights(path)["fc.weight"], weights["fc.weight"]), "state_dict not taken"
    assert torch.equal(load_weights(path, prefer_ema=True)["fc.weight"], ema["fc.weight"]), "EMA weights not taken"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a choice made is not warned about
        assert torch.equal(load_weights(path, prefer_ema=False)["fc.weight"], weights["fc.weight"])


def test_ema_weights_asked_for_must_be_there(tmp_path):
    """DeiT and ConvNeXt keep the EMA under ``model_ema``; asking for EMA weights where there are none is an
    error, not the raw weights loaded in silence (with the run's config saying EMA)."""
    weights, ema = {"fc.weight": torch.randn(3, 4)}, {"fc.weight": torch.randn(3, 4)}
    torch.save({"model": weights, "model_ema": ema, "epoch": 3}, tmp_path / "deit.pth")
    with pytest.warns(UserWarning, match=r"raw weights \(model\) and EMA weights \(model_ema\)"):
        assert torch.equal(load_weights(tmp_path / "deit.pth")["fc.weight"], weights["fc.weight"])
    assert torch.equal(load_weights(tmp_path / "deit.pth", prefer_ema=True)["fc.weight"], ema["fc.weight"])
    torch.save(weights, tmp_path / "plain.pth")
    torch.save({"state_dict": weights, "ema": ema}, tmp_path / "other.pth")
    save_file(weights, str(tmp_path / "plain.safetensors"))
    for name in ("plain.pth", "other.pth", "plain.safetensors"):
        with pytest.raises(ValueError, match="EMA weights were asked for"):
            load_weights(tmp_path / name, prefer_ema=True)
    for key in ("state_dict_ema", "model_ema"):  # EMA weights alone
        torch.save({key: ema, "epoch": 3}, tmp_path / "ema_only.pth")
        with pytest.warns(UserWarning, match=f"holds only EMA weights \\({key}\\)"):
            assert torch.equal(load_weights(tmp_path / "ema_only.pth")["fc.weight"], ema["fc.weight"])
        assert torch.equal(load_weights(tmp_path / "ema_only.pth", prefer_ema=True)["fc.weight"], ema["fc.weight"])
        with pytest.raises(ValueError, match="raw weights were asked for"):
            load_weights(tmp_path / "ema_only.pth", prefer_ema=False)


def test_the_marker_payload_really_runs_code_when_unpickled(tmp_path):
    """Control: proves the refusal tests below would notice if the loader executed the pickle."""
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(CreatesMarker(marker)))
    assert marker.exists(), "the payload should create the marker when unpickled without restrictions"


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
@pytest.mark.parametrize("loader", [load_weights, load_checkpoint])
def test_code_running_pickle_is_refused_without_running_it(tmp_path, writer, loader):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    payload = {"state_dict": {"w": torch.zeros(2)}, "x": CreatesMarker(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(UnsafeCheckpointError) as info:
        loader(path)
    message = str(info.value)
    assert "evil.pth" in message and "safetensors" in message, f"the error should name the file and the fix: {message}"
    assert "trust" in message, f"the error should say how to convert a trusted file: {message}"
    assert isinstance(info.value, ValueError), "UnsafeCheckpointError must be a ValueError"
    assert not marker.exists(), "loading executed code from the pickle"


def test_missing_and_non_checkpoint_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_weights(tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "notes.pth").write_text("hello, not a checkpoint")
    with pytest.raises(ValueError, match="notes.pth"):
        load_weights(tmp_path / "notes.pth")
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(ValueError, match="cut.safetensors"):
        load_weights(tmp_path / "cut.safetensors")
    torch.save({"epoch": 3, "w": [1, 2]}, tmp_path / "notweights.pt")
    with pytest.raises(ValueError, match="not tensors"):
        load_weights(tmp_path / "notweights.pt")


# --------------------------------------------------------------------------------------------- training state

def test_full_training_state_round_trips_weights_only(tmp_path):
    net = tiny_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    net(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    sched.step()
    state = {
        "model": net.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
        "scaler": torch.amp.GradScaler("cpu", enabled=False).state_dict(), "ema": net.state_dict(),
        "rng": rng_state(), "epoch": 1, "step": 10, "best_metric": 0.25,
        "config": {"model": "resnet18", "lr": 0.1, "se": {"reduction": 16, "include": ["layer3"]}},
    }
    atomic_save(state, tmp_path / "last.pt")
    loaded = load_checkpoint(tmp_path / "last.pt")
    assert loaded["epoch"] == 1 and loaded["best_metric"] == 0.25 and loaded["config"] == state["config"]
    fresh = torch.optim.SGD(tiny_net().parameters(), lr=0.1, momentum=0.9)
    fresh.load_state_dict(loaded["optimizer"])
    momentum = fresh.state_dict()["state"][0]["momentum_buffer"]
    assert torch.equal(momentum, opt.state_dict()["state"][0]["momentum_buffer"]), "optimizer momentum lost"


def draw() -> tuple:
    python = random.random(), random.gauss(0, 1)
    return python, float(np.random.rand()), float(np.random.randn()), torch.rand(3).tolist()


def test_rng_state_survives_a_weights_only_round_trip(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)
    np.random.randn()
    atomic_save({"rng": rng_state()}, tmp_path / "rng.pt")
    expected = draw()
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    assert draw() != expected, "reseeding should have changed the stream (else the test proves nothing)"
    set_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert draw() == expected, "restored RNG streams should continue exactly where they were saved"


# --------------------------------------------------------------------------------------------- conversion hint

@pytest.mark.parametrize("saved", ["whole model", "training checkpoint"])
def test_the_conversion_hint_of_an_unsafe_pickle_works_as_printed(tmp_path, saved):
    import re
    import shlex
    import subprocess

    model = tiny_net()
    obj = model if saved == "whole model" else {"model": model.state_dict(), "epoch": 3, "log_dir": tmp_path}
    path = tmp_path / "in.pth"
    torch.save(obj, path)
    with pytest.raises(UnsafeCheckpointError) as info:
        load_weights(path)
    command = re.search(r'python -c ".*"', str(info.value))
    assert command, f"no one-liner in: {info.value}"
    assert str(path) in command.group(0), f"the one-liner does not name the refused file: {command.group(0)}"
    python = shlex.split(command.group(0))
    done = subprocess.run([sys.executable, *python[1:]], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, f"the printed conversion failed: {done.stderr[-500:]}"
    offline_guide = (Path(__file__).parents[1] / "docs" / "guides" / "offline.md").read_text()
    generic = command.group(0).replace(str(path), "IN.pth").replace(str(tmp_path / "in.safetensors"), "OUT.safetensors")
    assert generic in offline_guide, "docs/guides/offline.md shows another conversion command"
    converted = tiny_net()
    load_into(converted, load_weights(tmp_path / "in.safetensors"))
    for name, value in model.state_dict().items():
        assert torch.equal(converted.state_dict()[name], value), f"{name} changed in the conversion"


def test_the_conversion_hint_never_points_at_an_existing_file(tmp_path):
    import re

    for taken in ("in.safetensors", "in.converted.safetensors"):
        (tmp_path / taken).write_bytes(b"the user's own file")
        path = tmp_path / "in.pth"
        torch.save(tiny_net(), path)
        with pytest.raises(UnsafeCheckpointError) as info:
            load_weights(path)
        command = re.search(r'python -c ".*"', str(info.value)).group(0)
        assert taken not in command, f"the hint would overwrite {taken}: {command}"
    assert "IN.pth" in command and "OUT.safetensors" in command, f"with both names taken, placeholders: {command}"
    quoted = tmp_path / "it's $HOME.pth"
    torch.save(tiny_net(), quoted)
    with pytest.raises(UnsafeCheckpointError, match="IN.pth and OUT.safetensors replaced by"):
        load_weights(quoted)


def test_a_damaged_or_misnamed_file_is_not_called_a_dangerous_pickle(tmp_path):
    """Random bytes and a safetensors file named .pth fail the unpickler too; neither is a pickle that would
    run code, and the advice to unpickle it with weights_only=False would be wrong."""
    (tmp_path / "random.pth").write_bytes(bytes(range(7, 256)) * 40)
    save_file({"w": torch.ones(2)}, str(tmp_path / "weights.safetensors"))
    (tmp_path / "named.pth").write_bytes((tmp_path / "weights.safetensors").read_bytes())
    for name, message in (("random.pth", "neither a zip archive .* nor a pickle"),
                          ("named.pth", "safetensors file under another name")):
        with pytest.raises(ValueError, match=message) as info:
            load_weights(tmp_path / name)
        assert not isinstance(info.value, UnsafeCheckpointError), f"{name}: {info.value}"


def test_a_checkpoint_changed_after_it_was_written_is_refused(tmp_path):
    """torch.load does not check the zip's checksums: bytes flipped inside a tensor's data loaded as other
    weights. The archive's CRC-32 catches it, naming the damaged entry; the intact file still loads."""
    state = {"w": torch.arange(4096, dtype=torch.float32), "b": torch.ones(3)}
    torch.save(state, tmp_path / "good.pth")
    data = bytearray((tmp_path / "good.pth").read_bytes())
    start = data.index(torch.arange(4096, dtype=torch.float32).numpy().tobytes()[:64])
    for i in range(start + 1000, start + 1100):
        data[i] ^= 0xFF
    (tmp_path / "bad.pth").write_bytes(bytes(data))
    assert torch.equal(load_weights(tmp_path / "good.pth")["w"], state["w"])
    with pytest.raises(ValueError, match=r"is damaged: its entry '.*data/0' does not match the checksum"):
        load_weights(tmp_path / "bad.pth")


def test_wrapper_prefixes_of_compiled_and_averaged_models_are_dropped(tmp_path):
    """torch.compile saves `_orig_mod.` before every key (also under DDP's `module.`), and torchvision's
    reference EMA (an AveragedModel) `module.` plus its `n_averaged` count: all load as the plain weights."""
    net = tiny_net()
    plain = net.state_dict()
    compiled = {f"_orig_mod.{k}": v for k, v in plain.items()}
    both = {f"module._orig_mod.{k}": v for k, v in plain.items()}
    averaged = torch.optim.swa_utils.AveragedModel(net).state_dict()
    assert "n_averaged" in averaged, sorted(averaged)[:3]
    for name, state in (("compiled", compiled), ("ddp_compiled", both), ("averaged", {"model": plain,
                                                                                      "model_ema": averaged})):
        torch.save(state, tmp_path / f"{name}.pth")
        loaded = load_weights(tmp_path / f"{name}.pth", prefer_ema=True if name == "averaged" else None)
        assert loaded.keys() == plain.keys() and all(torch.equal(loaded[k], plain[k]) for k in plain), (
            f"{name}: loaded keys {sorted(loaded)[:4]}")


def test_a_checkpoint_saved_without_checksums_still_loads(tmp_path):
    """torch.save can skip the CRC-32s (compute_crc32 = False, stored as 0): nothing to check, not damage."""
    from torch.utils import serialization

    state = {"w": torch.arange(64, dtype=torch.float32)}
    serialization.config.save.compute_crc32 = False
    try:
        torch.save(state, tmp_path / "nocrc.pth")
    finally:
        serialization.config.save.compute_crc32 = True
    assert torch.equal(load_weights(tmp_path / "nocrc.pth")["w"], state["w"])


def test_a_models_own_child_named_module_keeps_its_name(tmp_path):
    """Each wrapper's prefix goes once: DDP around a model whose only child is `module` saves
    `module.module.*`, which must load as `module.*`."""
    wrapped = nn.Sequential()
    wrapped.module = nn.Linear(2, 2)
    state = {f"module.{k}": v for k, v in wrapped.state_dict().items()}
    torch.save(state, tmp_path / "ddp.pth")
    assert sorted(load_weights(tmp_path / "ddp.pth")) == ["module.bias", "module.weight"]


# --------------------------------------------------------------------------------------------- Lightning's prefix

def _lightning(state: dict, path: Path, **extra: torch.Tensor) -> Path:
    """What PyTorch Lightning saves for a LightningModule holding the network as ``self.model``."""
    torch.save({"epoch": 3, "global_step": 12, "pytorch-lightning_version": "2.4.0",
                "state_dict": {**{f"model.{k}": v for k, v in state.items()}, **extra}}, path)
    return path


def test_a_lightning_checkpoints_model_prefix_is_dropped_when_it_is_the_one_reading(tmp_path):
    net = tiny_net()
    path = _lightning(net.state_dict(), tmp_path / "epoch=3.ckpt")
    loaded = load_weights(path, model=net)
    assert loaded.keys() == net.state_dict().keys(), f"the prefix was kept: {sorted(loaded)[:3]}"
    assert all(torch.equal(loaded[k], v) for k, v in net.state_dict().items()), "the values changed"
    assert all(k.startswith("model.") for k in load_weights(path)), "without the model, no prefix may be guessed"


@pytest.mark.parametrize("case", ["other entries", "own child named model", "DDP-wrapped", "EMA chosen"])
def test_a_prefix_that_is_not_the_one_reading_is_refused_with_a_command_that_works(tmp_path, case):
    # the command filtered the file's raw keys: after load_weights had dropped a DDP `module.` (or chosen the
    # EMA weights) it found none of them under the prefix and wrote an empty file
    import re
    import shlex
    import subprocess

    net = tiny_net()
    expected, options = net.state_dict(), {}
    if case == "own child named model":  # the model's own child is `model`: model.model.* must not be guessed at
        target = nn.Module()
        target.model = net
        path = _lightning(target.state_dict(), tmp_path / "last.ckpt")
        expected = target.state_dict()
    else:
        target = net
        path = _lightning(net.state_dict(), tmp_path / "last.ckpt", **{"criterion.weight": torch.ones(5)})
    if case == "DDP-wrapped":  # the LightningModule saved from inside DistributedDataParallel
        saved = torch.load(path, weights_only=True)
        saved["state_dict"] = {f"module.{k}": v for k, v in saved["state_dict"].items()}
        torch.save(saved, path)
    if case == "EMA chosen":  # raw weights beside an EMA copy, which the call asks for
        saved = torch.load(path, weights_only=True)
        expected = {k: v + 1 if v.is_floating_point() else v for k, v in net.state_dict().items()}
        saved["state_dict_ema"] = {**{f"model.{k}": v for k, v in expected.items()}, "criterion.weight": torch.ones(5)}
        torch.save(saved, path)
        options = {"prefer_ema": True}
    with pytest.raises(ValueError, match=r"under 'model\.'") as info:
        load_weights(path, model=target, **options)
    message = str(info.value)
    assert ("child named 'model'" in message) if case == "own child named model" else ("criterion.weight" in message), \
        message
    command = re.search(r'python -c ".*"', message)
    assert command and str(path) in command.group(0), f"no one-liner naming the file in: {message}"
    done = subprocess.run([sys.executable, *shlex.split(command.group(0))[1:]], capture_output=True, text=True)
    assert done.returncode == 0, f"the printed extraction failed: {done.stderr[-500:]}"
    extracted = load_weights(tmp_path / "last.model.safetensors")
    assert extracted.keys() == expected.keys(), \
        f"{case}: the printed command extracted {sorted(extracted)[:4]} ({len(extracted)} tensors), not the network's"
    assert all(torch.equal(v, expected[k]) for k, v in extracted.items()), f"{case}: the extracted weights differ"
    load_into(target, extracted)
