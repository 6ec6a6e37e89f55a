"""Checkpoint files that are never half-written and never run code when read.

Writes go to a temporary file in the destination folder and are moved into place with ``os.replace``,
so a crash or a full disk mid-save leaves the previous checkpoint intact rather than a truncated one
that fails on resume. Reads go through safetensors or ``torch.load(weights_only=True)``: a ``.pth``
found on the internet is a pickle, and a pickle may execute arbitrary code while it is loaded.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import struct
import tempfile
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch


StrPath = str | os.PathLike

WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "state_dict_ema")
# Where training scripts keep an exponential moving average of the weights beside the raw ones: timm's
# train.py (``state_dict_ema``), DeiT's and ConvNeXt's (``model_ema``).
EMA_KEYS = ("state_dict_ema", "model_ema")

_CONVERT_COMMAND = (
    "python -c \"import torch, safetensors.torch as st; "
    "obj = torch.load('IN.pth', map_location='cpu', weights_only=False); "
    "sd = obj.state_dict() if hasattr(obj, 'state_dict') else obj.get('state_dict', obj.get('model', obj)); "
    "sd = sd.state_dict() if hasattr(sd, 'state_dict') else sd; "
    "st.save_file({k: v.detach().clone().contiguous() for k, v in sd.items() if isinstance(v, torch.Tensor)}, "
    "'OUT.safetensors')\""
)
_SHELL_UNSAFE = re.compile(r"[\"'`$\\\n!]")


def _convert_hint(path: Path) -> str:
    """The one-liner that converts ``path``, with its real name where it can be pasted into a shell as is.

    The output goes beside the input under a name that does not exist yet, so running the hint never
    overwrites a file the user has; paths a double-quoted shell string would mangle keep the placeholders.
    """
    source = path.expanduser().absolute()
    target = source.with_suffix(".safetensors")
    if target.exists():
        target = source.with_name(f"{source.stem}.converted.safetensors")
    if target.exists() or _SHELL_UNSAFE.search(str(source)):
        return ("If you trust the file, convert it once to safetensors, with IN.pth and OUT.safetensors "
                f"replaced by its path and a new file's: {_CONVERT_COMMAND}")
    command = _CONVERT_COMMAND.replace("IN.pth", str(source)).replace("OUT.safetensors", str(target))
    return f"If you trust the file, convert it once to safetensors (it writes {target}): {command}"


class UnsafeCheckpointError(ValueError):
    """A checkpoint whose unpickling would import or call something other than tensors and containers."""


# --------------------------------------------------------------------------------------------- writing

def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable; not every platform can open a directory, hence best effort."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _file_mode(path: Path) -> int:
    """The mode a plainly written file would get: the old file's when replacing one, else 0666 less the
    umask (``mkstemp`` makes its file 0600, which a rename would carry over: weights others cannot read)."""
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _atomic_write(path: StrPath, write: Callable[[Path], None], check: Callable[[Path], None] | None = None,
                  exclusive: bool = False) -> Path:
    """Run ``write(tmp)`` on a temporary sibling of ``path``, fsync it, optionally ``check(tmp)``, then rename.

    The temporary file lives in the same folder so that ``os.replace`` is a rename on one file system,
    which POSIX and Windows make atomic. ``exclusive`` publishes it only where ``path`` does not exist
    yet (``FileExistsError`` otherwise): a hard link, which fails rather than replaces, so that of two
    processes claiming one name exactly one succeeds.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, _file_mode(path))  # after the write: a writer may recreate the file
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if check is not None:
            check(tmp)
        if exclusive:
            _publish_exclusively(tmp, path)
        else:
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


_SAFE_LEAVES = (str, bytes, int, float, complex, bool, type(None))
_SAFE_TORCH = (torch.Tensor, torch.dtype, torch.device, torch.Size)


