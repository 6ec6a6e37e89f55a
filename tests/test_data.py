"""build_datasets: the built-in digits and image folders, including the ways a folder can be wrong."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from se_retrofit.data import build_datasets
from se_retrofit.models import create_model


@pytest.fixture(scope="module")
def model():
    return create_model("resnet18", pretrained=False)


def write_image(path: Path, seed: int = 0, size: int = 12) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def write_class_folders(root: Path, counts: dict[str, int], ext: str = ".png") -> Path:
    for c, (name, n) in enumerate(counts.items()):
        for i in range(n):
            write_image(root / name / f"img{i}{ext}", seed=100 * c + i)
    return root


def labels_of(dataset) -> list[int]:
    return list(dataset.targets)


# --------------------------------------------------------------------------------------------- digits

def test_digits_is_a_stratified_deterministic_split_of_all_1797_images(model):
    train, val, classes = build_datasets("digits", model, val_split=0.1, seed=0)
    assert classes == [str(d) for d in range(10)], f"digit class names: {classes}"
    assert len(train) + len(val) == 1797, f"train {len(train)} + val {len(val)} should be all 1797 digits"
    assert 150 <= len(val) <= 210, f"val_split=0.1 gave {len(val)} validation images"
    per_class = np.bincount(labels_of(val), minlength=10)
    assert per_class.min() >= 15, f"validation should hold every class about equally, got counts {per_class.tolist()}"

    image, label = val[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32, f"digit image {image.shape} {image.dtype}"
    assert isinstance(label, int) and 0 <= label < 10, f"label {label!r}"
    assert image.std() > 0.1, "the upscaled digit should not be a blank image"
    assert torch.allclose(image[0] * 0.229 + 0.485, image[1] * 0.224 + 0.456, atol=1e-5), \
        "grey digits: the channels should be equal once the ImageNet normalisation is undone"

    again_train, again_val, _ = build_datasets("digits", model, val_split=0.1, seed=0)
    assert labels_of(again_val) == labels_of(val), "same seed must give the same split"
    assert torch.equal(again_val[5][0], val[5][0]), "validation images must be deterministic (no augmentation)"
    _, other_val, _ = build_datasets("digits", model, val_split=0.1, seed=1)
    assert not torch.equal(torch.stack([other_val[i][0] for i in range(20)]),
                           torch.stack([val[i][0] for i in range(20)])), "another seed should give another split"


def test_digits_images_stay_aligned_with_their_labels(model):
    _, val, _ = build_datasets("digits", model)
    images = torch.stack([val[i][0][0] for i in range(len(val))]).flatten(1)
    labels = torch.tensor(val.targets)
    centroids = torch.stack([images[labels == k].mean(0) for k in range(10)])
    accuracy = (torch.cdist(images, centroids).argmin(1) == labels).float().mean().item()
    assert accuracy > 0.8, f"nearest-centroid accuracy {accuracy:.2f}: images and labels look shuffled apart"


def test_digits_image_size_and_training_augmentation(model):
    train, val, _ = build_datasets("digits", model, image_size=48, val_split=0.2)
    assert train[0][0].shape == (3, 48, 48) and val[0][0].shape == (3, 48, 48), "image_size must set the size"
    torch.manual_seed(0)
    views = torch.stack([train[3][0] for _ in range(8)])
    assert not all(torch.equal(views[0], v) for v in views[1:]), "training digits should be randomly shifted"
    batch = next(iter(torch.utils.data.DataLoader(train, batch_size=16)))
    images, labels = batch
    assert images.shape == (16, 3, 48, 48) and labels.shape == (16,), f"batch shapes {images.shape} {labels.shape}"


@pytest.mark.parametrize("val_split", [0, 1, -0.1, 1.5, True])
def test_bad_val_split_is_refused(model, val_split):
    with pytest.raises(ValueError, match="val_split"):
        build_datasets("digits", model, val_split=val_split)


# --------------------------------------------------------------------------------------------- folders

def test_train_and_val_folders_are_used_as_they_are(tmp_path, model):
    write_class_folders(tmp_path / "train", {"cat": 3, "dog": 4})
    write_class_folders(tmp_path / "val", {"cat": 1, "dog": 2})
    train, val, classes = build_datasets(str(tmp_path), model, image_size=16)
    assert classes == ["cat", "dog"], f"classes {classes}"
    assert (len(train), len(val)) == (7, 3), f"sizes {(len(train), len(val))}"
    assert sorted(labels_of(val)) == [0, 1, 1], f"val labels {labels_of(val)}"
    image, label = val[0]
    assert tuple(image.shape) == (3, 16, 16), f"eval transform should give 16 px images, got {tuple(image.shape)}"
    assert tuple(train[0][0].shape) == (3, 16, 16), "training transform should give 16 px images"


@pytest.mark.parametrize("train_name,val_name", [("Train", "Val"), ("train", "valid"), ("TRAINING", "Validation")])
def test_split_folders_are_found_in_any_case_and_by_their_usual_names(tmp_path, model, train_name, val_name):
    write_class_folders(tmp_path / train_name, {"cat": 3, "dog": 4})
    write_class_folders(tmp_path / val_name, {"cat": 1, "dog": 2})
    train, val, classes = build_datasets(str(tmp_path), model, image_size=16)
    assert classes == ["cat", "dog"], f"{train_name}/{val_name} read as the classes {classes}"
    assert (len(train), len(val)) == (7, 3), f"{val_name} not used as the validation set: {(len(train), len(val))}"


@pytest.mark.parametrize("layout", [("Test", "Testing"), ("val", "valid")])
def test_split_named_class_folders_and_two_folders_for_one_split_are_errors(tmp_path, model, layout):
    """``DIR/Test`` + ``DIR/Testing`` would train a 'which split' classifier; ``val`` + ``valid``: which one?"""
    write_class_folders(tmp_path / "train" if layout[0] == "val" else tmp_path / "x", {"cat": 2, "dog": 2})
    for name in layout:
        write_class_folders(tmp_path / name, {"cat": 2, "dog": 2})
    if layout[0] != "val":
        (tmp_path / "x").rename(tmp_path / ".x")  # only the split-named folders are visible
    with pytest.raises(ValueError, match="named like dataset splits|folders for one split"):
        build_datasets(tmp_path, model)


def test_a_test_folder_beside_train_alone_is_named_as_unused(tmp_path, model):
    write_class_folders(tmp_path / "Train", {"cat": 5, "dog": 5})
    write_class_folders(tmp_path / "Test", {"cat": 2, "dog": 2})
    with pytest.warns(UserWarning, match="Test is not used.*--val-split"):
        train, val, classes = build_datasets(tmp_path, model, val_split=0.2, image_size=16)
    assert classes == ["cat", "dog"] and (len(train), len(val)) == (8, 2), f"{classes} {(len(train), len(val))}"


def test_a_flat_or_empty_val_folder_is_not_passed_over_silently(tmp_path, model):
    """ImageNet's raw val folder holds its images without class folders: it cannot be used, and a split of
    train in its place would measure something else than the user's validation set."""
    write_class_folders(tmp_path / "train", {"cat": 5, "dog": 5})
    for i in range(3):
        write_image(tmp_path / "val" / f"ILSVRC_val_{i}.JPEG", seed=50 + i)
    with pytest.raises(ValueError, match=r"val holds 3 entries but no class sub-folders.*--val-split"):
        build_datasets(tmp_path, model, image_size=16)
    for path in (tmp_path / "val").iterdir():
        path.unlink()
    with pytest.warns(UserWarning, match="val is empty and not used: validation is a --val-split of 'train'"):
        train, val, _ = build_datasets(tmp_path, model, val_split=0.2, image_size=16)
    assert (len(train), len(val)) == (8, 2), f"{(len(train), len(val))}"


