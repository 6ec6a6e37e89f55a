"""The epochs: train steps, validation, checkpoints, and the files each epoch leaves.

The pieces are the libraries' own (timm's optimizer factory, cosine scheduler and ``ModelEmaV3``,
torch's autocast, GradScaler and DDP); what is ours is the bookkeeping that makes a run resumable
to the bit: the step counter is the unit of progress, RNG states are saved at step boundaries, and
the data order comes from ``sampling.TrainBatches``.
"""
from __future__ import annotations

import gc
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..messages import few
from . import rng
from . import distributed, outputs, state
from .devices import autocast, grad_scaler
from .distributed import DistContext
from .freeze import freeze_batchnorm, parameter_groups, set_trainable, stage_of, trains_backbone
from .interrupt import GracefulStop
from .naming import names
from .options import TrainOptions
from .sampling import TrainBatches, val_loader

# How often (in steps) `Trainer._check_loss` reads whether a training loss was NaN or inf; it also reads it
# before every checkpoint and at the end of every epoch, so before anything is written.
LOSS_CHECK_EVERY = 10
_NO_STEP = 2**62  # `Trainer.first_nonfinite` before any loss was NaN or inf: above every step number


@dataclass
class LoopResult:
    model: nn.Module
    progress: state.Progress
    interrupted: bool
    seconds: float
    files: dict[str, Path]


