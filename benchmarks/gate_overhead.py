"""What the retrofit's Python costs around its SE kernels, per bottleneck and per ResNet-50 forward.

A retrofitted bottleneck runs SE as two calls in its generated forward: the early gate
(``gate_through(z, conv3, bn3, se)``: checks that the cached fold still holds, then a sum, two matrix
products, a ReLU and a sigmoid) and the SE module's call (``se(x, shortcut, gate=...)``: checks, then
one ``addcmul``). Each call is timed against its kernels called directly, with weights this script
folds itself, on maps of one pixel so that the kernels cost as little as they can: the difference is
the Python (checks, calls, bookkeeping) that every forward pays on top of the kernels, whatever the
input size. The profiler's op times (``se_overhead.py``) do not include it; on a CPU with many cores,
where a ResNet-50 forward takes tens of milliseconds, it is part of what SE costs.

Blocks ``layerN[1]`` of timm's ``resnet50`` retrofitted with ``init="paper"``; batch ``--batch``.
``--rounds`` rounds, each running every function ``--calls`` times in a row in a new (seeded) order;
the overheads are medians over rounds of the difference within each round (a slow spell of the
machine hits both terms alike), the times medians over rounds. The shared 2-core machine's speed moves
by up to 2x between runs, Python and kernels alike: the overhead as a multiple of the kernels' time
moves less than the overhead in ms.

``--after-conv`` times each call on its own right after what precedes it in a forward, untimed, on the
stage's map of a batch of 8 at 224x224 (56x56 down to 7x7): the early gate (and its kernels) after the
block's ``conv2``, ``bn2`` and ``act2``; the SE call (and its kernel) after ``conv3`` and ``bn3``. In a
forward the checks never run warm: the convolution has just replaced the caches' contents, and the
Python then reads its code and the modules' and tensors' objects from memory. Each call then costs a
convolution, so the defaults drop to 11 rounds of 20 calls, and the result goes to
``gate_overhead_after_conv.json``.

    python benchmarks/gate_overhead.py [--rounds 41] [--calls 200] [--batch 1] [--threads 1] [--after-conv] [--name NAME]
"""
from __future__ import annotations

import argparse
import random
import statistics
import time
from typing import Callable

import torch
from torch import nn

from _common import add_out_argument, write

STAGES = (("layer1", 3), ("layer2", 4), ("layer3", 6), ("layer4", 3))  # blocks per stage in ResNet-50


