"""``se-retrofit coverage``: run the pass over the model zoos and write coverage.json and the docs table."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "coverage", help="run apply over torchvision classifiers and one model per timm family",
        description="Retrofit every torchvision classifier and the smallest model of every timm family "
                    "(random weights, no download) and record, per model: SE inserted, additions left alone "
                    "and why, identity-init output difference, backward, apply time, errors.")
    p.add_argument("--zoo", choices=("torchvision", "timm", "all"), default="all")
    p.add_argument("--limit", type=int, default=None, help="check only the first N models of each zoo")
    p.add_argument("--models", nargs="+", default=None, metavar="NAME",
                   help="check only these models (timm names or torchvision:NAME)")
    p.add_argument("--out", type=Path, default=Path("coverage.json"), help="JSON file with one row per model")
    p.add_argument("--markdown", type=Path, default=None, help="also write the table as a markdown page")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .. import coverage

    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    models: list[tuple[str, str, str]] = []
    if args.models:
        for spec in args.models:
            zoo, name = ("torchvision", spec.split(":", 1)[1]) if spec.startswith("torchvision:") else ("timm", spec)
            models.append((zoo, "-", name))
    else:
        if args.zoo in ("torchvision", "all"):
            models += [("torchvision", f, n) for f, n in coverage.torchvision_models()[:args.limit]]
        if args.zoo in ("timm", "all"):
            models += [("timm", f, n) for f, n in coverage.timm_models()[:args.limit]]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows = coverage.run(models, out=args.out, log=sys.stdout)
    args.out.write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(coverage.to_markdown(rows))
    for zoo, t in coverage.totals(rows).items():
        print(f"{zoo}: {t['retrofitted']} retrofitted, {t['unchanged']} unchanged, {t['failed']} failed")
    return 1 if any(r.error for r in rows) else 0
