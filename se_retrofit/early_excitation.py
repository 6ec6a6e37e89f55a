"""Run time of the early squeeze: an SE block's first layer computed from a bottleneck's ``conv3`` input.

Where the SE input is ``norm(conv(z))`` with ``conv`` a 1x1 convolution and ``norm`` a batch norm
using running statistics, both are the same affine map at every position, so they commute with the
average: ``mean(norm(conv(z))) = norm(conv(mean(z)))``, and the squeeze can be taken from ``z``,
which in a bottleneck has a quarter of the channels (`squeeze_through`).

Without autograd (inference) the maps go further: ``fc1``, ``norm`` and ``conv`` are three affine
maps in a row, so ``fc1(norm(conv(m)))`` is one affine map ``W' m + b'`` with ``W' = W1 diag(s) W3``,
``hidden x in_channels``: a quarter of ``fc1``'s weight (in a bottleneck) and none of ``conv``'s to read per forward.
`fc1_through` uses it, folded once in float64 and cached per SE block until any of the tensors it
was folded from changes (version counter) or is replaced (identity, storage), or the block switches
between training and eval mode. Changes made through ``.data`` bypass the version counter (as they
bypass autograd's checks): made in eval mode, they are not seen until the next ``model.train()`` /
``model.eval()`` pair; `SEConfig(early_squeeze=False)` avoids the fold altogether. `gate_through`
goes on to the gate, so that all of SE's small kernels run before ``conv``, in one place.

Only modules whose arithmetic is known qualify: ``nn.Conv1d/2d/3d`` of kernel 1, stride 1, no padding,
one group, and ``nn.BatchNorm1d/2d/3d`` or torchvision's ``FrozenBatchNorm2d`` (exact types: a subclass
may compute something else), with no forward hooks (nor on the SE block a pre-hook, which could change
the input it gates). `early_squeeze` checks them when it rewrites the graph, and the functions
here check them again on every call, because the modules can be replaced afterwards: a deployment
step that fuses ``conv3`` and ``bn3`` leaves ``nn.Identity`` where ``bn3`` was, and the SE block then
averages its input as usual.
"""
from __future__ import annotations

import functools
import math
import weakref

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module_state

from .se_block import SEBlock

# SE block -> (weak references to the tensors folded, their fingerprint, the folded map). Kept off the
# module so that pickling and deep-copying a model never carry it (weak references do not pickle).
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


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


def _hooked(*modules: nn.Module) -> bool:
    """Whether calling these modules runs code besides their class's forward: forward hooks or pre-hooks
    (their own or global ones), or a ``forward`` set on the instance. The early squeeze redoes their
    arithmetic itself and would miss what such code changes (a calibration hook, a clipping hook)."""
    if _module_state._global_forward_hooks or _module_state._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__ for m in modules)


def _declines(z: torch.Tensor, conv: nn.Module, norm: nn.Module) -> bool:
    """Where the early squeeze must not run: not exact (batch statistics, modules not of the known
    kinds, hooks or an instance ``forward`` on them), or inside a tracer.

    ``torch.jit.trace`` would fix this run-time choice for every later input (and the MAC report
    costs the paper's block); ``torch.compile`` / ``torch.export`` see the plain SE ops and fuse them
    themselves, with no guard on the input's size; fx symbolic tracing has no values to decide with.
    """
    return (isinstance(z, fx.Proxy) or torch.jit.is_tracing() or torch.compiler.is_compiling()
            or type(norm) not in norm_types() or not is_pointwise_conv(conv, z.dim() - 2)
            or not _uses_running_stats(norm) or _hooked(conv, norm))


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
    # a pre-hook on the SE block may change the input it gates, which the gate from z would not see
    if _declines(z, conv, norm) or se._forward_pre_hooks:
        return None
    fc1 = se.fc1
    tensors = (_tensor(fc1, "weight"), _tensor(fc1, "bias"), _tensor(conv, "weight"), _tensor(conv, "bias"),
               _tensor(norm, "weight"), _tensor(norm, "bias"), _tensor(norm, "running_mean"),
               _tensor(norm, "running_var"))
    if torch.is_grad_enabled() and (z.requires_grad or any(t is not None and t.requires_grad for t in tensors)):
        s = _squeeze_from_input(z, conv, norm)
        return None if s is None else F.linear(s, fc1.weight.flatten(1), fc1.bias)
    folded = _folded(se, tensors, (norm.eps, se.__dict__.get("_mode_switches", 0)))
    if folded is None:
        return None
    weight_t, bias = folded
    dims = tuple(range(2, z.dim()))
    if z.dtype == torch.float16:  # a float16 sum over a large map can overflow where the mean does not
        return torch.addmm(bias, z.mean(dims), weight_t)
    # the mean's division as the product's alpha: torch.mean is a sum and a division kernel, and on
    # the CPU each small kernel costs tens of microseconds next to the convolutions, whatever its size
    return torch.addmm(bias, z.sum(dims), weight_t, alpha=1.0 / math.prod(z.shape[2:]))


