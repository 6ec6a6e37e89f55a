"""``se_retrofit.finetune``: retrofit (if needed) and fine-tune, the engine of ``convert-and-finetune``.

The model you pass is left untouched when it has no SE blocks yet: it is copied, its head resized
to the data's classes, retrofitted with ``se_retrofit.apply`` and the copy trained (``result.model``).
So is a plain model fine-tuned as a baseline (``retrofit=False`` with ``train="all"``): the copy trains.
A model that already has SE blocks is trained in place, like ``Module.fit`` elsewhere; its head is
resized only once every check that can refuse the run has passed, so a refused call leaves it as it was.
"""
from __future__ import annotations

import copy
import dataclasses
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from torch import nn
from torch.utils.data import Dataset

from .config import SEConfig
from .messages import first_line
from .models import classifier_of, head_modules, num_classes_of, reset_classifier
from .se_block import se_blocks
from .training import distributed, naming, outputs, state
from .training.devices import amp_dtype, resolve_device
from .training.freeze import new_parameter_names, set_trainable, trains_backbone
from .training.loop import Trainer, seed_everything
from .training.options import TrainOptions
from .training.sampling import check_one_batch

# Keyword options of `finetune` that configure the retrofit rather than the training: every SEConfig field.
CONVERSION_KEYS = tuple(f.name for f in dataclasses.fields(SEConfig))


@dataclass
class FinetuneResult:
    """What a run produced. ``history`` has one dict per epoch (the columns of ``metrics.csv``)."""

    model: nn.Module
    history: list[dict[str, float]]
    best_top1: float | None
    best_epoch: int | None
    epochs: int
    seconds: float
    interrupted: bool
    out_dir: Path | None
    config: dict[str, Any]
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def metrics(self) -> dict[str, float]:
        """The last epoch's row (empty before the first epoch ends)."""
        return dict(self.history[-1]) if self.history else {}

    def summary(self) -> str:
        if self.best_top1 is not None:
            best = f"best top-1 {self.best_top1:.2f}% (epoch {self.best_epoch})"
        else:  # no epoch finished (stopped in the first), or one did but there is nothing to validate on
            best = "no epoch validated yet" if not self.history else "no validation set"
        where = (f"; files in {self.out_dir}: {', '.join(n for n in self.files if n != outputs.LAST)}"
                 if self.out_dir is not None else "")
        state_word = "stopped after" if self.interrupted else "done:"
        return f"{state_word} {self.epochs} epoch(s) in {_duration(self.seconds)}, {best}{where}"


