"""Device and mixed-precision choices, decided once with a clear error for what cannot work.

AMP on the CPU uses bfloat16 autocast (PyTorch's CPU autocast supports it, and it needs no gradient
scaler since bfloat16 has float32's exponent range); float16 is refused there because CPU float16
kernels are incomplete and slow. On CUDA, ``auto`` takes bfloat16 where the GPU has it (Ampere and
later), else float16 with a ``GradScaler``.
"""
from __future__ import annotations

import contextlib
from typing import ContextManager

import torch

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(spec: str, local_rank: int = 0, world_size: int = 1) -> torch.device:
    """``auto``/``cpu``/``cuda``/``cuda:N`` -> a device; under torchrun each process takes its local GPU."""
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(f"--device {spec} was asked for, but CUDA is not available "
                           f"(torch {torch.__version__}, torch.cuda.is_available() is False); "
                           "use --device cpu or --device auto")
    if spec.startswith("cuda:") and world_size == 1:
        index = int(spec.split(":", 1)[1])
    else:
        index = local_rank
    if index >= torch.cuda.device_count():
        raise RuntimeError(f"GPU {index} was asked for but only {torch.cuda.device_count()} are visible; "
                           "check --device, --nproc_per_node and CUDA_VISIBLE_DEVICES")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def amp_dtype(device: torch.device, amp: bool, requested: str = "auto") -> torch.dtype | None:
    """The autocast dtype, or None for full precision."""
    if not amp:
        return None
    if device.type == "cpu":
        if requested == "float16":
            raise ValueError("float16 AMP is not supported on the CPU (its float16 kernels are incomplete); "
                             "use --amp-dtype bfloat16, or drop --amp")
        return torch.bfloat16
    if requested == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return _DTYPES[requested]


def autocast(device: torch.device, dtype: torch.dtype | None) -> ContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler | None:
    """A scaler only for float16, whose narrow range underflows small gradients without one."""
    if dtype is torch.float16:
        return torch.amp.GradScaler(device.type)
    return None
