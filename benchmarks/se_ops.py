"""What each op of an SE block costs, at the four ResNet-50 stage shapes, and what the cheaper forms save.

For each stage (batch 8 at 224 px: 256x56x56 ... 2048x7x7) it times, in eval mode without gradients:
the squeeze (``x.mean``), the squeeze and ``fc1`` as the early squeeze runs them without autograd
(`fc1_through`: the mean of ``conv3``'s four-times narrower input, one product with the folded weight),
the whole gate as the early squeeze computes it before ``conv3`` (`gate_through`), the excitation as
two 1x1 convolution calls and as two matrix products on
the ``(N, C)`` squeeze (what `SEBlock` runs), the rescale plus residual add as a multiply and an
add (the hand-written SE-ResNet) and as one ``torch.addcmul`` (what a fused `SEBlock` runs), the
plain residual add every ResNet has, and the whole `SEBlock` fused. Then it sums them over a
ResNet-50 forward (3, 4, 6 and 3 blocks per stage). Medians of ``--repeats`` timings.

Called back to back, an op finds its code and data hot. In a forward it runs after a convolution
that has displaced both, and small ops then cost several times more. ``--cold`` runs the stage's
1x1 convolution (``conv3``'s shape) untimed before each timed call, so each op meets what it meets in
the forward; it writes ``se_ops_cold.json``. The last row, adding 1 to an ``(N, C)`` tensor, is no
part of SE: it is there for scale, what any op with next to no work costs in each setting.

    python benchmarks/se_ops.py [--repeats 200] [--threads N] [--cold]
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from _common import add_out_argument, write
from se_retrofit import SEBlock
from se_retrofit.early_excitation import fc1_through, gate_through

STAGES = [(256, 56, 3), (512, 28, 4), (1024, 14, 6), (2048, 7, 3)]  # channels, size, blocks in ResNet-50


def timed(fn: Callable[[], object], repeats: int, before: Callable[[], object] | None = None) -> float:
    for _ in range(max(5, repeats // 10)):
        fn()
    samples = []
    for _ in range(repeats):
        if before is not None:
            before()
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def stage_ops(channels: int, size: int, batch: int, repeats: int, cold: bool = False) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    se = SEBlock(channels, channels // 16, gain=1.0).eval()
    x, shortcut = (torch.randn(batch, channels, size, size, generator=gen) for _ in range(2))
    z = torch.randn(batch, channels // 4, size, size, generator=gen)  # conv3's input in a bottleneck
    conv3 = nn.Conv2d(channels // 4, channels, 1, bias=False).eval()
    bn3 = nn.BatchNorm2d(channels).eval()
    squeezed = x.mean((2, 3), keepdim=True)
    gate = torch.sigmoid(squeezed)
    pooled = squeezed.flatten(1)
    w1, w2 = se.fc1.weight.flatten(1), se.fc2.weight.flatten(1)
    ops = {
        "squeeze (mean)": lambda: x.mean((2, 3), keepdim=True),
        "squeeze + fc1, folded, from z": lambda: fc1_through(z, conv3, bn3, se),
        "gate, folded, from z": lambda: gate_through(z, conv3, bn3, se),
        "excitation, 1x1 conv calls": lambda: se.fc2(F.relu(se.fc1(squeezed))),
        "excitation, matrix products": lambda: F.linear(F.relu(F.linear(squeezed.flatten(1), w1, se.fc1.bias)),
                                                         w2, se.fc2.bias),
        "rescale + add, mul then add": lambda: (x * gate).add_(shortcut),
        "rescale + add, addcmul": lambda: torch.addcmul(shortcut, x, gate),
        "residual add alone (base model)": lambda: x + shortcut,
        "SEBlock(x, shortcut), whole": lambda: se(x, shortcut),
        "not SE: (N, C) + 1, for scale": lambda: pooled + 1,
    }
    before = (lambda: conv3(z)) if cold else None
    with torch.inference_mode():
        return {name: timed(fn, repeats, before) for name, fn in ops.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--cold", action="store_true", help="run conv3 untimed before each timed call")
    add_out_argument(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for channels, size, blocks in STAGES:
        ops = stage_ops(channels, size, args.batch, args.repeats, args.cold)
        rows.append({"channels": channels, "size": size, "blocks": blocks, "seconds": ops})
    names = list(rows[0]["seconds"])
    print(f"batch {args.batch}, {args.threads} thread(s), median of {args.repeats}"
          f"{', each call after conv3' if args.cold else ''}; microseconds per call")
    print(f"{'op':<34}" + "".join(f"{r['channels']:>5}x{r['size']:<3}" for r in rows) + f"{'ResNet-50 ms':>14}")
    totals = {}
    for name in names:
        totals[name] = sum(r["seconds"][name] * r["blocks"] for r in rows)
        print(f"{name:<34}" + "".join(f"{r['seconds'][name] * 1e6:>9.0f}" for r in rows) + f"{totals[name] * 1e3:>14.2f}")
    print("written", write("se_ops_cold" if args.cold else "se_ops",
                           {"batch": args.batch, "threads": args.threads, "repeats": args.repeats,
                            "cold": args.cold, "rows": rows, "resnet50_totals_s": totals}, out=args.out))


if __name__ == "__main__":
    main()