def _find_unsafe(obj: Any, where: str = "checkpoint", depth: int = 0) -> str | None:
    """Where in ``obj`` the first value ``torch.load(weights_only=True)`` refuses sits, for the error message.

    Exact types are compared on purpose: ``numpy.float64`` is a ``float`` subclass and a namedtuple a
    ``tuple`` subclass, and the safe unpickler accepts neither.
    """
    if depth > 100 or type(obj) in _SAFE_LEAVES or isinstance(obj, _SAFE_TORCH):
        return None
    if type(obj) in (dict, OrderedDict):
        items = obj.items()
    elif type(obj) in (list, tuple):
        items = enumerate(obj)
    else:
        return f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}"
    for key, value in items:
        found = _find_unsafe(value, f"{where}[{key!r}]", depth + 1)
        if found:
            return found
    return None


def _publish_exclusively(tmp: Path, path: Path) -> None:
    """Give ``tmp`` the name ``path`` unless ``path`` exists (``FileExistsError``)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # no hard links on this file system: claim the name empty, then fill it in
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        os.replace(tmp, path)
        return
    tmp.unlink()


def atomic_save(obj: Any, path: StrPath, *, check_weights_only: bool = True) -> Path:
    """``torch.save(obj, path)`` that either fully replaces ``path`` or leaves it untouched.

    With ``check_weights_only`` (the default) the written file is read back with
    ``torch.load(weights_only=True, mmap=True)`` before it replaces ``path`` (mmap: the tensors are not
    read, only the pickle is checked). A training state holding a numpy array, a dataclass or a numpy
    float would otherwise save fine and only fail on resume, hours later, when `load_checkpoint`
    refuses it; here it fails at the first save and names the offending entry.
    """
    def check(tmp: Path) -> None:
        try:
            torch.load(tmp, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:
            culprit = _find_unsafe(obj) or _unpickler_reason(exc) or f"{type(exc).__name__}: {exc}"
            raise TypeError(
                f"refusing to write {path}: torch.load(weights_only=True) could not read it back ({culprit}). "
                "Store only tensors, numbers, strings, None and lists/tuples/dicts of them "
                "(e.g. config.to_dict(), float(metric), rng_state())."
            ) from None

    return _atomic_write(path, lambda tmp: torch.save(obj, tmp), check if check_weights_only else None)


def _safetensors_ready(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, CPU, contiguous tensors, each owning its memory.

    safetensors refuses tensors that share storage (tied weights, views of one buffer) because the file
    format cannot express aliasing; cloning the second and later users of a storage writes each one
    out in full, which is what a reader expects.
    """
    seen: set[tuple[str, int]] = set()
    ready: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise TypeError(f"safetensors needs a dict of str -> Tensor; entry {name!r} is a {type(tensor).__name__}. "
                            "Pass model.state_dict() or se_state_dict(model).")
        tensor = tensor.detach()
        storage = (str(tensor.device), tensor.untyped_storage().data_ptr())
        shared = storage in seen and tensor.numel() > 0
        seen.add(storage)
        tensor = tensor.to("cpu")
        if shared or tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        ready[name] = tensor.contiguous()
    return ready


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: StrPath,
                            metadata: dict[str, str] | None = None) -> Path:
    """Write ``tensors`` as a safetensors file, atomically; see `atomic_save` for why."""
    from safetensors.torch import save_file

    if metadata is not None:
        bad = {k: v for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))}
        if bad:
            raise TypeError(f"safetensors metadata must map str to str; got {bad!r}. "
                            "Convert values with str() or json.dumps().")
    ready = _safetensors_ready(tensors)

    def write(tmp: Path) -> None:
        save_file(ready, str(tmp), metadata=metadata)
        _sort_metadata(tmp)

    return _atomic_write(path, write)


