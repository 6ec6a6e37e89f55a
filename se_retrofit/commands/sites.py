"""``se-retrofit sites MODEL``: the dry run — where SE would go, and every addition left alone with the reason."""
from __future__ import annotations

import argparse
import json

from ._options import add_conversion_options, conversion_kwargs, model_input_shape, parse_input_size


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("sites", help="show where SE blocks would go (nothing is converted)",
                              description="Analyse MODEL (a timm name or torchvision:NAME, random weights) and "
                                          "list the residual sites SE would be inserted at, and the additions "
                                          "left alone with the reason for each.")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--input-size", type=parse_input_size, default=None, metavar="SIZE",
                   help="S (height and width), HxW, or a full input shape such as 1x3x224x224 (default: found "
                        "automatically); with S or HxW a video model keeps its automatic number of frames")
    p.add_argument("--format", choices=("table", "json"), default="table")
    add_conversion_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..api import find_sites
    from ..capture import NoExampleInput
    from ..config import SEConfig
    from ..models import create_model

    model = create_model(args.model, pretrained=False)
    example = None
    if args.input_size is not None:
        import torch

        example = torch.rand(*model_input_shape(model, args.input_size))
    try:
        plan = find_sites(model, SEConfig(**conversion_kwargs(args)), example_input=example)
    except NoExampleInput as exc:
        hint = ("Try another --input-size, or leave it out to use the model's own size."
                if args.input_size is not None else "Try --input-size with a size the model accepts.")
        raise exc.with_hint(hint) from None
    print(json.dumps(plan.to_dict(), indent=1) if args.format == "json" else plan)
    return 0
