"""The ``se-retrofit`` command: one subcommand per module in ``se_retrofit.commands``.

Each command module exposes ``register(subparsers)``, which adds its parser and sets ``func`` to the
function that runs it; ``main`` only dispatches, and each command owns its options. User and
environment errors (bad values, missing or unreadable files) end in one ``error:`` line and exit code 2.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from typing import Sequence

COMMANDS = ("sites", "report", "convert_and_finetune", "coverage")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="se-retrofit",
        description="Add Squeeze-and-Excitation blocks to the residual branches of a trained CNN.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"se_retrofit.commands.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    shown_as = warnings.formatwarning
    warnings.formatwarning = _warning_line
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError, RuntimeError) as exc:  # user and environment errors: one line, no traceback
        if not getattr(exc, "echo_of_rank0", False):  # under torchrun, once (by rank 0), not once per rank
            print(f"se-retrofit {args.command}: error: {_message(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a Ctrl-C the training loop does not handle itself (building the model, a report)
        from .commands._options import INTERRUPTED_EXIT

        if os.environ.get("RANK", "0") != "0":  # under torchrun, said once (by rank 0), not once per process
            return INTERRUPTED_EXIT
        print(f"se-retrofit {args.command}: interrupted. Every file written so far is whole (each is written under "
              "a temporary name, then renamed); a run that has a last.pt continues with --resume", file=sys.stderr)
        return INTERRUPTED_EXIT
    finally:
        warnings.formatwarning = shown_as


def _warning_line(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  line: str | None = None) -> str:
    """A warning as one line about the user's data or options, not the library's file and source line
    (a command's user has no code of their own for it to point at)."""
    return f"se-retrofit: warning: {message}\n" if category is UserWarning else \
        f"se-retrofit: {category.__name__}: {message}\n"


def _message(exc: BaseException) -> str:
    """The error's own message; from a data-loader worker, torch's re-raise wraps it in the worker's
    traceback (``Caught OSError in DataLoader worker process 0. Original Traceback ...``), whose last
    line is the message that was raised there."""
    text = str(exc)
    if text.startswith("Caught ") and "DataLoader worker process" in text.split("\n", 1)[0]:
        last = [line for line in text.splitlines() if line.strip()][-1].strip()
        kind, _, rest = last.partition(": ")
        if rest and kind.rsplit(".", 1)[-1] == type(exc).__name__:  # "OSError: ..." or "PIL.X: ..."
            last = rest
        return f"{last} (in a data-loader worker)"
    return text


if __name__ == "__main__":
    sys.exit(main())
