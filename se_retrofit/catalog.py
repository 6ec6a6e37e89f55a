"""What the analysis needs to know about module classes and functions, by role.

The analysis is structural (it reads graphs, not class names), but it has to know what a leaf does:
whether it convolves, only rescales, drops paths, normalises, or already is channel attention.
Classes are matched by ``isinstance`` where the library can be imported, and by class name for
libraries that are optional, so that no role needs a hard dependency.
"""
from __future__ import annotations

import operator
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .augmented import iadd
from .se_block import SEBlock

_CHANNEL_ATTENTION_NAMES = {
    # timm
    "SEModule", "SqueezeExcite", "EffectiveSEModule", "SqueezeExciteCl", "EcaModule", "CecaModule",
    "CbamModule", "LightCbamModule", "GatherExcite", "GlobalContext", "SelectiveKernel", "SplitAttn",
    # torchvision
    "SqueezeExcitation",
}
_user_attention: list[type] = []

_PATH_DROP_NAMES = {"DropPath", "StochasticDepth", "DropBlock2d"}
_FROZEN_BATCH_NORM_NAMES = {"FrozenBatchNorm2d", "FrozenBatchNormAct2d"}
_LAYER_SCALE_NAMES = {"LayerScale", "LayerScale2d", "LayerScaler"}

# Leaf modules that are linear maps of their input (or identities): a shortcut built only from these,
# with at most one convolution, is a projection, not a branch with work of its own.
_LINEAR_LEAVES: tuple[type, ...] = (
    nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm,
    nn.Identity, nn.modules.dropout._DropoutNd, nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd, nn.Upsample, nn.ZeroPad2d, nn.ConstantPad2d,
)
# Leaf modules that keep the layout of their input: same shape, same meaning of every axis.
_ELEMENTWISE_LEAVES: tuple[type, ...] = (
    nn.Identity, nn.modules.dropout._DropoutNd, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU,
    nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
    nn.Softplus, nn.Hardtanh, nn.LayerNorm,
)
_ACTIVATION_LEAVES: tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Hardtanh,
)
_ACTIVATION_NAMES = {"Swish", "SwishMe", "HardSwish", "HardSwishMe", "Mish", "MishMe", "GELU", "GELUTanh",
                     "HardSigmoid", "HardSigmoidMe", "QuickGELU", "Sigmoid", "Tanh", "PReLU", "HardMish"}


def register_channel_attention(cls: type) -> type:
    """Declare ``cls`` a channel-attention module, so branches holding it get no SE. Usable as a decorator."""
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise ValueError(f"register_channel_attention expects an nn.Module subclass, got {cls!r}")
    _user_attention.append(cls)
    return cls


def _class_names(module: nn.Module) -> set[str]:
    return {c.__name__ for c in type(module).__mro__}


def is_channel_attention(module: nn.Module) -> bool:
    if isinstance(module, SEBlock) or isinstance(module, tuple(_user_attention)):
        return True
    return bool(_class_names(module) & _CHANNEL_ATTENTION_NAMES)


def find_channel_attention(module: nn.Module) -> str | None:
    """Name (relative, '' for itself) of the first channel-attention module in ``module``'s tree."""
    for name, sub in module.named_modules():
        if is_channel_attention(sub):
            return name
    return None


def is_path_drop(module: nn.Module) -> bool:
    return isinstance(module, (nn.Identity, nn.modules.dropout._DropoutNd)) or bool(
        _class_names(module) & _PATH_DROP_NAMES)


def is_quantization_functional(module: nn.Module) -> bool:
    """torch.ao's ``FloatFunctional`` and kin: the adds of eager-mode quantizable models (torchvision's
    ``models.quantization``), which ``convert`` swaps for quantized ops."""
    return bool(_class_names(module) & {"FloatFunctional", "FXFloatFunctional", "QFunctional"})


def is_layer_scale(module: nn.Module) -> bool:
    names = _class_names(module)
    if names & _LAYER_SCALE_NAMES:
        return True
    # timm's MetaFormer (PoolFormer) calls its layer scale plain `Scale`: too common a name to trust
    # alone, so it must also look like one, a leaf holding a single per-channel vector
    return "Scale" in names and not any(True for _ in module.children()) \
        and [p.dim() for p in module.parameters()] == [1] and not any(True for _ in module.buffers())


def is_activation(module: nn.Module) -> bool:
    return isinstance(module, _ACTIVATION_LEAVES) or bool(_class_names(module) & _ACTIVATION_NAMES)


def is_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.conv._ConvNd)


def is_frozen_batch_norm(module: nn.Module) -> bool:
    """torchvision's FrozenBatchNorm2d (detection backbones, timm's ``freeze_batch_norm_2d``) and timm's
    FrozenBatchNormAct2d: batch norms with fixed statistics, computed as ``x * scale + bias`` rather than
    with ``F.batch_norm``."""
    return bool(_class_names(module) & _FROZEN_BATCH_NORM_NAMES)


def is_channel_first_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm)) or is_frozen_batch_norm(module)


