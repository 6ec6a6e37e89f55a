"""The run folder: refusing to clobber one, and writing what a finished (or stopped) run leaves there.

Layout of ``--out``::

    config.json          the resolved config (every default made concrete), compared on --resume
    last.pt              training state, rewritten atomically every epoch and mid-epoch (see state.py)
    best.safetensors     weights of the epoch with the best validation top-1 (none without validation)
    metrics.csv          one row per epoch
    curves.png           loss and accuracy against epochs
    report.md/.json      parameters and FLOPs before and after the retrofit (se_retrofit.report)
    model.safetensors    final full state dict
    se_adapter.*         SE weights (+ the head) alone, when the backbone was left untouched

Every file is written to a temporary name and renamed, so an interrupted write never leaves a torn
file; ``metrics.csv`` and ``curves.png`` are re-rendered from the history kept in the checkpoint, so
they always agree with it.
"""
from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import nn

from .. import checkpoint as ckpt
from ..messages import first_line
from .naming import names

CONFIG = "config.json"
LAST = "last.pt"
BEST = "best.safetensors"
METRICS = "metrics.csv"
CURVES = "curves.png"
MODEL = "model.safetensors"
METRIC_COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_top1", "val_top5", "lr", "seconds")
# Sections of config.json that may change between a run and its resumption: speed, not results.
UNCOMPARED = ("runtime", "se_retrofit_version")


# What `checkpoint._atomic_write` leaves of one of the run's files when its process is killed mid-write
# (`tempfile.mkstemp` names: 8 random characters), and the write test's probe (`_check_writable`).
_LEFTOVER = re.compile(r"^\.((config\.json|last\.pt|best\.safetensors|metrics\.csv|curves\.png|model\.safetensors|"
                       r"report\.md|report\.json|se_adapter\.safetensors|se_adapter_config\.json)\.[a-z0-9_]{8}\.tmp"
                       r"|se_retrofit_write_test_[a-z0-9_]{8})$")


def _entries(out: Path) -> list[str]:
    """The names in ``out``, leaving out the temporary files of writes that a killed run never finished."""
    return sorted(p.name for p in out.iterdir() if not _LEFTOVER.match(p.name))


def remove_leftovers(out: Path) -> None:
    """Delete the temporary files that killed writes left (a ``last.pt`` one is the model's size): called
    when a run finishes, when no write of its own is under way."""
    for p in Path(out).iterdir():
        if _LEFTOVER.match(p.name) and p.is_file():
            p.unlink(missing_ok=True)


