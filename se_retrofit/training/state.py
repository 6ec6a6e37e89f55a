"""The training-state checkpoint (``last.pt``): everything needed to continue as if never stopped.

It holds the model, optimizer, scheduler, gradient scaler and EMA states, each process's RNG states and
running sums (under torchrun every rank has its own augmentation stream), the position in the data
(epoch and batches done: the data order is a function of seed and epoch, see ``sampling``), the
history, the best metric and the resolved config. Only plain containers, numbers, strings and tensors
go in, so it loads with ``torch.load(weights_only=True)``: opening a checkpoint never runs code.
Writes go through ``se_retrofit.checkpoint.atomic_save`` (temporary file + ``os.replace``), so a
SIGKILL during a save leaves the previous checkpoint intact.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from .. import checkpoint as ckpt
from ..fingerprint import DIGESTS_ATTR
from ..fitting import load_into
from ..messages import first_line
from .naming import names

FORMAT = "se_retrofit.train_state/1"


@dataclass
class Progress:
    """Where the run is. ``epoch`` is the 0-based epoch in progress (``epochs`` once complete)."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best_top1: float | None = None
    best_epoch: int | None = None
    complete: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Progress":
        return cls(**data)


def build(*, model: nn.Module, optimizer: Any, scheduler: Any, scaler: Any, ema: Any, progress: Progress,
          rank_states: list[dict[str, Any]], data_order: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "ema": ema.state_dict() if ema is not None else None,
        "progress": progress.to_dict(),
        "ranks": rank_states,
        "data_order": data_order,
        "config": config,
        # what `apply` recorded of the base model: a resumed run rebuilds the model from random weights before
        # loading these states, and its adapter must still be checked against the base the run started from
        "base_digests": model.__dict__.get(DIGESTS_ATTR),
    }


def check_world_size(state: dict[str, Any], world_size: int) -> None:
    """Resume with as many processes as wrote the checkpoint: the data order and batch size depend on it."""
    written = len(state["ranks"])
    if written != world_size:
        raise ValueError(f"the checkpoint was written by {written} process(es), this run has {world_size}; resume "
                         f"with the same number (torchrun --nproc_per_node {written}), since the data order and "
                         "batch size depend on it")


def save(path: Path, state: dict[str, Any]) -> None:
    """Write ``last.pt`` atomically; a write that fails (most often a full disk, which torch reports as an
    internal ``enforce fail ... unexpected pos``) says which file, how much space is left, and that the
    previous checkpoint is intact."""
    from .outputs import writing

    with writing(path):
        ckpt.atomic_save(state, path)


def load(path: Path) -> dict[str, Any]:
    try:
        state = ckpt.load_checkpoint(path)
    except (ValueError, RuntimeError, EOFError) as exc:  # what torch.load raises for a torn or foreign file
        raise ValueError(f"cannot resume: {path} is damaged ({first_line(exc)}). The run's other files "
                         f"are untouched; put back a good copy of it, or start a new run in another {names().out}"
                         ) from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path} is not a se_retrofit training checkpoint (format {found!r}, expected {FORMAT!r}); "
                         f"{names().resume} continues only runs written by {names().writer}")
    return state


def restore(state: dict[str, Any], *, model: nn.Module, optimizer: Any, scheduler: Any, scaler: Any,
            ema: Any) -> Progress:
    """Load the states into the live objects and return the progress to continue from."""
    load_into(model, state["model"], strict=True)
    if state.get("base_digests") is not None:
        model.__dict__[DIGESTS_ATTR] = dict(state["base_digests"])
    try:
        optimizer.load_state_dict(state["optimizer"])
    except ValueError as exc:  # torch: "loaded state dict contains a parameter group that doesn't match ..."
        written = (state.get("config") or {}).get("se_retrofit_version")
        raise ValueError(
            f"cannot resume: the optimizer state in the checkpoint is for other trainable parameters than this run "
            f"has ({first_line(exc)}): it was written for another model (finetune() given a different one), or by an "
            f"se_retrofit that chose other layers to train with the SE blocks (its config records version "
            f"{written!r}; before a head's norm or second head was counted as part of the head, they stayed frozen). "
            "Continue it with the model and the se_retrofit that wrote it, or start the run again with the same "
            f"options in another {names().out}") from exc
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    if ema is not None:
        if state["ema"] is None:
            raise ValueError("the checkpoint was trained without --ema; resume without it")
        ema.load_state_dict(state["ema"])
    return Progress.from_dict(state["progress"])
