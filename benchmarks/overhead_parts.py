"""Where the retrofit's time over the base model goes, end to end: the retrofitted ResNet-50 with parts of
its SE work taken out or done another way, interleaved with the base model.

The profiler (``se_overhead.py``) sums op times and leaves out the Python around them and whatever an op
costs outside its own interval (waking the thread pool, caches another op evicts); ``latency.py`` gives the
whole end-to-end difference. This script splits that difference by running the same retrofitted model
(one object, the same weights in memory) with its generated forwards pointed at other versions of the early
gate and of the SE block's call, each in turn within one round:

- ``retrofitted``: as ``apply`` builds it;
- ``kernels only``: the same kernels (sum, folded ``addmm``, ReLU, ``addmm``, sigmoid, ``addcmul``), called
  directly with weights folded once by this script: no checks, no module call for the rescale;
- ``gate given``: the gate of each block computed once beforehand and handed over, so no squeeze or
  excitation runs at all, only the block's ``addcmul`` (outputs differ: a diagnostic);
- ``small ops on 1 thread``: as ``kernels only``, with the thread pool set to one thread around the
  excitation's matrix products and activations (the squeeze's sum keeps every thread);
- ``weight on the left``: as ``kernels only``, with each product written as ``W @ s^T`` (the weight in its
  own row-major layout, the batch as columns) instead of ``s @ W^T``.

Every variant that computes the gate is checked against the retrofit's output before timing.
Batch ``--batch``, ``--size`` x ``--size`` (224), eval mode, ``torch.inference_mode``; ``--rounds`` rounds in a new order each
round, one untimed forward before each timed one; medians, and the median per-round ratio over the base
model with a bootstrap 95 % interval. One table per ``--threads`` count, written as it finishes.

    python benchmarks/overhead_parts.py [--threads 16 4] [--rounds 101 25] [--batch 8] [--size 224] [--name NAME]
"""
from __future__ import annotations

import argparse
import time
from typing import Callable

import torch

from _common import add_out_argument, interleaved, machine, median, ratio_ci, se_models, write

GATE = "se_retrofit_early_excitation_gate_through"


def folded(model: torch.nn.Module) -> dict[int, tuple[torch.Tensor, ...]]:
    """Per SE block (by id): the folded ``fc1 . bn3 . conv3`` as ``(W'^T, b')`` from se_retrofit's own cache
    after one forward, and ``fc2``'s ``(W^T, b)``, plus the same in the weight-on-the-left layout."""
    from se_retrofit.excitation_fold import FOLDS

    out = {}
    for _, se in model.named_modules():
        fold = FOLDS.get(se) if type(se).__name__ == "SEBlock" else None
        if fold is None:
            continue
        w2 = se.fc2.weight.detach().flatten(1)
        out[id(se)] = (fold.weight_t, fold.bias, w2.t(), se.fc2.bias.detach(),
                       fold.weight_t.t().contiguous(), fold.bias[:, None].contiguous(), w2.contiguous(),
                       se.fc2.bias.detach()[:, None].contiguous())
    return out


def gate_kernels(weights: dict) -> Callable:
    def gate(z, conv, norm, se):
        w1t, b1, w2t, b2 = weights[id(se)][:4]
        hidden = torch.addmm(b1, z.sum((2, 3)), w1t, alpha=1.0 / (z.shape[2] * z.shape[3])).relu_()
        return torch.addmm(b2, hidden, w2t).sigmoid_()
    return gate


def gate_one_thread(weights: dict, threads: int) -> Callable:
    def gate(z, conv, norm, se):
        w1t, b1, w2t, b2 = weights[id(se)][:4]
        s = z.sum((2, 3))
        torch.set_num_threads(1)
        try:
            hidden = torch.addmm(b1, s, w1t, alpha=1.0 / (z.shape[2] * z.shape[3])).relu_()
            return torch.addmm(b2, hidden, w2t).sigmoid_()
        finally:
            torch.set_num_threads(threads)
    return gate


def gate_left(weights: dict) -> Callable:
    def gate(z, conv, norm, se):
        w1, b1, w2, b2 = weights[id(se)][4:]
        hidden = torch.addmm(b1, w1, z.sum((2, 3)).t(), alpha=1.0 / (z.shape[2] * z.shape[3])).relu_()
        return torch.addmm(b2, w2, hidden).sigmoid_().t()
    return gate


