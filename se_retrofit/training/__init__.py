"""The fine-tuning engine behind `se_retrofit.finetune` and ``se-retrofit convert-and-finetune``.

One idea per module: ``options`` (validated settings), ``freeze`` (what trains), ``devices`` (device,
AMP), ``distributed`` (torchrun/DDP), ``sampling`` (resumable data order), ``state`` (checkpoints),
``interrupt`` (Ctrl-C), ``outputs`` (files in the run folder) and ``loop`` (the epochs themselves).
"""
from .options import TRAIN_MODES, TrainOptions

__all__ = ["TRAIN_MODES", "TrainOptions"]
