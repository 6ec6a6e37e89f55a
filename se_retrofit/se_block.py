"""The Squeeze-and-Excitation block that ``apply`` inserts.

Paper: Hu et al., "Squeeze-and-Excitation Networks", https://arxiv.org/abs/1709.01507

Its parameter names and shapes (``fc1``/``fc2`` 1x1 convolutions with bias) are those of timm's
``SEModule``, so weights trained in a hand-written SE network load straight into a retrofitted one.
The gate is ``gain * sigmoid``: with ``gain=2`` and a zero ``fc2`` the block is exactly the identity
(the NFNet trick), which is how a pretrained network keeps its function when SE is added to it.

Given the shortcut as ``residual``, the block also does the residual addition, as one
``torch.addcmul`` (``residual + x * gate``): one pass over the feature map instead of a multiply that
writes a temporary and an add that reads it back. In eager mode on the CPU that pass is most of
what SE costs beyond the squeeze; ``apply`` uses it wherever the SE output goes straight into the add,
and where the original wrote ``x += shortcut`` it writes into ``x`` as that line did (see ``forward``).
Where ``x`` is the output of a 1x1 convolution and a batch norm, the whole gate can be computed
from the convolution's narrower input, before the convolution runs (`early_excitation`).
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.autograd import forward_ad

from .hooks import hooked
from .recording import recording

_CONV_BY_DIMS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
# ``gate[...]`` with these: the (N, C) gate as (N, C, 1, ...), by indexing rather than ``view(shape + ones)``,
# whose size arithmetic a tracer records as a tensor add (FX quantization put an observer on it)
_SPATIAL_ONES = {dims: (Ellipsis,) + (None,) * dims for dims in _CONV_BY_DIMS}


class SEBlock(nn.Module):
    """Squeeze (global average) -> excitation (C -> hidden -> C, ReLU between) -> gated rescale.

    Args:
        channels: channels of the feature map it gates.
        hidden: width of the bottleneck of the excitation.
        spatial_dims: 1, 2 or 3, for 1-D, 2-D and 3-D (video) feature maps; the squeeze averages
            over every dimension after the channel one.
        gain: the gate is ``gain * sigmoid(z)``; 2.0 makes a zero ``fc2`` an exact identity.
    """

    def __init__(self, channels: int, hidden: int, spatial_dims: int = 2, gain: float = 1.0) -> None:
        super().__init__()
        if spatial_dims not in _CONV_BY_DIMS:
            raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims!r}")
        conv = _CONV_BY_DIMS[spatial_dims]
        self.channels = channels
        self.hidden = hidden
        self.spatial_dims = spatial_dims
        self.gain = float(gain)
        self._dims = tuple(range(2, 2 + spatial_dims))
        self.fc1 = conv(channels, hidden, kernel_size=1, bias=True)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = conv(hidden, channels, kernel_size=1, bias=True)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, inplace: bool = False,
                gate: torch.Tensor | None = None) -> torch.Tensor:
        """``x * gate``, or ``residual + x * gate`` in one pass when given the residual's other operand.

        ``inplace=True`` (set by ``apply`` where the original wrote ``x += shortcut``) writes the sum
        into ``x``, as that line did, whenever autograd does not need ``x`` afterwards (inference,
        ``no_grad``, frozen inputs); under autograd the gate's gradient reads ``x``, so the sum goes to a
        new tensor, in ``x``'s dtype as that line's result is.

        ``gate``, when not None, is the ``(N, C)`` gate (before the gain) already computed by the caller:
        ``apply`` passes `~se_retrofit.early_excitation.gate_through` of a bottleneck's ``conv3`` input
        (`early_squeeze`), which is None where it does not apply.

        The gain goes into ``addcmul``'s scalar rather than into the gate: one op fewer per block, and
        the same bits where the gain is a power of two (scaling by it is exact), as identity init's 2 is.
        """
        if gate is None:
            gate = self._gate(x)
        gate = gate[_SPATIAL_ONES[self.spatial_dims]]
        if residual is None:
            return x * (gate * self.gain if self.gain != 1.0 else gate)
        if not inplace:
            return torch.addcmul(residual, x, gate, value=self.gain)
        if self._may_overwrite(x, residual, gate):
            return torch.addcmul(residual, x, gate, value=self.gain, out=x)
        out = torch.addcmul(residual, x, gate, value=self.gain)
        # ``x += shortcut`` keeps x's dtype (a bfloat16 branch under autocast with a float32 shortcut)
        return out if isinstance(x, fx.Proxy) or out.dtype == x.dtype else out.to(x.dtype)

    def _gate(self, x: torch.Tensor) -> torch.Tensor:
        """The ``(N, C)`` gate (before the gain) of the input itself.

        ``fc1`` and ``fc2`` are read as matrices (see `excite`) unless calling them runs more than their
        forward: pruning masks, the old-style ``weight_norm`` and ``spectral_norm`` recompute ``weight``
        in a pre-hook, which reading the attribute would skip (a stale weight, and a graph freed by the
        first backward); such layers, and any with the user's hooks, are called."""
        if hooked(self.fc1, self.fc2):
            s = x.mean(self._dims, keepdim=True)
            return torch.sigmoid(self.fc2(self.act(self.fc1(s)))).flatten(1)
        return self.excite(F.linear(x.mean(self._dims), self.fc1.weight.flatten(1), self.fc1.bias))

    def train(self, mode: bool = True) -> SEBlock:
        """Also count the switch between training and eval mode: `early_excitation` folds its map anew
        after one. The fold is otherwise checked against the version counters of the weights it came
        from, which changes made through ``.data`` bypass (as they bypass autograd's checks); such
        changes made in training mode (an old-style optimizer step) are then seen from ``eval()`` on."""
        if mode != self.training:
            self.__dict__["_mode_switches"] = self.__dict__.get("_mode_switches", 0) + 1
        return super().train(mode)

    def excite(self, hidden: torch.Tensor) -> torch.Tensor:
        """The ``(N, C)`` gate from ``fc1``'s ``(N, hidden)`` output: ReLU, ``fc2``, sigmoid (no gain).

        ``fc2`` runs as a matrix product with the 1x1 convolution's own weight: the same arithmetic as
        calling the convolution on a 1x1 map, at a third of its cost on the CPU (a convolution call on
        a 1x1 map is mostly overhead).
        """
        fc2 = self.fc2
        return torch.sigmoid(F.linear(self.act(hidden), fc2.weight.flatten(1), fc2.bias))

    @staticmethod
    def _may_overwrite(x: torch.Tensor, residual: torch.Tensor, gate: torch.Tensor) -> bool:
        """Whether ``x`` can take the sum: same shape and dtype, and no autograd record needs ``x``.

        Never while ``torch.jit.trace`` records (the trace would fix a choice that depends on the grad
        mode of the tracing call; ``trace``'s own check reruns it without grad), nor under fx symbolic
        tracing, which has no values to decide with, nor under ``torch.compile`` / ``torch.export``,
        whose graphs plan their own memory, nor under a dispatch mode (``make_fx``): all record the
        out-of-place ``addcmul``. Nor with forward-mode AD or under a ``torch.func`` transform (``jvp``,
        ``vmap``): an ``out=`` op has no forward derivative and no batching rule.
        """
        if recording(x) or forward_ad._current_level >= 0:
            return False
        if residual.shape != x.shape or residual.dtype != x.dtype:
            return False
        return not (torch.is_grad_enabled() and (x.requires_grad or residual.requires_grad or gate.requires_grad))

    def init_identity(self) -> None:
        """Zero the last excitation layer: with ``gain=2`` the gate is exactly 1 everywhere.

        ``fc2`` receives gradient on the first step (its input, the ReLU of ``fc1``, is non-zero);
        ``fc1`` receives it from the second step on, once ``fc2`` has moved away from zero.
        """
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, hidden={self.hidden}, spatial_dims={self.spatial_dims}, gain={self.gain:g}"


def hidden_width(channels: int, reduction: float, divisor: int = 8, min_hidden: int = 8) -> int:
    """Bottleneck width ``channels / reduction`` rounded to a multiple of ``divisor``, at least ``min_hidden``.

    This is timm's ``make_divisible(channels / r, 8, round_limit=0)``, which gives seresnet50 its
    28,088,024 parameters; the floor keeps narrow early stages from collapsing to one or two units.
    """
    value = channels / reduction
    rounded = int(value + divisor / 2) // divisor * divisor
    return max(min_hidden, rounded, 1)


def se_blocks(model: nn.Module) -> list[tuple[str, SEBlock]]:
    """Every SE block in ``model`` with its qualified name, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, SEBlock)]