def _folded(conv: nn.Module, norm: nn.Module, fc1: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W'^T, b')`` with ``fc1(norm(conv(m))) = m W'^T + b'``, computed here, not by se_retrofit."""
    scale = norm.running_var.double().add(norm.eps).rsqrt() * norm.weight.double()
    shift = norm.bias.double() - norm.running_mean.double() * scale
    w1 = fc1.weight.double().flatten(1)
    weight = (w1 * scale) @ conv.weight.double().flatten(1)
    bias = w1 @ shift + fc1.bias.double()
    return weight.t().contiguous().float(), bias.float()


def stage_functions(block: nn.Module, batch: int) -> dict[str, Callable[[], object]]:
    from se_retrofit.early_excitation import gate_through

    conv, norm, se = block.conv3, block.bn3, block.se
    z = torch.randn(batch, conv.in_channels, 1, 1)
    x, shortcut = torch.randn(batch, conv.out_channels, 1, 1), torch.randn(batch, conv.out_channels, 1, 1)
    w1t, b1 = _folded(conv, norm, se.fc1)
    w2t, b2 = se.fc2.weight.flatten(1).t(), se.fc2.bias
    gate = gate_through(z, conv, norm, se)
    if gate is None:
        raise SystemExit("the early gate declined on a plain retrofitted resnet50: nothing to measure")
    gate4 = gate.view(*gate.shape, 1, 1)
    return {
        "early gate": lambda: gate_through(z, conv, norm, se),
        "its kernels": lambda: torch.addmm(b2, torch.addmm(b1, z.sum((2, 3)), w1t).relu_(), w2t).sigmoid_(),
        "SE call": lambda: se(x, shortcut, inplace=True, gate=gate),
        "its kernel": lambda: torch.addcmul(shortcut, x, gate4, value=se.gain, out=x),
    }


def timed_rounds(fns: dict[str, Callable[[], object]], rounds: int, calls: int,
                 before: dict[str, Callable[[], object]] | None = None) -> dict[str, list[float]]:
    """Seconds per call, one value per round; each round runs every function ``calls`` times. With
    ``before``, each call is timed alone, right after an untimed ``before[name]()``."""
    rng = random.Random(0)
    for fn in fns.values():
        for _ in range(calls):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        order = list(fns)
        rng.shuffle(order)
        for name in order:
            fn = fns[name]
            if before is None:
                start = time.perf_counter()
                for _ in range(calls):
                    fn()
                samples[name].append((time.perf_counter() - start) / calls)
                continue
            total, prepare = 0.0, before[name]
            for _ in range(calls):
                prepare()
                start = time.perf_counter()
                fn()
                total += time.perf_counter() - start
            samples[name].append(total / calls)
    return samples


def preceding_ops(block: nn.Module, stage_index: int) -> dict[str, Callable[[], object]]:
    """What runs before each call in the block's forward, on the stage's map of a batch of 8 at
    224x224: ``act2(bn2(conv2(m)))`` before the early gate, ``bn3(conv3(z))`` before the SE call."""
    side = 56 >> stage_index
    m = torch.randn(8, block.conv2.in_channels, side, side)
    z = torch.randn(8, block.conv3.in_channels, side, side)
    before_gate = lambda: block.act2(block.bn2(block.conv2(m)))  # noqa: E731
    before_call = lambda: block.bn3(block.conv3(z))  # noqa: E731
    return {"early gate": before_gate, "its kernels": before_gate, "SE call": before_call, "its kernel": before_call}


def paired_overhead(samples: dict[str, list[float]], call: str, kernels: str) -> tuple[float, float]:
    """Median over rounds of ``call - kernels`` (seconds), and of the same over ``kernels``: paired
    within each round, so that a slow spell of the machine hits both terms alike."""
    pairs = list(zip(samples[call], samples[kernels]))
    return statistics.median(c - k for c, k in pairs), statistics.median((c - k) / k for c, k in pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=None, help="default 41, or 11 with --after-conv")
    parser.add_argument("--calls", type=int, default=None, help="default 200, or 20 with --after-conv")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--after-conv", action="store_true",
                        help="time each call alone, right after the block's conv2, bn2 and act2 (untimed)")
    parser.add_argument("--name", default=None,
                        help="results/NAME.json (default gate_overhead, or gate_overhead_after_conv with --after-conv)")
    add_out_argument(parser)
    args = parser.parse_args()
    if args.rounds is None:
        args.rounds = 11 if args.after_conv else 41
    if args.calls is None:
        args.calls = 20 if args.after_conv else 200
    if args.name is None:
        args.name = "gate_overhead_after_conv" if args.after_conv else "gate_overhead"
    torch.set_num_threads(args.threads)

    import timm

    import se_retrofit

    torch.manual_seed(0)
    model = se_retrofit.apply(timm.create_model("resnet50", zero_init_last=False), init="paper").eval()
    rows = []
    with torch.inference_mode():
        for index, (stage, blocks) in enumerate(STAGES):
            block = getattr(model, stage)[1]
            before = preceding_ops(block, index) if args.after_conv else None
            samples = timed_rounds(stage_functions(block, args.batch), args.rounds, args.calls, before)
            gate, gate_share = paired_overhead(samples, "early gate", "its kernels")
            call, call_share = paired_overhead(samples, "SE call", "its kernel")
            rows.append({"stage": stage, "blocks": blocks, "channels": block.conv3.out_channels,
                         "seconds": {name: statistics.median(s) for name, s in samples.items()},
                         "gate_overhead_s": gate, "gate_overhead_over_kernels": gate_share,
                         "call_overhead_s": call, "call_overhead_over_kernel": call_share})
    per_forward = sum((r["gate_overhead_s"] + r["call_overhead_s"]) * r["blocks"] for r in rows)
    kernels = sum((r["seconds"]["its kernels"] + r["seconds"]["its kernel"]) * r["blocks"] for r in rows)
    after = ", each call right after the ops before it in the forward (conv2-bn2-act2, conv3-bn3)" if args.after_conv else ""
    print(f"batch {args.batch}, 1x1 maps, {args.threads} thread(s), median of {args.rounds} rounds x {args.calls} calls"
          f"{after}; microseconds per call")
    print(f"{'stage':<8}{'early gate':>11}{'kernels':>9}{'overhead':>9}{'SE call':>9}{'kernel':>8}{'overhead':>9}")
    for r in rows:
        s = r["seconds"]
        print(f"{r['stage']:<8}{s['early gate'] * 1e6:>11.1f}{s['its kernels'] * 1e6:>9.1f}{r['gate_overhead_s'] * 1e6:>9.1f}"
              f"{s['SE call'] * 1e6:>9.1f}{s['its kernel'] * 1e6:>8.1f}{r['call_overhead_s'] * 1e6:>9.1f}")
    print(f"Python beyond the kernels per ResNet-50 forward (16 bottlenecks): {per_forward * 1e3:.3f} ms, "
          f"{per_forward / kernels:.2f}x the time of those kernels on 1x1 maps ({kernels * 1e3:.3f} ms)")
    print("written", write(args.name, {"batch": args.batch, "threads": args.threads, "rounds": args.rounds,
                                       "calls": args.calls, "after_conv": args.after_conv, "rows": rows, "per_forward_s": per_forward,
                                       "kernels_per_forward_s": kernels}, out=args.out))


if __name__ == "__main__":
    main()
