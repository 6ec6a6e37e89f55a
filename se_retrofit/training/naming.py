"""How messages about a run folder name what the user passed: ``finetune()``'s arguments, or the command's options.

The same checks refuse a run folder for ``se_retrofit.finetune`` and for ``convert-and-finetune``, and
each message ends with what to change. A Python caller has no ``--out`` to change, and a command-line
user no ``out_dir=``: the command names its options for as long as it runs (`command_options`), and
every other caller gets the function's arguments.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator


@dataclass(frozen=True)
class Names:
    out: str  # the run folder ("choose another --out")
    resume: str  # what continues a run ("drop --resume")
    resume_it: str  # the same, as an instruction ("then --resume it")
    options: str  # what a run is started with ("the options of that run")
    writer: str  # what writes the runs `resume` continues
    is_command: bool

    def folder(self, out: Path | str) -> str:
        """The run folder as the user gave it: ``--out runs/a`` or ``out_dir='runs/a'``."""
        return f"{self.out} {out}" if self.is_command else f"{self.out}={str(out)!r}"


FUNCTION = Names(out="out_dir", resume="resume=True", resume_it="pass resume=True", options="arguments",
                 writer="se_retrofit.finetune or convert-and-finetune", is_command=False)
COMMAND = Names(out="--out", resume="--resume", resume_it="--resume it", options="options",
                writer="convert-and-finetune", is_command=True)

_CURRENT: contextvars.ContextVar[Names] = contextvars.ContextVar("se_retrofit_names", default=FUNCTION)


def names() -> Names:
    """The names of the caller now: the command's inside `command_options`, else the function's."""
    return _CURRENT.get()


@contextlib.contextmanager
def command_options() -> Iterator[None]:
    """Messages name the command's options (``--out``, ``--resume``) until the block ends."""
    token = _CURRENT.set(COMMAND)
    try:
        yield
    finally:
        _CURRENT.reset(token)