def gate_through(z: torch.Tensor, conv: nn.Module, norm: nn.Module, se: SEBlock) -> torch.Tensor | None:
    """``se``'s ``(N, C)`` gate for the input ``norm(conv(z))``, computed from ``z``; None where the SE
    block must squeeze its input itself (`fc1_through`).

    Called before ``conv``, it runs all of SE's small kernels in one cluster there, while ``z`` and the
    dispatcher's code are still in cache; after the norm only the gated residual add is left.
    """
    hidden = fc1_through(z, conv, norm, se)
    return None if hidden is None else se.excite(hidden)


def _fingerprint(tensors: tuple[torch.Tensor | None, ...], extra: tuple) -> tuple | None:
    """What the folded map depends on: ``extra`` (the norm's eps, the SE block's mode switches) and each
    tensor's storage, version and type; None if untrackable."""
    try:
        return (extra, *((None if t is None else (t.data_ptr(), t._version, t.dtype, t.device)) for t in tensors))
    except RuntimeError:  # inference tensors (made under torch.inference_mode) have no version counter
        return None


def _folded(se: nn.Module, tensors: tuple[torch.Tensor | None, ...], extra: tuple[float, int]
            ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(W'^T, b')`` for ``fc1(norm(conv(m))) = m W'^T + b'``, from the cache or folded now.

    None where ``conv`` does not widen (averaging its input would read no less) or the tensors cannot
    be tracked for changes.
    """
    conv_weight = tensors[2]
    if conv_weight.shape[0] <= conv_weight.shape[1]:
        return None
    key = _fingerprint(tensors, extra)
    if key is None:
        return None
    cached = _CACHE.get(se)
    if cached is not None:
        refs, cached_key, folded = cached
        if cached_key == key and all((r is None and t is None) or (r is not None and r() is t)
                                     for r, t in zip(refs, tensors)):
            return folded
    eps = extra[0]
    wide = torch.float32 if conv_weight.device.type == "mps" else torch.float64  # MPS has no float64
    with torch.inference_mode(False), torch.no_grad():
        f64 = [None if t is None else t.detach().to(wide) for t in tensors]
        w1, b1, w3, b3, gamma, beta, mean, var = f64
        scale = torch.rsqrt(var + eps) * (1.0 if gamma is None else gamma)
        shift = (0.0 if beta is None else beta) - mean * scale
        w1 = w1.flatten(1)
        weight = (w1 * scale) @ w3.flatten(1)
        bias = w1 @ (shift + (0.0 if b3 is None else b3 * scale)) + (0.0 if b1 is None else b1)
        dtype = tensors[0].dtype
        folded = (weight.t().contiguous().to(dtype), bias.to(dtype))
    refs = tuple(None if t is None else weakref.ref(t) for t in tensors)
    _CACHE[se] = (refs, key, folded)
    return folded
