"""Write the CLI reference page from the argument parser itself.

    python docs/scripts/gen_cli_reference.py [--check]

Writes ``docs/cli.md``: ``se-retrofit --help`` and then ``se-retrofit COMMAND --help`` for every
subcommand ``se_retrofit.cli.build_parser()`` registers, in registration order. The help text is
argparse's own, rendered at a fixed width of 80 columns so the file does not depend on the terminal.
A command that exists in ``se_retrofit/commands/`` but is not registered in ``se_retrofit.cli`` is
not a command users can run, so it does not appear.
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ["COLUMNS"] = "80"  # argparse wraps to the terminal width; fix it before any parser is built

from se_retrofit.cli import build_parser  # noqa: E402

from _gen import DOCS, fence, header, write  # noqa: E402

SCRIPT = "gen_cli_reference.py"


def subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """``(name, one-line help, parser)`` of every subcommand, in the order they were registered."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            return [(name, helps.get(name, ""), sub) for name, sub in action.choices.items()]
    return []


def anchor(name: str) -> str:
    return f"se-retrofit-{name}"


def render() -> str:
    parser = build_parser()
    commands = subcommands(parser)
    out = [header(SCRIPT), "# Command line\n",
           "The `se-retrofit` command is installed with the package (`pip install -e .` or `make venv`); "
           "`python -m se_retrofit.cli` is the same program. This page is the parser's own `--help` output "
           "for every subcommand.\n"]
    if commands:
        out.append("| command | what it does |\n|---|---|")
        out.append("\n".join(f"| [`{name}`](#{anchor(name)}) | {text} |" for name, text, _ in commands) + "\n")
    out.append(fence(parser.format_help(), "text", title="se-retrofit --help"))
    for name, text, sub in commands:
        out.append(f"## se-retrofit {name} {{ #{anchor(name)} }}\n")
        out.append(fence(sub.format_help(), "text", title=f"se-retrofit {name} --help"))
    return "\n".join(out)


def main() -> int:
    return write(DOCS / "cli.md", render())


if __name__ == "__main__":
    sys.exit(main())
