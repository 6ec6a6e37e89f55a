"""``se-retrofit coverage``: run the pass over the model zoos and write coverage.json and the docs table."""
from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Iterator
from pathlib import Path

from ._options import INTERRUPTED_EXIT


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "coverage", help="run apply over torchvision classifiers and one model per timm family",
        description="Retrofit every torchvision classifier and the smallest model of every timm family "
                    "(random weights, no download) and record, per model: SE inserted, additions left alone "
                    "and why, identity-init output difference, backward, apply time, errors. Exits 1 when a "
                    "model fails or fails a check, 130 when interrupted (the rows so far are written).")
    # --zoo defaults to None, not "all", so that run() can tell it was given next to --models
    p.add_argument("--zoo", choices=("torchvision", "timm", "all"), default=None,
                   help="which zoo to sweep (default: all)")
    p.add_argument("--limit", type=int, default=None, help="check only the first N models of each zoo")
    p.add_argument("--models", nargs="+", default=None, metavar="NAME",
                   help="check only these models (timm names, timm:NAME or torchvision:NAME); "
                        "not with --zoo or --limit")
    p.add_argument("--out", type=Path, default=Path("coverage.json"), help="JSON file with one row per model")
    p.add_argument("--markdown", type=Path, default=None, help="also write the table as a markdown page")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .. import coverage

    models = _selection(args)
    if args.markdown is not None:
        _check_apart(args.out, args.markdown)
    _check_writable(args.out, "--out", "coverage.json")
    if args.markdown is not None:
        _check_writable(args.markdown, "--markdown", "coverage.md")
    try:
        rows = coverage.run(models, out=args.out, log=sys.stdout)
        interrupted = False
    except coverage.SweepInterrupted as stop:
        rows, interrupted = stop.rows, True
    coverage.write_json(rows, args.out)
    if args.markdown is not None:
        args.markdown.write_text(coverage.to_markdown(rows))
    for zoo, counts in coverage.totals(rows).items():
        print(f"{zoo}: {coverage.totals_line(counts)}")
    if interrupted:
        where = str(args.out) + (f" and {args.markdown}" if args.markdown is not None else "")
        print(f"interrupted after {len(rows)} model{'' if len(rows) == 1 else 's'}; their rows are in {where}",
              file=sys.stderr)
        return INTERRUPTED_EXIT
    return 1 if any(r.status in coverage.FAILING for r in rows) else 0


def _selection(args: argparse.Namespace) -> Iterator[tuple[str, str, str]]:
    """The (zoo, family, name) to check, every user error raised before any model is built.

    ``--models`` names the models itself, so ``--zoo`` and ``--limit`` (which pick from the zoos) would
    be ignored beside it: that is an error rather than a silent surprise. The zoos are sliced lazily,
    so ``--limit N`` counts only the first N timm families' models instead of all of timm's.
    """
    from .. import coverage

    if args.models is not None:
        if args.zoo is not None or args.limit is not None:
            raise ValueError("--models names the models to check and cannot be combined with --zoo or --limit, "
                             "which pick them from the zoos; drop one or the other.")
        return iter(coverage.resolve_models(args.models))
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}; leave it out to check every model.")
    zoo = args.zoo or "all"
    parts: list[Iterator[tuple[str, str, str]]] = []
    if zoo in ("torchvision", "all"):
        parts.append(("torchvision", f, n) for f, n in itertools.islice(coverage.torchvision_models(), args.limit))
    if zoo in ("timm", "all"):
        parts.append(("timm", f, n) for f, n in itertools.islice(coverage.timm_models(), args.limit))
    return itertools.chain(*parts)


def _check_apart(out: Path, markdown: Path) -> None:
    """Refuse one file for both outputs: the page is written last, over the JSON rows, and the sweep
    would end without an error and without its rows."""
    same = out.resolve() == markdown.resolve() or (out.exists() and markdown.exists() and out.samefile(markdown))
    if same:
        other = out.with_suffix(".md") if out.suffix != ".md" else out.with_name(f"{out.stem}-table.md")
        raise ValueError(f"--out {out} and --markdown {markdown} are the same file: the markdown page would "
                         f"replace the JSON rows. Give --markdown another file, e.g. {other}.")


def _check_writable(path: Path, option: str, example: str) -> None:
    """Fail before the first model, not after it: a sweep takes up to an hour, and an output that cannot
    be written would otherwise be found at the first row (``--out``) or only at the end (``--markdown``).

    Creates the parent folders (as writing would) and opens the file for appending; a file that did
    not exist is removed again, so a sweep that stops early leaves no empty page behind.
    """
    if path.is_dir():
        raise ValueError(f"{option} {path} is a directory; give a file path, e.g. {path / example}")
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a"):
            pass
        if not existed:
            path.unlink()
    except OSError as exc:
        raise ValueError(f"{option} {path} cannot be written ({exc.strerror or exc}); "
                         "choose a path in a writable folder.") from exc
