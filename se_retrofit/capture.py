"""Run the model once on an example input and record how each module was really called.

Tracing a block on its own needs the arguments its parent passes it (a DLA tree gets its shortcut
from the caller, HRNet a list), and checking a rewrite needs the block's true output. Both are
recorded here in one forward, in eval mode and without gradients so that no BatchNorm statistic moves;
a buffer the forward updates all the same (an EMA) is put back afterwards (`preserved_tensors`).
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn
from torch.utils._pytree import tree_map

from .compiled import conv_count, is_compiled
from .messages import first_line
from .trace_effects import ParameterWritten, preserved_tensors

_DEFAULT_SIZES = (64, 224, 299)
_BATCH = 2  # batch 2, so that a (1, C, H, W) parameter never looks like a feature map


@dataclass
class Call:
    """The first call of a module: the arguments its ``forward`` received and what it returned (hooks
    aside), cloned so later in-place ops cannot alter them.

    ``varies`` describes a later call whose non-tensor arguments differ from the first call's, if any:
    a traced graph fixes those arguments, so such a module cannot be rewritten from one trace.
    """

    args: tuple
    kwargs: dict
    output: Any
    varies: str | None = None

    def fresh_args(self) -> tuple[tuple, dict]:
        """Clones of the arguments, for a run that may modify its inputs in place."""
        return _clone(self.args), _clone(self.kwargs)


def _clone(value: Any) -> Any:
    return tree_map(_clone_leaf, value)


_IMMUTABLE = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size)


def _clone_leaf(value: Any) -> Any:
    """A tensor's copy, or a deep copy of an object pytree does not look into (a batch class, torchvision's
    ImageList), whose tensors the forward may change as well; an object that does not deep-copy is passed
    as it is."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, _IMMUTABLE):
        return value
    try:
        return copy.deepcopy(value)
    except Exception:  # deepcopy raises what the failing object raises (TypeError, RuntimeError, ...)
        return value


@contextlib.contextmanager
def preserved_modes(model: nn.Module) -> Iterator[None]:
    """Restore every submodule's train/eval flag on exit, whatever happened inside."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _first_conv(model: nn.Module) -> nn.Module | None:
    """The first convolution module, or None where a TorchScript module with convolutions comes first: a
    scripted stem is no ``nn.Conv2d``, and the layer after it would tell the wrong input channels."""
    for m in model.modules():
        if is_compiled(m) and conv_count(m):
            return None
        if isinstance(m, nn.modules.conv._ConvNd):
            return m
    return None


def _reference_tensor(model: nn.Module) -> torch.Tensor:
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t
    return torch.zeros(())


def _pretrained_size(model: nn.Module) -> tuple[tuple[int, ...] | None, bool]:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    fixed = bool(cfg.get("fixed_input_size")) if isinstance(cfg, dict) else False
    return (tuple(size) if size else None), fixed


def candidate_inputs(model: nn.Module) -> list[tuple[tuple, dict]]:
    """Example inputs to try, smallest first: a shape-only analysis does not need full resolution.

    Channels and the number of spatial dimensions come from the first convolution; a timm model with
    ``fixed_input_size`` gets exactly its configured size. Detection models take a list of images, so
    that form is tried after the batched tensor.
    """
    ref = _reference_tensor(model)
    conv = _first_conv(model)
    spatial = len(conv.kernel_size) if conv is not None else 2
    cfg_size, fixed = _pretrained_size(model)
    # The first convolution usually tells the input channels (timm's in_chans=1 keeps a 3-channel cfg);
    # the pretrained config's channels are the fallback for models that build their stem later.
    channels = [conv.in_channels] if conv is not None else []
    if cfg_size is not None and len(cfg_size) == spatial + 1 and cfg_size[0] not in channels:
        channels.append(cfg_size[0])
    channels = channels or [3]
    shapes: list[tuple[int, ...]] = []
    if fixed and cfg_size is not None:
        shapes.append(tuple(cfg_size[1:]))
    else:
        sizes = list(_DEFAULT_SIZES)
        if cfg_size is not None and cfg_size[-1] not in sizes:
            sizes.insert(1, cfg_size[-1])
        for s in sizes:
            shapes.append((8,) * (spatial - 2) + (s, s) if spatial >= 2 else (s * 4,))
    gen = torch.Generator().manual_seed(0)
    out = []
    for in_chans in channels:
        for shape in shapes:
            x = torch.rand((_BATCH, in_chans, *shape), generator=gen).to(device=ref.device, dtype=ref.dtype)
            out.append(((x,), {}))
    if spatial == 2:
        for shape in shapes[:2]:
            images = [torch.rand((channels[0], *shape), generator=gen).to(device=ref.device, dtype=ref.dtype)]
            out.append(((images,), {}))
    return out


def normalize_example_input(example_input: Any) -> tuple[tuple, dict]:
    """Accept a tensor, a tuple of positional arguments, or a dict of keyword arguments; anything else,
    a list included (torchvision's detectors take a list of images), is the one positional argument."""
    if isinstance(example_input, dict):
        return (), dict(example_input)
    if isinstance(example_input, tuple):
        return example_input, {}
    return (example_input,), {}


def describe(args: tuple, kwargs: dict) -> str:
    def one(v: Any) -> str:
        if isinstance(v, torch.Tensor):
            return f"Tensor{tuple(v.shape)}"
        if isinstance(v, (list, tuple)):
            inner = ", ".join(one(x) for x in v)
            return f"[{inner}]" if isinstance(v, list) else f"({inner})"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k!r}: {one(x)}" for k, x in v.items()) + "}"
        text = repr(v)  # a user's object may print every tensor it holds
        return text if len(text) <= 80 else f"<{type(v).__name__}>"
    parts = [one(a) for a in args] + [f"{k}={one(v)}" for k, v in kwargs.items()]
    return ", ".join(parts)


