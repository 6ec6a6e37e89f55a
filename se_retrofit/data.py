"""Datasets for fine-tuning: scikit-learn's bundled digits, or a folder of images.

The digits are there so that the README's demo fine-tunes on real images without a download and in a
few minutes on a laptop CPU. Folders follow torchvision's ImageFolder layout, but are scanned here
rather than by ``ImageFolder`` so that a broken file, an empty class or a train/val class mismatch is
reported before training starts, by name, instead of as a stack trace in a DataLoader worker at epoch 3.
"""
from __future__ import annotations

import os
import unicodedata
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from .pixels import to_rgb, unsupported_mode

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# Image types left out of IMG_EXTENSIONS (as torchvision's ImageFolder leaves them out): files of these are
# not loaded, and a folder of them must not shrink without a word.
_OTHER_IMAGE_EXTENSIONS = (".gif", ".jfif", ".jpe", ".heic", ".heif", ".avif", ".jp2", ".j2k", ".ico", ".tga",
                           ".dib", ".pbm", ".pnm", ".svg")
DIGITS_SIZE = 32
_LAYOUT_HINT = ("Expected DIR/train/CLASS/*.jpg and DIR/val/CLASS/*.jpg, or DIR/CLASS/*.jpg (split by --val-split), "
                "or 'digits' for the built-in dataset.")


class ImageFiles(Dataset):
    """``(image, class index)`` pairs from a list of files; ImageFolder's behaviour, given the list.

    Attributes:
        samples: ``(path, class index)`` for every image.
        classes: class names, index order.
        targets: the class index of every sample (for stratification and per-class metrics).
        verified: whether every file was opened and verified before (what a decode error can blame).
    """

    def __init__(self, samples: list[tuple[Path, int]], classes: list[str], transform: Callable | None = None,
                 verified: bool = True) -> None:
        self.samples = samples
        self.classes = classes
        self.targets = [target for _, target in samples]
        self.transform = transform
        self.verified = verified

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, target = self.samples[index]
        try:
            with Image.open(path) as image:
                problem = unsupported_mode(image)
                if problem is None:
                    image = _upright(to_rgb(image), image)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            if not self.verified:
                raise OSError(f"could not decode image {path} ({exc}); the images were not checked before training "
                              "(--no-verify-images; verify_images=False), a check that finds such files and skips "
                              "them with a warning. Replace it with a good copy and resume the run (--resume, "
                              "resume=True); or start a new run in another output folder with the check, since a "
                              "resumed run must see the data it started with (a run that saved no checkpoint yet "
                              "restarts when resumed).") from exc
            # worded for both callers: this may run in a data-loader worker, which does not know which one it serves
            raise OSError(f"could not decode image {path} ({exc}); the up-front check only catches broken headers "
                          "and checksums. Replace it with a good copy and resume the run (--resume, resume=True); "
                          "or delete it and start a new run in another output folder, since a resumed run must see "
                          "the data it started with (a run that saved no checkpoint yet restarts when resumed).") from exc
        if problem is not None:
            raise ValueError(f"cannot use image {path}: {problem}")
        return (self.transform(image) if self.transform else image), target


# EXIF orientation -> the transpose that shows the image as its camera saw it (Pillow's ``exif_transpose``).
_ORIENTATIONS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
                 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                 8: Image.Transpose.ROTATE_90}


