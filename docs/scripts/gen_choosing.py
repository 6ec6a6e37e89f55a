"""Tables for the "choosing reduction, positions and stages" guide: what SE adds to ResNet-50, by option.

    python docs/scripts/gen_choosing.py [--check]

One ``se_retrofit.find_sites`` dry run on ``torchvision.models.resnet50(weights=None)`` gives every SE
site with its channel count; the hidden width for each reduction ratio is ``se_retrofit.se_block.hidden_width``
(what ``apply`` uses), and a block's parameters are ``2 * C * hidden + C + hidden``. Writes, under
``docs/generated/``:

- ``reduction_params.md``: parameters added and total, for r = 2, 4, 8, 16, 32;
- ``stage_params.md``: at r = 16, the SE blocks and parameters of each stage (``layer1`` ... ``layer4``).
"""
from __future__ import annotations

import sys
from collections import defaultdict

import torch
import torchvision

import se_retrofit
from se_retrofit.se_block import hidden_width

from _gen import GENERATED, header, write

SCRIPT = "gen_choosing.py"
REDUCTIONS = (2, 4, 8, 16, 32)


def block_params(channels: int, hidden: int) -> int:
    return 2 * channels * hidden + channels + hidden


def main() -> int:
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None)
    base = sum(p.numel() for p in model.parameters())
    plan = se_retrofit.find_sites(model)
    config = plan.config
    source = ("Computed by `docs/scripts/gen_choosing.py` from `se_retrofit.find_sites(torchvision.models."
              f"resnet50(weights=None))`: {len(plan.sites)} SE sites; the base model has {base:,} parameters.\n")

    rows = ["| r | parameters added | total | added |", "|--:|--:|--:|--:|"]
    for r in REDUCTIONS:
        added = sum(block_params(s.channels, hidden_width(s.channels, r, config.divisor, config.min_hidden))
                    for s in plan.sites)
        rows.append(f"| {r} | {added:,} | {base + added:,} ({(base + added) / 1e6:.1f}M) | +{100 * added / base:.1f}% |")
    reduction = "\n".join([header(SCRIPT), source, "\n".join(rows)])

    stages: dict[str, list] = defaultdict(list)
    for s in plan.sites:
        stages[s.block.split(".")[0]].append(s)
    total = sum(s.params for s in plan.sites)
    rows = ["| stage | SE blocks | channels | parameters added | share of all SE parameters |", "|---|--:|--:|--:|--:|"]
    for stage, sites in stages.items():
        params = sum(s.params for s in sites)
        channels = ", ".join(sorted({str(s.channels) for s in sites}))
        rows.append(f"| `{stage}` | {len(sites)} | {channels} | {params:,} | {100 * params / total:.1f}% |")
    stage = "\n".join([header(SCRIPT), source.replace("parameters.\n", f"parameters. Reduction {config.reduction:g}.\n"),
                       "\n".join(rows)])
    return max(write(GENERATED / "reduction_params.md", reduction), write(GENERATED / "stage_params.md", stage))


if __name__ == "__main__":
    sys.exit(main())
