"""Run every documentation generator, each in its own interpreter (what ``make docs-gen`` runs).

    python docs/scripts/gen_all.py [--check]

With ``--check`` nothing is written and the exit status is 1 when any generated file is stale.
The generators build models with random weights and need no network; together they take about a
minute of CPU time, most of it in ``gen_block_graph.py``.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
GENERATORS = ("gen_block_graph.py", "gen_find_sites.py", "gen_choosing.py", "gen_benchmarks.py",
              "gen_cli_reference.py")


def main() -> int:
    extra = [a for a in sys.argv[1:] if a == "--check"]
    status = 0
    for script in GENERATORS:
        done = subprocess.run([sys.executable, str(HERE / script), *extra])
        if done.returncode != 0:
            print(f"{script} exited {done.returncode}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
