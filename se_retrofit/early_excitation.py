"""Run time of the early squeeze: an SE block's first layer computed from a bottleneck's ``conv3`` input.

Where the SE input is ``norm(conv(z))`` with ``conv`` a 1x1 convolution and ``norm`` a batch norm
using running statistics, both are the same affine map at every position, so they commute with the
average: ``mean(norm(conv(z))) = norm(conv(mean(z)))``, and the squeeze can be taken from ``z``,
which in a bottleneck has a quarter of the channels (`squeeze_through`).

Without autograd (inference) the maps go further: ``fc1``, ``norm`` and ``conv`` are three affine
maps in a row, so ``fc1(norm(conv(m)))`` is one affine map ``W' m + b'`` with ``W' = W1 diag(s) W3``,
``hidden x in_channels``: a quarter of ``fc1``'s weight (in a bottleneck) and none of ``conv``'s to read per forward.
`fc1_through` uses it, folded once in float64 and cached per SE block until any of the tensors it
was folded from, or ``fc2``'s, changes (version counter, or the norm's batch count for statistics
re-estimated in training mode) or is replaced (identity, storage, shape), or the block switches
between training and eval mode, or any ``torch.optim`` optimizer takes a step (fused optimizers,
``fused=True``, write the parameters without moving their version counters). Tensors that are not
registered parameters or buffers (a parametrization, a plain attribute) are not folded at all. Other
writes that bypass the version counter (in place through ``.data``, through a NumPy array or another
tensor sharing the storage without its version counter, as ``vector_to_parameters`` leaves them, and
``torch.distributed`` collectives such as ``broadcast`` into a parameter) bypass autograd's checks
too: made in eval mode, they are not seen until the next ``model.train()`` / ``model.eval()`` pair;
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
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import forward_ad
from torch.multiprocessing.reductions import StorageWeakRef
from torch.nn.modules import module as _module_state
from torch.optim.optimizer import register_optimizer_step_post_hook

from .recording import recording
from .se_block import SEBlock

# SE block -> its `_Fold`. Kept off the module so that pickling and deep-copying a model never carry it
# (weak references do not pickle).
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class _OptimizerSteps:
    """How many ``torch.optim`` optimizer steps this process has taken since the first fold, counted by
    a global step hook registered with that fold: fused optimizers (``fused=True``) write parameters
    without moving their version counters, which `_Fold.holds` would otherwise trust. One hook for the
    process, added only once the early squeeze is used; it costs an increment per step."""

    count = 0
    _handle = None

    @classmethod
    def start(cls) -> None:
        if cls._handle is None:
            cls._handle = register_optimizer_step_post_hook(cls._step)

    @classmethod
    def _step(cls, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        cls.count += 1


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
    """Whether calling these modules runs code besides their class's forward: forward or backward hooks
    or pre-hooks (their own or global ones), or a ``forward`` set on the instance. The early squeeze
    redoes their arithmetic itself and would miss what such code changes (a calibration hook, a
    clipping hook), and under autograd its gradient would go around a backward hook's module."""
    if (_module_state._global_forward_hooks or _module_state._global_forward_pre_hooks
            or _module_state._global_backward_hooks or _module_state._global_backward_pre_hooks):
        return True
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
               or "forward" in m.__dict__ for m in modules)


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
    return recording(z) or not _exact(z, conv, norm) or _hooked(conv, norm)


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
    tensors = _sources(conv, norm, se)
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
    from on every call (`_Fold.holds`), in a few microseconds, and then runs the five kernels of the
    gate with nothing between them (`_Fold.gate`): the full checks of `_declines`, a fold's bookkeeping
    made anew and the module calls of `SEBlock.excite` cost more than those kernels on small maps.
    """
    if _declines_at_once(z, conv, norm, se):
        return None
    tensors = _sources(conv, norm, se)
    if _needs_grad(z, tensors or ()):
        hidden = _fc1_with_autograd(z, conv, norm, se)
        return None if hidden is None else se.excite(hidden)
    fold = _current_fold(z, conv, norm, se, tensors)
    return None if fold is None else fold.gate(z, se, tensors)


def _declines_at_once(z: torch.Tensor, conv: nn.Module, norm: nn.Module, se: SEBlock) -> bool:
    """The checks of `_declines` that no cached fold can answer: tracers and hooks (a pre-hook on the
    SE block may change the input it gates, which the gate from ``z`` would not see)."""
    return recording(z) or _hooked(conv, norm) or bool(se._forward_pre_hooks)


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
                  tensors: tuple[torch.Tensor | None, ...] | None) -> _Fold | None:
    """The cached fold if it still holds, else a new one (cached), else None where none can be made
    (and the stale one is dropped, with what it kept alive)."""
    fold = _CACHE.get(se)
    if fold is not None and tensors is not None and fold.holds(z, conv, norm, se, tensors):
        return fold
    fold = _Fold.make(z, conv, norm, se, tensors) if tensors is not None and _exact(z, conv, norm) else None
    if fold is not None:
        _CACHE[se] = fold
    else:
        _CACHE.pop(se, None)
    return fold


def _sources(conv: nn.Module, norm: nn.Module, se: SEBlock) -> tuple[torch.Tensor | None, ...] | None:
    """The tensors a fold is made of or reads, in `_fold`'s order, then ``fc2``'s and the norm's batch
    count (its version moves with every training-mode pass, which updates the running statistics
    without moving theirs).

    None where one of them is neither a registered parameter or buffer nor registered as None (no
    bias): a plain attribute (``del m.bias; m.bias = t``) or a parametrization's property, which the
    checks cannot follow and the plain SE path reads as it is. Inline, without `_tensor` or
    ``nn.Module.__getattr__``: this runs on every forward of every bottleneck.
    """
    fc1, fc2 = se._modules["fc1"], se._modules["fc2"]
    found = []
    for module, name in ((fc1, "weight"), (fc1, "bias"), (conv, "weight"), (conv, "bias"), (norm, "weight"),
                         (norm, "bias"), (norm, "running_mean"), (norm, "running_var"), (fc2, "weight"),
                         (fc2, "bias")):
        params = module._parameters
        t = params.get(name)
        if t is None:
            buffers = module._buffers
            t = buffers.get(name)
            if (t is None and name not in params and name not in buffers
                    and (name in module.__dict__ or hasattr(type(module), name))):
                return None
        found.append(t)
    found.append(norm._buffers.get("num_batches_tracked"))
    return tuple(found)


_storage_expired = torch.UntypedStorage._expired


class _Record:
    """One tensor a fold was made from, as it was then: which object (by id: a weak reference would
    make ``torch.utils.swap_tensors``, which module conversion can use, refuse the tensor), its storage
    (by a weak reference: an address alone does not name a storage, since once the folded storage is
    freed the next one of its size usually lands there), and its address, version, dtype, shape and
    strides (a ``.data`` slice from index 0 keeps address and version). `_Fold.holds` compares them
    with the tensor now; a device change means another storage."""

    __slots__ = ("id", "storage", "ptr", "version", "dtype", "shape", "strides")

    def __init__(self, t: torch.Tensor) -> None:
        # inference tensors (made under torch.inference_mode) have no version counter: RuntimeError
        self.version = t._version
        self.id, self.storage = id(t), StorageWeakRef(t.untyped_storage())
        self.ptr, self.dtype, self.shape, self.strides = t.data_ptr(), t.dtype, t.shape, t.stride()



class _Fold:
    """``fc1 . norm . conv`` folded into ``m W'^T + b'`` for one SE block, with what it was folded from.

    Kept in `_CACHE` (weakly keyed by the SE block, off the module, so that pickling and deep-copying a
    model never carry it) and used only while `holds` finds all of that unchanged. It keeps no
    reference to the model's tensors, only the folded ones it made.
    """

    __slots__ = ("types", "geometry", "batchnorm", "extra", "records", "dims", "weight_t", "bias")

    @classmethod
    def make(cls, z: torch.Tensor, conv: nn.Module, norm: nn.Module, se: SEBlock,
             tensors: tuple[torch.Tensor | None, ...]) -> _Fold | None:
        """Fold now; None where ``conv`` does not widen (averaging its input would read no less) or the
        tensors cannot be tracked for changes."""
        conv_weight = tensors[2]
        if conv_weight.shape[0] <= conv_weight.shape[1] or tensors[0] is None or tensors[8] is None:
            return None
        try:
            records = tuple(None if t is None else _Record(t) for t in tensors)
        except RuntimeError:
            return None
        fold = cls()
        fold.types = (type(conv), type(norm))
        fold.geometry = _geometry(conv)
        fold.batchnorm = isinstance(norm, nn.modules.batchnorm._BatchNorm)
        _OptimizerSteps.start()
        fold.extra = (norm.eps, se.__dict__.get("_mode_switches", 0), _OptimizerSteps.count)
        fold.records = records
        fold.dims = tuple(range(2, z.dim()))
        fold.weight_t, fold.bias = _fold(tensors[:8], norm.eps)
        return fold

    def holds(self, z: torch.Tensor, conv: nn.Module, norm: nn.Module, se: SEBlock,
              tensors: tuple[torch.Tensor | None, ...]) -> bool:
        """Whether this fold is still exact for these modules: modules of the same types and geometry,
        the norm still using running statistics with the same eps, no mode switch of the SE block (see
        `SEBlock.train`) and no optimizer step since, and each tensor unchanged (`_Record`): what
        `_declines` and `make` check, at a fraction of their cost. (Other module objects holding the
        same tensors compute the same map.)"""
        if ((type(conv), type(norm)) != self.types
                or z.dim() != len(self.dims) + 2 or (self.batchnorm and norm.training)
                or (norm.eps, se.__dict__.get("_mode_switches", 0), _OptimizerSteps.count) != self.extra
                or _geometry(conv) != self.geometry):
            return False
        for record, t in zip(self.records, tensors):  # `_Record.holds`, inline: it runs for every tensor
            if record is None:
                if t is not None:
                    return False
            elif (t is None or id(t) != record.id or _storage_expired(record.storage.cdata)
                  or t.data_ptr() != record.ptr or t._version != record.version or t.dtype != record.dtype
                  or t.shape != record.shape or t.stride() != record.strides):
                return False
        return True

    def fc1(self, z: torch.Tensor) -> torch.Tensor:
        """``fc1(norm(conv(mean(z))))``: one sum and one matrix product."""
        if z.dtype == torch.float16:  # a float16 sum over a large map can overflow where the mean does not
            return torch.addmm(self.bias, z.mean(self.dims), self.weight_t)
        # the mean's division as the product's alpha: torch.mean is a sum and a division kernel, and on
        # the CPU each small kernel costs tens of microseconds next to the convolutions, whatever its size
        return torch.addmm(self.bias, z.sum(self.dims), self.weight_t, alpha=1.0 / math.prod(z.shape[2:]))

    def gate(self, z: torch.Tensor, se: SEBlock, tensors: tuple[torch.Tensor | None, ...]) -> torch.Tensor:
        """`SEBlock.excite` of `fc1`, with the same kernels and bits (``F.linear`` of a matrix is this
        ``addmm``) on ``fc2``'s current weight and bias (``tensors``, checked by `holds`); through
        ``se.excite`` itself where that is not `SEBlock`'s, or the activation is not a plain ReLU or has
        hooks."""
        act = se._modules["act"]
        if (type(act) is not nn.ReLU or _hooked(act) or type(se).excite is not SEBlock.excite
                or "excite" in se.__dict__):
            return se.excite(self.fc1(z))
        hidden = self.fc1(z).relu_()
        fc2_weight_t, fc2_bias = tensors[8].flatten(1).t(), tensors[9]
        if fc2_bias is None:
            return torch.mm(hidden, fc2_weight_t).sigmoid_()
        return torch.addmm(fc2_bias, hidden, fc2_weight_t).sigmoid_()


def _geometry(conv: nn.Module) -> tuple:
    """The attributes `is_pointwise_conv` reads besides the weight, to see them change."""
    return (conv.kernel_size, conv.stride, conv.padding, conv.groups)


def _fold(tensors: tuple[torch.Tensor | None, ...], eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W'^T, b')`` for ``fc1(norm(conv(m))) = m W'^T + b'``, computed in float64 (float32 on MPS, which
    has no float64) and returned in ``fc1``'s dtype."""
    conv_weight = tensors[2]
    wide = torch.float32 if conv_weight.device.type == "mps" else torch.float64
    with torch.inference_mode(False), torch.no_grad():
        f64 = [None if t is None else t.detach().to(wide) for t in tensors]
        w1, b1, w3, b3, gamma, beta, mean, var = f64
        scale = torch.rsqrt(var + eps) * (1.0 if gamma is None else gamma)
        shift = (0.0 if beta is None else beta) - mean * scale
        w1 = w1.flatten(1)
        weight = (w1 * scale) @ w3.flatten(1)
        bias = w1 @ (shift + (0.0 if b3 is None else b3 * scale)) + (0.0 if b1 is None else b1)
        dtype = tensors[0].dtype
        return weight.t().contiguous().to(dtype), bias.to(dtype)