def finetune(model: nn.Module, train_data: Dataset, val_data: Dataset | None = None, *,
             out_dir: str | Path | None = None, resume: bool = False, num_classes: int | None = None,
             class_names: Sequence[str] | None = None, se_config: SEConfig | dict | None = None,
             retrofit: bool = True, base_model: str | None = None, run_info: dict[str, Any] | None = None,
             verbose: bool = True, progress: bool | None = None, resume_hint: str | None = None,
             run_info_before: dict[str, Any] | None = None, **options: Any) -> FinetuneResult:
    """Fine-tune ``model`` (retrofitting it with SE blocks first when it has none).

    Args:
        model: a timm/torchvision CNN, plain or already retrofitted.
        train_data, val_data: map-style datasets of ``(image_tensor, class_index)``; ``val_data`` None
            trains without validation, and so does an empty one, with a warning.
        out_dir: run folder (see ``se_retrofit.training.outputs``); ``None`` writes nothing and
            keeps no checkpoints.
        resume: continue the run in ``out_dir`` (the resolved config must match).
        num_classes / class_names: the data's classes; by default ``train_data.classes`` (also
            through ``Subset``), else the model's head is kept as is, with a warning.
        se_config: conversion options, or pass them as keywords (``reduction=8``, ``init=...``).
        retrofit: set False to train a model without SE blocks (a baseline; needs ``train="all"``).
        base_model: name recorded in the adapter config (the CLI passes the MODEL argument).
        run_info: extra config sections (the CLI's ``model`` and ``data``), saved and compared on resume.
        verbose / progress: per-epoch lines and the summary / tqdm bars (default: when stdout is a tty).
        resume_hint: what to print after an interruption (the CLI passes its own command line).
        run_info_before: ``run_info`` as earlier versions recorded it for the same options, where
            it now records something else (the CLI's image size as given, now the size used): a run
            folder they wrote resumes as it did then.
        **options: `~se_retrofit.training.TrainOptions` fields (``epochs``, ``lr``, ``train``...).

    Returns a `FinetuneResult`; ``interrupted`` is True when Ctrl-C/SIGTERM stopped the run
    (a checkpoint was saved first if ``out_dir`` was given). A training loss that is NaN or inf, or
    trainable weights that became so, raise a ``RuntimeError`` naming the epoch and step, before anything
    trained with them is written.
    """
    conversion = {key: options.pop(key) for key in CONVERSION_KEYS if key in options}
    opts = TrainOptions.from_kwargs(options)
    se_config = _se_config(se_config, conversion)
    if resume and out_dir is None:
        raise ValueError("resume=True needs out_dir, the folder of the run to continue")
    out = Path(out_dir) if out_dir is not None else None

    device = resolve_device(opts.device, distributed.local_rank(), distributed.launched_world_size())
    dtype = amp_dtype(device, opts.amp, opts.amp_dtype)
    ctx = distributed.setup(device)
    held = None
    try:
        has_checkpoint = (distributed.main_first(lambda: outputs.prepare_out_dir(out, resume), ctx)
                          if out is not None else False)
        if out is not None:  # rank 0 holds the folder (one that exists already: a resume, an empty folder)
            held = distributed.main_first(lambda: outputs.hold(out), ctx)
        seed_everything(opts.seed)
        if ctx.is_main:
            _warn_empty_validation(val_data, out)
        names = _class_names(class_names, num_classes, train_data)
        n_classes = num_classes if num_classes is not None else (len(names) if names else None)
        if n_classes is None and ctx.is_main:
            _warn_head_kept(model)
        if verbose and ctx.is_main and retrofit and not se_blocks(model) and _head_fits(model, n_classes):
            print(f"keeping the model's classifier head: it has {n_classes} outputs, as the data has classes "
                  "(they must be the classes it was trained on, in the same order: sorted folder names for an "
                  "image folder). For a new head, pass a checkpoint without the classifier's weights.", flush=True)
        caller = model
        model, original, se_config = _prepare_model(model, n_classes, se_config, retrofit, opts.train)
        # the caller's own model (one with SE blocks, trained in place) keeps its head until the checks pass
        head_pending = model is caller and n_classes is not None and num_classes_of(model) != n_classes
        config = _resolved_config(model, train_data, val_data, names, se_config, opts, run_info, dtype, ctx,
                                  num_classes=n_classes if head_pending else None)

        restart = out is not None and resume and not has_checkpoint and outputs.restartable(out)

        def check_before_writing() -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
            found = compared = None
            if out is not None and resume and has_checkpoint:
                found = state.load(out / outputs.LAST)
                state.check_world_size(found, ctx.world_size)  # before config.json is rewritten below
                compared = found["config"]
            elif out is not None and resume and not restart:
                compared = outputs.read_config(out)
            if compared is not None:
                outputs.check_same_run(compared, config, out, run_info_before, run_info is not None)
            check_one_batch(len(train_data), opts.batch_size, ctx.world_size)
            if opts.ema:
                _check_ema_copies(model)
            return found, compared

        saved, compared = distributed.on_every_rank(check_before_writing, ctx)
        if compared is not None:  # a run of an earlier version keeps its record (config.json as last.pt)
            config = outputs.as_recorded(compared, config, run_info_before)
        # each process shards its own dataset: datasets of different sizes would train on neither
        sizes = (len(train_data), len(val_data) if val_data is not None else 0)
        distributed.same_on_every_rank(sizes, lambda n: f"{n[0]:,} training and {n[1]:,} validation samples", ctx)
        if head_pending:
            reset_classifier(model, n_classes)
        new_names = new_parameter_names(model) if se_blocks(model) else _head_names(model)
        heads = [name for name, _ in head_modules(model)]
        if restart and ctx.is_main and verbose:
            print(f"no {outputs.LAST} in {out}: that run stopped before its first checkpoint; starting it over",
                  flush=True)
        set_trainable(model, new_names, trains_backbone(opts.train, stage=1))
        if out is not None:
            if held is None:  # a new run's folder: made and held before its config claims it, so that a --resume
                # started in between (which a config.json alone would let start the run over) is refused as in use
                held = distributed.main_first(lambda: outputs.hold(outputs.make_out_dir(out)), ctx)
            distributed.main_first(lambda: _start_outputs(out, config, original, model, train_data, base_model,
                                                           restart, new_run=not resume), ctx)

        trainer = Trainer(model=model, train_data=train_data, val_data=val_data, options=opts, device=device,
                          dtype=dtype, ctx=ctx, new_names=new_names, head_names=heads,
                          out_dir=out, config=config, base_model=base_model, verbose=verbose,
                          progress_bars=progress)
        if saved is not None:
            trainer.resume_from(saved)
            if ctx.is_main and verbose:
                p = trainer.progress
                if p.complete:
                    print(f"the run in {out} is complete ({len(p.history)} epoch(s), step {p.global_step}): nothing "
                          "left to train; writing its final files again", flush=True)
                else:
                    print(f"resuming {out / outputs.LAST} at epoch {p.epoch + 1}, step {p.step_in_epoch} "
                          f"(step {p.global_step})", flush=True)
            del saved
        distributed.barrier(ctx)
        done = trainer.fit()
    finally:
        if ctx.is_main:
            outputs.release(held)
        distributed.teardown(ctx)

    result = FinetuneResult(model=done.model, history=done.progress.history, best_top1=done.progress.best_top1,
                            best_epoch=done.progress.best_epoch, epochs=len(done.progress.history),
                            seconds=done.seconds, interrupted=done.interrupted, out_dir=out, config=config,
                            files=done.files)
    if verbose and ctx.is_main:
        print(result.summary(), flush=True)
        if done.interrupted and out is not None:
            print(resume_hint or f"resume with finetune(..., out_dir={str(out)!r}, resume=True) and the same "
                                 "arguments", flush=True)
    return result


