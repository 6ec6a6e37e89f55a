"""Render the coverage sweep's JSON into docs/generated/coverage.md.

The sweep itself is `se-retrofit coverage` (it takes a while: every torchvision classifier and one
model per timm family); this script only turns its rows into the page, so the page can be rebuilt
without re-running the sweep:

    se-retrofit coverage --zoo all --out docs/generated/coverage.json
    python docs/scripts/gen_coverage.py
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from se_retrofit.coverage import CoverageRow, to_markdown

DOCS = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="*", type=Path, default=[DOCS / "generated" / "coverage.json"],
                        help="coverage JSON files (rows are concatenated)")
    parser.add_argument("--out", type=Path, default=DOCS / "generated" / "coverage.md")
    args = parser.parse_args()
    rows = []
    for path in args.inputs:
        rows += [CoverageRow(**row) for row in json.loads(path.read_text())]
    text = to_markdown(rows).replace("# Model coverage\n\n", "", 1)
    args.out.write_text(text)
    print(f"wrote {args.out} ({len(rows)} models)")


if __name__ == "__main__":
    main()
