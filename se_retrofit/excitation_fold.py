"""The early excitation's cache: ``fc1 . norm . conv`` folded into one affine map per SE block.

Without autograd (inference) ``fc1``, the norm and the 1x1 conv before the SE block are three affine
maps in a row, so ``fc1(norm(conv(m)))`` is one map ``W' m + b'`` with ``W' = W1 diag(s) W3``: a
quarter of ``fc1``'s weight (in a bottleneck) and none of ``conv``'s to read per forward. It is folded
once in float64 (`Fold.make`) and used while everything it came from is unchanged (`Fold.holds`):
the tensors (version counter, identity, storage, shape, dtype, strides; `Record`), the modules'
types and geometry, the norm's eps and mode, the SE block's train/eval switches, and the count of
``torch.optim`` optimizer steps (`OptimizerSteps`: fused optimizers write parameters without moving
their version counters). `early_excitation` decides when a fold may be used at all.
"""
from __future__ import annotations

import math
import weakref

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.optim.optimizer import register_optimizer_step_post_hook

from .hooks import hooked
from .se_block import SEBlock

# SE block -> its `Fold`. Kept off the module so that pickling and deep-copying a model never carry it
# (weak references do not pickle).
FOLDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class OptimizerSteps:
    """How many ``torch.optim`` optimizer steps this process has taken since the first fold, counted by
    a global step hook registered with that fold: fused optimizers (``fused=True``) write parameters
    without moving their version counters, which `Fold.holds` would otherwise trust. One hook for the
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


def sources(conv: nn.Module, norm: nn.Module, se: SEBlock) -> tuple[torch.Tensor | None, ...] | None:
    """The tensors a fold is made of or reads, in `_fold`'s order, then ``fc2``'s and the norm's batch
    count (its version moves with every training-mode pass, which updates the running statistics
    without moving theirs).

    None where one of them is neither a registered parameter or buffer nor registered as None (no
    bias): a plain attribute (``del m.bias; m.bias = t``) or a parametrization's property, which the
    checks cannot follow and the plain SE path reads as it is. Inline, without `getattr` or
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


class Record:
    """One tensor a fold was made from, as it was then: which object (by id: a weak reference would
    make ``torch.utils.swap_tensors``, which module conversion can use, refuse the tensor), its storage
    (by a weak reference: an address alone does not name a storage, since once the folded storage is
    freed the next one of its size usually lands there), and its address, version, dtype, shape and
    strides (a ``.data`` slice from index 0 keeps address and version). `Fold.holds` compares them
    with the tensor now; a device change means another storage."""

    __slots__ = ("id", "storage", "ptr", "version", "dtype", "shape", "strides")

    def __init__(self, t: torch.Tensor) -> None:
        # inference tensors (made under torch.inference_mode) have no version counter: RuntimeError
        self.version = t._version
        self.id, self.storage = id(t), StorageWeakRef(t.untyped_storage())
        self.ptr, self.dtype, self.shape, self.strides = t.data_ptr(), t.dtype, t.shape, t.stride()



class Fold:
    """``fc1 . norm . conv`` folded into ``m W'^T + b'`` for one SE block, with what it was folded from.

    Kept in `FOLDS` (weakly keyed by the SE block, off the module, so that pickling and deep-copying a
    model never carry it) and used only while `holds` finds all of that unchanged. It keeps no
    reference to the model's tensors, only the folded ones it made.
    """

    __slots__ = ("types", "geometry", "batchnorm", "extra", "records", "dims", "weight_t", "bias")

    @classmethod
    def make(cls, z: torch.Tensor, conv: nn.Module, norm: nn.Module, se: SEBlock,
             tensors: tuple[torch.Tensor | None, ...]) -> Fold | None:
        """Fold now; None where ``conv`` does not widen (averaging its input would read no less) or the
        tensors cannot be tracked for changes: among them tensors in shared memory (``share_memory()``,
        ``torch.multiprocessing``, Hogwild training), which other processes write without moving this
        one's version counters. Moving a tensor there gives it a new address, so a fold made before
        ``share_memory()`` is dropped at the next call."""
        conv_weight = tensors[2]
        if (conv_weight.shape[0] <= conv_weight.shape[1] or tensors[0] is None or tensors[8] is None
                or any(t is not None and t.device.type == "cpu" and t.is_shared() for t in tensors)):
            return None
        try:
            records = tuple(None if t is None else Record(t) for t in tensors)
        except RuntimeError:
            return None
        fold = cls()
        fold.types = (type(conv), type(norm))
        fold.geometry = _geometry(conv)
        fold.batchnorm = isinstance(norm, nn.modules.batchnorm._BatchNorm)
        OptimizerSteps.start()
        fold.extra = (norm.eps, se.__dict__.get("_mode_switches", 0), OptimizerSteps.count)
        fold.records = records
        fold.dims = tuple(range(2, z.dim()))
        fold.weight_t, fold.bias = _fold(tensors[:8], norm.eps)
        return fold

    def holds(self, z: torch.Tensor, conv: nn.Module, norm: nn.Module, se: SEBlock,
              tensors: tuple[torch.Tensor | None, ...]) -> bool:
        """Whether this fold is still exact for these modules: modules of the same types and geometry,
        the norm still using running statistics with the same eps, no mode switch of the SE block (see
        `SEBlock.train`) and no optimizer step since, and each tensor unchanged (`Record`): what
        `_declines` and `make` check, at a fraction of their cost. (Other module objects holding the
        same tensors compute the same map.)"""
        if ((type(conv), type(norm)) != self.types
                or z.dim() != len(self.dims) + 2 or (self.batchnorm and norm.training)
                or (norm.eps, se.__dict__.get("_mode_switches", 0), OptimizerSteps.count) != self.extra
                or _geometry(conv) != self.geometry):
            return False
        for record, t in zip(self.records, tensors):  # `Record.holds`, inline: it runs for every tensor
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
        if (type(act) is not nn.ReLU or hooked(act) or type(se).excite is not SEBlock.excite
                or "excite" in se.__dict__):
            return se.excite(self.fc1(z))
        hidden = self.fc1(z).relu_()
        fc2_weight_t, fc2_bias = tensors[8].flatten(1).t(), tensors[9]
        if fc2_bias is None:
            return torch.mm(hidden, fc2_weight_t).sigmoid_()
        return torch.addmm(fc2_bias, hidden, fc2_weight_t).sigmoid_()


def _geometry(conv: nn.Module) -> tuple:
    """The attributes `early_excitation.is_pointwise_conv` reads besides the weight, to see them change."""
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
