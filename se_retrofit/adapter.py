"""Save and load only what fine-tuning added: the SE blocks (and, on request, a few named modules).

An SE adapter for a ResNet-50 (reduction 16) is about 10 MB instead of the 100 MB of the whole model, and the
base weights stay the library's: ``load(dir, create_model("resnet50", pretrained=True))`` rebuilds the
fine-tuned network by re-running `se_retrofit.apply` with the stored config (which is
deterministic, so it recreates the same SE module names) and filling in the saved weights.

The config also records a fingerprint of the base weights the adapter was trained on, and `load`
refuses another base (other pretrained weights, another checkpoint): the SE blocks would gate features
they never saw, a model that runs and quietly loses accuracy.

The adapter holds nothing else by default. A run that also trained the classifier head or the
backbone must either name those modules in ``extra_modules`` (``("fc",)`` for ``--train se+head``) or
ship the full ``model.safetensors``; otherwise the loaded model has the base model's head.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from .checkpoint import _atomic_write, atomic_save_safetensors, load_weights
from .config import SEConfig
from .deploy_fusion import SLOTS
from .fingerprint import DIGESTS_ATTR, base_fingerprint, changed_since_apply, digest_tensors, tensor_digests
from .messages import few
from .models import classifier_of, head_modules, num_classes_of, reset_classifier
from .se_block import se_blocks
from .wrappers import unwrapped

WEIGHTS_NAME = "se_adapter.safetensors"
CONFIG_NAME = "se_adapter_config.json"
FORMAT_VERSION = 1


def se_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers of every SE block, keyed by their full names in ``model``.

    Full names (``layer1.0.se.fc1.weight``) rather than block-relative ones, so that the file reads
    like a slice of ``model.state_dict()`` and loads with ``load_state_dict(strict=False)`` too.
    """
    return {f"{name}.{key}": value for name, block in se_blocks(model) for key, value in block.state_dict().items()}


