"""Where SE's inference time goes inside a real forward: op times from the profiler, SE ops against the base model.

End-to-end ratios on a shared machine move by a few percent from run to run, more than what SE
costs. The profiler measures each op where it really runs (feature maps just written by the
previous op, not hot in cache as in ``se_ops.py``), so the time of the ops SE adds can be read
directly: every op that the base model does not run (the squeeze, the excitation, the gate), and for
the rescale the difference between the SE model's ``addcmul`` (or ``mul``) and the base model's
residual ``add_``. That sum, over the base model's total op time, is SE's overhead measured from
inside the forward, against the paper's 1.8 % (ResNet-50 on a CPU, 164 -> 167 ms).

Models (``--model resnet50`` or ``resnext50_32x4d``): the base model; timm's SE twin; the retrofit
as ``apply`` builds it; and the retrofit with ``fuse_add=False, early_squeeze=False`` (the
hand-written block's ops). Batch 8 at 224 px, eval, ``inference_mode``; ``--rounds`` interleaved
rounds of one profiled forward per model (`op_times_by_round`); the figures are medians over rounds
and SE / base comes with a bootstrap 95 % interval of its per-round values.

    python benchmarks/se_overhead.py [--model resnet50] [--rounds 15] [--batch 8] [--size 224] [--threads N]
                                     [--variants retrofitted ...] [--no-page-faults]

``--variants`` profiles only some of the SE models (the base model always runs) and
``--no-page-faults`` skips the page-fault counts, which cost a fresh process per model: together they
make the run short enough for a borrowed machine with many cores, where every forward is profiled.
"""
from __future__ import annotations

import argparse
import random
import resource
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from _common import PAIRS, add_out_argument, median, ratio_ci, se_models, write

VARIANTS = ("hand-written SE", "retrofitted", "retrofitted, plain ops")
# Ops of the convolutional trunk: identical work in every model, the denominator's bulk.
TRUNK = ("aten::mkldnn_convolution", "aten::native_batch_norm", "aten::max_pool2d_with_indices")
# What a convolution runs as where oneDNN does not take it: the trunk's own on small inputs, and always the
# hand-written SE's 1x1 fc1/fc2. These cannot join TRUNK (that would drop the hand-written SE's cost), so a
# base model that shows them (`trunk_warning`) makes the figures meaningless.
SLOW_CONVOLUTIONS = ("aten::_slow_conv2d_forward", "aten::thnn_conv2d")