def seed_everything(seed: int) -> None:
    """Python, NumPy and torch (all devices) RNGs from one integer."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """One fine-tuning run. Build it, then call `fit` once."""

    def __init__(self, *, model: nn.Module, train_data: Dataset, val_data: Dataset | None, options: TrainOptions,
                 device: torch.device, dtype: torch.dtype | None, ctx: DistContext, new_names: set[str],
                 head_names: list[str], out_dir: Path | None, config: dict[str, Any], base_model: str | None,
                 verbose: bool = True, progress_bars: bool | None = None) -> None:
        self.opts = options
        self.device = device
        self.dtype = dtype
        self.ctx = ctx
        self.new_names = new_names
        self.head_names = list(head_names)
        self.out = out_dir if ctx.is_main else None
        self.out_dir = out_dir  # on every rank, for messages every rank raises alike
        self.saving = out_dir is not None
        self.config = config
        self.base_model = base_model
        self.verbose = verbose and ctx.is_main
        if progress_bars is None:
            progress_bars = sys.stdout.isatty()
        self.bars = progress_bars and ctx.is_main

        self.model = model.to(device)
        if options.channels_last:
            self.model.to(memory_format=torch.channels_last)
        pin = device.type == "cuda"
        self.batches = TrainBatches(train_data, options.batch_size, options.workers, options.seed, ctx, pin)
        self.val = val_loader(val_data, options.batch_size, options.workers, ctx, pin) if val_data is not None else None
        self.steps_per_epoch = self.batches.steps_per_epoch

        groups = parameter_groups(self.model, new_names, options.train, options.weight_decay,
                                  options.backbone_lr_scale)
        self.optimizer = create_optimizer_v2(groups, opt=options.opt, lr=options.lr,
                                             weight_decay=options.weight_decay, momentum=options.momentum)
        self.scheduler, _ = create_scheduler_v2(
            self.optimizer, sched="cosine", num_epochs=options.epochs, warmup_epochs=options.warmup_epochs,
            warmup_lr=options.lr * 0.01, min_lr=options.min_lr, step_on_epochs=False,
            updates_per_epoch=self.steps_per_epoch)
        self.scaler = grad_scaler(device, dtype)
        self.ema = ModelEmaV3(self.model, decay=options.ema_decay, use_warmup=True) if options.ema else None
        self.criterion = nn.CrossEntropyLoss(label_smoothing=options.label_smoothing)

        self.stage = 0
        self.forward_model: nn.Module = self.model
        self.accum = torch.zeros(3, dtype=torch.float64, device=device)
        self.epoch_seconds = 0.0
        self.last_save = time.monotonic()
        self.progress = state.Progress()
        self.resumed = False
        self.last_lr = float(self.optimizer.param_groups[0]["lr"])
        # the step (in this epoch) of the first loss that was NaN or inf, kept on the device (`_check_loss`)
        self.first_nonfinite = torch.full((), _NO_STEP, dtype=torch.int64, device=device)
        self.saved_at: tuple[int, int] | None = None  # (epoch, step_in_epoch) of the last.pt written

    # ----------------------------------------------------------------------------------------- state
    def resume_from(self, saved: dict[str, Any]) -> None:
        """Continue from a ``last.pt`` (its process count checked, `state.check_world_size`): weights,
        optimizer, schedule, EMA, RNG, data position."""
        ranks = saved["ranks"]
        self.progress = state.restore(saved, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                                      scaler=self.scaler, ema=self.ema)
        mine = ranks[self.ctx.rank]
        self.accum = torch.tensor(mine["accum"], dtype=torch.float64, device=self.device)
        self.epoch_seconds = float(mine["epoch_seconds"])
        self.last_lr = float(mine["last_lr"])
        rng.set_rng_state(mine["rng"])
        self.resumed = True
        self.saved_at = (self.progress.epoch, self.progress.step_in_epoch)
        self._restore_best()

    def _save(self) -> None:
        """Write ``last.pt`` (collective under DDP: every rank contributes its RNG and sums)."""
        if not self.saving:
            return
        mine = {"rng": rng.rng_state(), "accum": self.accum.tolist(), "epoch_seconds": self.epoch_seconds,
                "last_lr": self.last_lr}
        ranks = distributed.gather(mine, self.ctx)
        if self.out is not None:
            snapshot = state.build(model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                                   scaler=self.scaler, ema=self.ema, progress=self.progress, rank_states=ranks,
                                   data_order=self.batches.order_state(self.progress.epoch,
                                                                       self.progress.step_in_epoch),
                                   config=self.config)
            state.save(self.out / outputs.LAST, snapshot)
        self.last_save = time.monotonic()
        self.saved_at = (self.progress.epoch, self.progress.step_in_epoch)

    def _checkpoint_due(self) -> bool:
        if not self.saving or self.progress.step_in_epoch >= self.steps_per_epoch:
            return False
        every = self.opts.checkpoint_every_steps
        if every and self.progress.global_step % every == 0:
            return True
        seconds = self.opts.checkpoint_every_seconds
        return bool(seconds) and time.monotonic() - self.last_save >= seconds

    # ------------------------------------------------------------------------------------- training
    def _enter_stage(self, stage: int) -> None:
        """Set what trains; DDP is rebuilt because it registers gradient hooks per trainable tensor."""
        set_trainable(self.model, self.new_names, trains_backbone(self.opts.train, stage))
        if self.forward_model is not self.model:
            self.forward_model = self.model
            gc.collect()  # the old DDP's reducer must be gone before a new one hooks the same parameters
        self.forward_model = distributed.wrap(self.model, self.device, self.ctx)
        if self.opts.compile:
            self.forward_model = torch.compile(self.forward_model)
        self.stage = stage
        if stage == 2:
            self._log(f"stage 2: training every layer, backbone at {self.opts.backbone_lr_scale:g} x lr")

    def _step(self, images: torch.Tensor, targets: torch.Tensor) -> None:
        images = images.to(self.device, non_blocking=True)
        targets = targets.to(self.device, non_blocking=True)
        if self.opts.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.dtype):
            try:
                logits = self.forward_model(images)
            except ValueError as exc:
                if "more than 1 value per channel" not in str(exc):
                    raise
                raise ValueError(f"batch norm in training mode needs more than one value per channel, and a batch "
                                 f"of {images.shape[0]} image(s) per process at this resolution gives one "
                                 f"({exc}); raise --batch-size, or train only SE and the head (--train se), whose "
                                 "frozen batch norms use their running statistics") from exc
            loss = self.criterion(logits, targets)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()
        if self.opts.clip_grad is not None:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            trainable = [p for p in self.model.parameters() if p.requires_grad]
            torch.nn.utils.clip_grad_norm_(trainable, self.opts.clip_grad)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.last_lr = float(self.optimizer.param_groups[0]["lr"])
        self.progress.global_step += 1
        self.progress.step_in_epoch += 1
        self.scheduler.step_update(num_updates=self.progress.global_step)
        if self.ema is not None:
            self.ema.update(self.model, step=self.progress.global_step)
        with torch.no_grad():
            count = targets.numel()
            correct = (logits.argmax(dim=1) == targets).sum()
            self.accum += torch.stack([loss.detach().double() * count, correct.double(),
                                       torch.tensor(float(count), dtype=torch.float64, device=self.device)])
            # on the device, without a synchronisation: `_check_loss` reads it
            self.first_nonfinite = torch.where(torch.isfinite(loss.detach()), self.first_nonfinite,
                                               self.first_nonfinite.clamp(max=self.progress.step_in_epoch))

    def _check_loss(self, weights: bool = False) -> None:
        """Stop the run, on every rank, if a training loss since the last check was NaN or inf, or (with
        ``weights``, before anything is written) a trainable weight is.

        Trained on, such a loss makes every weight it updates NaN, and the run would end as a success
        with NaN weights written over the files of its last good state. So the error comes before any
        file is written: this runs every `LOSS_CHECK_EVERY` steps, and with ``weights`` before every
        checkpoint (mid-epoch, at a stop) and at the end of every epoch, which leaves ``last.pt``,
        ``best.safetensors`` and ``metrics.csv`` as the last check that passed found them, and writes no
        ``model.safetensors`` or adapter. Each step only records the first non-finite loss's step on the
        device (`_step`); reading it is the synchronisation (under DDP, a small all-reduce whose minimum
        gives every rank the same answer, so that all stop together), once per ``LOSS_CHECK_EVERY`` steps
        rather than once per step; the price is up to that many steps trained in vain before the error.
        The weights are checked too where files are written: the last update before a check can overflow
        them while its own loss was finite (a learning rate far too high), and its result is what gets
        saved; one pass over the trainable tensors (and the EMA's), only at those points.
        """
        first = int(distributed.all_reduce_min(self.first_nonfinite.clone(), self.ctx).item())
        broken: list[str] = []
        if first == _NO_STEP and weights:
            broken = self._nonfinite_weights()
            flag = torch.tensor(0 if broken else 1, dtype=torch.int64, device=self.device)
            if int(distributed.all_reduce_min(flag, self.ctx).item()) == 1:
                return
        elif first == _NO_STEP:
            return
        if self.out_dir is None:
            kept = "No file is written without an out_dir."
        elif self.saved_at is None:
            kept = f"No checkpoint was saved before it: {self.out_dir} holds no {outputs.LAST}, weights or metrics."
        else:
            epoch, step = self.saved_at
            at = f"the end of epoch {epoch}" if step == 0 else f"epoch {epoch + 1}, step {step}"
            kept = (f"Nothing was written since: {self.out_dir} keeps {outputs.LAST} from {at} and the files "
                    f"written up to it, and has no {outputs.MODEL}.")
        where = f"epoch {self.progress.epoch + 1}/{self.opts.epochs}"
        if first != _NO_STEP:
            what = (f"the training loss is NaN or inf at {where}, step {first} (of {self.steps_per_epoch}): training "
                    "stopped, since every weight it updates from there on is NaN.")
        else:
            what = (f"trainable weights are NaN or inf at {where}, step {self.progress.step_in_epoch} (of "
                    f"{self.steps_per_epoch}), though every loss was finite ({few(broken or ['on another rank'], 3)}):"
                    " an update overflowed them, and training stopped before they were saved.")
        error = RuntimeError(f"{what} {kept} {_divergence_hint()}")
        error.echo_of_rank0 = not self.ctx.is_main  # every rank raises it; rank 0 prints it
        raise error

    def _nonfinite_weights(self) -> list[str]:
        """Names of the trainable tensors (the model's, and the EMA copy's, which the files are written from)
        holding a NaN or inf; one synchronisation for all of them."""
        named = [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]
        if self.ema is not None:
            trained = {name.removeprefix("module.") for name, _ in named}  # DDP's wrapper prefixes them
            named += [(f"ema.{name}", p) for name, p in self.ema.module.named_parameters() if name in trained]
        if not named:
            return []
        finite = torch.stack([torch.isfinite(p).all() for _, p in named]).tolist()
        return [name for (name, _), ok in zip(named, finite) if not ok]

    @torch.no_grad()
    def _evaluate(self) -> tuple[float, float, float]:
        """Validation loss, top-1 and top-5 (%) over the whole validation set, summed across ranks; top-5 is
        NaN (no value) with 5 classes or fewer, where every image is in it."""
        if self.val is None:
            return math.nan, math.nan, math.nan
        module = self.ema.module if self.ema is not None else self.model
        was_training = module.training
        module.eval()
        sums = torch.zeros(5, dtype=torch.float64, device=self.device)  # the last: batches with over 5 classes
        try:
            for images, targets in self.val:
                images = images.to(self.device, non_blocking=True)
                targets = targets.to(self.device, non_blocking=True)
                if self.opts.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                with autocast(self.device, self.dtype):
                    logits = module(images)
                logits = logits.float()
                topk = logits.topk(min(5, logits.shape[1]), dim=1).indices.eq(targets[:, None])
                sums += torch.stack([F.cross_entropy(logits, targets, reduction="sum").double(),
                                     topk[:, 0].sum().double(), topk.any(dim=1).sum().double(),
                                     torch.tensor(float(targets.numel()), dtype=torch.float64, device=self.device),
                                     torch.tensor(float(logits.shape[1] > 5), dtype=torch.float64, device=self.device)])
        finally:
            module.train(was_training)
        loss, top1, top5, count, wide = distributed.all_reduce_sum(sums, self.ctx).tolist()
        if count == 0:
            return math.nan, math.nan, math.nan
        return loss / count, 100.0 * top1 / count, 100.0 * top5 / count if wide else math.nan

    def _end_epoch(self, epoch: int, started: float) -> dict[str, float]:
        loss_sum, correct, count = distributed.all_reduce_sum(self.accum.clone(), self.ctx).tolist()
        val_loss, top1, top5 = self._evaluate()
        row = {"epoch": epoch + 1, "train_loss": loss_sum / max(count, 1), "train_acc": 100.0 * correct / max(count, 1),
               "val_loss": val_loss, "val_top1": top1, "val_top5": top5,
               "lr": self.last_lr, "seconds": time.perf_counter() - started}
        progress = self.progress
        progress.history.append(row)
        new_best = not math.isnan(top1) and (progress.best_top1 is None or top1 > progress.best_top1)
        if new_best:
            progress.best_top1, progress.best_epoch = top1, epoch + 1
        progress.epoch = epoch + 1
        progress.step_in_epoch = 0
        self.accum.zero_()
        self.epoch_seconds = 0.0
        return row

    def _save_best(self) -> None:
        """Write ``best.safetensors`` for the epoch just ended, after the ``last.pt`` that records it as the
        best: a run stopped in between resumes from that checkpoint, which holds these very weights, and
        writes the file then (`_restore_best`). Written first, a stop in between would leave a run with
        results and no checkpoint, which could neither resume nor start over."""
        if self.out is None or self.progress.best_epoch != self.progress.epoch or self.progress.step_in_epoch:
            return
        best = self.ema.module if self.ema is not None else self.model
        outputs.save_weights(self.out / outputs.BEST, best, metadata={"epoch": str(self.progress.best_epoch),
                                                                        "val_top1": f"{self.progress.best_top1:.4f}"})

    def _restore_best(self) -> None:
        """After `resume_from`: the best epoch's file, where the run stopped between its ``last.pt`` and it
        (the file is then missing, half-written under its temporary name, or an earlier best epoch's)."""
        if self.out is not None and outputs.weights_epoch(self.out / outputs.BEST) != self.progress.best_epoch:
            self._save_best()

    # ------------------------------------------------------------------------------------------ run
    def fit(self) -> LoopResult:
        started = time.perf_counter()
        opts, progress = self.opts, self.progress
        interrupted = False
        if not self.resumed:
            seed_everything(opts.seed + self.ctx.rank)
        if not progress.complete:
            with GracefulStop(announce=self.ctx.is_main) as stop:
                interrupted = self._run_epochs(stop)
        if not interrupted:
            if not progress.complete:
                progress.complete = True
                self._save()
            self._finish()
        return LoopResult(model=self.model, progress=progress, interrupted=interrupted,
                          seconds=time.perf_counter() - started, files=self._files())

    def _run_epochs(self, stop: GracefulStop) -> bool:
        opts, progress = self.opts, self.progress
        epoch_bar = tqdm(total=opts.epochs, initial=progress.epoch, desc="epochs", unit="epoch",
                         disable=not self.bars, dynamic_ncols=True)
        try:
            while progress.epoch < opts.epochs:
                epoch = progress.epoch
                stage = stage_of(opts.train, epoch, opts.stage1_epochs)
                if stage != self.stage:
                    self._enter_stage(stage)
                self.model.train()
                if opts.freeze_bn:
                    freeze_batchnorm(self.model, trains_backbone(opts.train, stage))
                epoch_started = time.perf_counter() - self.epoch_seconds
                batch_bar = tqdm(total=self.steps_per_epoch, initial=progress.step_in_epoch, leave=False,
                                 desc=f"epoch {epoch + 1}/{opts.epochs}", unit="batch", disable=not self.bars,
                                 dynamic_ncols=True)
                with batch_bar:
                    for images, targets in self.batches.epoch(epoch, progress.step_in_epoch):
                        self._step(images, targets)
                        batch_bar.update()
                        if self.bars and progress.step_in_epoch % 10 == 0:
                            batch_bar.set_postfix(loss=f"{self.accum[0].item() / max(self.accum[2].item(), 1):.3f}",
                                                  lr=f"{self.optimizer.param_groups[0]['lr']:.2e}")
                        stop_now, save_now = distributed.any_rank([stop.requested, self._checkpoint_due()],
                                                                  self.device, self.ctx)
                        if stop_now or save_now or progress.step_in_epoch % LOSS_CHECK_EVERY == 0:
                            self._check_loss(weights=stop_now or save_now)
                        if stop_now or save_now:
                            self.epoch_seconds = time.perf_counter() - epoch_started
                            self._save()
                        if stop_now:
                            self._announce_stop()
                            return True
                self._check_loss(weights=True)
                row = self._end_epoch(epoch, epoch_started)
                self._save()
                self._save_best()
                if self.out is not None:
                    outputs.write_metrics(self.out, progress.history)
                    outputs.plot_curves(self.out, progress.history)
                epoch_bar.update()
                self._log(_epoch_line(row, opts.epochs))
                if distributed.any_rank([stop.requested], self.device, self.ctx)[0] and progress.epoch < opts.epochs:
                    self._announce_stop()
                    return True
        finally:
            epoch_bar.close()
        return False

    def _finish(self) -> None:
        """Final weights (the EMA's when kept) to ``model.safetensors``, and the adapter when it suffices."""
        if self.ema is not None:
            self.model.load_state_dict(self.ema.module.state_dict())
        if self.out is not None:
            outputs.save_weights(self.out / outputs.MODEL, self.model, metadata={"format": "pt"})
            if self.adapter_suffices:
                extra = self.head_names
                names = (self.config or {}).get("data", {}).get("class_names")
                outputs.save_adapter(self.out, self.model, self.base_model, extra, names)
            outputs.write_metrics(self.out, self.progress.history)
            if self.progress.history:
                outputs.plot_curves(self.out, self.progress.history)
            outputs.remove_leftovers(self.out)
        distributed.barrier(self.ctx)

    @property
    def adapter_suffices(self) -> bool:
        """SE weights + head rebuild the model only if nothing else changed (weights or BN statistics)."""
        return self.opts.train in ("se", "se+head") and self.opts.freeze_bn and bool(self.new_names)

    def _files(self) -> dict[str, Path]:
        if not self.saving or self.out is None:
            return {}
        names = [outputs.CONFIG, outputs.LAST, outputs.BEST, outputs.METRICS, outputs.CURVES, "report.md",
                 "report.json", outputs.MODEL, "se_adapter.safetensors", "se_adapter_config.json"]
        return {name: self.out / name for name in names if (self.out / name).exists()}

    def _announce_stop(self) -> None:
        where = f"; checkpoint saved to {self.out / outputs.LAST}" if self.out is not None else ""
        self._log(f"stopped at epoch {self.progress.epoch + 1}, step {self.progress.step_in_epoch}{where}")

    def _log(self, message: str) -> None:
        if self.verbose:
            tqdm.write(message)


def _epoch_line(row: dict[str, float], epochs: int) -> str:
    """One epoch's metrics; those of a validation that did not run (no validation set) are left out, as
    metrics.csv leaves their cells empty, where a diverged model's ``val_loss nan`` is shown."""
    top5 = "" if math.isnan(row["val_top5"]) else f"val_top5 {row['val_top5']:.2f}%  "
    validated = not math.isnan(row["val_top1"])
    val = f"val_loss {row['val_loss']:.4f}  val_top1 {row['val_top1']:.2f}%  {top5}" if validated else ""
    return (f"epoch {row['epoch']}/{epochs}  train_loss {row['train_loss']:.4f}  train_acc {row['train_acc']:.2f}%  "
            f"{val}lr {row['lr']:.2e}  {row['seconds']:.1f}s")


def _divergence_hint() -> str:
    """What to change after a NaN or inf, in the caller's terms (`naming`): the function's arguments or the
    command's options."""
    n = names()
    lr, amp = ("--lr", "--amp") if n.is_command else ("lr=", "amp=")
    start = "the --checkpoint weights" if n.is_command else "the starting weights"
    return (f"Lower the learning rate ({lr}), check {start} (a model whose outputs are already inf or NaN gives "
            f"such a loss from the first step) and the input data for NaN or inf values, or train without "
            f"mixed precision ({amp}), in a new run ({n.out}).")