def _module_state(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    if not isinstance(name, str) or not name:
        raise ValueError(f"extra module names must be non-empty strings such as 'fc', got {name!r}; "
                         "to keep the whole model, save model.state_dict() instead.")
    try:
        module = model.get_submodule(name)
    except AttributeError:
        head = classifier_of(model)
        hint = f" (the classifier here is {head[0]!r})" if head else ""
        raise ValueError(f"extra module {name!r} is not a submodule of {type(model).__name__}{hint}; "
                         "pass names from model.named_modules().") from None
    state = module.state_dict()
    odd = [key for key, value in state.items() if not isinstance(value, torch.Tensor)]
    if odd:
        raise ValueError(f"extra module {name!r} holds {type(state[odd[0]]).__name__} entry {name}.{odd[0]} in its "
                         "state_dict, not a tensor (extra state, a quantized layer's packed weights), which an "
                         "adapter file cannot hold; save model.state_dict() with torch.save instead.")
    return {f"{name}.{key}": value for key, value in state.items()}


def _check_config_describes(model: nn.Module, config: SEConfig, blocks: list[tuple[str, nn.Module]]) -> None:
    """Refuse a recorded config and plan that do not describe the SE blocks to be saved: `load` rebuilds
    the blocks by re-running ``apply`` with the config, and would refuse the adapter (blaming the base)."""
    import se_retrofit

    plan = se_retrofit.get_plan(model)
    if plan is None or plan.config != config:
        return
    planned = {site.se_name: (site.channels, site.hidden, site.spatial_dims, config.gain) for site in plan.sites}
    present = {name: (block.channels, block.hidden, block.spatial_dims, block.gain) for name, block in blocks}
    if planned != present:
        differ = sorted(n for n in planned.keys() | present.keys() if planned.get(n) != present.get(n))
        hint = ("SE blocks in a fused block's attention slot: a deploy re-parameterisation (timm's reparameterize_model) "
                "moved them. Save the adapter from the model before re-parameterising it"
                if any(name.rpartition(".")[2] in SLOTS for name in present.keys() - planned.keys()) else
                "Retrofit the base model with one se_retrofit.apply call and train that")
        raise ValueError(f"the SE blocks of this model are not where its recorded apply call put them, or not of the "
                         f"widths and gain it gave them ({few(differ, 3)} differ: moved, replaced or added since), so load() "
                         f"could not rebuild them from the recorded config. {hint}.")


def _warn_changed_base(model: nn.Module, left_out: list[str]) -> list[str]:
    """Warn when backbone tensors changed since ``apply``: the adapter then records (and `load` then asks for)
    the changed backbone, not the base model it was made from. Returns the names of those whose values
    changed (not only their dtype)."""
    changed, converted = changed_since_apply(model, left_out)
    if converted:
        key, (old, new) = next(iter(converted.items()))
        warnings.warn(
            f"{len(converted)} tensor(s) outside the SE blocks were converted to another dtype since se_retrofit.apply "
            f"({key}: {old} -> {new}); the adapter rebuilds this model only on a base converted the same way, so "
            f"convert the base model (to {new}) before se_retrofit.load.", stacklevel=3)
    if changed:
        warnings.warn(
            f"{len(changed)} tensor(s) outside the SE blocks changed since se_retrofit.apply ({few(changed, 3)}"
            f"{_structural_note(model, changed)}); the "
            "adapter holds only the SE blocks, so it rebuilds this model only on a base with these changed weights, "
            "and load() refuses the original one. Batch-norm running statistics move in any training-mode forward, "
            "even with requires_grad=False: keep batch-norm layers in eval mode while training SE, or name the changed "
            "modules in extra_modules, or save the whole model.", stacklevel=3)
    return changed


def _structural_note(model: nn.Module, changed: list[str]) -> str:
    """``"; N of them added or removed ..."`` where a module was replaced by one with other parameters."""
    recorded, present = model.__dict__.get(DIGESTS_ATTR) or {}, set(model.state_dict())
    moved = [key for key in changed if key not in recorded or key not in present]
    return f"; {len(moved)} of them added or removed: a module replaced by one with other parameters" if moved else ""


def _changed_record(model: nn.Module, left_out: list[str], changed: list[str]) -> dict[str, Any]:
    """What `load` needs to name the tensors a base differs in when they are ones that changed after ``apply``
    (a classifier replaced, batch-norm statistics moved) and that the adapter does not hold: their digests,
    and a fingerprint of the other tensors, which a base it was made from matches."""
    digests = tensor_digests(model, left_out)
    return {"tensors": {key: digests.get(key) for key in changed},  # None: removed since apply
            "others_fingerprint": base_fingerprint(model, left_out, without=changed)}


def _differing_changed(model: nn.Module, left_out: list[str], record: Any) -> list[str]:
    """The tensors of `_changed_record` in which ``model`` differs from the model saved, where they are all it
    differs in (else, or without a record, none)."""
    if not _changed_entry(record):
        return []
    names = list(record["tensors"])
    if base_fingerprint(model, left_out, without=names) != record["others_fingerprint"]:
        return []
    now = tensor_digests(model, left_out)
    return [key for key in names if now.get(key) != record["tensors"][key]]


def _changed_entry(value: Any) -> bool:
    return (isinstance(value, dict) and isinstance(value.get("others_fingerprint"), str)
            and isinstance(value.get("tensors"), dict)
            and all(v is None or isinstance(v, str) for v in value["tensors"].values()))


def save_adapter(model: nn.Module, directory: str | os.PathLike, *, base_model: str | None = None,
                 extra_modules: Iterable[str] = (), config: SEConfig | None = None,
                 class_names: Sequence[str] | None = None) -> Path:
    """Write ``se_adapter.safetensors`` and ``se_adapter_config.json`` into ``directory``; return the folder.

    Args:
        model: a model returned by `se_retrofit.apply`, fine-tuned or not (also inside ``torch.compile``
            or a (Distributed)DataParallel wrapper).
        directory: created if missing; existing adapter files in it are replaced atomically.
        base_model: the name the base model is created from (``"resnet50"``, ``"torchvision:resnet50"``),
            recorded so that whoever loads the adapter knows which base to build.
        extra_modules: names of further modules whose weights to include, e.g. the classifier head
            after ``--train se+head``; their names are stored and `load` restores them too.
        config: the SE config, when ``model`` was not built by ``se_retrofit.apply`` (which records it).
        class_names: what each output of the saved classifier means, in order; recorded so that whoever
            gets only the adapter can map predictions back (``convert-and-finetune`` passes the folder's).

    Each file is replaced atomically, weights first, and the config records the weights file's SHA-256:
    an interrupted save leaves at worst new weights beside the old config, a pair `load` refuses.
    """
    import se_retrofit

    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory} is a file; save_adapter writes two files into a folder: pass a folder path")
    model = unwrapped(model)
    blocks = se_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no SE blocks, so there is no adapter to save; "
                         "save the model returned by se_retrofit.apply(model).")
    recorded = se_retrofit.get_config(model)
    if config is not None and recorded is not None and config != recorded:
        raise ValueError(f"config= differs from the SEConfig apply recorded for this model ({config} against "
                         f"{recorded}); load() rebuilds the blocks from the saved config, and these blocks were made "
                         "with the recorded one. Leave config= out for a model apply made.")
    config = config or recorded
    if config is None:
        raise ValueError("the model has SE blocks but no recorded SEConfig, so load() could not rebuild it; "
                         "pass config=SEConfig(...) with the options the blocks were made with.")
    _check_config_describes(model, config, blocks)
    extra_modules = list(dict.fromkeys([extra_modules] if isinstance(extra_modules, str) else extra_modules))
    tensors = se_state_dict(model)
    for name in extra_modules:
        tensors.update(_module_state(model, name))
    changed = _warn_changed_base(model, [name for name, _ in blocks] + extra_modules)

    heads = [name for name, _ in head_modules(model)]
    classifier = None
    saved_head = [head for head in heads if any(head == name or head.startswith(f"{name}.") for name in extra_modules)]
    if saved_head and num_classes_of(model) is not None:
        classifier = {"name": saved_head[0], "num_classes": num_classes_of(model)}
    if class_names is not None:
        class_names = [str(name) for name in class_names]
        outputs = classifier["num_classes"] if classifier else num_classes_of(model)
        if outputs is not None and len(class_names) != outputs:
            raise ValueError(f"class_names has {len(class_names)} names but the classifier has {outputs} outputs; "
                             "pass one name per output, in the order of the outputs")
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "se_retrofit_version": se_retrofit.__version__,
        "base_model": base_model,
        "base_fingerprint": base_fingerprint(model, [name for name, _ in blocks] + extra_modules),
        "se_config": config.to_dict(),
        "se_modules": [name for name, _ in blocks],
        "extra_modules": extra_modules,
        "classifier": classifier,
    }
    if changed:
        meta["changed_since_apply"] = _changed_record(model, [name for name, _ in blocks] + extra_modules, changed)
    if class_names is not None:
        meta["class_names"] = class_names
    atomic_save_safetensors(tensors, directory / WEIGHTS_NAME,
                            metadata={"format": "pt", "se_retrofit_version": se_retrofit.__version__})
    meta["weights_sha256"] = _digest(tensors)
    text = json.dumps(meta, indent=2) + "\n"
    _atomic_write(directory / CONFIG_NAME, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return directory


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the weights themselves, not of the file's bytes: the safetensors header's order can differ
    between two saves of the same tensors."""
    return digest_tensors(sorted(tensors.items()))


# The whole-model files of a convert-and-finetune run folder, which `load` is sometimes given by mistake.
_RUN_MODEL_FILES = ("model.safetensors", "best.safetensors")


def _adapter_files(path: str | os.PathLike) -> tuple[Path, Path]:
    path = Path(path)
    if path.is_dir():
        weights, config = path / WEIGHTS_NAME, path / CONFIG_NAME
    elif path.suffix == ".safetensors" and path.exists():
        if path.name in _RUN_MODEL_FILES and (path.parent / "config.json").is_file():
            raise ValueError(
                f"{str(path)!r} holds a whole model, not an SE adapter: it is a convert-and-finetune run's "
                f"{path.name}. Load it with load_state_dict into se_retrofit.apply(base_model, "
                "SEConfig.from_dict(config['se'])) (config.json of the run), or pass the run folder to load its "
                f"adapter ({WEIGHTS_NAME}).")
        weights, config = path, path.parent / CONFIG_NAME
    else:
        raise FileNotFoundError(f"no SE adapter at {str(path)!r}: pass the folder save_adapter wrote "
                                f"(holding {WEIGHTS_NAME} and {CONFIG_NAME}) or its .safetensors file.")
    for needed in (weights, config):
        if not needed.is_file():
            run = weights.parent
            if (not weights.exists() and not config.exists() and (run / "model.safetensors").is_file()
                    and (run / "config.json").is_file()):
                raise FileNotFoundError(
                    f"{str(run)!r} is a convert-and-finetune run folder without an SE adapter: runs that change the "
                    "backbone (--train all or staged, or BatchNorm statistics left to update) write none. Its "
                    "model.safetensors holds the whole model: load it into se_retrofit.apply(base_model, "
                    "SEConfig.from_dict(config['se'])) with load_state_dict.")
            raise FileNotFoundError(f"SE adapter file {str(needed)!r} is missing; an adapter needs both "
                                    f"{WEIGHTS_NAME} and {CONFIG_NAME}, as written by save_adapter.")
    return weights, config


def _read_config(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); re-save the adapter with save_adapter.") from None
    if not isinstance(meta, dict) or "se_config" not in meta or "se_modules" not in meta:
        raise ValueError(f"{path} is not an SE adapter config (no 'se_config'/'se_modules'); "
                         "re-save the adapter with save_adapter.")
    version = meta.get("format_version", 0)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"{path} has adapter format version {version!r}, newer than this se_retrofit reads "
                         f"({FORMAT_VERSION}); upgrade se_retrofit.")
    wrong = [f"{key} ({type(meta.get(key)).__name__})" for key, ok in (
        ("se_config", isinstance(meta["se_config"], dict)),
        ("se_modules", _strings(meta["se_modules"])),
        ("extra_modules", meta.get("extra_modules") is None or _strings(meta.get("extra_modules"))),
        ("base_fingerprint", meta.get("base_fingerprint") is None or isinstance(meta.get("base_fingerprint"), str)),
        ("weights_sha256", meta.get("weights_sha256") is None or isinstance(meta.get("weights_sha256"), str)),
        ("classifier", meta.get("classifier") is None or _classifier_entry(meta.get("classifier"))),
        ("changed_since_apply", meta.get("changed_since_apply") is None or _changed_entry(meta["changed_since_apply"])),
    ) if not ok]
    if wrong:
        raise ValueError(f"{path} is damaged: wrong type of {', '.join(wrong)} (se_config is a dict, the module "
                         "entries are lists of names); re-save the adapter with save_adapter.")
    return meta


def _changed_after_apply(weights_path: Path, differ: list[str], heads: list[str], structural: list[str]) -> str:
    """Why a base made from the right model still differs: tensors that changed after ``apply`` (save_adapter
    named them) are missing from the adapter, so no base has them. Where tensors were added or removed
    (``structural``: a head swapped for a module of other parameter names), saving the module is not enough:
    the base needs the same change before `load`, which rebuilds the model from it."""
    owners = {key.rpartition(".")[0] for key in differ}
    modules = sorted(m for m in owners if not any(m.startswith(f"{other}.") for other in owners if other != m))
    if structural:
        return (f"the base model differs from the model adapter {weights_path} was saved from in {few(differ, 3)} "
                f"alone (the others match): the module(s) {few(modules, 3)} were replaced after se_retrofit.apply by "
                f"ones with other parameters ({few(structural, 3)} added or removed; save_adapter warned). Make the "
                "same change to the base model before se_retrofit.load, with the adapter saved again from the "
                f"fine-tuned model with extra_modules={modules!r}, or load the whole fine-tuned model.")
    statistics = any(key.endswith(_BN_STATISTICS) for key in differ)
    if statistics:
        why = "batch-norm running statistics updated in a training-mode forward"
    elif all(any(m == h or m.startswith(f"{h}.") for h in heads) for m in modules):
        why = "the classifier head replaced or trained"
    else:
        why = "trained or edited"
    save = (f"extra_modules={modules!r}" if len(modules) <= 3 else
            f"their modules ({few(modules, 3)}) in extra_modules")
    return (f"the base model's weights differ from those adapter {weights_path} was saved with in {few(differ, 3)} "
            f"alone (the others match): tensors that changed after se_retrofit.apply ({why}; save_adapter warned) "
            f"and that the adapter does not hold. Save the adapter again from the fine-tuned model with {save}, "
            "or load the whole fine-tuned model" + (" (batch-norm layers kept in eval mode while training keep their "
                                                    "statistics)." if statistics else "."))


_BN_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def _classifier_entry(value: Any) -> bool:
    return (isinstance(value, dict) and isinstance(value.get("name"), str)
            and type(value.get("num_classes")) is int and value["num_classes"] > 0)


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _names_mismatch(expected: list[str], found: list[str], meta: dict[str, Any]) -> str:
    found_set, expected_set = set(found), set(expected)
    only_adapter = [n for n in expected if n not in found_set]
    only_model = [n for n in found if n not in expected_set]
    base = meta.get("base_model")
    trained_on = f" It was saved for base model {base!r}." if base else ""
    lines = ["the adapter's SE blocks do not match those se_retrofit.apply made on this base model."]
    if only_adapter:
        lines.append(f"  in the adapter only: {few(only_adapter)}")
    if only_model:
        lines.append(f"  in the model only: {few(only_model)}")
    lines.append(f"Is this the wrong base model?{trained_on} Pass the architecture the adapter was trained on.")
    return "\n".join(lines)


def load(path: str | os.PathLike, base_model: nn.Module, *, strict: bool = True,
         example_input: Any = None) -> nn.Module:
    """The fine-tuned model: ``se_retrofit.apply(base_model, saved config)`` with the saved weights loaded.

    ``base_model`` is not modified (``apply`` works on a copy); pass the model without SE blocks,
    created as the adapter's ``base_model`` entry says. The classifier is resized first when the
    adapter carries one of a different width (a 10-class head for an ImageNet base).

    With ``strict`` (the default) every SE block name and every saved key must match the rebuilt
    model; ``strict=False`` loads what matches and warns about the rest. Shapes must always match.
    Saved tensors of the base model outside the SE blocks and the recorded ``extra_modules`` are
    never loaded (a strict load refuses the file): an adapter must not silently replace base weights.
    ``example_input`` is passed on to ``apply``, for models that do not take a batch of images.
    """
    import se_retrofit

    weights_path, config_path = _adapter_files(path)
    meta = _read_config(config_path)
    if se_blocks(base_model):
        raise ValueError(f"base_model already has SE blocks ({few([n for n, _ in se_blocks(base_model)])}); "
                         "pass the model without SE, the one se_retrofit.apply was called on.")
    try:
        config = SEConfig.from_dict(meta["se_config"])
    except (ValueError, TypeError) as exc:
        written_by = meta.get("se_retrofit_version")
        raise ValueError(f"{config_path}: {exc}. The adapter was saved by se_retrofit {written_by or '(unknown)'}, "
                         f"this is {se_retrofit.__version__}: if that is newer, upgrade se_retrofit; otherwise "
                         "the file is damaged.") from None
    try:
        model = se_retrofit.apply(base_model, config, example_input=example_input)
    except ValueError as exc:
        saved_for = f" (it was saved for {meta['base_model']!r})" if meta.get("base_model") else ""
        raise ValueError(f"could not rebuild the adapter's SE blocks on this base model{saved_for}: {exc}") from exc

    expected = list(meta["se_modules"])
    found = [name for name, _ in se_blocks(model)]
    problems = []

    def refuse_or_note(message: str, loads_anyway: str) -> None:
        if strict:
            raise ValueError(f"{message} Or pass strict=False to {loads_anyway}.")
        problems.append(message)

    if set(expected) != set(found):
        refuse_or_note(_names_mismatch(expected, found, meta), "load the blocks whose names match")

    classifier = meta.get("classifier")
    if classifier and num_classes_of(model) != classifier["num_classes"]:
        reset_classifier(model, int(classifier["num_classes"]))

    saved_print = meta.get("base_fingerprint")  # absent in adapters written before it was recorded
    left_out = found + list(meta.get("extra_modules") or [])
    if saved_print and base_fingerprint(model, left_out) != saved_print:
        record = meta.get("changed_since_apply")
        differ = _differing_changed(model, left_out, record)
        heads = [name for name, _ in head_modules(model)]
        present = set(model.state_dict())
        structural = [key for key in differ if record["tensors"][key] is None or key not in present]
        message = (_changed_after_apply(weights_path, differ, heads, structural) if differ else
                   f"the base model's weights are not those adapter {weights_path} was trained on: its SE blocks "
                   "learned other features. Create the base model as it was for training (base model "
                   f"{meta.get('base_model')!r}: the same pretrained weights or checkpoint, the same dtype). If "
                   "training changed the backbone (batch-norm running statistics updated in a training-mode "
                   "forward; save_adapter warned), no base has those weights: load the whole fine-tuned model.")
        refuse_or_note(message, "load anyway")

    weights = load_weights(weights_path, strip_ddp_prefix=False)
    saved_digest = meta.get("weights_sha256")  # absent in adapters written before it was recorded
    if saved_digest and _digest(weights) != saved_digest:
        refuse_or_note(f"{weights_path} holds other weights than the ones {config_path} was saved with (an interrupted "
                       "save_adapter, or one of the two files replaced): its class names and base-model checks "
                       "describe other weights. Re-save the adapter from the fine-tuned model, or load the pair as "
                       "it is.", "load anyway")
    own = model.state_dict()
    unexpected = [k for k in weights if k not in own]
    wanted = set(se_state_dict(model))
    for name in meta.get("extra_modules") or []:
        wanted.update(k for k in own if k.startswith(f"{name}."))
    missing = sorted(wanted - set(weights))
    mismatched = [f"{k} (adapter {list(v.shape)} vs model {list(own[k].shape)})"
                  for k, v in weights.items() if k in own and v.shape != own[k].shape]
    if mismatched:
        raise ValueError(f"adapter {weights_path} does not fit this base model: shape mismatch for "
                         f"{few(mismatched, 3)}. Was it trained on a different variant or with another reduction? "
                         "Pass the base model it was saved for.")
    foreign = [k for k in weights if k in own and k not in wanted]
    if foreign:
        refuse_or_note(f"adapter {weights_path} holds base-model tensors outside its SE blocks and extra_modules "
                       f"({few(foreign, 3)}): loading them would silently replace the base model's own weights, "
                       "which an adapter never does (save_adapter writes only the SE blocks and the modules named in "
                       "extra_modules). Re-save the adapter from the fine-tuned model, with the modules that were "
                       "trained in extra_modules, or load the whole fine-tuned model.",
                       "load the SE blocks and extra_modules without them")
    if unexpected or missing:
        message = (f"adapter {weights_path} and the rebuilt model disagree: keys not in the model: "
                   f"{few(unexpected) or 'none'}; keys the adapter lacks: {few(missing) or 'none'}. "
                   "Re-save the adapter.")
        refuse_or_note(message, "load what matches")
    model.load_state_dict({k: v for k, v in weights.items() if k in wanted}, strict=False)
    if problems:
        warnings.warn("loaded with strict=False despite:\n" + "\n".join(problems), stacklevel=2)
    return model