def is_linear_leaf(module: nn.Module) -> bool:
    return (isinstance(module, _LINEAR_LEAVES) or is_path_drop(module) or is_layer_scale(module)
            or "FrozenBatchNorm2d" in _class_names(module))


def is_elementwise_leaf(module: nn.Module) -> bool:
    return (isinstance(module, _ELEMENTWISE_LEAVES) or is_activation(module) or is_path_drop(module)
            or is_layer_scale(module))


def count_convs(module: nn.Module) -> int:
    """Convolutions in ``module``'s tree; a TorchScript module's are counted in its compiled graph, where
    a scripted ``nn.Conv2d`` is no ``nn.Conv2d`` any more."""
    from .compiled import conv_count, is_compiled

    total, compiled = 0, set()
    for m in module.modules():  # parents first: a compiled module's graph holds its submodules' code
        if is_compiled(m) and id(m) not in compiled:
            total += conv_count(m)
            compiled.update(id(sub) for sub in m.modules())
        elif not is_compiled(m) and is_conv(m):
            total += 1
    return total


def _computing_children(module: nn.Module) -> Iterator[nn.Module]:
    """``module``'s children, leaving out ``torch.nn.utils.parametrize``'s parametrizations: they compute a
    weight (weight norm, spectral norm), not a map of the feature map."""
    for name, child in module.named_children():
        if not (name == "parametrizations" and parametrize.is_parametrized(module)):
            yield child


def _computing_modules(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` and its submodules, parametrizations left out (`_computing_children`)."""
    yield module
    for child in _computing_children(module):
        yield from _computing_modules(child)


def is_leaf_like(module: nn.Module) -> bool:
    """A module whose computation its class alone tells: no submodules but parametrizations (a
    parametrized convolution is still a convolution)."""
    return next(_computing_children(module), None) is None


def is_light_module(module: nn.Module) -> bool:
    """True when ``module`` holds no activation and every leaf of it is a linear map (conv, norm, pool...)."""
    for m in _computing_modules(module):
        if is_activation(m):
            return False
        if next(m.children(), None) is None and not is_linear_leaf(m):
            return False
    return True


# Functions (``call_function`` targets and ``call_method`` names), by role.
ADD_FUNCTIONS: set[Any] = {operator.add, operator.iadd, iadd, torch.add, torch.Tensor.add, torch.Tensor.add_}
ADD_METHODS = {"add", "add_", "__add__", "__iadd__"}

_ELEMENTWISE_FUNCTION_NAMES = {
    "relu", "relu_", "relu6", "gelu", "silu", "sigmoid", "sigmoid_", "tanh", "hardswish", "hardsigmoid",
    "mish", "leaky_relu", "elu", "selu", "celu", "softplus", "hardtanh", "dropout", "dropout2d", "dropout3d",
    "alpha_dropout", "drop_path", "stochastic_depth", "contiguous", "clone", "float", "to", "type_as", "neg",
    "abs", "exp", "clamp", "clamp_", "clamp_min", "swish", "hard_swish", "hard_sigmoid", "hard_mish",
    "gelu_tanh", "quick_gelu", "detach", "half", "bfloat16", "layer_norm", "getattr_noop",
}
_ACTIVATION_FUNCTION_NAMES = {
    "relu", "relu_", "relu6", "gelu", "silu", "tanh", "hardswish", "mish", "leaky_relu", "elu", "selu",
    "celu", "softplus", "hardtanh", "swish", "hard_swish", "hard_mish", "gelu_tanh", "quick_gelu",
}
_PATH_DROP_FUNCTION_NAMES = {"drop_path", "stochastic_depth", "dropout", "dropout2d", "dropout3d", "alpha_dropout"}
BINARY_ELEMENTWISE_FUNCTIONS: set[Any] = {
    operator.add, operator.iadd, iadd, operator.sub, operator.isub, operator.mul, operator.imul, operator.truediv,
    operator.itruediv, torch.add, torch.sub, torch.mul, torch.div, torch.Tensor.add, torch.Tensor.add_,
    torch.Tensor.mul, torch.Tensor.mul_, torch.Tensor.sub, torch.Tensor.div,
}
BINARY_ELEMENTWISE_METHODS = {"add", "add_", "mul", "mul_", "sub", "sub_", "div", "div_", "__add__", "__mul__"}
MUL_FUNCTIONS: set[Any] = {operator.mul, operator.imul, torch.mul, torch.Tensor.mul, torch.Tensor.mul_}
MUL_METHODS = {"mul", "mul_", "__mul__"}
CONV_FUNCTIONS: set[Callable] = {F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d,
                                 F.conv_transpose3d}
SLICE_FUNCTION_NAMES = {"split", "chunk", "tensor_split", "narrow", "unbind", "split_with_sizes"}


def target_name(target: Any) -> str:
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def is_elementwise_function_name(name: str) -> bool:
    return name in _ELEMENTWISE_FUNCTION_NAMES


def is_activation_function_name(name: str) -> bool:
    return name in _ACTIVATION_FUNCTION_NAMES


def is_path_drop_function_name(name: str) -> bool:
    return name in _PATH_DROP_FUNCTION_NAMES