def op_times_by_round(models: dict[str, torch.nn.Module], x: torch.Tensor, rounds: int
                      ) -> dict[str, list[dict[str, float]]]:
    """Self CPU seconds per op name of one forward, per model and round.

    The models take turns, one profiled forward each per round in a new (seeded) order, each after an
    untimed one (as ``latency.py --settle 1``): a slow spell of the machine then hits the base model
    and the SE models of the same round alike, and the per-round ratios cancel it; profiled one after
    the other, a slow spell of this shared 2-core machine hits one model and not the others.
    """
    rng = random.Random(0)
    times: dict[str, list[dict[str, float]]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            model(x)
            model(x)
        for _ in range(rounds):
            order = list(models)
            rng.shuffle(order)
            for name in order:
                models[name](x)
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    models[name](x)
                per_op: dict[str, float] = defaultdict(float)
                for event in prof.key_averages():
                    per_op[event.key] += event.self_cpu_time_total / 1e6
                times[name].append(dict(per_op))
    return times


def page_faults(base: str, variant: str, x_shape: tuple[int, ...], threads: int) -> int:
    """Minor page faults of one forward, in a fresh process that runs only this model (steady state).

    glibc returns the memory of large freed tensors to the system and maps it again on the next
    forward, one fault per 4 KiB page, charged to whichever op first writes the page (usually a
    convolution): an SE block that keeps a tensor alive longer, or allocates one more, shows here rather
    than in its own ops. The count depends on the process's allocation history, so each model gets a
    process of its own and the fourth forward is counted; even so it changes between identical runs,
    so read it as the order of magnitude of this cost, not as a difference between the models.
    """
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import se_overhead; "
            f"print(se_overhead._faults_here({base!r}, {variant!r}, {tuple(x_shape)!r}, {threads}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(done.stdout.strip().splitlines()[-1])


def _faults_here(base: str, variant: str, x_shape: tuple[int, ...], threads: int) -> int:
    torch.set_num_threads(threads)
    model = se_models(base, only=variant)[variant]
    x = torch.rand(*x_shape)
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        model(x)
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def trunk_warning(base_times: list[dict[str, float]], size: int) -> str | None:
    """Why this run's SE figures are meaningless, or None: the base model's convolutions left oneDNN.

    At small inputs PyTorch runs some of the trunk's convolutions as ``_slow_conv2d_forward``, which is
    not in `TRUNK`: their time, and its noise, then lands in *SE ops* (at 32 px, SE / base read -14 % for
    the retrofit and +128 % for the hand-written SE).
    """
    ops = sorted({op for per_op in base_times for op in per_op if op in SLOW_CONVOLUTIONS})
    if not ops:
        return None
    return (f"the base model's own convolutions ran as {', '.join(ops)} at {size}x{size}, which the trunk ops "
            "left out of 'SE ops' do not include, so their time counts as SE's: the SE ops and SE / base figures "
            "of this run are meaningless. Run with a larger --size (the default, 224, where every trunk "
            "convolution ran on oneDNN in the committed runs).")


def attribute(base: dict[str, float], other: dict[str, float]) -> dict[str, float]:
    """Seconds per forward that ``other`` spends beyond ``base`` outside the trunk ops, by op."""
    extra = {}
    for op in set(base) | set(other):
        if op in TRUNK:
            continue
        delta = other.get(op, 0.0) - base.get(op, 0.0)
        if abs(delta) >= 1e-5:
            extra[op] = delta
    return dict(sorted(extra.items(), key=lambda kv: -abs(kv[1])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--model", choices=list(PAIRS), default="resnet50")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                        help="the SE models to profile against the base model (default: all three)")
    parser.add_argument("--no-page-faults", action="store_true", help="skip the page-fault counts (a process per model)")
    parser.add_argument("--name", default=None, help="results/NAME.json (default se_overhead, se_overhead_MODEL)")
    add_out_argument(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.rand(args.batch, 3, args.size, args.size)
    models = {name: model for name, model in se_models(args.model).items() if name == "base" or name in args.variants}
    times = op_times_by_round(models, x, args.rounds)
    faults = ({} if args.no_page_faults else
              {name: page_faults(args.model, name, tuple(x.shape), args.threads) for name in models})
    warning = trunk_warning(times["base"], args.size)
    base_totals = [sum(t.values()) for t in times["base"]]
    base_total = median(base_totals)
    base_rest = median([total - sum(t.get(op, 0.0) for op in TRUNK) for t, total in zip(times["base"], base_totals)])
    rows = []
    for name in (v for v in VARIANTS if v in args.variants):
        extras = [attribute(b, t) for b, t in zip(times["base"], times[name])]
        se_s = [sum(e.values()) for e in extras]
        ops = {op for e in extras for op in e}
        by_op = {op: median([e.get(op, 0.0) for e in extras]) for op in ops}
        by_op = {op: t for op, t in sorted(by_op.items(), key=lambda kv: -abs(kv[1])) if abs(t) >= 1e-5}
        rows.append({"model": name, "total_s": median([sum(t.values()) for t in times[name]]), "se_s": median(se_s),
                     "se_over_base_total": median([s / b for s, b in zip(se_s, base_totals)]),
                     "se_over_base_ci95": ratio_ci(se_s, base_totals, paired=True),
                     "se_over_base_per_round": [s / b for s, b in zip(se_s, base_totals)],
                     "by_op_s": by_op, **({"page_faults_per_forward": faults[name]} if faults else {})})
    print(f"batch {args.batch}, {args.size}x{args.size}, {torch.get_num_threads()} threads, "
          f"{args.rounds} interleaved rounds, medians; base {args.model}: {base_total * 1e3:.1f} ms of op time "
          f"({base_rest * 1e3:.1f} ms outside conv/bn/max-pool)")
    if faults:
        print(f"page faults per forward, base model: {faults['base']:.0f}")
    print(f"{'model':<24}{'total ms':>9}{'SE ops ms':>10}{'SE / base':>10}{'95% CI':>16}{'faults':>8}  largest")
    for r in rows:
        top = ", ".join(f"{op.removeprefix('aten::')} {t * 1e3:+.1f}" for op, t in list(r["by_op_s"].items())[:4])
        lo, hi = r["se_over_base_ci95"]
        print(f"{r['model']:<24}{r['total_s'] * 1e3:>9.1f}{r['se_s'] * 1e3:>10.2f}{r['se_over_base_total']:>10.2%}"
              f"{f'[{lo:.2%}, {hi:.2%}]':>16}{r.get('page_faults_per_forward', float('nan')):>8.0f}  {top}")
    if warning:
        print(f"WARNING: {warning}", file=sys.stderr)
    name = args.name or ("se_overhead" if args.model == "resnet50" else f"se_overhead_{args.model}")
    print("written", write(name, {"model": args.model, "batch": args.batch, "size": args.size, "rounds": args.rounds,
                                  "base_total_s": base_total, "base_outside_trunk_s": base_rest,
                                  **({"warning": warning} if warning else {}),
                                  **({"base_page_faults_per_forward": faults["base"]} if faults else {}),
                                  "rows": rows}, out=args.out))


if __name__ == "__main__":
    main()