def _sort_metadata(path: Path) -> None:
    """Put the header's metadata in key order, in place: safetensors writes it from a Rust ``HashMap``,
    whose order is random in every process, so that two saves of the same tensors and metadata (a
    finished run's files written again on ``--resume``) would differ in their bytes. The header keeps
    its length, so nothing else in the file moves; a header this cannot rewrite to the same length is
    left as it was written."""
    with open(path, "r+b") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        raw = f.read(length)
        header = json.loads(raw)
        metadata = header.get("__metadata__")
        if not isinstance(metadata, dict) or len(metadata) < 2:
            return
        header["__metadata__"] = dict(sorted(metadata.items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) != len(raw.rstrip(b" ")):
            return
        f.seek(8)
        f.write(text + b" " * (length - len(text)))


# --------------------------------------------------------------------------------------------- reading

def _require_file(path: StrPath) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint file {str(path)!r} does not exist; "
                                f"check the path (absolute path: {path.absolute()}).")
    if path.is_dir():
        raise ValueError(f"checkpoint {str(path)!r} is a folder, not a file; "
                         "pass the .safetensors or .pth file inside it.")
    return path


def _unpickler_reason(exc: BaseException) -> str | None:
    match = re.search(r"WeightsUnpickler error: (.*?)(?: Please use|\n|$)", str(exc))
    return match.group(1).strip() if match else None


def _container_kind(path: Path) -> str | None:
    """What the first bytes of ``path`` say it is: ``"zip"`` (torch.save), ``"pickle"`` (the legacy
    format), ``"safetensors"`` (an 8-byte header length, then JSON), or None (neither: damaged, or
    another kind of file), so that a file the unpickler rejects is not called a dangerous pickle when
    it is no pickle at all."""
    try:
        with open(path, "rb") as f:
            head = f.read(10)
    except OSError:
        return None
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return "pickle"
    if len(head) >= 10 and head[8:10] == b'{"':
        return "safetensors"
    return None


def _check_zip_entries(path: Path) -> None:
    """Refuse a ``torch.save`` archive whose entries fail their CRC-32: ``torch.load`` does not check them,
    so a file damaged after it was written (a bad copy or download, a failing disk) would load as other
    weights without a word. One sequential read of the file. Entries saved without a checksum (CRC 0:
    ``torch.utils.serialization.config.save.compute_crc32 = False``) cannot be checked and are let through."""
    import zipfile

    bad = None
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.CRC == 0:
                    continue
                try:
                    with archive.open(info) as entry:  # zipfile compares the CRC when the entry is read to its end
                        while entry.read(1 << 24):
                            pass
                except zipfile.BadZipFile:
                    bad = info.filename
                    break
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise ValueError(f"{str(path)!r} is not a readable PyTorch checkpoint ({type(exc).__name__}: {exc}); "
                         "it may be truncated or damaged. Pass a good copy of it.") from None
    if bad is not None:
        raise ValueError(f"{str(path)!r} is damaged: its entry {bad!r} does not match the checksum written with it, "
                         "so the file changed after it was saved (a copy or download that went wrong, a failing "
                         "disk). Its weights would load as other numbers; pass a good copy of it.")


