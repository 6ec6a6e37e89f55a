"""``SEConfig``: every option of the retrofit in one validated dataclass.

Validation happens once, in ``__post_init__``, so that a typo in an option fails before any tracing
and names the option and the values it accepts (the PEFT ``LoraConfig`` pattern).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any, Sequence

INITS = ("identity", "paper")
POSITIONS = ("standard", "pre", "post", "identity")


def _as_patterns(name: str, value: str | Sequence[str] | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    try:
        # a set has no order: sorted, so that the config (recorded, saved with adapters) is always the same
        patterns = (value,) if isinstance(value, str) else tuple(sorted(value) if isinstance(value, (set, frozenset))
                                                                 else value)
    except TypeError:
        raise ValueError(f"{name} must be a pattern string or a list of them, got {value!r}") from None
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(f"{name} must hold non-empty fnmatch pattern strings, got {value!r}")
    return patterns


@dataclass
class SEConfig:
    """Options of `se_retrofit.apply`.

    Attributes:
        reduction: the excitation's reduction ratio r (hidden = channels / r); the paper uses 16.
        init: ``"identity"`` keeps the model's function exactly (gain-2 gate, zero last layer);
            ``"paper"`` is the paper's block (plain sigmoid, default initialisation).
        position: where on the residual unit SE goes, the paper's Table 14: ``"standard"`` (end of
            the residual branch), ``"pre"`` (start of the branch), ``"post"`` (after the addition
            and its activation), ``"identity"`` (on the shortcut).
        include: fnmatch patterns of block names (``"layer3.*"``); a pattern also matches every block
            under a matching module, so ``"layer3"`` selects the whole stage.
        exclude: the same, for blocks to leave alone; applied after ``include``.
        min_hidden: floor on the hidden width.
        divisor: the hidden width is rounded to a multiple of this (timm's convention, 8).
        fuse_add: where the SE output goes straight into the residual addition, let the SE block
            do that addition (``se(x, shortcut)`` returns ``shortcut + x * gate`` in one pass, saving
            a pass over the feature map). Set False to keep the addition as its own operation, for
            example to hook the SE output itself; the weights and the function are the same.
        early_squeeze: where the SE input is a 1x1 convolution followed by a batch norm (a
            bottleneck's ``bn3(conv3(z))``), let the block average the convolution's narrower input
            and map the average through both and ``fc1`` (folded into one small map without
            autograd), computing the gate before the convolution runs; in eval mode the same result
            for a quarter of the memory traffic.
            Set False to always average the SE input itself.
    """

    reduction: float = 16
    init: str = "identity"
    position: str = "standard"
    include: str | Sequence[str] | None = None
    exclude: str | Sequence[str] | None = None
    min_hidden: int = 8
    divisor: int = 8
    fuse_add: bool = True
    early_squeeze: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.reduction, bool) or not isinstance(self.reduction, numbers.Real) \
                or not math.isfinite(self.reduction) or self.reduction < 1:
            raise ValueError(f"reduction must be a finite number >= 1, got {self.reduction!r}")
        # plain Python numbers (a NumPy scalar from a sweep would not go into to_dict's JSON)
        self.reduction = int(self.reduction) if isinstance(self.reduction, numbers.Integral) else float(self.reduction)
        if self.init not in INITS:
            raise ValueError(f"init must be one of {', '.join(map(repr, INITS))}; got {self.init!r}")
        if self.position not in POSITIONS:
            raise ValueError(f"position must be one of {', '.join(map(repr, POSITIONS))}; got {self.position!r}")
        for name in ("min_hidden", "divisor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
            setattr(self, name, int(value))
        for name in ("fuse_add", "early_squeeze"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        self.include = _as_patterns("include", self.include)
        self.exclude = _as_patterns("exclude", self.exclude)

    @property
    def gain(self) -> float:
        """Gate gain: 2 for the identity init (so a zero last layer gives a gate of exactly 1)."""
        return 2.0 if self.init == "identity" else 1.0

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for key in ("include", "exclude"):
            if data[key] is not None:
                data[key] = list(data[key])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SEConfig":
        if not isinstance(data, dict):
            raise TypeError(f"SEConfig.from_dict takes a dict of options such as {{'reduction': 16}}, got "
                            f"{type(data).__name__}; for a saved config, pass the dict that to_dict() returned")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown SEConfig option(s) {unknown}; known options are {sorted(known)}")
        return cls(**data)