def _warn_head_kept(model: nn.Module) -> None:
    """Say that the head stays as it is when nothing gives the data's classes: a ``TensorDataset`` of 3
    classes then trains a 1000-way ImageNet head without a word (loss ~6.9, accuracy 0)."""
    outputs_now = num_classes_of(model)
    if outputs_now is not None:
        warnings.warn(f"the training data has no .classes and neither num_classes= nor class_names= was given, so "
                      f"the model keeps its {outputs_now}-output head: its outputs must be the data's labels. Pass "
                      f"num_classes= (the data's number of classes) for a new head, or num_classes={outputs_now} to "
                      "keep this one without this warning.", stacklevel=3)


def _warn_empty_validation(val_data: Dataset | None, out: Path | None) -> None:
    """Say that a ``val_data`` of no samples means a run without validation, as ``build_datasets`` says of
    an empty validation split: passed on, it trains as ``val_data=None`` does, and a caller who meant to
    validate learns it only from a history of empty ``val_top1``. The command has warned already, in
    its own terms (`naming`), and is not told twice."""
    if val_data is None or naming.names().is_command or not hasattr(val_data, "__len__") or len(val_data) > 0:
        return
    kept = ", and no best.safetensors is written" if out is not None else ""
    warnings.warn(f"val_data is empty (no samples): the run trains without validation, so no epoch gets a "
                  f"val_top1{kept}. Pass a validation dataset that holds samples, or val_data=None to train "
                  "without validation on purpose.", stacklevel=3)


def _se_config(se_config: SEConfig | dict | None, conversion: dict[str, Any]) -> SEConfig | None:
    if se_config is not None and conversion:
        raise ValueError(f"pass conversion options either as se_config or as keywords, not both "
                         f"(got se_config and {sorted(conversion)})")
    if isinstance(se_config, dict):
        return SEConfig.from_dict(se_config)
    if conversion:
        return SEConfig(**conversion)
    return se_config


def _class_names(class_names: Sequence[str] | None, num_classes: int | None, data: Dataset) -> list[str] | None:
    names = list(class_names) if class_names is not None else _dataset_classes(data)
    if names is not None and num_classes is not None and len(names) != num_classes:
        raise ValueError(f"num_classes={num_classes} but there are {len(names)} class names; pass one of them")
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes < 1):
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    return names


def _dataset_classes(data: Dataset) -> list[str] | None:
    """``classes`` of the dataset, looking through ``Subset``/wrappers' ``.dataset``."""
    for _ in range(8):
        classes = getattr(data, "classes", None)
        if classes is not None:
            return list(classes)
        data = getattr(data, "dataset", None)
        if data is None:
            return None
    return None


def _prepare_model(model: nn.Module, n_classes: int | None, se_config: SEConfig | None, retrofit: bool,
                   train: str) -> tuple[nn.Module, nn.Module | None, SEConfig | None]:
    """Return ``(model to train, original for the report or None, SE config or None)``. A model with SE
    blocks comes back itself, its head not yet resized (see `finetune`); any other, as a new model."""
    from .api import _copy, apply, get_config

    if se_blocks(model):
        existing = get_config(model)
        if se_config is not None and existing is not None and se_config.to_dict() != existing.to_dict():
            raise ValueError(f"the model is already retrofitted with {existing.to_dict()}, which differs from the "
                             "conversion options given; drop them or pass the plain model")
        return model, None, existing
    if not retrofit:
        if train != "all":
            raise ValueError(f"train={train!r} trains SE blocks, but retrofit=False leaves the model without any; "
                             "use train='all' for a plain fine-tune")
        baseline = _copy(model, other_way="")
        if n_classes is not None:
            reset_classifier(baseline, n_classes)
        return baseline, None, None
    original = model
    if n_classes is not None and not _head_fits(model, n_classes):
        original = _copy(model, other_way="")
        reset_classifier(original, n_classes)
    se_config = se_config or SEConfig()
    se_model = apply(original, se_config)
    if not se_blocks(se_model):
        raise ValueError(f"se_retrofit.apply found no residual branch to put SE blocks in {type(model).__name__} "
                         f"(options {se_config.to_dict()}); check --include/--exclude, or see `se-retrofit sites`")
    return se_model, original, se_config