def _upright(rgb: Image.Image, original: Image.Image) -> Image.Image:
    """``rgb`` (converted from ``original``) turned as ``original``'s EXIF orientation says: a phone stores a
    portrait photo sideways with that tag. Read from the file's image, since a conversion drops it; EXIF
    data Pillow cannot parse leaves the image as stored (its pixels decoded fine)."""
    try:
        method = _ORIENTATIONS.get(original.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - a damaged EXIF block is not a damaged image
        method = None
    return rgb if method is None else rgb.transpose(method)


class DigitsImages(Dataset):
    """scikit-learn's 8x8 digits as normalised RGB tensors of ``size`` pixels.

    The images are upscaled once (bilinear) and kept as uint8, so an epoch costs no resizing; training
    samples get a random shift of up to 1/8 of the image, a digit-safe augmentation (flips and large
    crops would turn a 6 into a 9 or cut a stroke off).
    """

    def __init__(self, images: torch.Tensor, targets: list[int], classes: list[str],
                 mean: tuple[float, ...], std: tuple[float, ...], train: bool) -> None:
        self.images = images
        self.targets = targets
        self.classes = classes
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.train = train

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index].float().div(255).expand(3, -1, -1)
        if self.train:
            size = image.shape[-1]
            pad = max(1, size // 8)
            padded = F.pad(image, (pad, pad, pad, pad))
            top, left = torch.randint(0, 2 * pad + 1, (2,)).tolist()
            image = padded[:, top:top + size, left:left + size]
        return (image - self.mean) / self.std, self.targets[index]


def _check_val_split(val_split: float) -> None:
    if isinstance(val_split, bool) or not isinstance(val_split, (int, float)) or not 0 < val_split < 1:
        raise ValueError(f"val_split must be a fraction between 0 and 1 (exclusive), got {val_split!r}; "
                         "0.1 keeps a tenth of each class for validation.")


def _stratified_split(targets: list[int], val_split: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of a per-class random split; the same ``seed`` gives the same split on every machine.

    Each class with two or more images puts at least one in each part, so validation covers every
    class that can spare an image; a single-image class stays in training.
    """
    rng = np.random.default_rng(seed)
    labels = np.asarray(targets)
    train, val = [], []
    for label in sorted(set(targets)):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_val = min(max(int(round(len(members) * val_split)), 1), len(members) - 1) if len(members) > 1 else 0
        val.extend(members[:n_val].tolist())
        train.extend(members[n_val:].tolist())
    return sorted(train), sorted(val)


def _data_config(model: nn.Module, image_size: int | None) -> dict[str, Any]:
    from timm.data import resolve_data_config

    config = resolve_data_config({}, model=model)
    if image_size is not None:
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive number of pixels, got {image_size!r}; e.g. 32 or 224.")
        config["input_size"] = (3, image_size, image_size)
    return config


# --------------------------------------------------------------------------------------------- digits

def _digits_size(model: nn.Module, image_size: int | None) -> int:
    """``image_size``, else a CPU-friendly 32 px, raised to what the model says it needs."""
    if image_size is not None:
        return image_size
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if cfg.get("fixed_input_size") and cfg.get("input_size"):
        return int(cfg["input_size"][-1])
    minimum = cfg.get("min_input_size")
    return max(DIGITS_SIZE, int(minimum[-1])) if minimum else DIGITS_SIZE


def _digits(model: nn.Module, val_split: float, seed: int,
            image_size: int | None) -> tuple[Dataset, Dataset, list[str]]:
    from sklearn.datasets import load_digits

    _check_val_split(val_split)
    config = _data_config(model, image_size)
    size = _digits_size(model, image_size)
    digits = load_digits()
    pixels = torch.from_numpy(digits.images).float().div(16).unsqueeze(1)
    upscaled = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False)
    images = upscaled.clamp(0, 1).mul(255).round().to(torch.uint8)
    targets = [int(t) for t in digits.target]
    classes = [str(name) for name in digits.target_names]
    train_idx, val_idx = _stratified_split(targets, val_split, seed)

    def part(indices: list[int], train: bool) -> DigitsImages:
        return DigitsImages(images[indices], [targets[i] for i in indices], classes,
                            config["mean"], config["std"], train)

    return part(train_idx, True), part(val_idx, False), classes


# --------------------------------------------------------------------------------------------- folders

def _visible(name: str) -> bool:
    """Hidden entries are skipped: macOS leaves ``._photo.jpg`` AppleDouble files that are not images."""
    return not name.startswith(".")


# How dataset exports name their splits (torchvision and timm: train/val; Kaggle and Roboflow: valid).
_TRAIN_NAMES = ("train", "training")
_VAL_NAMES = ("val", "valid", "validation")
_SPLIT_NAMES = _TRAIN_NAMES + _VAL_NAMES + ("test", "testing")


def _split_dir(root: Path, names: tuple[str, ...]) -> Path | None:
    """The sub-folder of ``root`` named for a split (any of ``names``, in any case) that holds class
    folders, if there is one; a folder of images named ``train`` is a class (of vehicles, say)."""
    found = [p for p in root.iterdir() if p.is_dir() and p.name.lower() in names
             and any(q.is_dir() and _visible(q.name) for q in p.iterdir())]
    if len(found) > 1:
        raise ValueError(f"{root} has {len(found)} folders for one split ({', '.join(sorted(p.name for p in found))}): "
                         f"which one to use is a guess. Keep one of them. {_LAYOUT_HINT}")
    return found[0] if found else None


def _holds_images(folder: Path) -> bool:
    """Whether any image (of the loaded types) is under ``folder``; stops at the first."""
    for _, subdirs, files in os.walk(folder):  # links not followed: one back up the tree would find the root's
        subdirs[:] = [d for d in subdirs if _visible(d)]
        if any(_visible(f) and f.lower().endswith(IMG_EXTENSIONS) for f in files):
            return True
    return False


def _check_folders_beside_train(root: Path, split: Path) -> None:
    """Refuse folders of images beside a training folder that has no validation folder beside it: either
    ``split`` is a class named like a split whose images sit in sub-folders (``vehicles/{bus,car,train}``,
    which would train a model on the sub-folders of ``train`` alone) or the others are data left out
    (``unlabeled/``). Which one is a guess. Beside a train and a val folder, a layout no class folder
    makes by accident, other folders are the user's (previews, masks, unlabeled images)."""
    others = sorted(p.name for p in root.iterdir() if p.is_dir() and _visible(p.name)
                    and p.name.lower() not in _SPLIT_NAMES and _holds_images(p))
    if others:
        shown = ", ".join(repr(name) for name in others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        raise ValueError(f"{root} holds a {split.name!r} folder with sub-folders, read as the training split, and "
                         f"beside it folders of images that are not splits ({shown}), which a split layout leaves "
                         f"out. If {split.name!r} is a class, rename it (its name is a split's); if it is the "
                         f"training split, move the other folders out of {root}, or add a 'val' folder of class "
                         f"folders beside it. {_LAYOUT_HINT}")


def _check_unused_val_folder(root: Path, train_dir: Path) -> None:
    """A validation folder without class sub-folders would be passed over for a split of ``train``."""
    for folder in (p for p in root.iterdir() if p.is_dir() and p.name.lower() in _VAL_NAMES):
        files = [q for q in folder.iterdir() if _visible(q.name)]
        if files:
            raise ValueError(f"{folder} holds {len(files)} entries but no class sub-folders, so it cannot be used "
                             f"for validation (ImageNet's raw val folder is flat: its label file sorts it). Sort its "
                             f"images into the class folders of {train_dir.name!r}, or move it away to validate on "
                             "a --val-split of the training images.")
        warnings.warn(f"{folder} is empty and not used: validation is a --val-split of {train_dir.name!r}.",
                      stacklevel=5)


def _class_dirs(root: Path) -> list[Path]:
    """The class sub-folders of ``root``; at least two, since one class trains to 100% without learning.

    Sub-folders that are all named like splits (``Train`` and ``Test``) are a layout one level off, not
    classes: trained on, they would teach which split an image is in."""
    # a link to nowhere named like a folder (no file suffix): a class folder on an unmounted drive
    dangling = sorted(p for p in root.iterdir() if p.is_symlink() and not p.exists() and _visible(p.name)
                      and not p.suffix)
    if dangling:
        raise ValueError(f"{dangling[0]} is a link to {os.readlink(dangling[0])}, which does not exist"
                         f"{f' ({len(dangling)} such links)' if len(dangling) > 1 else ''}: a class folder there "
                         "would be left out and the classifier trained without that class. Mount or restore the "
                         "target, or remove the link.")
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and _visible(p.name))
    if not dirs:
        raise ValueError(f"{root} has no class sub-folders. {_LAYOUT_HINT}")
    if len(dirs) > 1 and all(p.name.lower() in _SPLIT_NAMES for p in dirs):
        raise ValueError(f"the sub-folders of {root} ({', '.join(p.name for p in dirs)}) are named like dataset "
                         f"splits, not classes. {_LAYOUT_HINT} (split folder names: any case of "
                         f"{'/'.join(_TRAIN_NAMES)} and {'/'.join(_VAL_NAMES)}).")
    if len(dirs) < 2:
        inner = [p for p in dirs[0].iterdir() if p.is_dir() and _visible(p.name)]
        deeper = (f" {dirs[0]} itself holds {len(inner)} folders: is the dataset one level down (pass {dirs[0]})?"
                  if len(inner) >= 2 else "")
        raise ValueError(f"{root} has 1 class sub-folder ({dirs[0].name!r}), but a classifier needs at least 2 "
                         f"classes (with one, every prediction is right and nothing is learnt).{deeper} Add a "
                         f"sub-folder of images for each other class. {_LAYOUT_HINT}")
    return dirs


def _loose_images(root: Path) -> list[Path]:
    """Image files directly in ``root``, beside its class folders: they belong to no class, so they are
    not used (a photo dropped one level too high, a class's image saved next to its folder)."""
    return sorted(p for p in root.iterdir() if _visible(p.name) and p.is_file()
                  and p.name.lower().endswith(IMG_EXTENSIONS + _OTHER_IMAGE_EXTENSIONS))


def _unvisited_dirs(folder: Path, names: list[str], visited: set[str]) -> list[str]:
    """``names`` (sub-folders of ``folder``) whose real path is not in ``visited``, which gains them.

    Links are followed, so without this a link back up the tree (``ln -s . again``) is walked again at
    every level until the path gets too long, repeating each image dozens of times.
    """
    kept = []
    for name in names:
        real = os.path.realpath(folder / name)
        if real not in visited:
            visited.add(real)
            kept.append(name)
    return kept


def _unseen_files(paths: list[Path], seen: set[str]) -> list[Path]:
    """``paths`` whose real path is not in ``seen``, which gains them: a file reachable twice (through a
    link) counts once, so a stratified split cannot put one copy in train and the other in val."""
    kept = []
    for path in paths:
        real = os.path.realpath(path)
        if real not in seen:
            seen.add(real)
            kept.append(path)
    return kept


def _image_files(class_dir: Path, ignored: list[Path]) -> list[Path]:
    """The images under ``class_dir`` and its sub-folders, following links but each folder and file once;
    files of other image types go to ``ignored``."""
    found: list[Path] = []
    visited_dirs = {os.path.realpath(class_dir)}
    seen_files: set[str] = set()
    for folder, subdirs, files in os.walk(class_dir, followlinks=True):
        subdirs[:] = _unvisited_dirs(Path(folder), sorted(d for d in subdirs if _visible(d)), visited_dirs)
        images = [Path(folder) / f for f in sorted(files) if _visible(f) and f.lower().endswith(IMG_EXTENSIONS)]
        ignored.extend(Path(folder) / f for f in sorted(files) if _visible(f)
                       and f.lower().endswith(_OTHER_IMAGE_EXTENSIONS))
        found.extend(_unseen_files(images, seen_files))
    return found


def _check_image(path: Path) -> tuple[bool, str | None]:
    """``(readable, why its pixels cannot be used)``: the header and, for PNG, checksums, and the pixel type."""
    try:
        with Image.open(path) as image:
            problem = unsupported_mode(image)
            image.verify()
    except Image.DecompressionBombError:  # a good file, only too large for Pillow's guard: skipped as such
        return False, _TOO_LARGE
    except Exception:
        return False, None
    return True, problem


_TOO_LARGE = "too large"


# What `check_images` reports for a file: (readable, why its pixels cannot be used).
ImageCheck = tuple[bool, str | None]


@dataclass
class _Walk:
    """The walk of a data folder (its class folders, and the files found in each, with the position of
    the first in the whole list), recorded by `list_images` and replayed by the `build_datasets` that
    follows it, so that a process walks a large folder once."""

    class_dirs: dict[Path, list[Path]] = field(default_factory=dict)
    loose: dict[Path, list[Path]] = field(default_factory=dict)  # images beside each root's class folders
    images: dict[Path, tuple[list[Path], list[Path], int]] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)


@dataclass(frozen=True)
class FolderListing:
    """The image files of a data folder in the order `build_datasets` scans them (``files``), listed
    without opening any (`list_images`), with the walk that found them and, where the listing stopped
    early, the error it stopped at (``stopped``; `build_datasets` raises it, or an earlier one)."""

    files: list[Path]
    walk: _Walk = field(repr=False)
    stopped: str | None = None


@dataclass(frozen=True)
class ImageChecks:
    """What `check_images` found wrong with the files of ``listing``, by position in ``listing.files``,
    possibly merged from the shares of several processes: every listed file not in ``problems`` passed.
    `build_datasets` takes these (``checked=``) instead of opening those files again."""

    listing: FolderListing
    problems: Mapping[int, ImageCheck]


@dataclass
class _Findings:
    """What the scans of one data folder collect besides the images, and how far they have got.

    ``progress`` is called with the number of images looked at so far after each class folder: a folder
    of a million images takes minutes to verify, and a silent start looks like a hang. ``walk``, when
    given, is recorded (``listing``: no checks at all) or replayed, with the ``checked`` results.
    """

    verify: bool
    progress: Callable[[int], None] | None = None
    checked: ImageChecks | None = None
    walk: _Walk | None = None
    listing: bool = False
    looked_at: int = 0
    skipped: list[Path] = field(default_factory=list)    # unreadable
    ignored: list[Path] = field(default_factory=list)    # image types that are not loaded
    oversized: list[Path] = field(default_factory=list)  # over Pillow's size guard
    loose: list[Path] = field(default_factory=list)      # beside the class folders, in no class

    def class_dirs(self, root: Path) -> list[Path]:
        """The class folders of ``root``; the images beside them go to ``loose``."""
        walk = self.walk
        if walk is not None and root in walk.class_dirs:
            self.loose.extend(walk.loose.get(root, []))
            return walk.class_dirs[root]
        dirs = _class_dirs(root)
        loose = _loose_images(root)
        self.loose.extend(loose)
        if walk is not None and self.listing:
            walk.class_dirs[root] = dirs
            walk.loose[root] = loose
        return dirs

    def images(self, class_dir: Path) -> tuple[list[Path], int | None]:
        """The image files of ``class_dir``, and the position of the first in the listing (None: not listed)."""
        walk = self.walk
        if walk is not None and class_dir in walk.images:
            found, ignored, start = walk.images[class_dir]
            self.ignored.extend(ignored)
            return found, start
        ignored: list[Path] = []
        found = _image_files(class_dir, ignored)
        self.ignored.extend(ignored)
        if walk is None or not self.listing:
            return found, None
        walk.images[class_dir] = (found, ignored, len(walk.files))
        walk.files.extend(found)
        return found, len(walk.files) - len(found)

    def checks(self, paths: list[Path], start: int | None) -> list[ImageCheck]:
        if not self.verify:  # a listing runs with verify=False
            return [(True, None)] * len(paths)
        if start is None or self.checked is None:
            return [_check_image(p) for p in paths]
        problems = self.checked.problems
        return [problems.get(start + i, (True, None)) for i in range(len(paths))]


def _scan(root: Path, found: _Findings, allow_empty: bool = False) -> tuple[list[str], dict[str, list[Path]]]:
    """Class names and their readable images under ``root``; the rest goes to ``found``.

    ``allow_empty`` lets a class folder hold no image: in a validation folder, a rare class may have
    none, while its folder keeps the class indices those of the training folder. A listing
    (``found.listing``) raises none of the errors about the images themselves, which depend on their checks
    and are for the scan after it to raise, in its order."""
    classes = [d.name for d in found.class_dirs(root)]
    files: dict[str, list[Path]] = {}
    for name in classes:
        class_dir = root / name
        candidates, start = found.images(class_dir)
        if not candidates and (allow_empty or found.listing):
            files[name] = []
            continue
        if not candidates:
            raise ValueError(f"class folder {class_dir} holds no images (looked for {', '.join(IMG_EXTENSIONS)}); "
                             "add images to it or remove the folder.")
        checks = found.checks(candidates, start)
        found.looked_at += len(candidates)
        if found.progress is not None:
            found.progress(found.looked_at)
        _refuse_unsupported(class_dir, candidates, [problem if ok else None for ok, problem in checks])
        readable = [ok for ok, _ in checks]
        good = [p for p, ok in zip(candidates, readable) if ok]
        bad = [p for p, (ok, why) in zip(candidates, checks) if not ok and why != _TOO_LARGE]
        found.oversized.extend(p for p, (ok, why) in zip(candidates, checks) if not ok and why == _TOO_LARGE)
        if not good:
            raise ValueError(f"class folder {class_dir} holds no readable images: all {len(candidates)} files are "
                             "corrupt, not images or over Pillow's size limit. Replace them or remove the folder.")
        found.skipped.extend(bad)
        files[name] = good
    shared = None if found.listing else _first_shared_file(files)
    if shared:
        path, first, second = shared
        raise ValueError(f"the image {path} is in two classes, {first!r} and {second!r} (through a link or a "
                         "linked folder): a sample has one label. Remove one of the two links.")
    return classes, files


def _refuse_unsupported(class_dir: Path, paths: list[Path], problems: list[str | None]) -> None:
    """An error naming the images whose pixels cannot be used: skipping them would change the data set."""
    bad = [(path, problem) for path, problem in zip(paths, problems) if problem]
    if bad:
        shown = ", ".join(str(path) for path, _ in bad[:5]) + (", ..." if len(bad) > 5 else "")
        raise ValueError(f"{len(bad)} image(s) in {class_dir} cannot be used as they are ({shown}): {bad[0][1]}")


def _first_shared_file(groups: dict[str, list[Path]]) -> tuple[Path, str, str] | None:
    """A file (by real path) found under two of ``groups``, with the two group names, if any."""
    owner: dict[str, str] = {}
    for group, paths in groups.items():
        for path in paths:
            real = os.path.realpath(path)
            if owner.setdefault(real, group) != group:
                return path, owner[real], group
    return None


def _samples(classes: list[str], files: dict[str, list[Path]]) -> list[tuple[Path, int]]:
    return [(path, index) for index, name in enumerate(classes) for path in files[name]]


def _scan_layout(root: Path, found: _Findings, val_split: float | None
                 ) -> tuple[list[str], dict[str, list[Path]], dict[str, list[Path]] | None]:
    """The classes and readable images of ``root``'s training folder and of its validation folder, or
    None for the latter where validation is a split of the former (``val_split`` is checked first there,
    before a long scan; None: not checked)."""
    if not root.exists():
        raise FileNotFoundError(f"data folder {str(root)!r} does not exist (absolute path: {root.absolute()}). "
                                f"Check the path. {_LAYOUT_HINT}")
    if not root.is_dir():
        raise ValueError(f"data path {str(root)!r} is a file, not a folder. {_LAYOUT_HINT}")
    train_dir, val_dir = _split_dir(root, _TRAIN_NAMES), _split_dir(root, _VAL_NAMES)
    if train_dir is not None and val_dir is None:
        _check_folders_beside_train(root, train_dir)
    if val_dir is not None and train_dir is None:
        raise ValueError(f"{root} has a {val_dir.name!r} folder but no 'train' folder; add {root / 'train'} (or, if "
                         f"{val_dir.name!r} is a class whose images sit in sub-folders, rename it: its name is a "
                         f"split's). {_LAYOUT_HINT}")

    if train_dir is not None and val_dir is not None:
        classes, train_files = _scan(train_dir, found)
        val_classes, val_files = _scan(val_dir, found, allow_empty=True)
        if classes != val_classes:
            only_train = sorted(set(classes) - set(val_classes))
            only_val = sorted(set(val_classes) - set(classes))
            if sorted(unicodedata.normalize("NFC", c) for c in classes) == \
                    sorted(unicodedata.normalize("NFC", c) for c in val_classes):
                raise ValueError(f"{train_dir} and {val_dir} name the classes {only_train[:5]} in different Unicode "
                                 "forms (composed and decomposed accents: macOS writes the decomposed one), so they "
                                 "look alike but are different folder names; rename the folders of one split.")
            raise ValueError(f"{train_dir} and {val_dir} have different classes (only in train: {only_train[:10]}, "
                             f"only in val: {only_val[:10]}); class indices would not match. "
                             "Give both folders the same class sub-folders (a class without validation images "
                             "can have an empty folder in val).")
        if not any(val_files.values()):
            raise ValueError(f"{val_dir} holds no images in any class folder; add validation images, or move it "
                             "away to validate on a --val-split of the training images.")
        leak = _first_shared_file({"train": [p for v in train_files.values() for p in v],
                                   "val": [p for v in val_files.values() for p in v]})
        if leak:
            raise ValueError(f"the image {leak[0]} is in both {train_dir} and {val_dir} (through a link): "
                             "validation would measure memorisation. Remove it from one of them.")
        return classes, train_files, val_files
    if val_split is not None:
        _check_val_split(val_split)
    if train_dir is not None:
        _check_unused_val_folder(root, train_dir)
    test_dir = _split_dir(root, ("test", "testing")) if train_dir is not None else None
    if test_dir is not None:
        warnings.warn(f"{test_dir} is not used: with no validation folder beside {train_dir.name!r}, validation "
                      f"is a --val-split of it. To validate on {test_dir.name!r}, rename it 'val'.", stacklevel=4)
    classes, files = _scan(train_dir or root, found)
    return classes, files, None


def _folder(root: Path, model: nn.Module, val_split: float, seed: int, image_size: int | None,
            found: _Findings) -> tuple[Dataset, Dataset, list[str]]:
    from timm.data import create_transform

    classes, train_files, val_files = _scan_layout(root, found, val_split)
    if val_files is not None:
        train_samples, val_samples = _samples(classes, train_files), _samples(classes, val_files)
    else:
        samples = _samples(classes, train_files)
        train_idx, val_idx = _stratified_split([t for _, t in samples], val_split, seed)
        train_samples, val_samples = [samples[i] for i in train_idx], [samples[i] for i in val_idx]
    ignored, oversized, skipped, loose = found.ignored, found.oversized, found.skipped, found.loose
    if loose:
        warnings.warn(f"{len(loose)} image file(s) under {root} sit beside the class folders, in no class, and are "
                      f"not used: {', '.join(str(p) for p in loose[:5])}{', ...' if len(loose) > 5 else ''}. Move "
                      "each into the folder of its class (or out of the data folder) to silence this warning.",
                      stacklevel=3)
    if not val_samples:
        warnings.warn(f"the validation split of {root} is empty: each of its {len(classes)} classes has a single "
                      "image, which stays in training (--val-split takes at least one image from every class that "
                      "has two or more). Training runs without validation: no val_top1, and no best.safetensors. "
                      "Add images to the classes, or a 'val' folder of class folders beside a 'train' folder.",
                      stacklevel=3)
    if ignored:
        kinds = sorted({p.suffix.lower() for p in ignored})
        warnings.warn(f"ignored {len(ignored)} image file(s) of type {', '.join(kinds)} under {root} (e.g. "
                      f"{ignored[0]}): only {', '.join(IMG_EXTENSIONS)} are loaded. Convert them (or rename "
                      "JPEGs saved as .jfif/.jpe) to use them.", stacklevel=3)
    if oversized:
        warnings.warn(f"skipped {len(oversized)} image(s) over Pillow's size limit (PIL.Image.MAX_IMAGE_PIXELS, "
                      f"{Image.MAX_IMAGE_PIXELS:,} pixels, its guard against decompression bombs) under {root}: "
                      f"{', '.join(str(p) for p in oversized[:5])}{', ...' if len(oversized) > 5 else ''}. They are "
                      "not corrupt: downscale them to use them (training crops to the model's input size anyway).",
                      stacklevel=3)
    if skipped:
        shown = ", ".join(str(p) for p in skipped[:5])
        warnings.warn(f"skipped {len(skipped)} unreadable image file(s) under {root} (corrupt or not images): "
                      f"{shown}{', ...' if len(skipped) > 5 else ''}. Delete or replace them to silence this warning.",
                      stacklevel=3)
    config = _data_config(model, image_size)
    return (ImageFiles(train_samples, classes, create_transform(**config, is_training=True), found.verify),
            ImageFiles(val_samples, classes, create_transform(**config, is_training=False), found.verify),
            classes)


def build_datasets(data: str, model: nn.Module, *, val_split: float = 0.1, seed: int = 0,
                   image_size: int | None = None, verify_images: bool = True,
                   progress: Callable[[int], None] | None = None,
                   checked: ImageChecks | None = None) -> tuple[Dataset, Dataset, list[str]]:
    """``(train, val, class_names)`` for ``data``: ``"digits"`` or an image folder.

    ``"digits"``: scikit-learn's 1,797 bundled 8x8 digits, upscaled to ``image_size`` pixels (default 32,
    or the model's minimum/fixed input size when its pretrained config declares one) and normalised
    with the model's mean and std; a stratified ``val_split`` split by ``seed``.

    (A folder that happens to be called ``digits`` is reached as ``./digits``.)

    A folder: ``DIR/train`` and ``DIR/val`` of class sub-folders, used as they are; otherwise the class
    sub-folders of ``DIR`` (or of ``DIR/train`` alone), split per class by ``val_split`` and ``seed``.
    Transforms are timm's for the model's pretrained config (torchvision models get ImageNet's), at
    ``image_size`` when given. Files without an image extension and hidden files are ignored; images
    beside the class folders belong to no class and are left out, with a warning. A split that leaves
    no validation image (every class has a single one, which stays in training) warns.
    Links are followed, but a folder or file reached twice (a link loop, a linked copy) counts once,
    and one reached from two classes, or from both train and val, is an error. At least two
    classes are needed: with one, training reaches 100% accuracy without learning anything.

    Corrupt files do not stop the run: every image is opened and ``verify()``-ed up front (header and,
    for PNG, checksums), the unreadable ones are skipped, and one warning gives their number and the
    first few names; a class left with no readable image is an error, since training without it would
    silently change the label set. ``verify_images=False`` skips the check for very large folders;
    ``progress``, if given, is called with the number of images scanned so far after each class folder.
    ``checked`` gives checks already made elsewhere (`check_images` on shares of the files of
    `list_images`, in other processes): the files it covers are not opened again, nor the folder walked
    again. A file that passes ``verify`` but fails to decode later (a truncated JPEG) raises an ``OSError``
    naming it. 16-bit grayscale images are scaled to 8 bits rather than clipped at 255 (which turns
    them white); float and signed or 32-bit integer images are refused, since their value range is unknown
    (see ``se_retrofit.pixels``).
    """
    if isinstance(data, str) and data == "digits":
        return _digits(model, val_split, seed, image_size)
    walk = None if checked is None else checked.listing.walk
    return _folder(Path(data), model, val_split, seed, image_size, _Findings(verify_images, progress, checked, walk))


def image_size_used(data: str, model: nn.Module, image_size: int | None = None) -> int | list[int]:
    """The size in pixels `build_datasets` brings ``data``'s images to for ``model``: ``image_size`` when
    given, else the digits' (32, or the model's minimum or fixed size) or the model's pretrained input
    size; ``[height, width]`` where the two differ. What a run records: the option left unset says
    nothing of the size a run trained at, and a timm release may change a model's default."""
    if isinstance(data, str) and data == "digits":
        return _digits_size(model, image_size)
    height, width = (int(side) for side in _data_config(model, image_size)["input_size"][-2:])
    return height if height == width else [height, width]


def splits_for_validation(data: str) -> bool:
    """Whether `build_datasets` takes ``data``'s validation images from its training images by
    ``val_split`` (the digits, a folder without a validation folder of class folders), rather than
    from a folder of their own, where ``val_split`` has no effect."""
    if isinstance(data, str) and data == "digits":
        return True
    root = Path(data)
    return _split_dir(root, _TRAIN_NAMES) is None or _split_dir(root, _VAL_NAMES) is None


def list_images(data: str, progress: Callable[[int], None] | None = None) -> FolderListing:
    """The files `build_datasets` would open to verify in the image folder ``data``, in its scan order,
    without opening any (none for ``"digits"``).

    For sharing that work between processes: each checks a share of ``files`` (`check_images`), the
    results are merged into `ImageChecks`, and `build_datasets` takes them (and the walk recorded here,
    so that the folder is walked once), so that each image is opened once per run rather than once per
    process. Nothing here raises about the folder: where its layout or contents are wrong, the listing
    stops there (``stopped`` says why), and `build_datasets` raises the error it raises without a listing,
    in the same order. ``progress`` as there.
    """
    walk = _Walk()
    if isinstance(data, str) and data == "digits":
        return FolderListing([], walk)
    found = _Findings(verify=False, progress=progress, walk=walk, listing=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            _scan_layout(Path(data), found, None)
        except (ValueError, OSError) as exc:  # build_datasets checks the rest itself and raises
            return FolderListing(walk.files, walk, f"{type(exc).__name__}: {exc}")
    return FolderListing(walk.files, walk)


def check_images(paths: Sequence[Path], progress: Callable[[int], None] | None = None) -> dict[int, ImageCheck]:
    """Open and verify each file as `build_datasets` does, and return the ones with something wrong, by
    position in ``paths``: ``(readable, why its pixels cannot be used)``. Files that pass are left out (a
    share of a million files has few problems to send to the other processes). ``progress`` is called
    with the number checked so far, every 1,000 files and at the end."""
    problems: dict[int, ImageCheck] = {}
    for index, path in enumerate(paths):
        result = _check_image(path)
        if result != (True, None):
            problems[index] = result
        if progress is not None and (index + 1) % 1000 == 0:
            progress(index + 1)
    if progress is not None:
        progress(len(paths))
    return problems