def test_a_class_folder_that_is_a_broken_link_is_an_error(tmp_path, model):
    write_class_folders(tmp_path, {"cat": 3, "dog": 3})
    (tmp_path / "zebra").symlink_to(tmp_path / "unmounted" / "zebra")
    with pytest.raises(ValueError, match=r"zebra is a link to .*unmounted/zebra, which does not exist"):
        build_datasets(tmp_path, model, image_size=16)


def test_a_class_named_like_a_split_among_others_is_a_class(tmp_path, model):
    write_class_folders(tmp_path, {"bus": 3, "car": 3, "train": 3})
    _, _, classes = build_datasets(tmp_path, model, val_split=0.3, image_size=16)
    assert classes == ["bus", "car", "train"], f"classes {classes}"


@pytest.mark.parametrize("split_like", ["train", "val"])
def test_a_class_named_like_a_split_with_sub_folders_is_not_taken_for_the_split(tmp_path, model, split_like):
    """``vehicles/{bus,car,train/{steam,electric}}``: read as a split layout, the run trained a model on the
    sub-folders of ``train`` and dropped bus and car without a word."""
    write_class_folders(tmp_path, {"bus": 3, "car": 3})
    write_class_folders(tmp_path / split_like, {"steam": 2, "electric": 2})
    refusal = (r"holds a 'train' folder .* not splits \('bus', 'car'\).*rename it" if split_like == "train"
               else r"has a 'val' folder but no 'train' folder.*if 'val' is a class .* rename it")
    with pytest.raises(ValueError, match=refusal):
        build_datasets(tmp_path, model, val_split=0.3, image_size=16)


def test_other_folders_beside_a_train_and_a_val_folder_are_the_users(tmp_path, model):
    """Previews, masks, unlabeled images beside a complete split layout: no class folder makes that layout
    by accident, so they are left alone (a link back up the tree included)."""
    write_class_folders(tmp_path / "train", {"cat": 3, "dog": 3})
    write_class_folders(tmp_path / "val", {"cat": 1, "dog": 1})
    write_class_folders(tmp_path, {"unlabeled": 3})
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "labels.json").write_text("{}")
    _, _, classes = build_datasets(tmp_path, model, image_size=16)
    assert classes == ["cat", "dog"], f"classes {classes}"


def test_a_link_back_up_the_tree_beside_train_is_not_a_folder_of_images(tmp_path, model):
    write_class_folders(tmp_path / "train", {"cat": 5, "dog": 5})
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "up").symlink_to(tmp_path)
    _, _, classes = build_datasets(tmp_path, model, val_split=0.2, image_size=16)
    assert classes == ["cat", "dog"], f"classes {classes}"


