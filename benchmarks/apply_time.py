"""How long ``se_retrofit.apply`` takes, next to the time to build the model it rewrites.

    python benchmarks/apply_time.py [--repeats 5] [--models resnet50 convnext_tiny resnet152] [--out DIR]
"""
from __future__ import annotations

import argparse
import time
import warnings

import timm

import se_retrofit
from _common import add_out_argument, median, write


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "convnext_tiny", "resnet152"])
    parser.add_argument("--repeats", type=int, default=5)
    add_out_argument(parser)
    args = parser.parse_args()
    with warnings.catch_warnings():  # one untimed run: the first apply of a process pays one-time costs
        warnings.simplefilter("ignore")
        se_retrofit.apply(timm.create_model(args.models[0], pretrained=False))
    rows = []
    for name in args.models:
        build, apply_ = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            model = timm.create_model(name, pretrained=False)
            build.append(time.perf_counter() - start)
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                se_model = se_retrofit.apply(model)
            apply_.append(time.perf_counter() - start)
        rows.append({"model": name, "se_blocks": len(se_retrofit.se_blocks(se_model)),
                     "build_s": median(build), "apply_s": median(apply_), "apply_over_build": median(apply_) / median(build)})
    print(f"{'model':<16}{'SE':>5}{'build s':>10}{'apply s':>10}{'apply/build':>13}")
    for r in rows:
        print(f"{r['model']:<16}{r['se_blocks']:>5}{r['build_s']:>10.3f}{r['apply_s']:>10.3f}{r['apply_over_build']:>13.2f}")
    print("written", write("apply_time", {"repeats": args.repeats, "rows": rows}, out=args.out))


if __name__ == "__main__":
    main()
