"""What the SE blocks cost: parameters and MACs before and after, per block (fvcore).

    python examples/report.py [--model resnet50] [--input-size 224] [--reduction 16]

The same numbers as ``se-retrofit report MODEL``; here through the Python API, with the report's
fields used directly, and checked: the per-block rows add up to the differences in the totals.
MACs are multiply-accumulates (fvcore's "flops"); FLOPs would be about twice as many. Counts do not
depend on the weights, so the model is built without them (offline).
"""
from __future__ import annotations

import argparse

import timm

import se_retrofit
from se_retrofit.report import report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50", help="a timm model name (default resnet50)")
    parser.add_argument("--input-size", type=int, default=224, help="image side in pixels (default 224)")
    parser.add_argument("--reduction", type=float, default=16, help="SE reduction ratio (default 16)")
    args = parser.parse_args()

    model = timm.create_model(args.model, pretrained=False)
    se_model = se_retrofit.apply(model, reduction=args.reduction)
    result = report(model, se_model, input_size=args.input_size, name=args.model)
    print(result)                          # result.to_markdown() / result.to_json() for files

    # The per-block rows account for the whole difference: nothing outside the SE blocks costs more, and
    # each block's parameters are the two 1x1 convolutions the plan describes.
    sites = se_retrofit.get_plan(se_model).sites
    per_block = {b.name: b.params for b in result.blocks}
    assert per_block == {site.se_name: site.params for site in sites}, (per_block, sites)
    assert sum(b.params for b in result.blocks) == result.params_delta, result.params_delta
    assert sum(b.macs for b in result.blocks) == result.macs_delta, result.macs_delta

    print(f"\n{len(result.blocks)} SE blocks add {result.params_delta:,} parameters "
          f"({result.params_delta_pct:+.2f}%) and {result.macs_delta:,} MACs ({result.macs_delta_pct:+.2f}%).")
    if not result.blocks:
        print("No residual addition of this model could take an SE block: `se-retrofit sites MODEL` says why.")
        return
    heaviest = max(result.blocks, key=lambda b: b.params)
    costliest = max(result.blocks, key=lambda b: b.macs)
    print(f"Most parameters: {heaviest.name} ({heaviest.params:,}); most MACs: {costliest.name} ({costliest.macs:,}).")


if __name__ == "__main__":
    main()
