"""``TrainOptions``: every knob of the fine-tuning loop, validated once, with defaults resolved.

Validation lives here, before any model is built or file written, so that a typo costs nothing. The
``None`` defaults (learning rate, weight decay, first-stage length) are resolved from the training
mode and optimizer: what gets recorded in ``config.json`` and compared on ``--resume`` is always the
concrete value, so a run is reproducible from its config alone.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

TRAIN_MODES = ("se", "se+head", "all", "staged")
OPTIMIZERS = ("adamw", "sgd")
AMP_DTYPES = ("auto", "bfloat16", "float16")

# Learning rates that work for a fresh SE adapter + head (``new``) and for whole-network fine-tuning
# (``all``): the usual AdamW 1e-3 / 1e-4 and SGD 0.05 / 0.01 pairs of transfer-learning recipes.
DEFAULT_LR = {"adamw": {"new": 1e-3, "all": 1e-4}, "sgd": {"new": 0.05, "all": 0.01}}
# timm's fine-tuning weight decays: 0.05 for AdamW (decoupled), 1e-4 for SGD (the SE paper's).
DEFAULT_WEIGHT_DECAY = {"adamw": 0.05, "sgd": 1e-4}

# Options that change how fast a run goes but not what it computes; a resumed run may change them.
RUNTIME_FIELDS = ("device", "channels_last", "compile", "workers", "checkpoint_every_steps",
                  "checkpoint_every_seconds")


@dataclass
class TrainOptions:
    """Options of `se_retrofit.finetune` (the CLI flags of the same names).

    Attributes:
        epochs: passes over the training set.
        batch_size: images per step *per process* (under torchrun the global batch is this times
            the number of processes).
        lr: peak learning rate of the new parameters; ``None`` picks one for ``train`` and ``opt``.
        train: ``"se"`` / ``"se+head"`` (only SE blocks and the classifier learn; the same thing,
            two names), ``"all"`` (everything), ``"staged"`` (SE + head for ``stage1_epochs``, then
            everything, the backbone at ``backbone_lr_scale`` times the learning rate).
        opt: ``"adamw"`` or ``"sgd"`` (Nesterov momentum), built by timm's optimizer factory.
        weight_decay: ``None`` picks 0.05 (AdamW) or 1e-4 (SGD); biases and norm weights get none.
        momentum: SGD momentum.
        warmup_epochs: linear warmup, then cosine decay to ``min_lr`` (timm's per-step scheduler);
            ``None``: 1 epoch, or a tenth of the run when it has one epoch (a whole run of warmup would
            never reach ``lr``).
        min_lr: the learning rate the cosine ends at.
        label_smoothing: of the training loss (validation loss is plain cross-entropy).
        clip_grad: maximum global gradient norm, or ``None`` for no clipping.
        ema: keep an exponential moving average of the weights (timm ``ModelEmaV3``); validation,
            best tracking and the saved model then use the average.
        ema_decay: its decay (with timm's warm-up, so short runs still average sensibly).
        stage1_epochs: length of the first stage of ``"staged"``; ``None`` is half the epochs.
        backbone_lr_scale: learning-rate factor of the pre-existing weights in ``"staged"``'s
            second stage.
        freeze_bn: batch-norm layers whose weights are frozen also keep their running statistics
            (eval mode). The backbone is then exactly the pretrained one, so the adapter alone
            reproduces the model and small batches cannot corrupt the statistics.
        amp: mixed precision; bfloat16 on the CPU and on GPUs that have it, else float16 with a
            gradient scaler. ``amp_dtype`` forces one (float16 is refused on the CPU).
        channels_last: NHWC memory format (faster convolutions on recent GPUs and CPUs).
        compile: ``torch.compile`` the training forward (needs a C++ compiler on the CPU).
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        workers: DataLoader processes; 0 loads in the training process (needed for a resume that
            is bit-identical to an uninterrupted run when the training transforms are random).
        seed: seeds weights of new layers, data order and augmentation.
        checkpoint_every_steps / checkpoint_every_seconds: mid-epoch checkpoints (0 disables
            either); a checkpoint is always written at the end of every epoch.
    """

    epochs: int = 10
    batch_size: int = 32
    lr: float | None = None
    train: str = "se"
    opt: str = "adamw"
    weight_decay: float | None = None
    momentum: float = 0.9
    warmup_epochs: float | None = None
    min_lr: float = 0.0
    label_smoothing: float = 0.1
    clip_grad: float | None = None
    ema: bool = False
    ema_decay: float = 0.999
    stage1_epochs: int | None = None
    backbone_lr_scale: float = 0.1
    freeze_bn: bool = True
    amp: bool = False
    amp_dtype: str = "auto"
    channels_last: bool = False
    compile: bool = False
    device: str = "auto"
    workers: int = 0
    seed: int = 0
    checkpoint_every_steps: int = 0
    checkpoint_every_seconds: float = 600.0

    def __post_init__(self) -> None:
        _positive_int("epochs", self.epochs)
        _positive_int("batch_size", self.batch_size)
        _choice("train", self.train, TRAIN_MODES)
        _choice("opt", self.opt, OPTIMIZERS)
        _choice("amp_dtype", self.amp_dtype, AMP_DTYPES)
        _int_at_least("workers", self.workers, 0)
        _int_at_least("seed", self.seed, 0)
        if self.seed >= 2**32:  # the per-epoch seeds derived from it must fit the generators' 64 bits
            raise ValueError(f"seed must be below 2**32 (4294967296), got {self.seed}")
        _int_at_least("checkpoint_every_steps", self.checkpoint_every_steps, 0)
        if self.warmup_epochs is None:
            self.warmup_epochs = 1.0 if self.epochs > 1 else 0.1
        for name in ("momentum", "warmup_epochs", "min_lr", "checkpoint_every_seconds"):
            _number_at_least(name, getattr(self, name), 0.0)
        if not 0.0 <= _number("label_smoothing", self.label_smoothing) < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}; 0.1 is the usual value")
        if not 0.0 < _number("ema_decay", self.ema_decay) < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay!r}; try 0.999")
        if not 0.0 < _number("backbone_lr_scale", self.backbone_lr_scale) <= 1.0:
            raise ValueError(f"backbone_lr_scale must be in (0, 1], got {self.backbone_lr_scale!r}; try 0.1")
        if self.clip_grad is not None and _number("clip_grad", self.clip_grad) <= 0:
            raise ValueError(f"clip_grad must be a positive norm or None, got {self.clip_grad!r}; try 1.0")
        # a one-epoch run warms up for all of it only when asked to (older versions' default, which --resume repeats)
        if self.warmup_epochs >= self.epochs and self.epochs > 1:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs:g}) must be shorter than epochs ({self.epochs}), or "
                             "the learning rate never reaches lr; lower --warmup-epochs")
        if not isinstance(self.device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        for name in ("freeze_bn", "ema", "amp", "channels_last", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        self._resolve_defaults()

    def _resolve_defaults(self) -> None:
        group = "all" if self.train == "all" else "new"
        if self.lr is None:
            self.lr = DEFAULT_LR[self.opt][group]
        if _number("lr", self.lr) <= 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}; try {DEFAULT_LR[self.opt][group]:g}")
        if self.weight_decay is None:
            self.weight_decay = DEFAULT_WEIGHT_DECAY[self.opt]
        _number_at_least("weight_decay", self.weight_decay, 0.0)
        if self.train == "staged":
            if self.epochs < 2:
                raise ValueError("train='staged' needs at least 2 epochs (one per stage); raise --epochs "
                                 "or use --train se")
            if self.stage1_epochs is None:
                self.stage1_epochs = max(1, self.epochs // 2)
            if not isinstance(self.stage1_epochs, int) or not 1 <= self.stage1_epochs < self.epochs:
                raise ValueError(f"stage1_epochs must be an integer in [1, epochs), got {self.stage1_epochs!r}; "
                                 f"with {self.epochs} epochs try {max(1, self.epochs // 2)}")
        elif self.stage1_epochs is not None:
            raise ValueError(f"stage1_epochs only applies to train='staged', not {self.train!r}; drop it")
        if self.amp_dtype != "auto" and not self.amp:
            raise ValueError(f"amp_dtype={self.amp_dtype!r} only applies with amp=True (--amp), which is off; "
                             "turn it on or drop the dtype")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any]) -> "TrainOptions":
        """Build from keyword arguments, naming any unknown ones (a typo must not be silently ignored)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"unknown training option(s) {unknown}; known options are {sorted(known)}")
        return cls(**kwargs)

    def recipe(self) -> dict[str, Any]:
        """The options that determine the result: compared when a run is resumed."""
        return {k: v for k, v in self.to_dict().items() if k not in RUNTIME_FIELDS}

    def runtime(self) -> dict[str, Any]:
        return {k: v for k, v in self.to_dict().items() if k in RUNTIME_FIELDS}


def parse_checkpoint_every(text: str) -> tuple[int, float]:
    """``"200"`` -> every 200 steps; ``"30s"``, ``"10m"``, ``"1h"`` -> by wall time; ``"0"`` -> epochs only.

    Returns ``(steps, seconds)`` with the unused one 0.
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", str(text))
    if not match:
        raise ValueError(f"--checkpoint-every takes a step count (200) or a duration (30s, 10m, 1h), got {text!r}")
    value, unit = match.groups()
    if not unit:
        if "." in value:
            raise ValueError(f"--checkpoint-every step count must be a whole number, got {text!r}; "
                             "add s/m/h for a duration")
        return int(value), 0.0
    return 0, float(value) * {"s": 1, "m": 60, "h": 3600}[unit]


def _number(name: str, value: Any) -> float:
    """``value`` as a float, refusing NaN and infinity.

    Every range check below is a comparison, and a comparison with NaN is always false: without this,
    ``lr=inf`` or ``clip_grad=nan`` would pass validation and train to NaN weights with exit status 0.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {value!r}; nan and inf are not valid settings, "
                         "give an ordinary number (or leave the option out for its default)")
    return number


def _number_at_least(name: str, value: Any, low: float) -> None:
    if _number(name, value) < low:
        raise ValueError(f"{name} must be >= {low:g}, got {value!r}")


def _int_at_least(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _positive_int(name: str, value: Any) -> None:
    _int_at_least(name, value, 1)


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