_TENSOR = object()  # stands for any tensor in the constants of a call


def _constants(a: tuple, kw: dict) -> Any:
    return tree_map(lambda v: _TENSOR if isinstance(v, torch.Tensor) else v, (a, kw))


def _same(x: Any, y: Any) -> bool:
    try:
        return bool(x == y)
    except Exception:  # a value without a plain truth for ==, an array say: count it as different
        return False


def _record(model: nn.Module, modules: dict[str, nn.Module], args: tuple, kwargs: dict) -> dict[str, Call]:
    """One eval-mode, no-grad forward with hooks that keep each module's first call and note later
    calls with other constants; the model's buffers are as before afterwards, even where it fails.

    The pre-hook runs after the user's pre-hooks and the forward hook before the user's forward
    hooks, so that the call recorded is the one ``forward`` itself saw and made.
    """
    calls: dict[str, Call] = {}
    pending: dict[str, tuple[tuple, dict]] = {}
    first: dict[str, Any] = {}
    varies: dict[str, str] = {}

    def pre_hook(name: str):
        def hook(module: nn.Module, a: tuple, kw: dict) -> None:
            if name not in first:
                first[name] = _constants(a, kw)
                pending[name] = (_clone(a), _clone(kw))
            elif name not in varies and not _same(first[name], _constants(a, kw)):
                varies[name] = describe(a, kw)
        return hook

    def post_hook(name: str):
        def hook(module: nn.Module, a: tuple, kw: dict, output: Any) -> None:
            if name in pending and name not in calls:
                a0, kw0 = pending.pop(name)
                calls[name] = Call(a0, kw0, _clone(output))
        return hook

    handles = []
    for name, module in modules.items():
        handles.append(module.register_forward_pre_hook(pre_hook(name), with_kwargs=True))
        handles.append(module.register_forward_hook(post_hook(name), with_kwargs=True, prepend=True))
    try:
        with preserved_modes(model), preserved_tensors(model), torch.no_grad(), _small_detection_transforms(model):
            model.eval()
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    for name, call in calls.items():
        call.varies = varies.get(name)
    return calls


_DETECTION_SIZE = 128  # the shorter side torchvision detectors resize to during the example forward


