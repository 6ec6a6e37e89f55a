"""The run folder and the inputs of ``convert-and-finetune``: what ``--resume`` may start over, what
it must refuse, and which user files it must accept.

A finished run whose ``last.pt`` was deleted (it is the largest file, and only needed to resume) must
not be retrained over; a run that stopped before its first checkpoint holds no result and may start
over with other arguments; a run folder inside the data folder would become a class of the next run.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import TensorDataset

from se_retrofit.finetune import finetune
from se_retrofit.models import create_model
from se_retrofit.training import outputs
from test_finetune import MODEL, Quadrants, fast_args, run_cli, write_image_folder

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("data") / "images", classes=2, train_per_class=4,
                              val_per_class=2)


def _safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata (the header's key order is not fixed, so files are compared by content)."""
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_resume_refuses_a_finished_run_without_its_checkpoint(images: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    assert run_cli(fast_args(images, out, "--epochs", "1")) == 0
    (out / "last.pt").unlink()
    before = _digest(out)
    assert run_cli(fast_args(images, out, "--epochs", "1", "--resume")) == 2
    err = capsys.readouterr().err
    assert "no last.pt to resume from" in err and "model.safetensors" in err, err
    assert _digest(out) == before, "the finished run's files were changed"


def test_resume_starts_over_a_run_that_stopped_before_its_first_checkpoint(images: Path, tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture) -> None:
    """What a run leaves when it fails after writing its config (a batch larger than the data, say)."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"se_retrofit_version": "0.1.0", "model": {"name": "resnet18"},
                                                 "train": {"batch_size": 64}}))
    assert run_cli(fast_args(images, out, "--epochs", "1")) == 2
    assert "--resume starts it over" in capsys.readouterr().err
    assert run_cli(fast_args(images, out, "--epochs", "1", "--resume")) == 0
    assert "starting it over" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["name"] == "resnet10t", "the config of the run that started over was not rewritten"
    assert (out / "model.safetensors").exists() and (out / "last.pt").exists()


@pytest.mark.parametrize("leftover", [False, True])
def test_resume_never_starts_over_on_a_config_json_that_is_not_a_runs(leftover: bool, images: Path, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    """Some other tool's config.json: neither a new run nor --resume may take the folder (and overwrite it).
    A temporary file that a killed write of ours left does not change that."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"model": {"name": "resnet18"}, "train": {"batch_size": 64}}))
    if leftover:
        (out / ".last.pt.abc123_x.tmp").write_bytes(b"partial")
    before = _digest(out)
    assert run_cli(fast_args(images, out, "--epochs", "1")) == 2
    err = capsys.readouterr().err
    assert "--resume" not in err and "another --out" in err, err
    assert run_cli(fast_args(images, out, "--epochs", "1", "--resume")) == 2
    err = capsys.readouterr().err
    assert "not the config of an se_retrofit run" in err, err
    assert _digest(out) == before, "the folder's files were changed"


def test_a_killed_writes_temporary_file_neither_blocks_a_folder_nor_outlives_the_run(
        images: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A run killed while writing its first file leaves only ``.config.json.*.tmp``: the folder is empty
    for a new run, and a finished run removes such files."""
    out = tmp_path / "run"
    out.mkdir()
    (out / ".config.json.k1ll3d_x.tmp").write_text("{")
    assert run_cli(fast_args(images, out, "--epochs", "1", "--resume")) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert run_cli(fast_args(images, out, "--epochs", "1")) == 0
    assert not list(out.glob(".*.tmp")), "the killed write's temporary file outlived the run"


def test_a_run_stopped_between_its_checkpoint_and_best_weights_resumes_and_writes_them(
        images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``best.safetensors`` comes after the ``last.pt`` that records it: a run that dies in between (here at
    the end of its first epoch) resumes from that checkpoint, which holds those very weights, and ends
    with the best weights an uninterrupted run has. (Written first, it left a folder with a result and no
    checkpoint, which neither --resume nor a new run would take.)"""
    from se_retrofit.training import outputs

    reference = tmp_path / "reference"
    assert run_cli(fast_args(images, reference, "--epochs", "1")) == 0
    save_weights = outputs.save_weights

    def dies_on_best(path: Path, *args, **kwargs) -> None:
        if path.name == outputs.BEST:
            raise KeyboardInterrupt  # a kill between the two files
        save_weights(path, *args, **kwargs)

    out = tmp_path / "run"
    monkeypatch.setattr(outputs, "save_weights", dies_on_best)
    assert run_cli(fast_args(images, out, "--epochs", "1")) == 130
    monkeypatch.setattr(outputs, "save_weights", save_weights)
    assert (out / "last.pt").exists() and not (out / "best.safetensors").exists()
    # an earlier best epoch's file, as a kill during this epoch's write leaves it
    save_file({"w": torch.zeros(1)}, str(out / "best.safetensors"), metadata={"epoch": "0"})
    assert run_cli(fast_args(images, out, "--epochs", "1", "--resume")) == 0
    got, want = _safetensors(out / "best.safetensors"), _safetensors(reference / "best.safetensors")
    assert got[1] == want[1], f"metadata {got[1]} != {want[1]}"
    assert got[0].keys() == want[0].keys() and all(torch.equal(got[0][k], want[0][k]) for k in want[0]), \
        "the resumed run's best weights differ from an uninterrupted run's"


class _Poisoned(Quadrants):
    """Training images that turn NaN once ``poisoned`` is set, as activations that overflow mid-run do;
    ``on_first`` is called when the first NaN image is served."""

    poisoned = False
    on_first = None

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, target = super().__getitem__(index)
        if not self.poisoned:
            return image, target
        if self.on_first is not None:
            self.on_first()
            self.on_first = None
        return torch.full_like(image, float("nan")), target


def test_a_loss_that_turns_nan_mid_run_stops_it_and_keeps_the_last_good_files(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The loss goes NaN in epoch 2, with a checkpoint due after every step: the error comes before that
    checkpoint, so last.pt, best.safetensors and metrics.csv stay those of epoch 1 (--resume still has a
    good state), and no model.safetensors or adapter is written."""
    out = tmp_path / "run"
    data = _Poisoned(24)
    good: dict[str, str] = {}
    data.on_first = lambda: good.update(_digest(out))  # the folder as epoch 1 left it
    write_metrics = outputs.write_metrics

    def poison_after_the_first_epoch(*args, **kwargs) -> None:
        write_metrics(*args, **kwargs)
        data.poisoned = True

    monkeypatch.setattr(outputs, "write_metrics", poison_after_the_first_epoch)
    with pytest.raises(RuntimeError, match=r"NaN or inf at epoch 2/3, step 1 \(of 3\)") as error:
        finetune(create_model(MODEL), data, Quadrants(9, seed=1), out_dir=out, epochs=3, batch_size=8,
                 checkpoint_every_steps=1, verbose=False, progress=False)
    assert "keeps last.pt from the end of epoch 1" in str(error.value), str(error.value)
    assert sorted(good) == ["best.safetensors", "config.json", "curves.png", "last.pt", "metrics.csv", "report.json",
                            "report.md"], sorted(good)
    assert _digest(out) == good, "files of the last good state were changed, or others added, after the loss went NaN"
    assert len((out / "metrics.csv").read_text().splitlines()) == 2, "metrics.csv should hold epoch 1 alone"
    saved = torch.load(out / "last.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point()), \
        "last.pt holds non-finite weights"


@pytest.mark.parametrize("where", ["inside", "around"])
def test_out_and_data_must_not_contain_each_other(where: str, images: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    out = images / "run1" if where == "inside" else images.parent
    before = sorted(p.name for p in images.iterdir())
    assert run_cli(fast_args(images, out, "--epochs", "1")) == 2
    err = capsys.readouterr().err
    assert ("inside --data" if where == "inside" else "is inside --out") in err, err
    assert sorted(p.name for p in images.iterdir()) == before, "files were written into the data folder"


def test_a_damaged_last_pt_is_named_and_nothing_is_touched(images: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    assert run_cli(fast_args(images, out, "--epochs", "1")) == 0
    (out / "last.pt").write_bytes((out / "last.pt").read_bytes()[:1000])
    before = _digest(out)
    assert run_cli(fast_args(images, out, "--epochs", "1", "--resume")) == 2
    err = capsys.readouterr().err
    assert "last.pt is damaged" in err and "another --out" in err, err
    assert _digest(out) == before


def test_a_backbone_checkpoint_without_its_classifier_is_accepted(images: Path, tmp_path: Path) -> None:
    """``timm.create_model(..., num_classes=0).state_dict()`` has no head: the run fits one to the data anyway."""
    path = tmp_path / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in create_model(MODEL, num_classes=0).state_dict().items()}, str(path))
    assert run_cli(fast_args(images, tmp_path / "run", "--epochs", "1", "--checkpoint", str(path))) == 0


@pytest.mark.parametrize("classes", [10, 0], ids=["10_classes", "backbone_only"])
def test_a_checkpoint_of_a_convolution_head_model_loads_with_its_own_class_count(classes: int, images: Path,
                                                                                tmp_path: Path) -> None:
    """DLA's classifier is a 1x1 convolution: a file with another class count (or none) loads as a linear
    head's does, its backbone kept and the head fitted to the data's classes."""
    torch.manual_seed(0)
    saved = create_model("dla46_c", num_classes=classes).state_dict()
    path = tmp_path / "dla46_c.safetensors"
    save_file({k: v.contiguous() for k, v in saved.items()}, str(path))
    args = fast_args(images, tmp_path / "run", "--epochs", "1", "--checkpoint", str(path))
    args[1] = "dla46_c"
    assert run_cli(args) == 0, f"a dla46_c checkpoint with {classes} classes was refused"
    trained, _ = _safetensors(tmp_path / "run" / "model.safetensors")
    assert torch.equal(trained["base_layer.0.weight"], saved["base_layer.0.weight"]), "the backbone was not loaded"
    assert trained["fc.weight"].shape[0] == 2, f"the head has {trained['fc.weight'].shape[0]} outputs, not 2"


def test_a_lightning_checkpoint_loads_with_checkpoint(tmp_path: Path) -> None:
    """PyTorch Lightning saves ``model.`` before every key of a network held as ``self.model``."""
    from se_retrofit.commands.convert_and_finetune import _build_model

    saved = create_model(MODEL, num_classes=10).state_dict()
    path = tmp_path / "epoch=3-step=12.ckpt"
    torch.save({"epoch": 3, "state_dict": {f"model.{k}": v for k, v in saved.items()}}, path)
    model = _build_model(MODEL, False, path)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items()), "the checkpoint was not loaded"


def test_a_checkpoint_folder_is_named_as_a_folder(images: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert run_cli(fast_args(images, tmp_path / "run", "--checkpoint", str(tmp_path))) == 2
    assert "is a folder" in capsys.readouterr().err


def test_resume_repairs_a_torn_config(images: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert run_cli(fast_args(images, out, "--epochs", "1")) == 0
    (out / "config.json").write_text("{")
    assert run_cli(fast_args(images, out, "--epochs", "1", "--resume")) == 0
    assert json.loads((out / "config.json").read_text())["model"]["name"] == "resnet10t"


def test_a_run_started_at_the_same_time_on_the_same_out_stops_before_writing(
        images: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two runs on one ``--out`` both find it empty; the one whose config comes second must write nothing
    (both used to finish, leaving one run's config beside the other's weights)."""
    from se_retrofit.training import outputs

    out = tmp_path / "run"
    check, calls = outputs.prepare_out_dir, []

    def the_other_run_starts_meanwhile(folder: Path, resume: bool) -> bool:
        found = check(folder, resume)
        calls.append(folder)
        if len(calls) == 2:  # the command checks the folder up front, then finetune() again before its config
            folder.mkdir(exist_ok=True)
            (folder / "config.json").write_text('{"the other run": true}\n')
        return found

    monkeypatch.setattr(outputs, "prepare_out_dir", the_other_run_starts_meanwhile)
    assert run_cli(fast_args(images, out, "--epochs", "1")) == 2
    assert "taken by another run started at the same time" in capsys.readouterr().err
    assert _digest(out) == {"config.json": hashlib.sha256(b'{"the other run": true}\n').hexdigest()}, \
        f"the second run wrote into the first one's folder: {sorted(p.name for p in out.iterdir())}"


def test_ctrl_c_outside_the_training_loop_is_a_message_not_a_traceback(images: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch,
                                                                        capsys: pytest.CaptureFixture) -> None:
    from se_retrofit import models

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "create_model", interrupted)
    assert run_cli(fast_args(images, tmp_path / "run", "--epochs", "1")) == 130
    assert "interrupted" in capsys.readouterr().err


def test_a_checkpoint_write_that_fails_says_which_file_and_how_to_go_on(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk reaches torch.save as an internal 'enforce fail ... unexpected pos' error."""
    from se_retrofit import checkpoint
    from se_retrofit.training import naming, state

    def full_disk(obj, path, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 35581056 vs 35580952")

    monkeypatch.setattr(checkpoint, "atomic_save", full_disk)
    with pytest.raises(OSError, match=r"could not write .*last\.pt .*MiB free.*is intact.*with resume=True"):
        state.save(tmp_path / "last.pt", {"format": "x"})
    with naming.command_options(), pytest.raises(OSError, match=r"is intact.*with --resume"):
        state.save(tmp_path / "last.pt", {"format": "x"})


def test_a_resume_while_the_run_is_still_going_is_refused(tmp_path: Path) -> None:
    """Two processes in one run folder would write the same last.pt and delete each other's temporary files:
    the running one holds the folder, and a --resume started meanwhile stops before touching anything."""
    from se_retrofit.training import outputs

    out = tmp_path / "run"
    finetune(create_model(MODEL, num_classes=3), Quadrants(8), None, out_dir=out, epochs=1, batch_size=8,
             verbose=False, progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    held = outputs.hold(out)  # what the still-running process holds
    try:
        with pytest.raises(FileExistsError, match="is in use: another process is running this run"):
            finetune(create_model(MODEL, num_classes=3), Quadrants(8), None, out_dir=out, resume=True, epochs=1,
                     batch_size=8, verbose=False, progress=False)
    finally:
        outputs.release(held)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before, "the refused resume changed the folder"
    finetune(create_model(MODEL, num_classes=3), Quadrants(8), None, out_dir=out, resume=True, epochs=1,
             batch_size=8, verbose=False, progress=False)  # once released, the resume goes ahead


def _edit_last(out: Path, edit) -> None:
    state = torch.load(out / "last.pt", weights_only=True)
    edit(state)
    torch.save(state, out / "last.pt")


def test_resuming_a_run_of_a_version_that_recorded_no_head_class_count_says_so(images: Path, tmp_path: Path,
                                                                               capsys: pytest.CaptureFixture) -> None:
    """Versions before conv and MLP heads were recognised wrote ``model.num_classes: null`` for them (DLA, DPN):
    the run is not "a different run" with options to change, it is one this version cannot continue."""
    out = tmp_path / "run"
    assert run_cli(fast_args(images, out, "--epochs", "1")) == 0
    older = {"se_retrofit_version": "0.0.9"}
    config = json.loads((out / "config.json").read_text())
    config["model"]["num_classes"] = None
    (out / "config.json").write_text(json.dumps(config | older, indent=2))
    _edit_last(out, lambda state: (state["config"]["model"].update(num_classes=None), state["config"].update(older)))
    before = _digest(out)
    assert run_cli(fast_args(images, out, "--epochs", "1", "--resume")) == 2
    err = capsys.readouterr().err
    assert "written by an older se_retrofit" in err and "'0.0.9'" in err and "another --out" in err, \
        f"no version change said in: {err}"
    assert _digest(out) == before, "the refused resume changed the run's files"


class _ConvHeadNet(nn.Module):
    """A head this version does not know as a classifier (a 1x1 convolution, no timm API): its run records
    ``model.num_classes: null``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1, self.conv2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.conv2(torch.relu(self.conv1(x))))
        return self.head(x).mean((2, 3))


def test_resuming_a_run_of_this_version_with_another_model_lists_the_differences(tmp_path: Path) -> None:
    """``num_classes: null`` is also what this version writes for a head it does not know: resumed by mistake
    with another model, the run was blamed on "an older se_retrofit" and the model change went unsaid."""
    out = tmp_path / "run"
    data = TensorDataset(torch.randn(8, 3, 16, 16), torch.arange(8) % 3)  # no class list: the head is kept as it is
    finetune(_ConvHeadNet(), data, None, out_dir=out, epochs=1, batch_size=4, verbose=False, progress=False)
    assert json.loads((out / "config.json").read_text())["model"]["num_classes"] is None, "the premise changed"
    before = _digest(out)
    with pytest.raises(ValueError) as info:
        finetune(create_model(MODEL, num_classes=3), data, None, out_dir=out, resume=True, epochs=1, batch_size=4,
                 verbose=False, progress=False)
    message = str(info.value)
    assert "older se_retrofit" not in message, f"a run of this version blamed on an older one: {message}"
    assert "holds a different run" in message and "model.class: " in message and "-> 'ResNet'" in message, \
        f"the model change is not listed: {message}"
    assert _digest(out) == before, "the refused resume changed the run's files"


def test_a_checkpoint_whose_optimizer_holds_other_parameters_says_why_it_cannot_resume(
        images: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """What a run of a version that left a head's norm frozen (EfficientViT-MSRA, SHViT) looks like to this one:
    an optimizer group of another size."""
    out = tmp_path / "run"
    assert run_cli(fast_args(images, out, "--epochs", "1")) == 0
    _edit_last(out, lambda state: state["optimizer"]["param_groups"][0]["params"].pop())
    assert run_cli(fast_args(images, out, "--epochs", "1", "--resume")) == 2
    err = capsys.readouterr().err
    assert "optimizer state in the checkpoint is for other trainable parameters" in err and "another --out" in err, err


@pytest.mark.parametrize("version, other", [("0.0.9", None), ("0.0.9", ("name", "dla34")), (None, None),
                                            ("0.1.0", None), ("0.1.0", ("name", "dla34"))])
def test_the_older_version_message_needs_only_the_class_count_changed(version, other) -> None:
    """The older-version reading holds only where nothing else explains a ``num_classes: null``; the version
    number (the same before and after the change) does not decide it."""
    new = {"se_retrofit_version": "0.1.0", "model": {"name": "dla46_c", "num_classes": 3}, "train": {"epochs": 1}}
    saved = json.loads(json.dumps(new))
    saved["model"]["num_classes"] = None
    if version is None:
        del saved["se_retrofit_version"]
    else:
        saved["se_retrofit_version"] = version
    if other is not None:
        saved["model"][other[0]] = other[1]
    with pytest.raises(ValueError) as info:
        outputs.check_same_run(saved, new, Path("run"))
    older = "written by an older se_retrofit" in str(info.value) or "written by an earlier build" in str(info.value)
    assert older == (other is None), f"version {version!r}, other difference {other}: {info.value}"
    if other is not None:
        assert "model.name: 'dla34' -> 'dla46_c'" in str(info.value), f"the model change is not listed: {info.value}"


# ------------------------------------------------------------------------------- the size and split recorded

def _default_size_args(data: Path, out: Path, *extra: str) -> list[str]:
    """`fast_args` without ``--image-size``: the run takes the model's size (resnet10t's pretrained 176)."""
    args = fast_args(data, out, "--epochs", "1", *extra)
    at = args.index("--image-size")
    return args[:at] + args[at + 2:]


def _edit_data_section(out: Path, **changes) -> None:
    """What an earlier version wrote: both the config and the checkpoint's copy of it."""
    config = json.loads((out / "config.json").read_text())
    config["data"].update(changes)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    _edit_last(out, lambda state: state["config"]["data"].update(changes))


def test_config_records_the_image_size_used_and_resume_compares_it(images: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    """``--image-size`` left out recorded ``null``: the size given explicitly on --resume was "a different run",
    and a changed default (a timm release) went unseen."""
    out = tmp_path / "run"
    assert run_cli(_default_size_args(images, out)) == 0
    size = json.loads((out / "config.json").read_text())["data"]["image_size"]
    assert size == 176, f"config.json records image_size {size!r}, not the 176 px resnet10t trained at"
    capsys.readouterr()
    assert run_cli(_default_size_args(images, out, "--image-size", "176", "--resume")) == 0, \
        f"the size used, given explicitly, was refused: {capsys.readouterr().err}"
    _edit_data_section(out, image_size=64)  # as if the model's default was 64 when the run started
    before = _digest(out)
    assert run_cli(_default_size_args(images, out, "--resume")) == 2
    err = capsys.readouterr().err
    assert "data.image_size: 64 -> 176" in err, f"a changed default size was not seen: {err}"
    assert _digest(out) == before, "the refused resume changed the run's files"


def test_a_run_folder_that_recorded_no_image_size_resumes_as_before(images: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    assert run_cli(_default_size_args(images, out)) == 0
    _edit_data_section(out, image_size=None)
    assert run_cli(_default_size_args(images, out, "--image-size", "64", "--resume")) == 2
    assert "data.image_size: None -> 64" in capsys.readouterr().err, "another size given was not refused"
    assert run_cli(_default_size_args(images, out, "--resume")) == 0, \
        f"a run of an earlier version was refused with the same options: {capsys.readouterr().err}"


def test_a_resumed_run_of_an_earlier_version_keeps_config_json_as_the_checkpoint_records_it(
        images: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Resumed, a run of 0.1.0 got a config.json in this version's layout (the size used, no val_split) while
    its last.pt kept the old record until its next save, never for a finished run: a later refusal listed
    ``data.image_size: None -> 176 ... (see config.json)`` beside a config.json that showed 176."""
    out = tmp_path / "run"
    assert run_cli(_default_size_args(images, out)) == 0
    _edit_data_section(out, image_size=None, val_split=0.1)  # as 0.1.0 wrote it, beside a val folder
    assert run_cli(_default_size_args(images, out, "--resume")) == 0, \
        f"a finished run of an earlier version was refused with the same options: {capsys.readouterr().err}"
    shown = json.loads((out / "config.json").read_text())["data"]
    saved = torch.load(out / "last.pt", weights_only=True)["config"]["data"]
    assert {k: shown.get(k) for k in ("image_size", "val_split")} == \
        {k: saved.get(k) for k in ("image_size", "val_split")}, \
        f"config.json records {shown} where last.pt, which resume compares with, records {saved}"
    capsys.readouterr()
    assert run_cli(_default_size_args(images, out, "--image-size", "176", "--resume")) == 2
    err = capsys.readouterr().err
    assert "data.image_size: None -> 176" in err and "config.json" in err, err
    assert shown["image_size"] is None, f"the refusal cites config.json, which records image_size {shown['image_size']}"
    assert run_cli(_default_size_args(images, out, "--val-split", "0.3", "--resume")) == 2
    assert "data.val_split: 0.1 -> 0.3" in capsys.readouterr().err, "the earlier version's split was not compared"


def test_val_split_is_recorded_and_compared_only_where_it_splits(images: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    """With DIR/train and DIR/val the fraction has no effect: ``--val-split 0.2 --resume`` was refused."""
    out = tmp_path / "run"
    assert run_cli(fast_args(images, out, "--epochs", "1")) == 0
    assert "val_split" not in json.loads((out / "config.json").read_text())["data"], \
        "val_split recorded for a layout with a validation folder"
    assert run_cli(fast_args(images, out, "--epochs", "1", "--val-split", "0.2", "--resume")) == 0, \
        f"a val-split that has no effect was compared: {capsys.readouterr().err}"

    _edit_data_section(out, val_split=0.1)  # what earlier versions recorded there
    assert run_cli(fast_args(images, out, "--epochs", "1", "--resume")) == 0, \
        f"a run of an earlier version was refused with the same options: {capsys.readouterr().err}"

    split = tmp_path / "split"
    assert run_cli(fast_args(images / "train", split, "--epochs", "1", "--batch-size", "2", "--val-split", "0.5")) == 0
    assert json.loads((split / "config.json").read_text())["data"]["val_split"] == 0.5
    capsys.readouterr()
    assert run_cli(fast_args(images / "train", split, "--epochs", "1", "--batch-size", "2", "--val-split", "0.25",
                                     "--resume")) == 2
    assert "data.val_split: 0.5 -> 0.25" in capsys.readouterr().err, "a changed split was not refused"


# ------------------------------------------------------------------------------- messages to Python callers

def test_finetune_refusals_name_its_own_arguments(tmp_path: Path) -> None:
    """A Python caller has no --out or --resume to change."""
    data = TensorDataset(torch.randn(8, 3, 16, 16), torch.arange(8) % 2)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError) as info:
        finetune(create_model(MODEL, num_classes=2), data, None, out_dir=taken, epochs=1, verbose=False)
    assert "out_dir=" in str(info.value) and "another out_dir" in str(info.value) and "--" not in str(info.value), \
        f"the refusal does not name finetune's argument: {info.value}"
    with pytest.raises(FileNotFoundError) as info:
        finetune(create_model(MODEL, num_classes=2), data, None, out_dir=tmp_path / "none", resume=True, epochs=1,
                 verbose=False)
    assert "drop resume=True" in str(info.value) and "--" not in str(info.value), str(info.value)


def test_a_python_resume_of_a_command_run_lists_only_real_differences(images: Path, tmp_path: Path) -> None:
    """The command records model and data sections (``run_info``) a finetune() call does not: the differences
    listed were '<unset>' noise beside the real ones."""
    out = tmp_path / "run"
    assert run_cli(fast_args(images, out, "--epochs", "1")) == 0
    before = _digest(out)
    data = TensorDataset(torch.randn(9, 3, 32, 32), torch.arange(9) % 3)
    with pytest.raises(ValueError) as info:
        finetune(create_model(MODEL), data, None, out_dir=out, resume=True, num_classes=3, epochs=1, batch_size=8,
                 verbose=False)
    message = str(info.value)
    assert "<unset>" not in message, f"settings only the command records are listed as differences: {message}"
    assert "model.num_classes: 2 -> 3" in message, f"the real difference is not listed: {message}"
    assert message.startswith("resume=True:") and "run_info" in message and "model.name 'resnet10t'" in message, \
        f"the message does not say the run was started with run_info: {message}"
    assert _digest(out) == before, "the refused resume changed the run's files"


def test_a_run_that_differs_only_in_run_info_is_still_refused_to_a_call_without_it() -> None:
    saved = {"se_retrofit_version": "0.2.0", "model": {"name": "resnet10t", "num_classes": 3},
             "data": {"data": "/d", "train_size": 9}, "train": {"epochs": 1}}
    new = {"se_retrofit_version": "0.2.0", "model": {"class": "ResNet", "num_classes": 3},
           "data": {"train_size": 9}, "train": {"epochs": 1}}
    with pytest.raises(ValueError) as info:
        outputs.check_same_run(saved, new, Path("run"), with_run_info=False)
    assert "<unset>" not in str(info.value) and "model.name 'resnet10t'" in str(info.value), str(info.value)
    with pytest.raises(ValueError, match=r"model.class: '<unset>' -> 'ResNet'"):  # as the command lists it
        outputs.check_same_run(saved, new, Path("run"))


def test_epoch_lines_and_the_resume_of_a_finished_run_read_as_what_happened(tmp_path: Path,
                                                                             capsys: pytest.CaptureFixture) -> None:
    """Without validation data the epoch line said ``val_loss nan  val_top1 nan%``; resuming a finished run
    said ``resuming .../last.pt at complete``."""
    data = TensorDataset(torch.randn(8, 3, 16, 16), torch.arange(8) % 2)
    out = tmp_path / "run"
    finetune(create_model(MODEL, num_classes=2), data, None, out_dir=out, epochs=1, batch_size=4, progress=False)
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch 1/1"))
    assert "val_" not in line and "nan" not in line, f"metrics of a validation that did not run are shown: {line}"
    finetune(create_model(MODEL, num_classes=2), data, None, out_dir=out, resume=True, epochs=1, batch_size=4,
             progress=False)
    printed = capsys.readouterr().out
    assert "at complete" not in printed and f"the run in {out} is complete (1 epoch(s), step 2)" in printed, printed


def test_a_folder_with_another_tools_last_pt_is_not_called_a_run(tmp_path):
    """A user's own training folder often holds a ``last.pt``: without a run config of ours beside it, the
    refusal must not tell the user to "continue that run" as if it were one of se_retrofit's."""
    out = tmp_path / "my_training"
    out.mkdir()
    torch.save({"model": {}}, out / "last.pt")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError) as info:
        outputs.prepare_out_dir(out, resume=False)
    message = str(info.value)
    assert "continue that run" not in message and "whose config.json was lost" in message, message
    assert sorted(p.name for p in out.iterdir()) == ["last.pt", "notes.txt"], "the user's folder was changed"


def test_a_new_runs_folder_is_held_before_its_config_is_written(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A --resume started after a new run's config.json appears, but before the run held its folder, found a
    run that "stopped before its first checkpoint", started it over and trained beside it (review r19c)."""
    out = tmp_path / "run"
    write_config, seen = outputs.write_config, []

    def resume_arrives_now(folder: Path, config: dict, new_run: bool = False) -> None:
        if not seen:
            try:
                outputs.release(outputs.hold(folder))  # what the other process's --resume would take
                seen.append("the folder was free when the config was written")
            except FileExistsError:
                seen.append("held")
        write_config(folder, config, new_run=new_run)

    monkeypatch.setattr(outputs, "write_config", resume_arrives_now)
    finetune(create_model(MODEL, num_classes=3), Quadrants(8), None, out_dir=out, epochs=1, batch_size=8,
             verbose=False, progress=False)
    assert seen == ["held"], seen
