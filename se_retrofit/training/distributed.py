"""torchrun support: one process per device, DDP, and the few collectives the loop needs.

Everything here degrades to a no-op in a single process, so the loop has one code path. Backend:
nccl on GPUs, gloo on the CPU (the only one that works there, and what the tests use).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_world_size() -> int:
    """Processes torchrun started (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(device: torch.device) -> DistContext:
    """Join the process group torchrun describes in the environment, or reuse one already joined."""
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    world = launched_world_size()
    if world <= 1:
        return DistContext()
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this PyTorch build; run without torchrun")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")),
                       owns_group=True)


def local_rank() -> int:
    """This process's GPU index on its node under torchrun (0 otherwise)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def teardown(ctx: DistContext) -> None:
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, device: torch.device, ctx: DistContext) -> nn.Module:
    """DDP over the parameters that currently require grad (re-wrap when that set changes)."""
    if not ctx.enabled:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def all_reduce_sum(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if ctx.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_min(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if ctx.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return tensor


def any_rank(flags: list[bool], device: torch.device, ctx: DistContext) -> list[bool]:
    """Element-wise OR over ranks: every process must stop or checkpoint at the same step."""
    if not ctx.enabled:
        return flags
    tensor = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [bool(v) for v in tensor.tolist()]


def gather(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's ``obj``, in rank order (each process has its own RNG and running sums)."""
    if not ctx.enabled:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def main_first(fn: Callable[[], T], ctx: DistContext) -> T:
    """Run ``fn`` on rank 0 only; every rank gets its result, or raises its error.

    Without this, a refused ``--out`` on rank 0 would leave the other ranks waiting in a collective.
    """
    if not ctx.enabled:
        return fn()
    box: list[Any] = [None, None]
    if ctx.is_main:
        try:
            box[1] = fn()
        except (ValueError, OSError, RuntimeError) as exc:
            box[0] = (next(c.__name__ for c in type(exc).__mro__ if c.__name__ in _ERRORS), str(exc))
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        error = _ERRORS.get(box[0][0], RuntimeError)(box[0][1])
        error.echo_of_rank0 = not ctx.is_main  # rank 0 reports it; the CLI leaves the copies unprinted
        raise error
    return box[1]


def on_every_rank(fn: Callable[[], T], ctx: DistContext) -> T:
    """Run ``fn`` on every rank (the data scan, the checks before training) and fail together, printed once.

    Ranks usually fail alike (the same data and options), and then N copies of one error would be
    printed; but a problem only one rank meets (data missing on a second node) must still be printed
    and must not leave the others waiting in a collective. So every rank learns every rank's outcome:
    the first failing rank's error is the one the CLI prints, every rank raises.
    """
    if not ctx.enabled:
        return fn()
    result: Any = None
    error: BaseException | None = None
    try:
        result = fn()
    except (ValueError, OSError, RuntimeError) as exc:
        error = exc
    outcomes: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(outcomes, None if error is None else (type(error).__name__, str(error)))
    failed = [(rank, outcome) for rank, outcome in enumerate(outcomes) if outcome is not None]
    if not failed:
        return result
    first, (kind, text) = failed[0]
    if error is None:
        error = _ERRORS.get(kind, RuntimeError)(f"on rank {first}: {text}")
    error.echo_of_rank0 = ctx.rank != first  # printed by the first rank that failed
    raise error


_SAME_DATA = "Every process must read the same data (a shared file system, or identical copies on every node)."


def same_on_every_rank(value: Any, describe: Callable[[Any], str], ctx: DistContext, hint: str = _SAME_DATA) -> None:
    """Raise on every rank (printed by rank 0) unless every rank computed the same ``value``.

    For what each process builds on its own and DDP assumes equal, such as the list of images: two
    nodes with different copies of a folder would each shard their own list, and the run would train on
    neither without a word. ``describe`` turns a value into words for the message, which ends with ``hint``.
    """
    if not ctx.enabled:
        return
    values = gather(value, ctx)
    differ = [rank for rank, v in enumerate(values) if v != values[0]]
    if not differ:
        return
    error = ValueError(f"the processes do not agree: rank 0 has {describe(values[0])}, rank {differ[0]} has "
                       f"{describe(values[differ[0]])}. {hint}")
    error.echo_of_rank0 = not ctx.is_main
    raise error


_ERRORS = {cls.__name__: cls for cls in (ValueError, FileNotFoundError, FileExistsError, PermissionError,
                                          RuntimeError, OSError, NotADirectoryError, IsADirectoryError)}
