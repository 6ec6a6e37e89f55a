"""``se-retrofit report MODEL``: what adding SE to MODEL costs, in parameters and MACs.

The first question before shipping an SE model is its price; this command builds the model, applies
the retrofit with the given conversion options and prints `se_retrofit.report.report`'s answer.
"""
from __future__ import annotations

import argparse

from ._options import add_conversion_options, conversion_kwargs, model_input_shape, parse_input_size

FORMATS = ("table", "markdown", "json")


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "report",
        help="parameters and MACs before and after adding SE, per SE block",
        description="Build MODEL, add SE blocks with se_retrofit.apply and report what they cost: parameters "
                    "and MACs (fvcore; one fused multiply-add = 1) before and after, and per SE block.",
    )
    parser.add_argument("model", metavar="MODEL", help="a timm model name, or torchvision:NAME")
    parser.add_argument("--input-size", type=parse_input_size, default=224, metavar="SIZE",
                        help="S (height and width), HxW, or a full input shape such as 1x3x224x224 (default 224: "
                             "one image of the model's channels, and a video model's automatic number of frames). "
                             "A model that resizes its input (a torchvision detector, to its own min_size) is "
                             "counted at the size it runs at, which the report names")
    parser.add_argument("--format", choices=FORMATS, default="table", help="output format (default table)")
    parser.add_argument("--pretrained", action="store_true",
                        help="load the library's pretrained weights (needs a network; costs do not depend on them)")
    add_conversion_options(parser)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from .. import apply
    from ..config import SEConfig
    from ..models import create_model
    from ..report import report

    config = SEConfig(**conversion_kwargs(args))
    model = create_model(args.model, pretrained=args.pretrained,
                         offline_hint="The counts do not depend on the weights' values: run without --pretrained "
                                      "(a torchvision detector then has plain instead of frozen BatchNorm in "
                                      "its backbone, which changes its counts slightly).")
    se_model = apply(model, config)
    result = report(model, se_model, input_size=model_input_shape(model, args.input_size, batch=1), name=args.model)
    if args.format == "json":
        print(result.to_json())
    elif args.format == "markdown":
        print(result.to_markdown())
    else:
        print(result)
    return 0