def test_single_folder_is_split_per_class_deterministically(tmp_path, model):
    write_class_folders(tmp_path, {"a": 10, "b": 10, "c": 2})
    train, val, classes = build_datasets(tmp_path, model, val_split=0.3, seed=3, image_size=16)
    assert classes == ["a", "b", "c"], f"classes {classes}"
    train_files = {p for p, _ in train.samples}
    val_files = {p for p, _ in val.samples}
    assert not train_files & val_files, "a file must not be in both train and val"
    assert len(train_files | val_files) == 22, "every image must land in train or val"
    assert np.bincount(labels_of(val), minlength=3).tolist() == [3, 3, 1], f"stratified val counts {labels_of(val)}"

    _, val_again, _ = build_datasets(tmp_path, model, val_split=0.3, seed=3, image_size=16)
    assert [p for p, _ in val_again.samples] == [p for p, _ in val.samples], "same seed, same split"
    _, val_other, _ = build_datasets(tmp_path, model, val_split=0.3, seed=4, image_size=16)
    assert [p for p, _ in val_other.samples] != [p for p, _ in val.samples], "another seed, another split"


def test_a_split_that_leaves_no_validation_image_says_so_before_training(tmp_path, model):
    """A class of one image stays in training, so classes of one image each leave validation empty: the run
    would train without validation, and write no best.safetensors, without a word."""
    write_class_folders(tmp_path, {"a": 1, "b": 1})
    with pytest.warns(UserWarning, match="validation split of .* is empty") as record:
        train, val, _ = build_datasets(tmp_path, model, val_split=0.5, image_size=16)
    assert (len(train), len(val)) == (2, 0), f"{(len(train), len(val))}"
    warned = next(w for w in record if "is empty" in str(w.message))
    message = str(warned.message)
    assert "single image" in message and "best.safetensors" in message and "'val' folder" in message, message
    assert Path(warned.filename).name == "test_data.py", "the warning should point at the caller"
    write_image(tmp_path / "b" / "img1.png", seed=7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one class that can spare an image: no warning
        _, val, _ = build_datasets(tmp_path, model, val_split=0.5, image_size=16)
    assert len(val) == 1, f"{len(val)} validation images"


@pytest.mark.parametrize("layout", ["one folder", "train and val", "listed first"])
def test_images_beside_the_class_folders_are_named_in_a_warning(tmp_path, model, layout):
    """``DIR/stray.png`` beside ``DIR/a/`` and ``DIR/b/`` belongs to no class: it is left out, but not silently
    (also where a listing made elsewhere, under torchrun, replaces the walk)."""
    from se_retrofit.data import ImageChecks, check_images, list_images

    root = tmp_path / "train" if layout == "train and val" else tmp_path
    write_class_folders(root, {"a": 3, "b": 3})
    if layout == "train and val":
        write_class_folders(tmp_path / "val", {"a": 1, "b": 1})
        write_image(tmp_path / "val" / "val_stray.jpg", seed=70)
    for i in range(6):
        write_image(root / f"stray{i}.png", seed=50 + i)
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.png").write_bytes(b"")
    checked = None
    if layout == "listed first":
        listing = list_images(str(tmp_path))
        checked = ImageChecks(listing, check_images(listing.files))
    with pytest.warns(UserWarning, match="in no class") as record:
        train, val, classes = build_datasets(tmp_path, model, val_split=0.34, image_size=16, checked=checked)
    warned = [w for w in record if "in no class" in str(w.message)]
    messages = [str(w.message) for w in warned]
    assert len(messages) == 1, f"one warning expected: {messages}"
    strays = 7 if layout == "train and val" else 6
    assert messages[0].startswith(f"{strays} image file(s)"), messages[0]
    assert "stray0.png" in messages[0] and ", ..." in messages[0], f"the first few should be named: {messages[0]}"
    assert "notes.txt" not in messages[0] and ".hidden" not in messages[0], messages[0]
    assert Path(warned[0].filename).name == "test_data.py", "the warning should point at the caller"
    assert classes == ["a", "b"], classes
    assert not any("stray" in p.name for p, _ in train.samples + val.samples), "a stray image was used"


def test_train_folder_alone_is_split(tmp_path, model):
    write_class_folders(tmp_path / "train", {"x": 5, "y": 5})
    train, val, classes = build_datasets(tmp_path, model, val_split=0.2, image_size=16)
    assert classes == ["x", "y"] and (len(train), len(val)) == (8, 2), f"{classes} {(len(train), len(val))}"


def test_non_image_and_hidden_files_are_ignored(tmp_path, model):
    write_class_folders(tmp_path, {"a": 3, "b": 3})
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    (tmp_path / "a" / "._img0.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    write_image(tmp_path / "b" / "nested" / "deep.JPG", seed=9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train, val, _ = build_datasets(tmp_path, model, val_split=0.3, image_size=16)
    names = sorted(p.name for p, _ in train.samples + val.samples)
    assert names == sorted(["deep.JPG"] + [f"img{i}.png" for i in range(3)] * 2), f"scanned files {names}"


def test_symlink_loops_and_linked_copies_count_each_image_once(tmp_path, model):
    write_class_folders(tmp_path, {"a": 3, "b": 3})
    write_image(tmp_path / "a" / "nested" / "deep.png", seed=50)
    try:
        (tmp_path / "a" / "again").symlink_to(".", target_is_directory=True)
        (tmp_path / "a" / "alias").symlink_to(tmp_path / "a" / "nested", target_is_directory=True)
        (tmp_path / "b" / "copy.png").symlink_to(tmp_path / "b" / "img0.png")
    except OSError as exc:
        pytest.skip(f"cannot create symlinks here: {exc}")
    train, val, _ = build_datasets(tmp_path, model, val_split=0.5, image_size=16)
    samples = train.samples + val.samples
    real = [p.resolve() for p, _ in samples]
    assert len(samples) == 7, f"expected 4 + 3 distinct images, got {len(samples)}: {sorted(map(str, real))}"
    assert len(set(real)) == len(real), f"an image was listed twice: {sorted(map(str, real))}"
    assert not {p.resolve() for p, _ in train.samples} & {p.resolve() for p, _ in val.samples}, \
        "the same image file must not be in both train and val"


def test_an_image_linked_into_two_classes_or_into_train_and_val_is_an_error(tmp_path, model):
    write_class_folders(tmp_path / "flat", {"a": 2, "b": 2})
    write_class_folders(tmp_path / "split" / "train", {"a": 2, "b": 2})
    write_class_folders(tmp_path / "split" / "val", {"a": 2, "b": 2})
    try:
        (tmp_path / "flat" / "b" / "from_a.png").symlink_to(tmp_path / "flat" / "a" / "img0.png")
        (tmp_path / "split" / "val" / "a" / "leak.png").symlink_to(tmp_path / "split" / "train" / "a" / "img1.png")
    except OSError as exc:
        pytest.skip(f"cannot create symlinks here: {exc}")
    with pytest.raises(ValueError, match="is in two classes, 'a' and 'b'"):
        build_datasets(tmp_path / "flat", model, image_size=16)
    with pytest.raises(ValueError, match="is in both .*train and .*val"):
        build_datasets(tmp_path / "split", model, image_size=16)


def test_corrupt_files_are_skipped_with_one_warning(tmp_path, model):
    write_class_folders(tmp_path / "train", {"a": 3, "b": 3})
    write_class_folders(tmp_path / "val", {"a": 2, "b": 2})
    (tmp_path / "train" / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    good = write_image(tmp_path / "val" / "b" / "truncated.png", seed=7, size=64)
    good.write_bytes(good.read_bytes()[:200])
    with pytest.warns(UserWarning) as record:
        train, val, _ = build_datasets(tmp_path, model, image_size=16)
    messages = [str(w.message) for w in record if "unreadable" in str(w.message)]
    assert len(messages) == 1, f"expected one warning for all corrupt files, got {messages}"
    assert "skipped 2" in messages[0] and "broken.png" in messages[0] and "truncated.png" in messages[0], messages[0]
    names = {p.name for p, _ in train.samples + val.samples}
    assert not names & {"broken.png", "truncated.png"}, f"corrupt files were kept: {names}"
    assert (len(train), len(val)) == (6, 4), f"sizes {(len(train), len(val))}"


def test_a_file_broken_after_the_scan_fails_with_its_name(tmp_path, model):
    write_class_folders(tmp_path, {"a": 3, "b": 3})
    train, val, _ = build_datasets(tmp_path, model, val_split=0.3, image_size=16)
    path, _ = val.samples[0]
    path.write_bytes(b"garbage")
    with pytest.raises(OSError, match=path.name):
        val[0]


def test_class_of_only_corrupt_files_is_an_error(tmp_path, model):
    write_class_folders(tmp_path, {"a": 3})
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x.jpg").write_bytes(b"nope")
    with pytest.raises(ValueError, match=r"b.*no readable images"):
        build_datasets(tmp_path, model)


def test_empty_class_folder_is_an_error_naming_it(tmp_path, model):
    write_class_folders(tmp_path, {"a": 3})
    (tmp_path / "empty_class").mkdir()
    (tmp_path / "empty_class" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="empty_class") as info:
        build_datasets(tmp_path, model)
    assert "no images" in str(info.value), str(info.value)


def test_missing_folder_is_file_not_found_naming_it(tmp_path, model):
    missing = tmp_path / "no_such_dataset"
    with pytest.raises(FileNotFoundError, match="no_such_dataset") as info:
        build_datasets(str(missing), model)
    assert "digits" in str(info.value), f"the error should point at the built-in dataset too: {info.value}"


def test_folder_without_class_folders_is_an_error(tmp_path, model):
    write_image(tmp_path / "loose.png")
    with pytest.raises(ValueError, match="no class sub-folders"):
        build_datasets(tmp_path, model)


@pytest.mark.parametrize("layout", ["single folder", "train and val"])
def test_a_single_class_is_an_error_naming_the_folder(tmp_path, model, layout):
    root = tmp_path / "train" if layout == "train and val" else tmp_path
    write_class_folders(root, {"only": 4})
    if layout == "train and val":
        write_class_folders(tmp_path / "val", {"only": 2})
    with pytest.raises(ValueError, match="1 class sub-folder") as info:
        build_datasets(tmp_path, model)
    message = str(info.value)
    assert str(root) in message and "'only'" in message, f"the error should name the folder and the class: {message}"
    assert "at least 2 classes" in message, message


def test_train_and_val_with_different_classes_is_an_error(tmp_path, model):
    write_class_folders(tmp_path / "train", {"cat": 2, "dog": 2})
    write_class_folders(tmp_path / "val", {"cat": 1, "bird": 1})
    with pytest.raises(ValueError, match="different classes") as info:
        build_datasets(tmp_path, model)
    assert "dog" in str(info.value) and "bird" in str(info.value), str(info.value)


def test_a_class_without_validation_images_keeps_an_empty_val_folder(tmp_path, model):
    """A rare class may have no validation image; its empty folder keeps the class indices aligned."""
    write_class_folders(tmp_path / "train", {"cat": 2, "dog": 2, "emu": 2})
    write_class_folders(tmp_path / "val", {"cat": 1, "dog": 1})
    with pytest.raises(ValueError, match="can have an empty folder in val"):
        build_datasets(tmp_path, model, image_size=16)
    (tmp_path / "val" / "emu").mkdir()
    train, val, classes = build_datasets(tmp_path, model, image_size=16)
    assert classes == ["cat", "dog", "emu"] and labels_of(val) == [0, 1] and len(train) == 6, \
        f"{classes} {labels_of(val)} {len(train)}"
    for name in ("cat", "dog"):
        for path in (tmp_path / "val" / name).iterdir():
            path.unlink()
    with pytest.raises(ValueError, match="holds no images in any class folder"):
        build_datasets(tmp_path, model, image_size=16)


def test_a_dataset_one_level_down_is_pointed_at(tmp_path, model):
    """--data one folder too high: DIR/flowers/CLASS."""
    write_class_folders(tmp_path / "datasets" / "flowers", {"rose": 2, "tulip": 2})
    with pytest.raises(ValueError, match=r"is the dataset one level down \(pass .*datasets/flowers\)"):
        build_datasets(tmp_path / "datasets", model, image_size=16)


def test_class_names_in_two_unicode_forms_are_named_as_such(tmp_path, model):
    import unicodedata

    write_class_folders(tmp_path / "train", {unicodedata.normalize("NFC", "café"): 2, "tea": 2})
    write_class_folders(tmp_path / "val", {unicodedata.normalize("NFD", "café"): 1, "tea": 1})
    with pytest.raises(ValueError, match="different Unicode forms"):
        build_datasets(tmp_path, model, image_size=16)


def test_val_without_train_is_an_error(tmp_path, model):
    write_class_folders(tmp_path / "val", {"cat": 2})
    with pytest.raises(ValueError, match="no 'train' folder"):
        build_datasets(tmp_path, model)


def test_torchvision_model_gets_default_transforms(tmp_path):
    write_class_folders(tmp_path, {"a": 2, "b": 2})
    tv_model = create_model("torchvision:resnet18", pretrained=False)
    train, val, classes = build_datasets(tmp_path, tv_model, val_split=0.5)
    assert tuple(val[0][0].shape) == (3, 224, 224), f"default input size should be 224, got {tuple(val[0][0].shape)}"
    assert len(classes) == 2


# ------------------------------------------------------------------------------------ pixel types

def _gray16(path: Path, seed: int = 0, size: int = 12) -> tuple[Path, np.ndarray]:
    """A 16-bit grayscale PNG spanning most of the 16-bit range (what a microscope or depth camera writes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    values = np.random.default_rng(seed).integers(1024, 65536, (size, size), dtype=np.uint16)
    Image.fromarray(values).save(path)
    return path, values


def test_16_bit_gray_images_are_scaled_to_8_bits_not_clipped_white(tmp_path, model):
    write_class_folders(tmp_path, {"a": 2, "b": 2})
    path, values = _gray16(tmp_path / "a" / "deep.png")
    with Image.open(path) as image:
        assert image.mode.startswith("I"), f"the test image should open as 16-bit gray, opened as {image.mode}"
    train, val, _ = build_datasets(tmp_path, model, val_split=0.4, image_size=16)
    dataset = next(d for d in (train, val) if any(p == path for p, _ in d.samples))
    transform, dataset.transform = dataset.transform, None
    try:
        image, _ = dataset[next(i for i, (p, _) in enumerate(dataset.samples) if p == path)]
    finally:
        dataset.transform = transform
    pixels = np.asarray(image)
    assert image.mode == "RGB" and pixels.shape == (12, 12, 3), f"decoded as {image.mode} {pixels.shape}"
    expected = np.rint(values / 257.0).astype(np.uint8)
    assert np.array_equal(pixels[..., 0], expected), "16-bit values were not scaled by 1/257"
    assert (pixels == 255).mean() < 0.05, f"{(pixels == 255).mean():.0%} of the pixels are white: clipped"


def test_float_images_are_refused_up_front_naming_them(tmp_path, model):
    write_class_folders(tmp_path, {"a": 2, "b": 2})
    Image.fromarray(np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)).save(tmp_path / "b" / "depth.tif")
    with pytest.raises(ValueError, match=r"1 image\(s\) in .*b cannot be used.*depth\.tif.*floats.*Convert"):
        build_datasets(tmp_path, model, val_split=0.4, image_size=16)


def test_float_images_are_refused_when_loaded_if_the_scan_is_off(tmp_path, model):
    write_class_folders(tmp_path, {"a": 3, "b": 3})
    float_path = tmp_path / "b" / "depth.tif"
    Image.fromarray(np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)).save(float_path)
    train, val, _ = build_datasets(tmp_path, model, val_split=0.3, image_size=16, verify_images=False)
    dataset = next(d for d in (train, val) if any(p == float_path for p, _ in d.samples))
    index = next(i for i, (p, _) in enumerate(dataset.samples) if p == float_path)
    with pytest.raises(ValueError, match=r"depth\.tif.*floats"):
        dataset[index]


def test_16_bit_pgm_images_are_scaled_like_16_bit_png(tmp_path, model):
    write_class_folders(tmp_path, {"a": 2, "b": 2})
    values = (np.arange(12 * 12).reshape(12, 12) * 400).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "a" / "deep.pgm")
    Image.fromarray(values).save(tmp_path / "a" / "deep.png")
    train, val, _ = build_datasets(tmp_path, model, val_split=0.4, image_size=16)
    decoded = {}
    for dataset in (train, val):
        transform, dataset.transform = dataset.transform, None
        try:
            for i, (path, _) in enumerate(dataset.samples):
                if path.stem == "deep":
                    decoded[path.suffix] = np.asarray(dataset[i][0])
        finally:
            dataset.transform = transform
    assert set(decoded) == {".pgm", ".png"}, f"both 16-bit files should be in the data set: {sorted(decoded)}"
    assert np.array_equal(decoded[".pgm"], decoded[".png"]), "a 16-bit PGM decodes unlike the same pixels as PNG"


def test_an_image_over_pillows_size_guard_is_named_as_too_large_not_corrupt(tmp_path, model, monkeypatch):
    write_class_folders(tmp_path, {"cat": 3, "dog": 3}, ext=".png")
    write_image(tmp_path / "cat" / "huge.png", size=20)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 150)  # 20x20 = 400 pixels: over twice the limit, 12x12 under it
    with pytest.warns(UserWarning, match=r"skipped 1 image\(s\) over Pillow's size limit.*huge.png.*not corrupt"):
        train, val, _ = build_datasets(tmp_path, model, val_split=0.34, image_size=16)
    assert len(train) + len(val) == 6, "the other images are kept"


def test_image_types_the_loader_leaves_out_are_counted_in_a_warning(tmp_path, model):
    write_class_folders(tmp_path, {"cat": 3, "dog": 3})
    write_image(tmp_path / "cat" / "from_phone.jfif")
    Image.new("RGB", (12, 12)).save(tmp_path / "dog" / "anim.gif")
    with pytest.warns(UserWarning, match=r"ignored 2 image file\(s\) of type \.gif, \.jfif"):
        train, val, _ = build_datasets(tmp_path, model, val_split=0.34, image_size=16)
    assert len(train) + len(val) == 6, "only the loadable images are in the data"


def test_the_scan_reports_its_progress_after_each_class_folder(tmp_path, model):
    """A million images take minutes to verify: the caller gets a running count to show."""
    write_class_folders(tmp_path / "train", {"a": 3, "b": 2})
    write_class_folders(tmp_path / "val", {"a": 1, "b": 2})
    counts: list[int] = []
    build_datasets(tmp_path, model, image_size=16, progress=counts.append)
    assert counts == [3, 5, 6, 8], f"running counts after each class folder (train, then val): {counts}"


def test_the_command_prints_scan_progress_only_for_a_slow_scan(capsys):
    from se_retrofit.commands import convert_and_finetune as command

    times = iter([0.0, 4.0, 12.0, 15.0, 30.0, 31.0])
    progress = command._ScanProgress(True, every=10.0, clock=lambda: next(times))
    for images in (100, 250, 400, 900):
        progress(images)
    progress.finish()
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["scanning the data: 250 images so far (12 s; --no-verify-images skips opening each one)",
                     "scanning the data: 900 images so far (30 s; --no-verify-images skips opening each one)",
                     "scanned 900 images in 31 s"], lines
    quick_times = iter([0.0, 2.0, 3.0])
    quick = command._ScanProgress(True, every=10.0, clock=lambda: next(quick_times))
    quick(5)
    quick.finish()
    assert capsys.readouterr().out == "", "a scan shorter than the interval should print nothing"
    unverified_times = iter([0.0, 11.0])
    unverified = command._ScanProgress(False, every=10.0, clock=lambda: next(unverified_times))
    unverified(7)
    assert capsys.readouterr().out == "scanning the data: 7 images so far (11 s)\n", \
        "without --verify-images the line should not suggest turning it off"


# ------------------------------------------------------------------- verification shared between processes

def _opened_by_the_scan(monkeypatch) -> list[Path]:
    import se_retrofit.data as data_module

    opened: list[Path] = []
    check = data_module._check_image
    monkeypatch.setattr(data_module, "_check_image", lambda path: (opened.append(path), check(path))[1])
    return opened


@pytest.mark.parametrize("layout", ["train and val", "one folder split"])
def test_list_images_lists_what_the_scan_opens_without_opening_any(tmp_path, model, monkeypatch, layout):
    from se_retrofit.data import list_images

    if layout == "train and val":
        write_class_folders(tmp_path / "train", {"a": 3, "b": 2})
        write_class_folders(tmp_path / "val", {"a": 1, "b": 2})
    else:
        write_class_folders(tmp_path, {"a": 3, "b": 3})
    (tmp_path / "a_note.txt").write_text("not an image")
    opened = _opened_by_the_scan(monkeypatch)
    listing = list_images(str(tmp_path))
    assert opened == [], f"listing opened {opened}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build_datasets(tmp_path, model, val_split=0.34, image_size=16)
    assert listing.files == opened, f"listed {listing.files}\nbut the scan opened {opened}"
    assert list_images("digits").files == [], "the built-in digits have no files"


def _fails_alike_with_and_without_a_listing(root: Path, model, **kwargs) -> str:
    """The error `build_datasets` raises for ``root``, checked to be the same after a listing and the
    shared checks of every listed file."""
    from se_retrofit.data import ImageChecks, check_images, list_images

    with pytest.raises((ValueError, OSError)) as alone:
        build_datasets(root, model, image_size=16, **kwargs)
    listing = list_images(str(root))
    with pytest.raises(type(alone.value)) as after:
        build_datasets(root, model, image_size=16, checked=ImageChecks(listing, check_images(listing.files)), **kwargs)
    assert str(after.value) == str(alone.value), f"after a listing: {after.value}\nwithout: {alone.value}"
    return str(alone.value)


def test_a_listing_raises_nothing_and_the_scan_after_it_raises_what_it_raises_alone(tmp_path, model):
    """The listing runs before any check: an error it raised would come first, where the scan alone raises
    another (a class of corrupt files before an empty one), or none (a corrupt file linked into two classes
    is left out before the two classes are compared)."""
    from se_retrofit.data import ImageChecks, check_images, list_images

    assert "does not exist" in _fails_alike_with_and_without_a_listing(tmp_path / "missing", model)
    mixed = tmp_path / "mixed"
    write_class_folders(mixed, {"b": 2})
    (mixed / "a").mkdir()
    (mixed / "a" / "broken.png").write_bytes(b"not a png")
    (mixed / "c").mkdir()
    assert "a holds no readable images" in _fails_alike_with_and_without_a_listing(mixed, model, val_split=0.5)
    linked = tmp_path / "linked"
    write_class_folders(linked, {"a": 3, "b": 3})
    (linked / "a" / "bad.png").write_bytes(b"not a png")
    (linked / "b" / "bad.png").symlink_to(linked / "a" / "bad.png")
    listing = list_images(str(linked))
    with pytest.warns(UserWarning, match="skipped 2 unreadable"):  # as without the listing: once per class
        train, val, _ = build_datasets(linked, model, val_split=0.34, image_size=16,
                                       checked=ImageChecks(listing, check_images(listing.files)))
    assert len(train) + len(val) == 6, "the corrupt file is left out, in both of its classes"


def test_check_images_returns_only_the_files_with_a_problem_by_position(tmp_path):
    from se_retrofit.data import check_images

    good = [write_image(tmp_path / f"{i}.png", seed=i) for i in range(3)]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    signed = tmp_path / "signed.tif"
    Image.fromarray(np.zeros((4, 4), dtype=np.int32)).save(signed)
    counts: list[int] = []
    problems = check_images([good[0], broken, *good[1:], signed], progress=counts.append)
    assert set(problems) == {1, 4}, f"problems: {problems}"
    assert problems[1] == (False, None), problems
    assert problems[4][0] and problems[4][1], f"readable, with a reason: {problems}"
    assert counts == [5], f"progress at the end: {counts}"


def test_build_datasets_trusts_checks_made_elsewhere_and_neither_opens_nor_walks_again(tmp_path, model,
                                                                                     monkeypatch):
    import se_retrofit.data as data_module
    from se_retrofit.data import ImageChecks, list_images

    write_class_folders(tmp_path / "train", {"a": 3, "b": 3})
    write_class_folders(tmp_path / "val", {"a": 2, "b": 2})
    listing = list_images(str(tmp_path))
    said_broken = 2  # a good file another process reported unreadable: its report is what counts
    checks = ImageChecks(listing, {said_broken: (False, None)})
    opened = _opened_by_the_scan(monkeypatch)
    walked: list[Path] = []
    walk = data_module._image_files
    monkeypatch.setattr(data_module, "_image_files", lambda d, ignored: (walked.append(d), walk(d, ignored))[1])
    with pytest.warns(UserWarning, match="skipped 1 unreadable") as record:
        train, val, _ = build_datasets(tmp_path, model, image_size=16, checked=checks)
    assert opened == [] and walked == [], f"opened {opened}, walked {walked}"
    kept = {p for p, _ in train.samples + val.samples}
    assert listing.files[said_broken] not in kept and len(kept) == len(listing.files) - 1, f"kept {sorted(kept)}"
    assert str(listing.files[said_broken]) in str(record[0].message)
    unusable = ImageChecks(listing, {1: (True, "signed 32-bit pixels")})
    with pytest.raises(ValueError, match="signed 32-bit pixels"):
        build_datasets(tmp_path, model, image_size=16, checked=unusable)


def test_files_a_listing_did_not_reach_are_opened_by_the_scan(tmp_path, model, monkeypatch):
    from se_retrofit.data import FolderListing, ImageChecks, _Walk, list_images

    write_class_folders(tmp_path / "train", {"a": 2, "b": 2})
    write_class_folders(tmp_path / "val", {"a": 1, "b": 1})
    full = list_images(str(tmp_path))
    partial = _Walk(class_dirs=dict(list(full.walk.class_dirs.items())[:1]),
                    images=dict(list(full.walk.images.items())[:1]), files=full.files[:2])
    opened = _opened_by_the_scan(monkeypatch)
    build_datasets(tmp_path, model, image_size=16, checked=ImageChecks(FolderListing(partial.files, partial), {}))
    assert opened == full.files[2:], f"the files past the listing should be opened: {opened}"


@pytest.mark.parametrize("beside", ["val", "test"])
def test_warnings_about_unused_folders_point_at_the_caller(tmp_path, model, beside):
    write_class_folders(tmp_path / "train", {"a": 2, "b": 2})
    if beside == "val":
        (tmp_path / "val").mkdir()
    else:
        write_class_folders(tmp_path / "test", {"a": 1, "b": 1})
    with pytest.warns(UserWarning, match="not used") as record:
        build_datasets(tmp_path, model, val_split=0.5, image_size=16)
    where = [Path(w.filename).name for w in record if "not used" in str(w.message)]
    assert where == ["test_data.py"], f"the warning points at {where}, not at the caller"


def test_under_torchrun_the_progress_line_says_it_counts_this_process_share(capsys):
    from se_retrofit.commands import convert_and_finetune as command

    times = iter([0.0, 12.0, 13.0])
    progress = command._ScanProgress(True, every=10.0, clock=lambda: next(times), processes=4)
    progress(250)
    progress.finish()
    assert capsys.readouterr().out.splitlines() == [
        "scanning the data: 250 images of this process's share (1/4) so far (12 s; --no-verify-images skips "
        "opening each one)", "scanned 250 images of this process's share (1/4) in 13 s"]
    times = iter([0.0, 11.0, 12.0])
    listing = command._ScanProgress(False, every=10.0, clock=lambda: next(times), listing=True)
    listing(5000)
    listing.finish()
    assert capsys.readouterr().out.splitlines() == ["listing the data: 5,000 files so far (11 s)",
                                                    "listed 5,000 files in 12 s"]



def _verify_in_one_process(tmp_path: Path):
    import argparse

    from se_retrofit.commands.convert_and_finetune import _verify_in_shares
    from se_retrofit.training.distributed import DistContext

    args = argparse.Namespace(data=str(tmp_path), val_split=0.5, image_size=16, verify_images=True)
    return _verify_in_shares(args, DistContext())


def test_shared_verification_keeps_the_user_warning_filters(tmp_path, monkeypatch):
    """Pillow warns about an image over its pixel limit (up to twice it; an error beyond): shown as a warning
    by default, but a user who turns it into an error gets the file skipped as unreadable, as in a single
    process, not a crash."""
    write_class_folders(tmp_path, {"a": 2, "b": 2})
    big = write_image(tmp_path / "a" / "big.png", size=20)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)  # 400 pixels: over the limit, under twice it
    with pytest.warns(Image.DecompressionBombWarning):
        checks = _verify_in_one_process(tmp_path)
    assert checks.problems == {}, f"a warning alone is no problem: {checks.problems}"
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        checks = _verify_in_one_process(tmp_path)
    assert [checks.listing.files[i] for i in checks.problems] == [big], f"problems: {checks.problems}"
    assert list(checks.problems.values()) == [(False, None)], checks.problems


def test_images_are_loaded_upright_as_their_exif_orientation_says(tmp_path):
    """A phone stores a portrait photo as a landscape one with an EXIF tag; it was trained sideways."""
    from se_retrofit.data import ImageFiles

    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :20] = 255  # the left half white
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # Orientation: shown rotated 90 degrees clockwise
    path = tmp_path / "portrait.jpg"
    image.save(path, exif=exif, quality=95)
    loaded, _ = ImageFiles([(path, 0)], ["a"])[0]
    assert loaded.size == (20, 40), f"loaded as {loaded.size}, not upright (20, 40)"
    top = np.asarray(loaded)[:20].mean()
    assert top > 200, f"rotated the wrong way: the top half has mean {top:.0f}, expected the white half"


def test_the_image_size_used_is_the_one_the_datasets_get(model, tmp_path: Path) -> None:
    from se_retrofit.data import image_size_used

    assert image_size_used("digits", model) == 32 == build_datasets("digits", model)[1][0][0].shape[-1]
    assert image_size_used("digits", model, 40) == 40
    folder = write_class_folders(tmp_path / "f", {"a": 2, "b": 2})
    default = model.pretrained_cfg["input_size"][-1]
    assert image_size_used(str(folder), model) == default
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, val, _ = build_datasets(str(folder), model, val_split=0.5)
    assert val[0][0].shape[-1] == default, "the folder's images are not at the size reported"
    assert image_size_used(str(folder), model, 24) == 24


@pytest.mark.parametrize("verify", [True, False])
def test_a_file_that_does_not_decode_is_explained_by_whether_images_were_checked(tmp_path, model, verify):
    """With verification off no check ran: "the up-front check only catches broken headers" blamed one."""
    write_class_folders(tmp_path, {"a": 2, "b": 2})
    train, _, _ = build_datasets(tmp_path, model, val_split=0.5, image_size=16, verify_images=verify)
    path, _ = train.samples[0]
    path.write_bytes(b"not an image")  # broken after the check, or unchecked
    with pytest.raises(OSError) as info:
        train[0]
    message = str(info.value)
    assert str(path) in message, message
    if verify:
        assert "up-front check only catches broken headers" in message, message
    else:
        assert "up-front check" not in message and "not checked before training (--no-verify-images" in message \
            and "with the check" in message, f"the message does not say verification was off: {message}"
