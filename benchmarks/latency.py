"""Inference latency: retrofitted model vs timm's hand-written SE model vs the base model.

The retrofitted model is built with ``init="paper"`` and given the hand-written model's weights, so
both compute the same function; any gap is the cost of the rewrite itself. It is timed twice: as
``apply`` builds it (the SE block does the residual add in one ``addcmul`` pass, in place where the
original added in place, and a bottleneck's SE squeezes before ``conv3``/``bn3``) and with
``fuse_add=False, early_squeeze=False`` ("plain ops": the ops of the hand-written block).
Models run interleaved, one timed forward each per round, in a new order each round, each after
``--settle`` untimed forwards (default 1) so that it runs with the memory state it leaves for itself,
as a model serving requests does; the figure is the median of the rounds, with bootstrap 95 %
intervals over rounds for the ratios to the base model.

``--base-and-retrofit`` times only the base model and the retrofit, for the overhead over the base
model alone: half the forwards per round, so twice the rounds (and a narrower interval) per minute.

    python benchmarks/latency.py [--batch 8] [--size 224] [--repeats 15] [--settle 1] [--compile] [--base-and-retrofit]
"""
from __future__ import annotations

import argparse

import torch

from _common import PAIRS, add_out_argument, interleaved, median, ratio_ci, se_models, write

def summarise(base: str, mode: str, times: dict[str, list[float]]) -> dict:
    """Medians and ratios of the models that were timed (``--base-and-retrofit`` times only two)."""
    med = {k: median(v) for k, v in times.items()}

    def paired(a: str, b: str) -> float:
        # Each round runs the models back to back, so the per-round ratio cancels slow drifts in load.
        return median([x / y for x, y in zip(times[a], times[b])])

    row = {"model": base, "mode": mode, "median_s": med,
           "retrofitted_over_base": med["retrofitted"] / med["base"],
           "retrofitted_over_base_paired": paired("retrofitted", "base"),
           "retrofitted_over_base_ci95": ratio_ci(times["retrofitted"], times["base"]),
           "retrofitted_over_base_paired_ci95": ratio_ci(times["retrofitted"], times["base"], paired=True),
           "times_s": times}
    if "hand-written SE" in times:
        row.update({"retrofitted_over_hand_written": med["retrofitted"] / med["hand-written SE"],
                    "retrofitted_over_hand_written_paired": paired("retrofitted", "hand-written SE"),
                    "plain_over_hand_written": med["retrofitted, plain ops"] / med["hand-written SE"],
                    "plain_over_hand_written_paired": paired("retrofitted, plain ops", "hand-written SE"),
                    "plain_over_base": med["retrofitted, plain ops"] / med["base"],
                    "hand_written_over_base": med["hand-written SE"] / med["base"],
                    "hand_written_over_base_ci95": ratio_ci(times["hand-written SE"], times["base"])})
    return row


def _ms(row: dict, name: str) -> str:
    return f"{row['median_s'][name] * 1e3:.1f}" if name in row["median_s"] else "-"


def _ratio(row: dict, key: str) -> str:
    return f"{row[key]:.3f}" if key in row else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--models", nargs="+", default=list(PAIRS))
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd models")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--settle", type=int, default=1, help="untimed forwards before each timed one")
    parser.add_argument("--base-and-retrofit", action="store_true",
                        help="time only the base model and the retrofit: twice the rounds per minute for retro/base")
    parser.add_argument("--name", default=None, help="results/NAME.json (default latency or latency_compile)")
    add_out_argument(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.rand(args.batch, 3, args.size, args.size)
    rows = []
    for base in args.models:
        models = se_models(base)
        if args.base_and_retrofit:
            models = {k: models[k] for k in ("base", "retrofitted")}
        modes = [("eager", models)]
        if args.compile:
            modes.append(("compiled", {k: torch.compile(m) for k, m in models.items()}))
        for mode, ms in modes:
            with torch.inference_mode():
                times = interleaved({k: (lambda m=m: m(x)) for k, m in ms.items()}, args.repeats, shuffle=True,
                                    settle=args.settle)
            rows.append(summarise(base, mode, times))
    print(f"batch {args.batch}, {args.size}x{args.size}, {torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"{'model':<17}{'mode':<9}{'base':>7}{'SE':>7}{'retro':>7}{'plain':>7}  {'retro/SE':>8}{'plain/SE':>9}"
          f"  {'SE/base':>7}{'retro/base':>11}{'95% interval':>15}{'paired':>7}{'95% interval':>15}")
    for r in rows:
        lo, hi = r["retrofitted_over_base_ci95"]
        plo, phi = r["retrofitted_over_base_paired_ci95"]
        print(f"{r['model']:<17}{r['mode']:<9}{_ms(r, 'base'):>7}{_ms(r, 'hand-written SE'):>7}"
              f"{_ms(r, 'retrofitted'):>7}{_ms(r, 'retrofitted, plain ops'):>7}  "
              f"{_ratio(r, 'retrofitted_over_hand_written'):>8}{_ratio(r, 'plain_over_hand_written'):>9}  "
              f"{_ratio(r, 'hand_written_over_base'):>7}{r['retrofitted_over_base']:>11.3f}"
              f"{f'{lo:.3f}-{hi:.3f}':>15}{r['retrofitted_over_base_paired']:>7.3f}{f'{plo:.3f}-{phi:.3f}':>15}")
    print("(times in ms; paired: median of per-round ratios; interval: bootstrap over rounds)")
    print("written", write(args.name or "latency" + ("_compile" if args.compile else ""),
                           {"batch": args.batch, "size": args.size, "repeats": args.repeats, "settle": args.settle,
                            "rows": rows}, out=args.out))


if __name__ == "__main__":
    main()
