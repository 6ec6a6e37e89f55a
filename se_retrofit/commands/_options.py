"""The conversion options every command that converts a model shares (``--reduction``, ``--init``, ...).

One definition keeps the flags, their help and their meaning identical across commands. Every flag
defaults to None and `conversion_kwargs` passes on only the flags the user gave, so
`~se_retrofit.config.SEConfig` stays the single place that holds the defaults and validates
the values.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
from typing import Any

from ..config import INITS, POSITIONS, SEConfig

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(SEConfig)}
_OPTION_NAMES = tuple(_DEFAULTS)

INTERRUPTED_EXIT = 130  # the shell's code for "stopped by SIGINT"


def parse_input_size(text: str) -> int | tuple[int, ...]:
    """``224``, ``224x192`` (height x width) or a full shape ``1x3x224x224``: one syntax for every command."""
    parts = [p for p in re.split(r"[x,\s]+", text.strip().lower()) if p]
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        dims = ()
    if not dims or any(d <= 0 for d in dims):
        raise argparse.ArgumentTypeError(
            f"input size must be S, HxW or a full shape like 1x3x224x224 of positive integers, got {text!r}")
    return dims[0] if len(dims) == 1 else dims


def model_input_shape(model: Any, size: int | tuple[int, ...], batch: int | None = None) -> tuple[int, ...]:
    """The full input shape for ``--input-size``: a full shape is taken as given; S or HxW replace the
    trailing spatial sizes of the input found for the model (`~se_retrofit.capture.candidate_inputs`),
    so that its channels and a video model's frames stay as they must be; ``batch`` replaces its batch."""
    from ..capture import candidate_inputs

    if isinstance(size, tuple) and len(size) > 2:
        return size
    spatial = (size, size) if isinstance(size, int) else size
    (x,), _ = candidate_inputs(model)[0]
    resized = min(len(spatial), x.dim() - 2)  # frames and 1-D lengths past height and width stay automatic
    shape = (*x.shape[:x.dim() - resized], *spatial[len(spatial) - resized:])
    return shape if batch is None else (batch, *shape[1:])


def _number(text: str) -> int | float:
    """A reduction ratio: ``16`` stays an int (so saved configs read ``16``), ``12.5`` a float."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    return int(value) if value.is_integer() else value


def add_conversion_options(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Add the SEConfig options to ``parser`` as their own help group; return the group."""
    group = parser.add_argument_group("conversion options", "where SE blocks go and how they are built "
                                      "(se_retrofit.SEConfig)")
    group.add_argument("--reduction", type=_number, metavar="R",
                       help=f"reduction ratio r, hidden = channels / r (default {_DEFAULTS['reduction']})")
    group.add_argument("--init", choices=INITS,
                       help=f"'identity' keeps the model's function exactly, 'paper' is the paper's block "
                            f"(default {_DEFAULTS['init']})")
    group.add_argument("--position", choices=POSITIONS,
                       help=f"where on the residual unit SE goes, the paper's Table 14 "
                            f"(default {_DEFAULTS['position']})")
    group.add_argument("--include", action="append", metavar="PATTERN",
                       help="fnmatch pattern of blocks to convert ('layer3.*'); repeat for more (default: all)")
    group.add_argument("--exclude", action="append", metavar="PATTERN",
                       help="fnmatch pattern of blocks to leave alone, applied after --include; repeat for more")
    group.add_argument("--min-hidden", type=int, metavar="N",
                       help=f"floor on the hidden width (default {_DEFAULTS['min_hidden']})")
    group.add_argument("--divisor", type=int, metavar="N",
                       help=f"round the hidden width to a multiple of N (default {_DEFAULTS['divisor']})")
    group.add_argument("--no-fuse-add", dest="fuse_add", action="store_const", const=False, default=None,
                       help="keep the residual addition apart from the SE block (by default the block does it, "
                            "shortcut + x * gate in one pass; same weights and function)")
    group.add_argument("--no-early-squeeze", dest="early_squeeze", action="store_const", const=False, default=None,
                       help="always average the SE input itself (by default a block fed by a 1x1 conv and a batch "
                            "norm averages the conv's narrower input in eval mode; the same squeeze)")
    return group


def conversion_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The SEConfig keyword arguments the user gave on the command line (and only those)."""
    return {name: getattr(args, name) for name in _OPTION_NAMES if getattr(args, name, None) is not None}
