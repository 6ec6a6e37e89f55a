"""Training-step cost: retrofitted resnet50 vs timm's hand-written seresnet50, and --train se vs --train all.

Each step is what ``convert-and-finetune`` runs: forward, cross-entropy, backward, AdamW step, with
the trainable set, frozen batch norms and parameter groups built by ``se_retrofit.training.freeze``.
The retrofitted model uses ``init="paper"`` and the hand-written model's weights, so both compute
the same function. Times are medians of interleaved rounds (one step of each configuration per
round). Memory is measured in a fresh process per configuration: the peak resident set size
(``VmHWM``, reset once the model is built and freed heap returned) minus the RSS at that moment, i.e.
what three training steps add on top of the weights: gradients, optimizer state, activations (Linux
only). Rounds run in a new order each, with one untimed step before each timed one.

    python benchmarks/train_step.py [--batch 8] [--size 160] [--repeats 7] [--threads N] [--memory-runs 5] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import gc
import subprocess
import sys
import warnings
from pathlib import Path

import timm
import torch

import se_retrofit
from _common import RESULTS, interleaved, machine, make_train_step, median

CONFIGS = {
    "seresnet50 (timm), all": ("hand", "all"),
    "retrofitted resnet50, all": ("retro", "all"),
    "retrofitted resnet50, se": ("retro", "se"),
}


def build(kind: str) -> torch.nn.Module:
    """The model, with nothing else left allocated: the hand-written model whose weights the retrofit takes
    is dropped, and the retrofit rewrites its base in place (no copy), so that the memory worker's baseline
    holds one model, as the hand-written configuration's does."""
    hand = timm.create_model("seresnet50", zero_init_last=False)
    if kind == "hand":
        return hand
    state = hand.state_dict()
    del hand
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        retro = se_retrofit.apply(timm.create_model("resnet50", zero_init_last=False), init="paper", inplace=True)
    retro.load_state_dict(state)
    return retro


def _release_freed_heap() -> None:
    """Hand freed heap back to the system: glibc keeps it, still counted in the RSS, and a baseline read
    over it makes what training then reuses look free."""
    import ctypes

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}; the memory measurement needs Linux")


def memory_worker(name: str, batch: int, size: int) -> None:
    kind, mode = CONFIGS[name]
    step = make_train_step(build(kind), mode, batch, size)
    _release_freed_heap()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
    built = _status_mib("VmRSS")
    for _ in range(3):
        step()
    print(json.dumps({"after_build_mib": built, "peak_mib": _status_mib("VmHWM")}))


def measure_memory(name: str, args: argparse.Namespace) -> dict:
    """Medians over ``--memory-runs`` fresh processes: one process's figure moves by tens of MiB between
    runs (where glibc's arenas happen to put the heap), as much as the configurations differ."""
    runs = []
    for _ in range(args.memory_runs):
        done = subprocess.run([sys.executable, __file__, "--memory-worker", name, "--batch", str(args.batch),
                               "--size", str(args.size), "--threads", str(args.threads)],
                              capture_output=True, text=True, check=True)
        run = json.loads(done.stdout.strip().splitlines()[-1])
        run["training_mib"] = run["peak_mib"] - run["after_build_mib"]
        runs.append(run)
    result = {key: median([r[key] for r in runs]) for key in ("after_build_mib", "peak_mib", "training_mib")}
    result["training_mib_runs"] = [r["training_mib"] for r in runs]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--memory-runs", type=int, default=5, help="fresh processes per configuration for memory")
    parser.add_argument("--json", type=Path, default=RESULTS / "train_step.json")
    parser.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_worker:
        memory_worker(args.memory_worker, args.batch, args.size)
        return

    steps = {name: make_train_step(build(kind), mode, args.batch, args.size) for name, (kind, mode) in CONFIGS.items()}
    times = interleaved(steps, repeats=args.repeats, warmup=2, shuffle=True, settle=1)
    medians = {name: median(values) for name, values in times.items()}
    memory = {name: measure_memory(name, args) for name in CONFIGS}

    retro_all, hand_all = medians["retrofitted resnet50, all"], medians["seresnet50 (timm), all"]
    retro_se = medians["retrofitted resnet50, se"]
    # Each round times all configurations back to back, so per-round ratios cancel slow drift in load.
    paired = median([r / h for r, h in zip(times["retrofitted resnet50, all"], times["seresnet50 (timm), all"])])
    paired_se = median([s / a for s, a in zip(times["retrofitted resnet50, se"], times["retrofitted resnet50, all"])])
    print(f"training step, batch {args.batch} at {args.size}px, CPU, {args.threads} thread(s), "
          f"median of {args.repeats} interleaved rounds")
    print(f"{'configuration':<28} {'step (ms)':>10} {'peak RSS (MiB)':>15} {'training mem (MiB)':>19}")
    for name in CONFIGS:
        print(f"{name:<28} {medians[name] * 1e3:>10.1f} {memory[name]['peak_mib']:>15.0f} "
              f"{memory[name]['training_mib']:>19.0f}")
    print(f"retrofitted / hand-written (train all): {retro_all / hand_all:.3f} (ratio of medians), "
          f"{paired:.3f} (median of per-round ratios)")
    memory_ratio = (memory["retrofitted resnet50, se"]["training_mib"]
                    / memory["retrofitted resnet50, all"]["training_mib"])
    print(f"--train se / --train all (retrofitted): time {retro_se / retro_all:.3f} (per-round {paired_se:.3f}), "
          f"training memory {memory_ratio:.3f}")

    payload = {"machine": machine(), "batch": args.batch, "size": args.size, "repeats": args.repeats,
               "threads": args.threads, "step_seconds": times, "median_seconds": medians, "memory": memory,
               "memory_method": f"median of {args.memory_runs} fresh processes per configuration: VmHWM, reset after "
                                "building the model and returning freed heap (malloc_trim), minus VmRSS at that moment",
               "ratio_retrofitted_vs_handwritten": retro_all / hand_all,
               "ratio_retrofitted_vs_handwritten_per_round_median": paired,
               "ratio_se_vs_all_time_per_round_median": paired_se,
               "ratio_se_vs_all_time": retro_se / retro_all, "ratio_se_vs_all_training_memory": memory_ratio}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
