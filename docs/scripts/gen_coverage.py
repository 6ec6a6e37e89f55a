"""Render the coverage sweep's JSON into docs/generated/coverage.md.

The sweep itself is `se-retrofit coverage` (it takes a while: every torchvision classifier and one
model per timm family); this script only turns its rows into the page, so the page can be rebuilt
without re-running the sweep:

    se-retrofit coverage --zoo all --out docs/generated/coverage.json
    python docs/scripts/gen_coverage.py [--check]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from se_retrofit.coverage import CoverageRow, to_markdown

from _gen import DOCS, header, write

SCRIPT = "gen_coverage.py"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="*", type=Path, default=[DOCS / "generated" / "coverage.json"],
                        help="coverage JSON files (rows are concatenated)")
    parser.add_argument("--out", type=Path, default=DOCS / "generated" / "coverage.md")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when the page is stale")
    args = parser.parse_args()
    rows = []
    for path in args.inputs:
        rows += [CoverageRow(**row) for row in json.loads(path.read_text())]
    text = to_markdown(rows).replace("# Model coverage\n\n", "", 1)
    return write(args.out, header(SCRIPT) + text)


if __name__ == "__main__":
    raise SystemExit(main())