def is_run_config(out: Path) -> bool:
    """Whether ``out``'s ``config.json`` is one a run of se_retrofit wrote (not some other tool's)."""
    try:
        config = json.loads((Path(out) / CONFIG).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "se_retrofit_version" in config and isinstance(config.get("train"), dict)


def prepare_out_dir(out: Path, resume: bool) -> bool:
    """Check that ``out`` can take this run; return True when there is a checkpoint to resume.

    A new run needs a folder that is missing or empty: anything else may be someone's earlier run,
    and silently mixing or overwriting files is how results get lost. ``resume`` needs ``last.pt``
    (the config comparison happens once the new config is known, in `check_same_run`), or ``config.json``
    and none of a run's results: a run that stopped before its first checkpoint starts over when
    nothing else is there (`restartable`), and is otherwise compared with the new config as well. A
    ``config.json`` se_retrofit did not write is never taken for a run's. Temporary files that a killed
    write left (`remove_leftovers`) count for nothing.
    """
    out, n = Path(out), names()
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{n.folder(out)} is a file, not a folder; choose a folder path")
    if out.is_dir():
        entries = _entries(out)
        if resume:
            if CONFIG not in entries and LAST not in entries:
                raise FileNotFoundError(f"nothing to resume in {out}: it has no {CONFIG} or {LAST} from an earlier "
                                        f"run; drop {n.resume} to start a new run there (it must be empty)")
            if LAST not in entries and not is_run_config(out):
                raise FileExistsError(f"{n.resume}: {out} has no {LAST}, and its {CONFIG} is not the config of an "
                                      f"se_retrofit run; refusing to overwrite it. Choose another {n.out}")
            if LAST not in entries:
                finished = finished_outputs(out)
                if finished:
                    raise FileExistsError(
                        f"{n.resume}: {out} has no {LAST} to resume from but holds the results of a run "
                        f"({', '.join(finished)}); starting over would overwrite them. Choose another {n.out} "
                        f"for a new run, or put {LAST} back to continue that one")
            _check_writable(out)
            return LAST in entries
        if entries:
            if not is_run_config(out):
                # a last.pt beside no run config of ours may be another tool's (a training folder's own last.pt)
                maybe_ours = (f"If its {LAST} is from an se_retrofit run whose {CONFIG} was lost, pass {n.resume} to "
                              "continue it; otherwise choose" if LAST in entries else "Choose")
                raise FileExistsError(f"{n.folder(out)} {_describe_run(out, entries)}; refusing to overwrite it. "
                                      f"{maybe_ours} another {n.out} (a new run needs a missing or empty folder)")
            again = (f"; it stopped before its first checkpoint, so {n.resume} starts it over" if restartable(out)
                     else "")
            raise FileExistsError(f"{n.folder(out)} {_describe_run(out, entries)}; refusing to overwrite it. Pass "
                                  f"{n.resume} to continue that run{again}, or choose another {n.out}")
        _check_writable(out)
        return False
    if resume:
        raise FileNotFoundError(f"nothing to resume: {out} does not exist; drop {n.resume} to start a new run")
    _check_writable(_existing_ancestor(out))
    return False


def hold(out: Path) -> int | None:
    """Take the run folder for this process until `release`: an advisory lock (``flock``) on the folder
    itself, so that a ``--resume`` started while the run is still going (a second terminal, a job requeued
    while the first still runs) is refused instead of training beside it in the same files. None where
    the system has no ``flock`` (Windows) or the folder is missing (a new run, taken when created)."""
    try:
        import fcntl
    except ImportError:
        return None
    try:
        fd = os.open(out, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        n = names()
        raise FileExistsError(f"{n.folder(out)} is in use: another process is running this run now. Let it finish "
                              f"(or stop it), then {n.resume_it} if it did not finish") from None
    return fd


def release(held: int | None) -> None:
    """Give back what `hold` took."""
    if held is not None:
        os.close(held)


def finished_outputs(out: Path) -> list[str]:
    """The files in ``out`` that only training writes: weights, metrics, the adapter (not the config or report)."""
    return [p.name for p in sorted(Path(out).iterdir()) if p.name in (MODEL, BEST, METRICS, CURVES)
            or p.name.startswith("se_adapter")]


# What a run writes before its first checkpoint: a folder holding only these has no result to lose.
_STARTED = (CONFIG, "report.md", "report.json")


def restartable(out: Path) -> bool:
    """Whether ``out`` holds a run that stopped before its first checkpoint and nothing else."""
    names = set(_entries(Path(out)))
    return LAST not in names and CONFIG in names and names <= set(_STARTED) and is_run_config(out)


def make_out_dir(out: Path) -> Path:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PermissionError(f"cannot create {names().folder(out)}: {exc.strerror or exc}; choose a writable "
                              "folder") from exc
    return out


def _existing_ancestor(path: Path) -> Path:
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise FileExistsError(f"cannot create {names().folder(path)}: {parent} is a file; choose a folder "
                                      "path")
            return parent
    return Path("/")


def _check_writable(folder: Path) -> None:
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".se_retrofit_write_test_")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise PermissionError(f"cannot write to {folder} ({exc.strerror or exc}); choose a writable "
                              f"{names().out}") from exc


def _describe_run(out: Path, entries: list[str]) -> str:
    if not is_run_config(out):
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        return f"holds {len(entries)} file(s) ({shown})"
    config = json.loads((out / CONFIG).read_text())
    model = config.get("model", {}) if isinstance(config.get("model"), dict) else {}
    return f"already holds a run of {model.get('name') or model.get('class') or 'a model'!r} ({CONFIG})"


def read_config(out: Path) -> dict[str, Any]:
    return json.loads((Path(out) / CONFIG).read_text())


def config_differences(saved: dict[str, Any], new: dict[str, Any],
                       recorded_before: Mapping[str, Any] | None = None) -> list[str]:
    """``section.key: saved -> new`` for every setting that differs, runtime settings aside
    (``recorded_before``: see `check_same_run`)."""
    return [f"{key}: {a!r} -> {b!r}" for key, a, b in _differing(saved, new, recorded_before)]


def _differing(saved: dict[str, Any], new: dict[str, Any],
               recorded_before: Mapping[str, Any] | None = None) -> list[tuple[str, Any, Any]]:
    flat_saved, flat_new = _flatten(saved), _flatten(new)
    before = _flatten(recorded_before) if recorded_before else {}
    diffs = []
    for key in sorted(set(flat_saved) | set(flat_new), key=_importance):
        if key.split(".", 1)[0] in UNCOMPARED:
            continue
        a, b = flat_saved.get(key, _UNSET), flat_new.get(key, _UNSET)
        if a != b and key in before:
            if a == before[key]:  # recorded as older versions did, for the same options
                continue
            if b == _UNSET:
                b = before[key]
        if a != b:
            diffs.append((key, a, b))
    return diffs


# What a key recorded in one config only shows as in the other.
_UNSET = "<unset>"
# The sections `finetune`'s ``run_info`` adds to (the command's model and data options).
_RUN_INFO_SECTIONS = ("model", "data")


def _importance(key: str) -> tuple[int, str]:
    """Model and SE options first: the differences that say "another run" most plainly."""
    order = ("model", "se", "train", "data")
    section = key.split(".", 1)[0]
    return (order.index(section) if section in order else len(order), key)


def check_same_run(saved: dict[str, Any], new: dict[str, Any], out: Path,
                   recorded_before: Mapping[str, Any] | None = None, with_run_info: bool = True) -> None:
    """Refuse to resume the run ``saved`` describes with the config ``new``, listing what differs.

    ``recorded_before`` holds, in sections as the config does, what earlier versions recorded for
    settings now recorded otherwise, given the same options (the command's ``--image-size`` as given,
    ``null`` when left out, where it now records the size that resolves to): a saved config holding
    that value resumes as it did then. ``with_run_info`` False (a `finetune` call without ``run_info``):
    see `_started_with`.
    """
    n = names()
    diffs = _differing(saved, new, recorded_before)
    started_with = []
    if not with_run_info:
        diffs, started_with = _started_with(saved, diffs)
    if diffs and _older_head_record(saved, new, recorded_before):
        written = saved.get("se_retrofit_version")
        which = (f"an older se_retrofit (its {CONFIG} records version {written!r})"
                 if written != new.get("se_retrofit_version") else
                 f"an earlier build of se_retrofit (one that still called itself {written!r})")
        raise ValueError(
            f"{n.resume}: {out} was written by {which}, from "
            f"before the class count of a classifier that is not one linear layer (a 1x1 convolution as in DLA and "
            f"DPN, an MLP head) was recorded: its model.num_classes is None where this version finds "
            f"{new['model']['num_classes']} (or, for a model of your own, its head changed from one this version "
            "does not know as a classifier to one it does). That version also kept such a head frozen, so its "
            "optimizer state does not fit the parameters this one trains, and the run cannot continue here. Start "
            "it again with the "
            f"same {n.options} in another {n.out} (its {CONFIG} lists them), or finish it with the se_retrofit that "
            "wrote it")
    run_info = ""
    if started_with:
        shown = ", ".join(started_with[:3]) + (", ..." if len(started_with) > 3 else "")
        run_info = (f"It was started with run_info ({shown}; the se-retrofit command records its options there), "
                    "which this call does not pass: continue it with the same run_info, or with the command and "
                    "its --resume")
        if not diffs:
            raise ValueError(f"{n.resume}: {out} holds a run that this call cannot tell is the same. {run_info}; or "
                             f"choose another {n.out} for a new run")
    if diffs:
        listed = [f"{key}: {a!r} -> {b!r}" for key, a, b in diffs]
        shown = "; ".join(listed[:6]) + (f"; and {len(listed) - 6} more" if len(listed) > 6 else "")
        raise ValueError(f"{n.resume}: {out} holds a different run ({shown}). Resume with the {n.options} of that run "
                         f"(see {out / CONFIG}), or choose another {n.out} for a new one"
                         + (f". {run_info}" if run_info else ""))


def as_recorded(saved: dict[str, Any], new: dict[str, Any],
                recorded_before: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``new``, but for the settings ``saved`` records as earlier versions did (``recorded_before``, see
    `check_same_run`), which keep that record: the config of a resumed run, which ``config.json`` shows
    at once and ``last.pt`` only from its next save, and never for a finished run. Recorded anew, a later
    refusal compared with the checkpoint's old record would cite a ``config.json`` that no longer shows it."""
    if not recorded_before:
        return new
    flat_saved, flat_new = _flatten(saved), _flatten(new)
    old = {key: before for key, before in _flatten(recorded_before).items()
           if key in flat_saved and flat_saved[key] == before and flat_new.get(key, _UNSET) != before}
    if not old:
        return new
    kept = copy.deepcopy(new)
    for key, before in old.items():
        *sections, name = key.split(".")
        target = kept
        for section in sections:
            target = target.setdefault(section, {})
        target[name] = before
    return kept


def _started_with(saved: dict[str, Any], diffs: list[tuple[str, Any, Any]]
                  ) -> tuple[list[tuple[str, Any, Any]], list[str]]:
    """For a `finetune` call without ``run_info``: ``diffs`` less the settings of the model and data
    sections that only one of the two configs records, and those the saved run records, as ``key value``.
    They come from ``run_info`` (the command's options, where the call records the model's class), not
    from a difference the call could fix: listed as ``'<unset>'`` they drowned the real ones."""
    one_sided = {key: a for key, a, b in diffs if key.split(".", 1)[0] in _RUN_INFO_SECTIONS and _UNSET in (a, b)}
    kept = [d for d in diffs if d[0] not in one_sided]
    started_with = [f"{key} {value!r}" for key, value in _flatten(saved).items()  # as recorded: the name first
                    if key in one_sided and one_sided[key] != _UNSET]
    return kept, started_with


def _older_head_record(saved: dict[str, Any], new: dict[str, Any],
                       recorded_before: Mapping[str, Any] | None = None) -> bool:
    """Whether ``saved`` is a config of a version that recorded no class count for a head it did not know
    as a classifier (``None``), where this version records one: before a head that is not one linear
    layer was recognised, which also changed what trains.

    Only when the class count is all that differs: this version records ``None`` too, for a model whose
    head it does not know, so the same ``None`` beside a model name or class that differs is a run of
    another model, which the usual message lists. The recorded version alone cannot tell: it stayed the
    same across the change."""
    saved_model, new_model = saved.get("model"), new.get("model")
    return (isinstance(saved_model, dict) and isinstance(new_model, dict) and "num_classes" in saved_model
            and saved_model["num_classes"] is None and new_model.get("num_classes") is not None
            and [key for key, _, _ in _differing(saved, new, recorded_before)] == ["model.num_classes"])


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        flat: dict[str, Any] = {}
        for key, value in data.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: _jsonable(data)}


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def atomic_write_text(path: Path, text: str, exclusive: bool = False) -> None:
    _atomic_write_bytes(path, text.encode(), exclusive)


def _atomic_write_bytes(path: Path, data: bytes, exclusive: bool = False) -> None:
    ckpt._atomic_write(path, lambda tmp: tmp.write_bytes(data), exclusive=exclusive)


def write_config(out: Path, config: dict[str, Any], new_run: bool = False) -> None:
    """Write ``config.json``; for a new run, only where none exists: the config claims the folder, and a
    second run started on the same ``--out`` at the same time, which found it empty too, stops here
    before writing anything."""
    try:
        atomic_write_text(out / CONFIG, json.dumps(config, indent=2, default=str) + "\n", exclusive=new_run)
    except FileExistsError:
        n = names()
        raise FileExistsError(f"{n.folder(out)} was taken by another run started at the same time (its {CONFIG} "
                              f"appeared after this run found the folder empty); choose another {n.out}") from None


def write_metrics(out: Path, history: list[dict[str, float]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=METRIC_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: _fmt(row.get(k)) for k in METRIC_COLUMNS})
    atomic_write_text(out / METRICS, buffer.getvalue())


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return value


def plot_curves(out: Path, history: list[dict[str, float]]) -> None:
    """Loss and accuracy per epoch, drawn with the Agg canvas directly (no pyplot, no global backend change)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    epochs = [row["epoch"] for row in history]
    figure = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(figure)
    loss_ax, acc_ax = figure.subplots(1, 2)
    for key, label in (("train_loss", "train (label-smoothed)"), ("val_loss", "validation")):
        loss_ax.plot(epochs, [row[key] for row in history], marker="o", label=label)
    accuracies = (("train_acc", "train top-1"), ("val_top1", "validation top-1"), ("val_top5", "validation top-5"))
    for key, label in accuracies:
        if all(math.isnan(row[key]) for row in history):  # no validation, or top-5 of 5 classes or fewer
            continue
        acc_ax.plot(epochs, [row[key] for row in history], marker="o", label=label)
    loss_ax.set(title="loss", xlabel="epoch", ylabel="cross-entropy")
    acc_ax.set(title="accuracy", xlabel="epoch", ylabel="%")
    for ax in (loss_ax, acc_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    _atomic_write_bytes(out / CURVES, buffer.getvalue())


def write_report(out: Path, original: nn.Module, se_model: nn.Module, input_size: tuple[int, ...],
                 name: str | None = None) -> None:
    """Parameters and MACs before and after the retrofit (and how many train), as Markdown and JSON."""
    from ..report import report

    with torch.no_grad():
        result = report(original, se_model, input_size=tuple(input_size), name=name)
    atomic_write_text(out / "report.md", result.to_markdown())
    atomic_write_text(out / "report.json", result.to_json())


def weights_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """A safetensors-ready copy: CPU, contiguous (channels_last is a stride, not a layout there)."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def weights_epoch(path: Path) -> int | None:
    """The epoch a weights file of this run records in its metadata (`save_weights`), or None."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return int((f.metadata() or {}).get("epoch", ""))
    except (OSError, ValueError, SafetensorError):
        return None


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """A failed write of one of the run's files (most often a full disk) as one line that names the file
    and says the run continues with --resume: the file it would have replaced is intact."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as exc:
        try:
            free = f"; {shutil.disk_usage(path.parent).free / 2**20:,.0f} MiB free there"
        except OSError:
            free = ""
        raise OSError(f"could not write {path} ({first_line(exc)}{free}). The previous {path.name}, if there was "
                      f"one, is intact: free some space (or fix the folder) and continue the run with "
                      f"{names().resume}") from exc


def save_weights(path: Path, model: nn.Module, metadata: dict[str, str] | None = None) -> None:
    with writing(path):
        ckpt.atomic_save_safetensors(weights_of(model), path, metadata=metadata)


def save_adapter(out: Path, model: nn.Module, base_model: str | None, extra_modules: Iterable[str],
                 class_names: list[str] | None = None) -> Path:
    from ..adapter import save_adapter as _save_adapter

    with writing(out / "se_adapter.safetensors"):
        return Path(_save_adapter(model, out, base_model=base_model, extra_modules=tuple(extra_modules),
                                  class_names=class_names))
