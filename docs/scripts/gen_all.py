"""Run every documentation generator, each in its own interpreter (what ``make docs-gen`` runs).

    python docs/scripts/gen_all.py [--check]

With ``--check`` nothing is written and the exit status is 1 when any generated file is stale.
The generators build models with random weights and need no network; together they take a few
minutes of CPU time, most of it in ``gen_detection_table.py`` and ``gen_block_graph.py``.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
GENERATORS = ("gen_block_graph.py", "gen_find_sites.py", "gen_choosing.py", "gen_benchmarks.py",
              "gen_cli_reference.py", "gen_detection_table.py", "gen_coverage.py")


# The accuracy study's page and plot are redrawn from its committed JSON (the study itself trains for minutes).
RENDERERS = ((HERE.parents[1] / "benchmarks" / "accuracy_study.py", "--render-only"),)


def main() -> int:
    extra = [a for a in sys.argv[1:] if a == "--check"]
    status = 0
    commands = [(HERE / script,) for script in GENERATORS] + list(RENDERERS)
    for script, *arguments in commands:
        done = subprocess.run([sys.executable, str(script), *arguments, *extra])
        if done.returncode != 0:
            print(f"{script.name} exited {done.returncode}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
