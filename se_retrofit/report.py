"""What an SE retrofit costs: parameters and multiply-accumulates before and after, per SE block.

The paper answers "what does SE cost?" for ResNet-50 with +~10% parameters and +0.26% GFLOPs; this
module answers the same question, measured, for any pair (original, retrofitted) of models. For
ResNet-50 at 224 px it finds the parameters of timm's ``seresnet50`` exactly (+2,530,992, the paper's
~2.5M) and +0.33% MACs: the excitation's convolutions alone are +0.06%, and the rest is the squeeze,
gate and rescale, one per element (see below), which the paper's figure does not break down.

Counts come from fvcore (``FlopCountAnalysis``, ``parameter_count``) so that they agree with the
numbers people already quote for these models. fvcore counts one fused multiply-add as one "flop";
that unit is a multiply-accumulate, so every count here is called MACs (as timm's benchmark does),
never FLOPs, which would be twice as many.

fvcore has no handle for ``mean``, ``sigmoid`` and ``mul``, so by default it costs only the two 1x1
convolutions of an SE block and silently leaves out its squeeze, gate and rescale, which at early
stages cost more than the convolutions. Here those three ops are counted, one per element (fvcore's
own convention for pooling), but only inside `~se_retrofit.se_block.SEBlock` scopes: the rest
of each model is counted exactly as fvcore does by default, so the "before" column is the number
fvcore gives for the original model. An SE block is costed as the paper's block, squeezing its own
input: the early squeeze (``SEConfig.early_squeeze``, an eval-mode shortcut to the same value) is not
taken while fvcore traces. One multiplication beyond the paper's is counted: with ``init="identity"``
(gain 2) a block that does not do the residual add scales its ``N x C`` gate by the gain (a block doing
the add folds the gain into its ``addcmul``).

Counts are of the size the model really runs at. A model may resize its input before its first
convolution (a torchvision detector scales every image to its transform's ``min_size``/``max_size`` and
pads it to a multiple of 32), so that the size asked for is not the one counted; the report then
names both (`Report.resized_to`) rather than implying the size it was asked for.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import math
import operator
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from .compiled import is_compiled
from .se_block import se_blocks
from .wrappers import unwrapped

MACS_UNIT = "MACs: multiply-accumulates, one fused multiply-add = 1 (fvcore's 'flop'); FLOPs would be about 2x"


@dataclass
class BlockCost:
    """The cost of one SE block.

    Attributes:
        name: qualified module name of the block (``layer1.0.se``).
        channels: channels of the feature map it gates.
        hidden: width of its excitation bottleneck.
        params: its parameters (``fc1`` and ``fc2``, weights and biases).
        macs: its MACs at the report's input size: the two 1x1 convolutions, plus the squeeze, gate
            and rescale counted one per element.
        param_share: fraction of the parameters added by all SE blocks that this block holds.
        mac_share: fraction of the MACs added by all SE blocks that this block costs.
        input_shape: shape of the feature map it saw (the first, if it ran more than once), which is
            what makes early blocks expensive in MACs and late blocks expensive in parameters; None if
            it was not called.
        calls: how often it ran in one forward; ``macs`` covers every call.
    """

    name: str
    channels: int
    hidden: int
    params: int
    macs: int
    param_share: float
    mac_share: float
    input_shape: tuple[int, ...] | None = None
    calls: int = 1


@dataclass
class Report:
    """Parameters and MACs of a model before and after the SE retrofit.

    Attributes:
        input_size: the full input shape given to the models (batch first); MACs scale with it, unless
            the model resizes its input itself (``resized_to``).
        params_before / params_after: parameters of the original and of the SE model (shared
            parameters counted once).
        macs_before / macs_after: MACs of one forward pass in eval mode; see `MACS_UNIT`.
        trainable_params: parameters of the SE model with ``requires_grad``; the rest are frozen.
        blocks: one `BlockCost` per SE block the SE model adds (not those the original already has), in
            module order.
        unsupported_ops: ops of the SE model that fvcore could not cost, with how often they ran;
            neither MAC total includes them, so a large entry here means the totals undercount.
        unsupported_ops_before: the same for the original model (its residual adds, for one, where
            the SE model's blocks took them over).
        uncalled_blocks: SE blocks that never ran through their own ``__call__`` during the count;
            their MACs read 0 and their convolutions, if run, are attributed to the caller.
        name: what was measured, for the table's title.
        resized_to: the spatial size the original model's first convolution saw, where the model
            resized the input to it (a torchvision detector, to its transform's ``min_size`` and
            ``max_size``): every count is at this size, whatever ``input_size`` says. None where the
            model ran at ``input_size``.
    """

    input_size: tuple[int, ...]
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    trainable_params: int
    blocks: list[BlockCost] = field(default_factory=list)
    unsupported_ops: dict[str, int] = field(default_factory=dict)
    uncalled_blocks: list[str] = field(default_factory=list)
    name: str | None = None
    unsupported_ops_before: dict[str, int] = field(default_factory=dict)
    resized_to: tuple[int, ...] | None = None

    @property
    def params_delta(self) -> int:
        return self.params_after - self.params_before

    @property
    def macs_delta(self) -> int:
        return self.macs_after - self.macs_before

    @property
    def params_delta_pct(self) -> float:
        return _percent(self.params_delta, self.params_before)

    @property
    def macs_delta_pct(self) -> float:
        return _percent(self.macs_delta, self.macs_before)

    @property
    def frozen_params(self) -> int:
        return self.params_after - self.trainable_params

    @property
    def trainable_pct(self) -> float:
        return _percent(self.trainable_params, self.params_after)

    def trainable_summary(self) -> str:
        """PEFT's ``print_trainable_parameters`` line, so the number reads like the one users know."""
        return (f"trainable params: {self.trainable_params:,d} || all params: {self.params_after:,d} "
                f"|| trainable%: {self.trainable_pct:.4f}")

    def to_dict(self) -> dict[str, Any]:
        """Every field plus the derived deltas, in plain JSON types."""
        data = dataclasses.asdict(self)
        data["input_size"] = list(self.input_size)
        data["resized_to"] = None if self.resized_to is None else list(self.resized_to)
        for block in data["blocks"]:
            if block["input_shape"] is not None:
                block["input_shape"] = list(block["input_shape"])
        data.update(
            params_delta=self.params_delta,
            params_delta_pct=self.params_delta_pct,
            macs_delta=self.macs_delta,
            macs_delta_pct=self.macs_delta_pct,
            frozen_params=self.frozen_params,
            trainable_pct=self.trainable_pct,
            macs_unit=MACS_UNIT,
        )
        return data

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def to_markdown(self) -> str:
        return self._render(markdown=True)

    def __str__(self) -> str:
        return self._render(markdown=False)

    def _render(self, markdown: bool) -> str:
        title = f"SE retrofit cost{f' of {self.name}' if self.name else ''} at input {_shape_str(self.input_size)}"
        if self.resized_to is not None:
            title += f", resized by the model to {_shape_str(self.resized_to)}"
        totals = _table(
            ["", "before", "after", "delta", "delta %"],
            [
                ["params", f"{self.params_before:,d}", f"{self.params_after:,d}", f"{self.params_delta:+,d}",
                 f"{self.params_delta_pct:+.2f}%"],
                ["MACs", f"{self.macs_before:,d}", f"{self.macs_after:,d}", f"{self.macs_delta:+,d}",
                 f"{self.macs_delta_pct:+.2f}%"],
                ["GMACs", f"{self.macs_before / 1e9:.4f}", f"{self.macs_after / 1e9:.4f}",
                 f"{self.macs_delta / 1e9:+.4f}", ""],
            ],
            markdown,
        )
        blocks = _table(
            ["SE block", "feature map", "channels", "hidden", "params", "MACs", "% added params", "% added MACs"],
            [[b.name, _feature_map(b), str(b.channels),
              str(b.hidden), f"{b.params:,d}", f"{b.macs:,d}", f"{100 * b.param_share:.1f}%",
              f"{100 * b.mac_share:.1f}%"] for b in self.blocks],
            markdown,
        )
        parts = [f"## {title}" if markdown else title, "", totals, "", self.trainable_summary(), ""]
        parts += [blocks] if self.blocks else ["No SE blocks in the SE model."]
        notes = [MACS_UNIT + "; inside SE blocks the squeeze, gate and rescale count one per element."]
        if self.resized_to is not None:
            notes.append(_resized_note(self.input_size, self.resized_to))
        for which, counted in (("original", self.unsupported_ops_before), ("SE model", self.unsupported_ops)):
            if counted:
                ops = ", ".join(f"{op} x{n}" for op, n in sorted(counted.items()))
                notes.append(f"fvcore could not cost these ops of the {which}, so its total leaves them out: {ops}.")
        notes.append("fvcore also counts nothing, by design, for ReLU, clamp and data movement (view, cat, "
                     "copy...), in both models.")
        if self.uncalled_blocks:
            notes.append(f"SE blocks never called during the count (MACs 0): {', '.join(self.uncalled_blocks)}.")
        bullet = "- " if markdown else ""
        return "\n".join(parts + [""] + [bullet + note for note in notes])


def _resized_note(input_size: Sequence[int], resized_to: Sequence[int]) -> str:
    ran = _shape_str(resized_to)
    return (f"The model resized the {_shape_str(input_size[2:])} input to {ran} before its first convolution, so "
            f"every count is at {ran}, whatever input size is asked. A torchvision detector does so: it scales each "
            "image to its transform's min_size and max_size and pads it to a multiple of 32; to count it at another "
            "size, set those in Python (model.transform.min_size = (S,), model.transform.max_size = M) before "
            "calling report().")


def _feature_map(block: BlockCost) -> str:
    if not block.input_shape:
        return "not called"
    return _shape_str(block.input_shape[1:]) + (f" ({block.calls} calls)" if block.calls > 1 else "")


def report(original: nn.Module, se_model: nn.Module, input_size: int | Sequence[int] = (1, 3, 224, 224), *,
           name: str | None = None) -> Report:
    """Measure what turning ``original`` into ``se_model`` costs, in parameters and MACs.

    Both models run once in eval mode (the cost users ship is the inference cost, and batch norm
    must not update its statistics) and are then put back in the train/eval mode each of their
    modules had; nothing else about them changes.

    Args:
        original: the model before the retrofit; after ``apply(model, inplace=True)``, a copy taken
            before it.
        se_model: the model after it (``se_retrofit.apply(original)``). ``torch.compile`` and
            DataParallel wrappers are looked through: the cost is the network's.
        input_size: the full input shape, batch first (``(1, 3, 224, 224)``); an int ``s`` or a pair
            ``(h, w)`` is shorthand for one 3-channel image of that size. MACs scale with it, unless
            the model resizes its input before its first convolution, as a torchvision detector does
            (to its transform's ``min_size`` and ``max_size``): the counts are then at the size it ran
            at, which the report names (`Report.resized_to`) next to this one. The model is counted
            as it is, not made to run at a size it would not run at in use.
        name: what to call the pair in the table's title.

    The count is of the paper's SE block squeezing its own input; the early squeeze
    (``SEConfig.early_squeeze``), an eval-mode shortcut to the same gate, is not taken while fvcore
    traces. A block that does the residual add (``SEConfig.fuse_add``) is costed for its rescale
    alone, like the add it replaces, which fvcore does not count; so the SE model's residual adds do
    not appear in ``unsupported_ops``, while the original's are in ``unsupported_ops_before``.

    Raises:
        TypeError: a model is not an ``nn.Module``.
        ValueError: the input size is malformed, a model cannot run on it, is on the meta device or holds
            a TorchScript module, the two models are one object, or only ``original`` has SE blocks
            (swapped arguments).
        RuntimeError: fvcore's TorchScript tracer could not trace a model that runs eagerly.
    """
    original, se_model = _check_pair(original, se_model)
    shape = input_shape(input_size)
    had = {n for n, _ in se_blocks(original)}  # a second apply: the first one's blocks are in both counts
    blocks = [(n, m) for n, m in se_blocks(se_model) if n not in had]
    seen: dict[str, tuple[int, ...]] = {}
    calls: Counter[str] = Counter()
    first_convolution: list[tuple[int, ...]] = []
    with _eval_mode(original, se_model):
        with _recording_first_convolution(original, first_convolution):
            _check_runs(original, shape, "original")
        with _recording_input_shapes(blocks, seen, calls):
            _check_runs(se_model, shape, "SE")
        before = _count(original, shape)
        after = _count(se_model, shape)
    params_before = _parameter_count(original)
    params_after = _parameter_count(se_model)
    block_params = {n: _parameter_count(m) for n, m in blocks}
    block_macs = {n: after.by_module.get(after.canonical(n), 0) for n, _ in blocks}
    total_params, total_macs = sum(block_params.values()), sum(block_macs.values())
    rows = [BlockCost(name=n, channels=m.channels, hidden=m.hidden, params=block_params[n], macs=block_macs[n],
                      param_share=_fraction(block_params[n], total_params),
                      mac_share=_fraction(block_macs[n], total_macs), input_shape=seen.get(n),
                      calls=calls[n])
            for n, m in blocks]
    trainable = sum(p.numel() for p in se_model.parameters() if p.requires_grad)
    return Report(
        input_size=shape,
        params_before=params_before,
        params_after=params_after,
        macs_before=before.macs,
        macs_after=after.macs,
        trainable_params=trainable,
        blocks=rows,
        unsupported_ops=dict(sorted(after.unsupported.items())),
        unsupported_ops_before=dict(sorted(before.unsupported.items())),
        uncalled_blocks=[n for n, _ in blocks if after.canonical(n) in after.uncalled],
        name=name,
        resized_to=_resized_to(shape, first_convolution[0] if first_convolution else None),
    )


def _check_pair(original: nn.Module, se_model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The two networks to count, refusing the pairs whose count would be silently meaningless."""
    for label, model in (("original", original), ("se_model", se_model)):
        if not isinstance(model, nn.Module):
            raise TypeError(f"{label} must be a torch.nn.Module, got {type(model).__name__}")
    original, se_model = unwrapped(original), unwrapped(se_model)
    if original is se_model:
        raise ValueError("original and se_model are the same model, so every delta would read 0; "
                         "apply(model, inplace=True) turns the model itself into the SE model. Pass a copy "
                         "taken before (copy.deepcopy(model)), or call apply without inplace=True.")
    if se_blocks(original) and not se_blocks(se_model):
        raise ValueError("original has SE blocks and se_model has none: were the arguments swapped? "
                         "Call report(original, se_model).")
    for label, model in (("original", original), ("se_model", se_model)):
        if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
            raise ValueError(f"{label} is on the meta device, which fvcore's tracer cannot run. The weights do "
                             "not change the counts: materialise it with model.to_empty(device='cpu') first.")
        compiled = next((name for name, m in model.named_modules() if is_compiled(m)), None)
        if compiled is not None:
            raise ValueError(f"{label} holds a TorchScript module ('{compiled}'): fvcore hooks every module to count "
                             "each one's MACs, and TorchScript modules refuse hooks. Report on the eager model and "
                             "its retrofit, built before any part of it is scripted or traced.")
    return original, se_model


def input_shape(input_size: int | Sequence[int]) -> tuple[int, ...]:
    """The full input shape for ``input_size``: ``s`` and ``(h, w)`` mean one 3-channel image."""
    if _is_integer(input_size):
        dims: tuple[Any, ...] = (1, 3, input_size, input_size)
    elif isinstance(input_size, Sequence) and not isinstance(input_size, str):
        dims = tuple(input_size)
        if len(dims) == 2:
            dims = (1, 3) + dims
    else:
        raise ValueError(f"input size must be an int, (height, width) or a full shape, got {input_size!r}")
    if len(dims) < 3 or not all(_is_positive_int(d) for d in dims):
        raise ValueError(f"input size {input_size!r} must be a positive int, (height, width) or a full input "
                         "shape (batch, channels, ...) of positive ints")
    return tuple(operator.index(d) for d in dims)


def _is_integer(value: Any) -> bool:
    """An int or integer scalar (``numpy.int64``, a 0-d integer tensor), not a bool or a sequence."""
    if _is_bool(value) or isinstance(value, Sequence) or getattr(value, "ndim", 0) != 0:
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def _is_bool(value: Any) -> bool:
    """``True`` is an int to Python and a 0-d bool tensor has ``__index__``; neither is a size."""
    return isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool)


def _is_positive_int(value: Any) -> bool:
    """An int, or an integer scalar such as ``numpy.int64`` or a ``torch.Size`` entry, above zero."""
    if _is_bool(value):
        return False
    try:
        return operator.index(value) > 0
    except TypeError:
        return False


@dataclass
class _Count:
    macs: int
    by_module: dict[str, int]
    unsupported: Counter[str]
    uncalled: set[str]
    canonical: Callable[[str], str]


def _elements(value: Any) -> int:
    shape = value.type().sizes() if value.isCompleteTensor() else None
    if shape is None:
        raise RuntimeError(f"fvcore's trace has no complete shape for {value.debugName()}; cannot cost the SE gate")
    return math.prod(shape)


def _input_elements(inputs: list[Any], outputs: list[Any]) -> int:
    return _elements(inputs[0])


def _output_elements(inputs: list[Any], outputs: list[Any]) -> int:
    return _elements(outputs[0])


# The ops of SEBlock.forward that fvcore has no handle for. The squeeze costs one add per input
# element and the gate and rescale one op per output element: fvcore's convention for pooling.
# A block that does the residual add too (``addcmul``) is costed for its rescale alone: the add was
# in the original model already, where fvcore does not count additions either.
_SE_GATE_OPS: dict[str, Callable[[list[Any], list[Any]], int]] = {
    "aten::mean": _input_elements,
    "aten::sigmoid": _output_elements,
    "aten::sigmoid_": _output_elements,
    "aten::mul": _output_elements,
    "aten::mul_": _output_elements,
    "aten::addcmul": _output_elements,
}


class _SEScopedHandles:
    """fvcore op handles that cost the SE gate ops only inside SE block scopes.

    fvcore handles see just an op's inputs and outputs, but the op's node carries the module scope
    the tracer recorded (``/layer1/layer1.0/layer1.0.se``). Outside SE blocks the handles count
    nothing and remember the op instead, so it is still reported as one fvcore could not cost and
    the rest of the model's count stays fvcore's default.
    """

    def __init__(self, se_names: set[str]) -> None:
        self.se_names = se_names
        self.skipped: Counter[str] = Counter()

    def handles(self) -> dict[str, Callable[[list[Any], list[Any]], int]]:
        return {op: self._scoped(op, count) for op, count in _SE_GATE_OPS.items()}

    def _in_se_block(self, outputs: list[Any]) -> bool:
        if not outputs or not self.se_names:
            return False
        scopes = outputs[0].node().scopeName().split("/")
        owner = scopes[-1].split(".")
        owners = {".".join(owner[:k]) for k in range(1, len(owner) + 1)}
        return not self.se_names.isdisjoint(scopes) or not self.se_names.isdisjoint(owners)

    def _scoped(self, op: str, count: Callable[[list[Any], list[Any]], int]) -> Callable[[list[Any], list[Any]], int]:
        def handle(inputs: list[Any], outputs: list[Any]) -> int:
            if self._in_se_block(outputs):
                return count(inputs, outputs)
            self.skipped[op] += 1
            return 0

        return handle


def _fvcore() -> Any:
    """Import ``fvcore.nn`` without its import-time TorchScript deprecation warning reaching the user."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        return importlib.import_module("fvcore.nn")


def _count(model: nn.Module, shape: tuple[int, ...]) -> _Count:
    """fvcore's count with the SE gate handles, every fvcore message and trace warning kept from the user.

    The model already ran eagerly (`_check_runs`), so any warning of its own has been shown
    once; what the trace adds on top is TorchScript noise.
    """
    fvcore = _fvcore()
    se_names = {name for name, _ in se_blocks(model)}
    scoped = _SEScopedHandles(se_names)
    analysis = (fvcore.FlopCountAnalysis(model, (_example_input(model, shape),))
                .unsupported_ops_warnings(False)
                .uncalled_modules_warnings(False)
                .tracer_warnings("none")
                .set_op_handle(**scoped.handles()))
    scoped.se_names = {analysis.canonical_module_name(name) for name in se_names}
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            total = analysis.total()
    except (RuntimeError, TypeError) as exc:
        raise RuntimeError(f"fvcore's TorchScript tracer could not trace {type(model).__name__}: {exc}") from exc
    unsupported = Counter(analysis.unsupported_ops()) + scoped.skipped
    return _Count(macs=int(total), by_module={k: int(v) for k, v in analysis.by_module().items()},
                  unsupported=unsupported, uncalled=set(analysis.uncalled_modules()),
                  canonical=analysis.canonical_module_name)


def _parameter_count(model: nn.Module) -> int:
    return int(_fvcore().parameter_count(model)[""])


def _example_input(model: nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
    """A fixed random input on the model's device and in its dtype; the caller's RNG is left alone."""
    reference = next((t for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()), None)
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(shape, generator=generator)
    if reference is not None:
        example = example.to(device=reference.device, dtype=reference.dtype)
    return example


def _check_runs(model: nn.Module, shape: tuple[int, ...], which: str) -> None:
    """Run once eagerly so that a size the model cannot take fails here, naming the size, not in the tracer."""
    try:
        with torch.no_grad():
            model(_example_input(model, shape))
    except (RuntimeError, ValueError, IndexError, AssertionError) as exc:
        raise ValueError(f"the {which} model ({type(model).__name__}) cannot take an input of size "
                         f"{_shape_str(shape)}: {exc}") from exc


@contextlib.contextmanager
def _eval_mode(*models: nn.Module) -> Iterator[None]:
    """Eval mode for the count, then every module's own train/eval flag back, even a mixed one."""
    saved = [(module, module.training) for model in models for module in model.modules()]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for module, training in saved:
            module.training = training


@contextlib.contextmanager
def _recording_input_shapes(blocks: list[tuple[str, nn.Module]], seen: dict[str, tuple[int, ...]],
                            calls: Counter[str]) -> Iterator[None]:
    def recorder(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            calls[name] += 1
            if args and isinstance(args[0], torch.Tensor):
                seen.setdefault(name, tuple(args[0].shape))

        return hook

    handles = [module.register_forward_pre_hook(recorder(name)) for name, module in blocks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@contextlib.contextmanager
def _recording_first_convolution(model: nn.Module, seen: list[tuple[int, ...]]) -> Iterator[None]:
    """Append to ``seen`` the input shape of the first convolution that runs: the size the model's stem
    really ran at, which is not the size it was given where the model resizes its input itself."""
    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        if not seen and args and isinstance(args[0], torch.Tensor):
            seen.append(tuple(args[0].shape))

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, _CONVOLUTIONS)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _resized_to(asked: tuple[int, ...], ran: tuple[int, ...] | None) -> tuple[int, ...] | None:
    """The spatial size the first convolution saw, where the model resized its input to it; else None.

    Only a first convolution that sees the input's channels counts as seeing the input: one behind a
    space-to-depth stem (TResNet) sees other channels at other sizes without anything having been resized.
    """
    if ran is None or len(ran) != len(asked) or ran[1] != asked[1] or ran[2:] == asked[2:]:
        return None
    return ran[2:]


def _percent(part: int, whole: int) -> float:
    return 100.0 * part / whole if whole else 0.0


def _fraction(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


def _shape_str(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape)


def _table(headers: list[str], rows: list[list[str]], markdown: bool) -> str:
    """A plain aligned table, or a GitHub pipe table; text columns left-aligned, numbers right."""
    numeric = [i > 0 and all(_looks_numeric(row[i]) for row in rows) for i in range(len(headers))]
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]

    def line(cells: list[str]) -> str:
        padded = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric)]
        return "| " + " | ".join(padded) + " |" if markdown else "  ".join(padded).rstrip()

    out = [line(headers)]
    if markdown:
        out.append("|" + "|".join(("-" * (w + 1) + ":") if num else (":" + "-" * (w + 1))
                                  for w, num in zip(widths, numeric)) + "|")
    else:
        out.append("  ".join("-" * w for w in widths))
    return "\n".join(out + [line(row) for row in rows])


def _looks_numeric(text: str) -> bool:
    stripped = text.strip().lstrip("+-").rstrip("%").replace(",", "").replace(".", "")
    return stripped.isdigit() or not stripped
