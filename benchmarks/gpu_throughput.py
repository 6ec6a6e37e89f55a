"""GPU images/s: retrofitted resnet50 vs timm's hand-written seresnet50 vs resnet50, training and inference.

Settings are what a GPU user runs: autocast (bfloat16 by default), channels_last, optionally
``torch.compile``. The retrofitted model uses ``init="paper"`` with seresnet50's weights, so both SE
networks compute the same function; any gap is the cost of the rewrite. "plain ops" is the retrofit
with ``fuse_add=False, early_squeeze=False`` (the hand-written model's ops). Configurations run
interleaved, ``--steps`` iterations each per round, and the figure per configuration is the median
over ``--rounds`` rounds. Peak memory is ``torch.cuda.max_memory_allocated`` above what was allocated
before the configuration's steps (its activations and gradients; weights and optimizer state excluded).

    python benchmarks/gpu_throughput.py [--batch 128] [--size 224] [--rounds 7] [--steps 10] [--compile]
        [--compiled-only] [--configs base hand retro plain retro-se] [--kinds train infer]

``--compiled-only --configs base hand retro`` is the short compiled run: compiling a training
configuration takes a minute or more, and the GPU machine is lent by the minute.
"""
from __future__ import annotations

import argparse
import time
from typing import Callable

import torch

from _common import add_out_argument, make_train_step, median, se_models, write

TRAIN = {"resnet50 (base), all": ("base", "all"), "seresnet50 (timm), all": ("hand-written SE", "all"),
         "retrofitted resnet50, all": ("retrofitted", "all"),
         "retro. resnet50 plain ops, all": ("retrofitted, plain ops", "all"),
         "retrofitted resnet50, se": ("retrofitted", "se")}
INFER = {"resnet50 (base)": "base", "seresnet50 (timm)": "hand-written SE", "retrofitted resnet50": "retrofitted",
         "retro. resnet50 plain ops": "retrofitted, plain ops"}
# --configs keys: which rows of TRAIN and INFER run (retro-se has no inference row: it is the same model).
CONFIGS = {"base": ("resnet50 (base), all", "resnet50 (base)"),
           "hand": ("seresnet50 (timm), all", "seresnet50 (timm)"),
           "retro": ("retrofitted resnet50, all", "retrofitted resnet50"),
           "plain": ("retro. resnet50 plain ops, all", "retro. resnet50 plain ops"),
           "retro-se": ("retrofitted resnet50, se", None)}


def make_infer_step(model: torch.nn.Module, batch: int, size: int, dtype: torch.dtype | None,
                    channels_last: bool) -> Callable[[], None]:
    model.cuda().eval()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, size, size, device="cuda")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def step() -> None:
        with torch.inference_mode(), torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
            model(x)

    return step


