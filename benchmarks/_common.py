"""Shared by the benchmark scripts: machine description, interleaved timing, JSON output."""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).parent / "results"


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "timm": _version("timm"), "python": platform.python_version(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "host": platform.node(), "cpu_capability": _cpu_capability(), **code_version()}
    allocator = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_") or k == "LD_PRELOAD"}
    if allocator:  # glibc malloc tuning or a preloaded allocator changes CPU timings a lot
        info["allocator_env"] = allocator
    return info


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _cpu_capability() -> str | None:
    """The vector ISA PyTorch's CPU kernels use (``AVX512``, ``AVX2``): two hosts with one CPU label can
    differ in it, and with it in kernels and rounding."""
    try:
        return torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        return None


def code_version() -> dict:
    """Which code measured: the commit, and whether the tree had uncommitted changes (outside
    ``benchmarks/results``, which the benchmarks themselves write).

    Tables from different code states sit side by side in the docs; without this only prose could say
    which is which. A copy made elsewhere (the GPU machine gets the working tree, with a ``.git`` that can
    be older than it) says so with ``SE_RETROFIT_COMMIT`` (``SE_RETROFIT_COMMIT=$(git rev-parse HEAD)``
    where the copy was made), which wins over the copy's own git: that git would name its stale commit,
    with the newer tree as uncommitted changes.
    """
    import subprocess

    given = os.environ.get("SE_RETROFIT_COMMIT")
    repo = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        # results written by an earlier step of the same run (gpu_checks.sh) are not code changes
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                     ":(exclude)benchmarks/results"], cwd=repo,
                                    capture_output=True, text=True, timeout=10, check=True).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit = dirty = None
    if given and not (commit and (commit.startswith(given) or given.startswith(commit))):
        # a copy: whether its tree matched the commit named is the sender's word, not checked here
        return {"commit": given, "uncommitted_changes": None, "commit_source": "SE_RETROFIT_COMMIT"}
    return {"commit": commit, "uncommitted_changes": dirty}


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2,
                shuffle: bool = False, settle: int = 0) -> dict[str, list[float]]:
    """Time each function once per round, round after round, so drift in machine load hits all alike.

    ``shuffle`` runs each round in a new (seeded) order, so that no function always follows the same
    one. ``settle`` untimed calls before each timed one let the function find memory as it leaves it
    for itself: after another model's forward the allocator has returned or reshaped the heap, and the
    first forward pays page faults for fresh memory that a model serving requests alone never pays.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    rng = random.Random(0)
    for _ in range(repeats):
        order = list(fns)
        if shuffle:
            rng.shuffle(order)
        for name in order:
            fn = fns[name]
            for _ in range(settle):
                fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def ratio_ci(num: list[float], den: list[float], paired: bool = False, samples: int = 2000,
             level: float = 0.95) -> tuple[float, float]:
    """Bootstrap interval of ``median(num) / median(den)`` (or, ``paired``, of the median per-round ratio).

    Whole rounds are resampled, so the two times of one round stay together.
    """
    rng = random.Random(0)
    n = len(num)
    ratios = []
    for _ in range(samples):
        idx = [rng.randrange(n) for _ in range(n)]
        if paired:
            ratios.append(median([num[i] / den[i] for i in idx]))
        else:
            ratios.append(median([num[i] for i in idx]) / median([den[i] for i in idx]))
    ratios.sort()
    tail = (1 - level) / 2
    return ratios[int(tail * samples)], ratios[min(samples - 1, int((1 - tail) * samples))]


# Base models with a hand-written SE twin in timm, and the retrofits the scripts compare with it.
PAIRS = {"resnet50": "seresnet50", "resnext50_32x4d": "seresnext50_32x4d"}
RETROFITS = {"retrofitted": {}, "retrofitted, plain ops": {"fuse_add": False, "early_squeeze": False}}


def se_models(base: str, only: str | None = None) -> dict[str, torch.nn.Module]:
    """``base``, its hand-written SE twin and the RETROFITS (``init="paper"`` with the twin's weights, so
    every SE model computes the same function), in eval mode; or just the one named ``only``."""
    import warnings

    import timm

    import se_retrofit

    # zero_init_last=False: timm zeroes each residual branch's last norm, so the SE blocks would gate zeros
    # and "same function" would hold trivially
    hand = timm.create_model(PAIRS[base], zero_init_last=False).eval()
    models = {"base": timm.create_model(base, zero_init_last=False).eval(), "hand-written SE": hand}
    for name, options in RETROFITS.items():
        if only is not None and name != only:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = se_retrofit.SEConfig(init="paper", **options)
            models[name] = se_retrofit.apply(timm.create_model(base, zero_init_last=False), config).eval()
        models[name].load_state_dict(hand.state_dict())
    return {only: models[only]} if only else models


def add_out_argument(parser: argparse.ArgumentParser) -> None:
    """``--out DIR``: where the JSON goes. The default is the folder the docs' tables are generated from,
    so a trial run elsewhere neither replaces a committed result nor becomes a table."""
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help=f"folder for the JSON result (default {RESULTS.relative_to(RESULTS.parents[1])}, "
                             "which docs/scripts/gen_benchmarks.py renders)")


def write(name: str, payload: dict, out: Path = RESULTS) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2) + "\n")
    return path


def make_train_step(model: torch.nn.Module, mode: str, batch: int, size: int, device: str = "cpu",
                    dtype: torch.dtype | None = None, channels_last: bool = False) -> Callable[[], None]:
    """One training step as ``convert-and-finetune`` runs it: trainable set, frozen BN, AdamW groups.

    ``mode`` is ``"all"`` or ``"se"``; ``dtype`` turns on autocast (bfloat16 needs no gradient scaler).
    """
    from timm.optim import create_optimizer_v2

    from se_retrofit.training.freeze import freeze_batchnorm, new_parameter_names, parameter_groups, set_trainable

    new = new_parameter_names(model)
    set_trainable(model, new, backbone=mode == "all")
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    model.train()
    if mode != "all":
        freeze_batchnorm(model)
    optimizer = create_optimizer_v2(parameter_groups(model, new, mode, 0.05, 1.0), opt="adamw", lr=1e-4,
                                    weight_decay=0.05)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=gen).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), generator=gen).to(device)
    device_type = torch.device(device).type

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()

    step.optimizer = optimizer  # type: ignore[attr-defined]  # lets a memory probe free the gradients first
    return step
