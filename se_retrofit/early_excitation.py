"""Run time of the early squeeze: an SE block's first layer computed from a bottleneck's ``conv3`` input.

Where the SE input is ``norm(conv(z))`` with ``conv`` a 1x1 convolution and ``norm`` a batch norm
using running statistics, both are the same affine map at every position, so they commute with the
average: ``mean(norm(conv(z))) = norm(conv(mean(z)))``, and the squeeze can be taken from ``z``,
which in a bottleneck has a quarter of the channels (`squeeze_through`).

Without autograd (inference) the maps go further: ``fc1``, ``norm`` and ``conv`` are three affine
maps in a row, so ``fc1(norm(conv(m)))`` is one affine map ``W' m + b'`` with ``W' = W1 diag(s) W3``,
``hidden x in_channels``: a quarter of ``fc1``'s weight (in a bottleneck) and none of ``conv``'s to read per forward.
`fc1_through` uses it, folded once in float64 and cached per SE block (`excitation_fold`) until any of the tensors it
was folded from, or ``fc2``'s, changes (version counter, or the norm's batch count for statistics
re-estimated in training mode) or is replaced (identity, storage, shape), or the block switches
between training and eval mode, or any ``torch.optim`` optimizer takes a step (fused optimizers,
``fused=True``, write the parameters without moving their version counters). Tensors that are not
registered parameters or buffers (a parametrization, a plain attribute) are not folded at all. Other
writes that bypass the version counter (in place through ``.data``, through a NumPy array or another
tensor sharing the storage without its version counter, as ``vector_to_parameters`` leaves them, and
``torch.distributed`` collectives such as ``broadcast`` into a parameter) bypass autograd's checks
too: made in eval mode, they are not seen until the next ``model.train()`` / ``model.eval()`` pair.
CPU tensors in shared memory (``share_memory()``, which Hogwild training with ``torch.multiprocessing``
uses) are never folded, since other processes write them unseen; CUDA tensors shared between processes
cannot be told apart from others (``is_shared()`` is always true for them), and their writes in another
process are missed in the same way;
`SEConfig(early_squeeze=False)` avoids the fold altogether. `gate_through` goes on to the gate, so
that all of SE's small kernels run before ``conv``, in one place.

Only modules whose arithmetic is known qualify: ``nn.Conv1d/2d/3d`` of kernel 1, stride 1, no padding,
one group, and ``nn.BatchNorm1d/2d/3d`` or torchvision's ``FrozenBatchNorm2d`` (exact types: a subclass
may compute something else), with no forward or backward hooks (nor on the SE block a pre-hook,
which could change the input it gates). `early_squeeze` checks them when it rewrites the graph, and the functions
here check them again on every call, because the modules can be replaced afterwards: a deployment
step that fuses ``conv3`` and ``bn3`` leaves ``nn.Identity`` where ``bn3`` was, and the SE block then
averages its input as usual.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import forward_ad

from .excitation_fold import FOLDS, Fold, sources
from .hooks import hooked
from .recording import recording
from .se_block import SEBlock

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@functools.cache
def norm_types() -> tuple[type, ...]:
    """The norms whose eval-mode arithmetic is a known per-channel affine map."""
    norms: tuple[type, ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    try:
        from torchvision.ops.misc import FrozenBatchNorm2d
    except ImportError:
        return norms
    return (*norms, FrozenBatchNorm2d)


def is_pointwise_conv(conv: nn.Module, spatial_dims: int) -> bool:
    """An exact ``nn.ConvNd`` that is the same linear map at every position: kernel 1, stride 1, no
    padding, one group."""
    if type(conv) not in _CONVS:
        return False
    weight = _tensor(conv, "weight")
    return (weight is not None and weight.dim() == spatial_dims + 2 and conv.groups == 1
            and all(k == 1 for k in conv.kernel_size) and all(s == 1 for s in conv.stride)
            and (conv.padding == "valid" or all(p == 0 for p in conv.padding)))


def _tensor(module: nn.Module, name: str) -> torch.Tensor | None:
    """A parameter or buffer of ``module``, without ``nn.Module.__getattr__`` (a few microseconds per
    lookup, which this per-forward path would pay a dozen times per block)."""
    found = module._parameters.get(name)
    return module._buffers.get(name) if found is None else found


def _uses_running_stats(norm: nn.Module) -> bool:
    """Whether ``norm`` normalises with its running statistics, i.e. is a fixed per-channel affine map."""
    if isinstance(norm, nn.modules.batchnorm._BatchNorm) and norm.training:
        return False
    # track_running_stats=False: batch statistics even in eval mode
    return _tensor(norm, "running_mean") is not None and _tensor(norm, "running_var") is not None


def _exact(z: torch.Tensor, conv: nn.Module, norm: nn.Module) -> bool:
    """Whether ``norm(conv(z))`` is an affine map of known arithmetic at every position."""
    return (type(norm) in norm_types() and is_pointwise_conv(conv, z.dim() - 2) and _uses_running_stats(norm))


def _declines(z: torch.Tensor, conv: nn.Module, norm: nn.Module) -> bool:
    """Where the early squeeze must not run: not exact (batch statistics, modules not of the known
    kinds, hooks or an instance ``forward`` on them), or inside a tracer.

    ``torch.jit.trace`` would fix this run-time choice for every later input (and the MAC report
    costs the paper's block); ``torch.compile`` / ``torch.export`` see the plain SE ops and fuse them
    themselves, with no guard on the input's size; fx symbolic tracing has no values to decide with.
    """
    return recording(z) or not _exact(z, conv, norm) or hooked(conv, norm)


def squeeze_through(z: torch.Tensor, conv: nn.Module, norm: nn.Module) -> torch.Tensor | None:
    """The squeeze of ``norm(conv(z))`` computed from ``z``, or None where it must come from the output.

    This is the autograd-friendly form (gradients reach ``conv`` and ``norm`` as through the plain
    squeeze). Its price is reading ``conv``'s weight again, so it is taken only where one image's map
    is the larger read (the choice does not depend on the batch size, so neither do the outputs'
    last bits). None also where `_declines`.
    """
    return None if _declines(z, conv, norm) else _squeeze_from_input(z, conv, norm)


def _squeeze_from_input(z: torch.Tensor, conv: nn.Module, norm: nn.Module) -> torch.Tensor | None:
    """`squeeze_through` once `_declines` has been checked."""
    weight = conv.weight.flatten(1)
    out_channels, in_channels = weight.shape
    if math.prod(z.shape[2:]) * (out_channels - in_channels) <= weight.numel():
        return None
    s = F.linear(z.mean(tuple(range(2, z.dim()))), weight, conv.bias)
    return F.batch_norm(s, norm.running_mean, norm.running_var, norm.weight, norm.bias, False, 0.0, norm.eps)


def fc1_through(z: torch.Tensor, conv: nn.Module, norm: nn.Module, se: SEBlock) -> torch.Tensor | None:
    """``se.fc1`` of the squeeze of ``norm(conv(z))``, computed from ``z``; None where the SE block
    must average its input itself.

    When autograd needs none of the tensors involved, this is one small matrix product on ``mean(z)``
    with the folded weight (see the module docstring), for every bottleneck with ``conv`` widening;
    otherwise `squeeze_through` and ``fc1``, under its rule.
    """
    if _declines_at_once(z, conv, norm, se):
        return None
    tensors = sources(conv, norm, se)
    if _needs_grad(z, tensors or ()):
        return _fc1_with_autograd(z, conv, norm, se)
    fold = _current_fold(z, conv, norm, se, tensors)
    return None if fold is None else fold.fc1(z)


def gate_through(z: torch.Tensor, conv: nn.Module, norm: nn.Module, se: SEBlock) -> torch.Tensor | None:
    """``se``'s ``(N, C)`` gate for the input ``norm(conv(z))``, computed from ``z``; None where the SE
    block must squeeze its input itself (`fc1_through`).

    Called before ``conv``, it runs all of SE's small kernels in one cluster there, while ``z`` and the
    dispatcher's code are still in cache; after the norm only the gated residual add is left.

    A bottleneck calls this once per forward. The cached fold is checked against everything it came
    from on every call (`Fold.holds`), in a few microseconds, and then runs the five kernels of the
    gate with nothing between them (`Fold.gate`): the full checks of `_declines`, a fold's bookkeeping
    made anew and the module calls of `SEBlock.excite` cost more than those kernels on small maps.
    """
    if _declines_at_once(z, conv, norm, se):
        return None
    tensors = sources(conv, norm, se)
    if _needs_grad(z, tensors or ()):
        hidden = _fc1_with_autograd(z, conv, norm, se)
        return None if hidden is None else se.excite(hidden)
    fold = _current_fold(z, conv, norm, se, tensors)
    return None if fold is None else fold.gate(z, se, tensors)


def _declines_at_once(z: torch.Tensor, conv: nn.Module, norm: nn.Module, se: SEBlock) -> bool:
    """The checks of `_declines` that no cached fold can answer: tracers and hooks (a pre-hook on the
    SE block may change the input it gates, which the gate from ``z`` would not see; one on ``fc1`` or
    ``fc2``, as pruning and the old-style weight and spectral norms add, recomputes the weight the fold
    would read)."""
    return recording(z) or hooked(conv, norm, se.fc1, se.fc2) or bool(se._forward_pre_hooks)


def _needs_grad(z: torch.Tensor, tensors: tuple[torch.Tensor | None, ...]) -> bool:
    """Whether autograd needs the ops themselves: backward (a tensor requiring grad) or forward mode
    (inside ``forward_ad.dual_level``, where any of them may carry a tangent the fold would drop)."""
    if forward_ad._current_level >= 0:
        return True
    return torch.is_grad_enabled() and (z.requires_grad or any(t is not None and t.requires_grad for t in tensors))


def _fc1_with_autograd(z: torch.Tensor, conv: nn.Module, norm: nn.Module, se: SEBlock) -> torch.Tensor | None:
    """``fc1`` of `squeeze_through`'s squeeze, for autograd: no fold, gradients reach every module."""
    if not _exact(z, conv, norm):
        return None
    s = _squeeze_from_input(z, conv, norm)
    return None if s is None else F.linear(s, se.fc1.weight.flatten(1), se.fc1.bias)


def _current_fold(z: torch.Tensor, conv: nn.Module, norm: nn.Module, se: SEBlock,
                  tensors: tuple[torch.Tensor | None, ...] | None) -> Fold | None:
    """The cached fold if it still holds, else a new one (cached), else None where none can be made
    (and the stale one is dropped, with what it kept alive)."""
    fold = FOLDS.get(se)
    if fold is not None and tensors is not None and fold.holds(z, conv, norm, se, tensors):
        return fold
    fold = Fold.make(z, conv, norm, se, tensors) if tensors is not None and _exact(z, conv, norm) else None
    if fold is not None:
        FOLDS[se] = fold
    else:
        FOLDS.pop(se, None)
    return fold