def _check_ema_copies(model: nn.Module) -> None:
    """Refuse ``ema=True`` for a model that does not deep-copy, before anything is written: timm's
    ``ModelEmaV3`` keeps a deep copy, and a model reparametrised with hooks (``torch.nn.utils.prune``, the
    old ``weight_norm``) holds computed tensors that refuse it, an error that names neither. Tried on the
    modules alone, every parameter and leaf buffer shared through the memo, so that no weight is copied.
    A buffer computed with gradients on (one with a ``grad_fn``) is left out of the memo: its copy is
    refused before any data is read, as it is in the real copy."""
    shared = {id(t): t for t in (*model.parameters(), *model.buffers()) if t.is_leaf}
    try:
        copy.deepcopy(model, shared)
    except Exception as exc:  # deepcopy raises what the failing object raises (RuntimeError, TypeError...)
        raise ValueError(
            f"ema=True keeps a copy of the model, but {type(model).__name__} does not deep-copy ({first_line(exc)}). "
            "Models reparametrised with hooks (torch.nn.utils.prune, the old torch.nn.utils.weight_norm) do not, "
            "nor do tensors computed from parameters with gradients on and kept on a module (a buffer, or a cache "
            "such as LeViT's attention_bias_cache, filled by an eval-mode forward run with gradients on): make the "
            "change permanent first (prune.remove(module, 'weight'), remove_weight_norm), register such buffers "
            "detached (.detach()), clear such a cache (LeViT's model.train() does) and run eval forwards under "
            "torch.no_grad(), or train without ema.") from exc


def _head_fits(model: nn.Module, n_classes: int | None) -> bool:
    """Whether the model's classifier already has one output per class, so that it is kept."""
    return n_classes is not None and classifier_of(model) is not None and num_classes_of(model) == n_classes


def _head_names(model: nn.Module) -> set[str]:
    return {f"{name}.{param}" for name, module in head_modules(model) for param, _ in module.named_parameters()}


def _resolved_config(model: nn.Module, train_data: Dataset, val_data: Dataset | None, names: list[str] | None,
                     se_config: SEConfig | None, opts: TrainOptions, run_info: dict[str, Any] | None, dtype: Any,
                     ctx: distributed.DistContext, num_classes: int | None = None) -> dict[str, Any]:
    """The run's config; ``num_classes``, when given, is the head the model will have (not yet resized)."""
    from . import __version__

    run_info = run_info or {}
    model_section = dict(run_info.get("model") or {"class": type(model).__name__})
    model_section["num_classes"] = num_classes if num_classes is not None else num_classes_of(model)
    data_section = dict(run_info.get("data") or {})
    data_section.update(train_size=len(train_data), val_size=len(val_data) if val_data is not None else 0,
                        class_names=names)
    runtime = opts.runtime()
    runtime.update(world_size=ctx.world_size, amp_dtype_used=str(dtype).replace("torch.", "") if dtype else None)
    return {"se_retrofit_version": __version__, "model": model_section, "data": data_section,
            "se": se_config.to_dict() if se_config is not None else None, "train": opts.recipe(), "runtime": runtime}


def _start_outputs(out: Path, config: dict[str, Any], original: nn.Module | None, model: nn.Module,
                   train_data: Dataset, name: str | None, restart: bool = False, new_run: bool = False) -> None:
    """The config and the report; a resumed run keeps its report (both files, or one lost since comes back),
    a run started over gets a new one.

    The config is written every time: a resumed run's matched the saved one (`check_same_run`), and
    rewriting it repairs a ``config.json`` torn or edited since.
    """
    outputs.make_out_dir(out)
    outputs.write_config(out, config, new_run=new_run)
    if original is None or (not restart and (out / "report.md").exists() and (out / "report.json").exists()):
        return
    shape = tuple(getattr(train_data[0][0], "shape", ()))
    if len(shape) != 3:
        warnings.warn(f"no report.md: training samples are not CHW tensors (shape {shape}); add a transform",
                      stacklevel=3)
        return
    try:
        outputs.write_report(out, original, model, (1, *shape), name)
    except (RuntimeError, ValueError, TypeError) as exc:  # a cost report must not cost the run
        warnings.warn(f"no report.md: measuring parameters and MACs failed ({exc})", stacklevel=3)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{seconds:.1f}s"