def rescale_kernel(se: torch.nn.Module) -> Callable:
    gain = se.gain

    def forward(x, residual=None, inplace=False, gate=None):
        return torch.addcmul(residual, x, gate.view(*gate.shape, 1, 1), value=gain, out=x)
    return forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()])
    parser.add_argument("--rounds", type=int, nargs="+", default=[41])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--name", default="overhead_parts")
    add_out_argument(parser)
    args = parser.parse_args()
    if len(args.rounds) not in (1, len(args.threads)):
        raise SystemExit("--rounds takes one count, or one per --threads value")
    rounds = args.rounds * len(args.threads) if len(args.rounds) == 1 else args.rounds

    models = se_models("resnet50", only=None)
    base, retro = models["base"], models["retrofitted"]
    x = torch.rand(args.batch, 3, args.size, args.size)
    with torch.inference_mode():
        reference = retro(x)
    weights = folded(retro)
    blocks = [m for m in retro.modules() if GATE in getattr(type(m).forward, "__globals__", {})]
    namespaces = {id(g): g for g in (type(m).forward.__globals__ for m in blocks)}.values()
    original = next(iter(namespaces))[GATE]
    ses = [m for m in retro.modules() if id(m) in weights]
    if len(ses) != 16 or len(blocks) != 16:
        raise SystemExit(f"expected 16 early-gated SE blocks, found {len(ses)} SE and {len(blocks)} blocks")
    given: dict[int, torch.Tensor] = {}

    def record(z, conv, norm, se):
        given[id(se)] = original(z, conv, norm, se).clone()
        return given[id(se)]

    def use(gate: Callable, fast_rescale: bool) -> None:
        for g in namespaces:
            g[GATE] = gate
        for se in ses:
            if fast_rescale:
                se.forward = rescale_kernel(se)
            else:
                se.__dict__.pop("forward", None)

    results = []
    for threads, count in zip(args.threads, rounds):
        torch.set_num_threads(threads)
        use(record, False)
        with torch.inference_mode():
            retro(x)
        variants = {
            "retrofitted": (original, False),
            "kernels only": (gate_kernels(weights), True),
            "gate given": (lambda z, conv, norm, se: given[id(se)], False),
            "small ops on 1 thread": (gate_one_thread(weights, threads), True),
            "weight on the left": (gate_left(weights), True),
        }
        with torch.inference_mode():
            for name, (gate, fast) in variants.items():
                use(gate, fast)
                if name != "gate given" and not torch.allclose(retro(x), reference, rtol=1e-4, atol=1e-4):
                    raise SystemExit(f"variant {name!r} does not compute the retrofit's output")
        fns: dict[str, Callable[[], object]] = {"base": lambda: base(x)}
        for name, (gate, fast) in variants.items():
            fns[name] = lambda gate=gate, fast=fast: (use(gate, fast), retro(x))
        start = time.perf_counter()
        with torch.inference_mode():
            times = interleaved(fns, count, shuffle=True, settle=1)
        use(original, False)
        rows = []
        for name, values in times.items():
            paired = median([v / b for v, b in zip(values, times["base"])])
            lo, hi = ratio_ci(values, times["base"], paired=True)
            rows.append({"variant": name, "median_s": median(values), "over_base_paired": paired,
                         "over_base_paired_ci95": [lo, hi], "times_s": values})
        results.append({"threads": threads, "rounds": count, "rows": rows})
        print(f"\nbatch {args.batch}, {args.size}x{args.size}, {threads} threads, {count} rounds ({time.perf_counter() - start:.0f} s)")
        print(f"{'variant':<24}{'ms':>8}{'- base ms':>11}{'/ base':>9}{'95% interval':>17}")
        base_ms = rows[0]["median_s"] * 1e3
        for r in rows:
            lo, hi = r["over_base_paired_ci95"]
            print(f"{r['variant']:<24}{r['median_s'] * 1e3:>8.1f}{r['median_s'] * 1e3 - base_ms:>11.2f}"
                  f"{r['over_base_paired']:>9.3f}{f'{lo:.3f}-{hi:.3f}':>17}")
        # the thread count is per table: the machine's entry would give whichever count ran last
        print("written", write(args.name, {"machine": {**machine(), "torch_threads": None}, "batch": args.batch,
                                           "size": args.size, "settle": 1, "results": results}, out=args.out))


if __name__ == "__main__":
    main()