def _torch_load_weights_only(path: Path) -> Any:
    """``torch.load(weights_only=True)`` whose failures say which file and what to do; a zip archive's
    checksums are checked first (`_check_zip_entries`)."""
    import pickle

    if _container_kind(path) == "zip":
        _check_zip_entries(path)

    try:
        # timm's train.py stores its argparse.Namespace of options beside the weights; a Namespace only
        # holds attributes, so allowing it lets those checkpoints load without opening the door to code.
        with warnings.catch_warnings(), torch.serialization.safe_globals([argparse.Namespace]):
            warnings.filterwarnings("ignore", message=".*pickle protocol.*")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        kind = _container_kind(path)
        if kind == "safetensors":
            raise ValueError(f"{str(path)!r} is a safetensors file under another name: rename it to end in "
                             ".safetensors") from None
        if kind is None:
            raise ValueError(f"{str(path)!r} is not a PyTorch checkpoint: it is neither a zip archive (what "
                             "torch.save writes) nor a pickle of protocol 2 or later; it may be damaged or another kind "
                             "of file") from None
        if "weights only" in str(exc).lower() or "weights_only" in str(exc).lower():
            reason = _unpickler_reason(exc) or "it references Python objects other than tensors and containers"
            raise UnsafeCheckpointError(
                f"refusing to load {str(path)!r}: it is a pickle that would import or run code when loaded ({reason}). "
                "Only safetensors files and weights-only PyTorch checkpoints are accepted, because unpickling an "
                f"untrusted file can execute arbitrary code. {_convert_hint(path)}"
            ) from None
        raise ValueError(f"{str(path)!r} is not a PyTorch checkpoint ({exc}); "
                         "pass a .safetensors or .pth/.pt file.") from None
    except (EOFError, KeyError, RuntimeError) as exc:
        raise ValueError(f"{str(path)!r} is not a readable PyTorch checkpoint ({type(exc).__name__}: {exc}); "
                         "it may be truncated or another kind of file. Pass a .safetensors or .pth/.pt file.") from None