def rounds(steps: dict[str, Callable[[], None]], n_rounds: int, n_steps: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per step of each configuration, one median-able figure per round, interleaved."""
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    torch.cuda.synchronize()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(n_rounds):
        for name, fn in steps.items():
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(n_steps):
                fn()
            torch.cuda.synchronize()
            times[name].append((time.perf_counter() - start) / n_steps)
    return times


def peak_memory_mib(fn: Callable[[], None]) -> float:
    """Peak memory of two steps above the weights and optimizer state: the previous step's gradients are
    freed first, so that the figure holds the gradients as well as the activations."""
    optimizer = getattr(fn, "optimizer", None)
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def run(kind: str, args: argparse.Namespace, dtype: torch.dtype | None, compiled: bool) -> list[dict]:
    models = se_models("resnet50")
    batch = args.batch if kind == "train" else args.infer_batch
    steps: dict[str, Callable[[], None]] = {}
    chosen = {CONFIGS[key][0 if kind == "train" else 1] for key in args.configs}
    if kind == "train":
        for name, (which, mode) in TRAIN.items():
            if name not in chosen:
                continue
            model = models[which] if mode == "all" or which != "retrofitted" else se_models("resnet50", only=which)[which]
            if compiled:
                model = torch.compile(model)
            steps[name] = make_train_step(model, mode, batch, args.size, "cuda", dtype, args.channels_last)
    else:
        for name, which in INFER.items():
            if name not in chosen:
                continue
            model = models[which]
            step = make_infer_step(model, batch, args.size, dtype, args.channels_last)
            steps[name] = step if not compiled else make_infer_step(torch.compile(model), batch, args.size, dtype,
                                                                    args.channels_last)
    started = time.perf_counter()
    times = rounds(steps, args.rounds, args.steps, warmup=3)
    rows = []
    hand = "seresnet50 (timm)" + (", all" if kind == "train" else "")
    retro = "retrofitted resnet50" + (", all" if kind == "train" else "")
    paired = median([r / h for r, h in zip(times[retro], times[hand])]) if hand in times and retro in times else None
    for name, values in times.items():
        rows.append({"kind": kind, "compiled": compiled, "config": name, "batch": batch,
                     "median_step_s": median(values), "images_per_s": batch / median(values),
                     "peak_mib_above_start": peak_memory_mib(steps[name]) if kind == "train" else None,
                     "step_s": values})
    for row in rows:
        row["retrofitted_over_hand_written_time_paired"] = paired
    print(f"  ({kind}, {'compiled' if compiled else 'eager'}: {time.perf_counter() - started:.0f} s)", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128, help="training batch")
    parser.add_argument("--infer-batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10, help="steps per configuration per round")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd models")
    parser.add_argument("--compiled-only", action="store_true", help="time only torch.compile'd models")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS),
                        help="configurations to time (default: all); hand and retro give the paired ratio")
    parser.add_argument("--kinds", nargs="+", choices=["train", "infer"], default=["train", "infer"])
    parser.add_argument("--name", default="gpu_throughput", help="results/NAME.json")
    add_out_argument(parser)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_throughput.py needs a CUDA GPU; benchmarks/latency.py and train_step.py time the CPU")
    torch.backends.cudnn.benchmark = True
    dtype = None if args.dtype == "float32" else getattr(torch, args.dtype)
    rows = []
    modes = [True] if args.compiled_only else [False, True] if args.compile else [False]
    for compiled in modes:
        for kind in args.kinds:
            rows += run(kind, args, dtype, compiled)
    print(f"{torch.cuda.get_device_name(0)}, {args.dtype} autocast, channels_last={args.channels_last}, "
          f"{args.size}px, median of {args.rounds} rounds x {args.steps} steps")
    print(f"{'kind':<6}{'mode':<10}{'configuration':<28}{'batch':>6}{'images/s':>10}{'ms/step':>9}{'peak MiB':>10}")
    for r in rows:
        peak = f"{r['peak_mib_above_start']:.0f}" if r["peak_mib_above_start"] is not None else "-"
        print(f"{r['kind']:<6}{'compiled' if r['compiled'] else 'eager':<10}{r['config']:<28}{r['batch']:>6}"
              f"{r['images_per_s']:>10.0f}{r['median_step_s'] * 1e3:>9.1f}{peak:>10}")
    for kind in args.kinds:
        for compiled in sorted({r["compiled"] for r in rows}):
            group = {r["config"]: r for r in rows if r["kind"] == kind and r["compiled"] == compiled}
            hand = group.get("seresnet50 (timm)" + (", all" if kind == "train" else ""))
            retro = group.get("retrofitted resnet50" + (", all" if kind == "train" else ""))
            base = group.get("resnet50 (base)" + (", all" if kind == "train" else ""))
            if hand is None or retro is None or base is None:
                continue
            print(f"{kind} {'compiled' if compiled else 'eager'}: retrofitted/hand-written step time "
                  f"{retro['median_step_s'] / hand['median_step_s']:.3f} (per-round "
                  f"{retro['retrofitted_over_hand_written_time_paired']:.3f}); hand-written/base "
                  f"{hand['median_step_s'] / base['median_step_s']:.3f}; retrofitted/base "
                  f"{retro['median_step_s'] / base['median_step_s']:.3f}")
    print("written", write(args.name, {"memory_baseline": "weights and optimizer state (gradients freed)","size": args.size, "rounds": args.rounds, "steps": args.steps,
                                       "dtype": args.dtype, "channels_last": args.channels_last, "rows": rows}, out=args.out))


if __name__ == "__main__":
    main()
