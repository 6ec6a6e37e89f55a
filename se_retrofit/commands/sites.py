"""``se-retrofit sites MODEL``: the dry run — where SE would go, and every addition left alone with the reason."""
from __future__ import annotations

import argparse
import json

from ._options import add_conversion_options, conversion_kwargs


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("sites", help="show where SE blocks would go (nothing is converted)",
                              description="Analyse MODEL (a timm name or torchvision:NAME, random weights) and "
                                          "list the residual sites SE would be inserted at, and the additions "
                                          "left alone with the reason for each.")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--input-size", type=int, default=None, metavar="PX",
                   help="side of the example image (default: found automatically)")
    p.add_argument("--format", choices=("table", "json"), default="table")
    add_conversion_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..api import find_sites
    from ..capture import candidate_inputs
    from ..config import SEConfig
    from ..models import create_model

    model = create_model(args.model, pretrained=False)
    example = None
    if args.input_size is not None:
        if args.input_size < 1:
            raise ValueError(f"--input-size must be a positive number of pixels, got {args.input_size}")
        (x,), _ = candidate_inputs(model)[0]
        example = torch.rand(x.shape[0], x.shape[1], *([args.input_size] * (x.dim() - 2)))
    plan = find_sites(model, SEConfig(**conversion_kwargs(args)), example_input=example)
    print(json.dumps(plan.to_dict(), indent=1) if args.format == "json" else plan)
    return 0