@contextlib.contextmanager
def _small_detection_transforms(model: nn.Module) -> Iterator[None]:
    """Let torchvision detectors resize the example images to 128 px instead of their 800 px for this one run.

    Their ``GeneralizedRCNNTransform`` scales every image to ``min_size`` (800 by default) before the
    backbone, so the example forward would cost a full-size detection (about a minute on a laptop CPU).
    The analysis needs channels and the call structure, not the resolution; the sizes are put back after.
    """
    try:
        from torchvision.models.detection.transform import GeneralizedRCNNTransform
    except ImportError:
        yield
        return
    saved = [(m, m.min_size, m.max_size) for m in model.modules() if isinstance(m, GeneralizedRCNNTransform)]
    try:
        for m, min_size, max_size in saved:
            if min(min_size) > _DETECTION_SIZE:
                m.min_size, m.max_size = (_DETECTION_SIZE,), min(max_size, _DETECTION_SIZE * max_size // min(min_size))
        yield
    finally:
        for m, min_size, max_size in saved:
            m.min_size, m.max_size = min_size, max_size


def candidate_described(model: nn.Module, description: str) -> tuple[tuple, dict]:
    """The candidate input (`candidate_inputs`) that `describe` gives as ``description``: the input a plan's
    ``example_input`` names, made anew (a plan keeps only the description, not the tensors: a model would
    otherwise carry its example batch, and the caller's autograd graph, for life, in memory and in pickles)."""
    for args, kwargs in candidate_inputs(model):
        if describe(args, kwargs) == description:
            return args, kwargs
    raise ValueError(f"no candidate input of {type(model).__name__} is {description!r}; the plan was made with an "
                     "example_input of the caller's: run the model on that input")


def _private_copy(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Copies of every tensor in the example arguments, for the one forward that may modify them.

    A model may change its input in place (``ReLU(inplace=True)`` first): the caller's example input
    must come back as it was given. The copies are made outside ``torch.inference_mode``, so an input
    made under it (an inference tensor, which refuses in-place updates there) runs too.
    """
    with torch.inference_mode(False):
        return _clone(args), _clone(kwargs)


def capture_calls(model: nn.Module, modules: dict[str, nn.Module], example_input: Any = None
                  ) -> tuple[dict[str, Call], tuple[tuple, dict]]:
    """Record the first call of every module in ``modules`` during one example forward.

    Returns the calls by module name and the example arguments that worked, as they were before the
    forward (it runs on copies). Raises ValueError when no example input runs, with the shapes tried
    and the last error.
    """
    if example_input is not None:
        candidates = [normalize_example_input(example_input)]
    else:
        candidates = candidate_inputs(model)
    errors: list[str] = []
    for args, kwargs in candidates:
        try:
            return _record(model, modules, *_private_copy(args, kwargs)), (args, kwargs)
        except ParameterWritten:  # no other input would undo it
            raise
        except Exception as exc:  # any failure means "try the next input"; all are reported below
            errors.append(f"input {describe(args, kwargs)}: {first_line(exc, 300)}")
    raise NoExampleInput(type(model).__name__, errors)


class NoExampleInput(ValueError):
    """No example input ran through the model; the message lists what was tried and ends with a hint.

    The hint names the Python argument; a command line names its own option with `with_hint`.
    """

    API_HINT = "Pass example_input= with an input the model accepts (a tensor, a tuple of arguments or a dict)."

    def __init__(self, model_name: str, tried: list[str], hint: str = API_HINT) -> None:
        self.model_name, self.tried, self.hint = model_name, tried, hint
        listed = "\n  ".join(tried)
        super().__init__(f"could not run an example forward through {model_name}; tried:\n  {listed}\n{hint}")

    def with_hint(self, hint: str) -> NoExampleInput:
        return NoExampleInput(self.model_name, self.tried, hint)

    def __reduce__(self) -> tuple[type, tuple[str, list[str], str]]:
        # Exceptions pickle as ``cls(*args)`` with the message as the only argument; a worker process
        # (a process pool running apply) must hand this one back whole.
        return type(self), (self.model_name, self.tried, self.hint)