def _unwrap(obj: Any, path: Path, prefer_ema: bool | None) -> Any:
    """Dig the state dict out of a training checkpoint (timm, Lightning-less trainers, the ImageNet example).

    A file holding both raw and EMA weights (timm's train.py with ``--model-ema``, whose best epoch is
    chosen by the EMA's score) gets the raw ones unless ``prefer_ema``, and a warning where the caller
    did not choose (``None``): which of the two fine-tuning starts from should not pass unsaid."""
    ema = next((k for k in EMA_KEYS if isinstance(obj, Mapping) and isinstance(obj.get(k), Mapping)), None)
    raw = next((k for k in WRAPPER_KEYS if k not in EMA_KEYS and isinstance(obj, Mapping)
                and isinstance(obj.get(k), Mapping)), None)
    if prefer_ema and ema is None:
        keys = ", ".join(map(str, list(obj)[:8])) if isinstance(obj, Mapping) else type(obj).__name__
        raise ValueError(f"EMA weights were asked for (--checkpoint-ema, prefer_ema=True), but {str(path)!r} holds "
                         f"none under {' or '.join(EMA_KEYS)} (it holds: {keys}). Drop the option to load its "
                         "weights, or pass the file that holds the EMA's.")
    if prefer_ema is None and ema is not None and raw is not None:
        warnings.warn(f"{str(path)!r} holds raw weights ({raw}) and EMA weights ({ema}); loading the "
                      "raw ones. Pass prefer_ema=True (the command: --checkpoint-ema) for the EMA weights, or "
                      "prefer_ema=False (--no-checkpoint-ema) to silence this.", stacklevel=3)
    if ema is not None and raw is None:  # EMA weights alone
        if prefer_ema is False:
            raise ValueError(f"raw weights were asked for (--no-checkpoint-ema, prefer_ema=False), but {str(path)!r} "
                             f"holds only EMA weights ({ema}). Load those (--checkpoint-ema), or pass the file that "
                             "holds the raw ones.")
        if prefer_ema is None:
            warnings.warn(f"{str(path)!r} holds only EMA weights ({ema}); loading them. Pass prefer_ema=True (the "
                          "command: --checkpoint-ema) to silence this.", stacklevel=3)
    keys = (ema, *WRAPPER_KEYS) if ema is not None and (prefer_ema or raw is None) else WRAPPER_KEYS
    for _ in range(3):
        if not isinstance(obj, Mapping):
            break
        inner = next((obj[k] for k in keys if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise ValueError(f"{str(path)!r} holds a {type(obj).__name__}, not a state dict; "
                         "save model.state_dict() instead.")
    not_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ValueError(f"{str(path)!r} does not look like a state dict: entries {not_tensors[:5]} are not tensors. "
                         f"Save model.state_dict(), or a dict holding it under one of {list(WRAPPER_KEYS)}.")
    return obj


# What wrappers put before every key of the model they wrap: DistributedDataParallel, DataParallel and
# torch.optim.swa_utils.AveragedModel (torchvision's reference EMA) `module.`, torch.compile `_orig_mod.`.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _strip_module_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove the prefixes wrappers put before every key (`_WRAPPER_PREFIXES`, nested in any order), and
    the ``n_averaged`` count an ``AveragedModel`` keeps beside its ``module.`` weights."""
    state = dict(state)
    if len(state) > 1 and "n_averaged" in state and all(k.startswith("module.") for k in state if k != "n_averaged"):
        del state["n_averaged"]
    left = list(_WRAPPER_PREFIXES)  # each wrapper once: a model's own child may be named `module`
    while state and left:
        prefix = next((p for p in left if all(k.startswith(p) for k in state)), None)
        if prefix is None:
            return state
        left.remove(prefix)
        state = {k[len(prefix):]: v for k, v in state.items()}
    return state


# Through se_retrofit's own loader, so that the keys the command filters are the ones the refusal saw:
# the file unwrapped and its EMA or raw weights chosen as `load_weights` did, wrapper prefixes dropped.
_EXTRACT_COMMAND = (
    "python -c \"from se_retrofit.checkpoint import load_weights; import safetensors.torch as st; "
    "sd = load_weights('IN'OPTIONS); "
    "st.save_file({k[len('PREFIX'):]: v.detach().clone().contiguous() for k, v in sd.items() "
    "if k.startswith('PREFIX')}, 'OUT.safetensors')\""
)


def _extract_hint(path: Path, prefix: str, options: dict[str, Any]) -> str:
    """The one-liner that writes the weights under ``prefix`` of ``path``, without it, to a new safetensors
    file beside it (placeholders where the path would not survive a shell, as in `_convert_hint`).

    ``options`` are the `load_weights` arguments of the refused call other than their defaults, passed on
    so that the command reads the same keys."""
    source = path.expanduser().absolute()
    target = source.with_name(f"{source.stem}.{prefix.rstrip('.')}.safetensors")
    given = "".join(f", {name}={value!r}" for name, value in options.items())
    command = _EXTRACT_COMMAND.replace("PREFIX", prefix).replace("OPTIONS", given)
    if target.exists() or _SHELL_UNSAFE.search(str(source)) or _SHELL_UNSAFE.search(prefix):
        return (f"Extract them once, with the Python se_retrofit is installed in and IN and OUT.safetensors "
                f"replaced by its path and a new file's: {command}, then pass OUT.safetensors.")
    command = command.replace("'IN'", f"'{source}'").replace("OUT.safetensors", str(target))
    return (f"Extract them once, with the Python se_retrofit is installed in (it writes {target}): {command}, "
            "then pass that file.")


def _strip_attribute_prefix(state: dict[str, torch.Tensor], model: torch.nn.Module, path: Path,
                            options: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Remove the attribute name a training framework kept the network under: PyTorch Lightning saves the
    LightningModule's state dict, so a network held as ``self.model`` puts ``model.`` before every key.

    Removed only where that is the one reading: every key carries the prefix, ``model`` has no child of
    that name, and without it every key names a tensor of ``model``. A file that holds the whole network
    under a prefix but is not that case (other entries beside it: a loss's weights, a second network; or
    a model with its own child of that name) is refused with the command that extracts the network's
    weights, since which keys are the network's is then the user's call (``options``: the `load_weights`
    arguments that read ``state``, for that command).
    """
    own = model.state_dict()
    if state.keys() <= own.keys():
        return state
    children = dict(model.named_children())
    for name in sorted({key.split(".", 1)[0] for key in state if "." in key}):
        prefix = f"{name}."
        under = [key for key in state if key.startswith(prefix)]
        stripped = {key[len(prefix):] for key in under}
        if not stripped <= own.keys():
            continue
        own_child = name in children or any(k.startswith(prefix) for k in own)
        if len(under) == len(state) and not own_child:
            return {key[len(prefix):]: value for key, value in state.items()}
        if not all(k in stripped or k.endswith(".num_batches_tracked") for k in own):
            continue  # not the whole network under it: left to the load's own error
        others = [key for key in state if not key.startswith(prefix)]
        why = (f"beside {len(others)} other {'entry' if len(others) == 1 else 'entries'} ({', '.join(others[:3])}"
               f"{', ...' if len(others) > 3 else ''})"
               if others else f"and {type(model).__name__} has a child named {name!r} itself, so the prefix is "
                              "not dropped by guessing")
        raise ValueError(
            f"{str(path)!r} holds the weights of {type(model).__name__} under {prefix!r} (the attribute a PyTorch "
            f"Lightning module or another wrapper kept the network in), {why}. {_extract_hint(path, prefix, options)}")
    return state


def load_weights(path: StrPath, *, prefer_ema: bool | None = None, strip_ddp_prefix: bool = True,
                 model: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """A model state dict from a ``.safetensors`` file or a weights-only PyTorch checkpoint, on the CPU.

    Training checkpoints that wrap the weights (``{"state_dict": ..., "epoch": ...}``) are unwrapped. With
    ``prefer_ema=True`` an EMA copy (`EMA_KEYS`) wins over the raw weights, and a file without one is an
    error; with ``False`` the raw weights, and a file of EMA weights alone is an error; left as None, a
    file with both loads the raw ones and warns, and one with EMA weights alone loads them and warns.
    A pickle that needs anything beyond tensors and containers raises `UnsafeCheckpointError` without
    running it.
    ``strip_ddp_prefix`` drops a ``module.`` or ``_orig_mod.`` that every key starts with (a user's checkpoint
    saved from a ``DistributedDataParallel``, ``AveragedModel`` or ``torch.compile`` wrapper); files this
    package wrote itself have none to drop, and a model whose only child is named ``module`` needs it kept.
    Given the ``model`` the weights are for, the name of the attribute a training framework kept it under
    (PyTorch Lightning's ``model.``) is dropped too, where that is the one reading (`_strip_attribute_prefix`).
    """
    path = _require_file(path)
    if path.suffix.lower() == ".safetensors":
        if prefer_ema:
            raise ValueError(f"EMA weights were asked for (--checkpoint-ema, prefer_ema=True), but {str(path)!r} is a "
                             "safetensors file, which holds one set of weights. Drop the option to load them, or "
                             "pass the training checkpoint that holds the EMA's.")
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path), device="cpu")
        except SafetensorError as exc:
            raise ValueError(f"{str(path)!r} is not a valid safetensors file ({exc}); it may be truncated. "
                             "Re-export it, or pass the original checkpoint.") from None
    else:
        state = _unwrap(_torch_load_weights_only(path), path, prefer_ema)
    state = _strip_module_prefix(state) if strip_ddp_prefix else dict(state)
    if model is None:
        return state
    options = {name: value for name, value, default in (("prefer_ema", prefer_ema, None),
                                                        ("strip_ddp_prefix", strip_ddp_prefix, True))
               if value != default}
    return _strip_attribute_prefix(state, model, path, options)


def load_checkpoint(path: StrPath) -> dict[str, Any]:
    """A full training state written by `atomic_save`, read with ``weights_only=True``.

    The same refusal as `load_weights` applies: a resume file is as much an attack surface as a
    downloaded one, since run folders get shared and copied around.
    """
    path = _require_file(path)
    state = _torch_load_weights_only(path)
    if not isinstance(state, dict):
        raise ValueError(f"{str(path)!r} holds a {type(state).__name__}, not a training checkpoint dict; "
                         "pass a file written by the trainer (e.g. last.pt).")
    return state
