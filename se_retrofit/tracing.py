"""Trace one module's own forward, with every submodule a leaf, and check the graph against reality.

Tracing block by block (rather than the whole model) means code fx cannot follow in one place —
timm's TF "same" padding, a shape check, a data-dependent loop — costs only the module that holds
it. The arguments come from a real call (``capture.Call``): ``None`` and Python constants are
specialised (fx inserts a check that they keep their value), tuples and lists of tensors become
tuples and lists of proxies, so ``isinstance(x, tuple)`` and list mutation behave as at run time.
Every trace is replayed on the recorded arguments and must reproduce the recorded output, because
fx can silently take the wrong branch of Python control flow.
"""
from __future__ import annotations

import inspect
import re
import threading
import weakref
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx._symbolic_trace import PH
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils._pytree import tree_flatten

from .augmented import AugmentedProxy
from .capture import Call, preserved_modes
from .compiled import is_compiled
from .early_excitation import gate_through
from .messages import first_line
from .trace_effects import Checkpoints, RandomDraws, StateReads, StateWrites, preserved_tensors


class TraceFailure(Exception):
    """The module's own forward cannot be turned into a faithful graph; the message says why."""


def _notrace_functions() -> list:
    try:
        from timm.layers import _fx as timm_fx
    except ImportError:
        return []
    return list(timm_fx.get_notrace_functions())


class BlockTracer(fx.Tracer):
    """An ``fx.Tracer`` for one module: every submodule call stays a ``call_module`` leaf.

    timm's registered no-trace functions stay opaque calls too, as they do in timm's own tracer, and
    so does a retrofitted block's ``gate_through``.
    ``x += y`` stays in place (``augmented``).
    """

    def __init__(self) -> None:
        super().__init__(autowrap_functions=(*_notrace_functions(), gate_through), param_shapes_constant=True)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return AugmentedProxy(node, self)


_CONSTANT_TYPES = (type(None), bool, int, float, str, torch.dtype, torch.device)


def _as_concrete(value: Any, name: str) -> Any:
    """What fx should see for one argument: a proxy (PH) for tensors, the value itself for constants."""
    if isinstance(value, torch.Tensor):
        return PH
    if isinstance(value, _CONSTANT_TYPES):
        return value
    if isinstance(value, (tuple, list)):
        return type(value)(_as_concrete(v, name) for v in value)
    raise TraceFailure(f"argument {name!r} of type {type(value).__name__} cannot be traced")


def bind_call(module: nn.Module, call: Call) -> tuple[list[str], dict[str, Any]]:
    """Match the recorded call to the forward signature: the parameter names, and the concrete args."""
    sig = inspect.signature(type(module).forward)
    params = list(sig.parameters.values())[1:]
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        raise TraceFailure("forward takes *args or **kwargs")
    try:
        bound = sig.bind(module, *call.args, **call.kwargs)
    except TypeError as exc:
        raise TraceFailure(f"recorded call does not match forward's signature: {exc}") from None
    bound.apply_defaults()
    names = [p.name for p in params]
    concrete: dict[str, Any] = {}
    for name in names:
        value = bound.arguments[name]
        spec = _as_concrete(value, name)
        if spec is not PH:
            concrete[name] = spec
    return names, concrete


_SPIES: dict[type, type] = {}


def _spy_class(cls: type) -> type:
    """A subclass of ``cls`` whose ``training`` attribute records that it was read.

    fx bakes ``self.training`` into the graph as a constant; a forward that never reads it needs one
    trace, not one per mode. Knowing exactly (rather than searching the source for the word) also
    covers helper methods the forward calls.
    """
    spy = _SPIES.get(cls)
    if spy is None:
        def get(self: nn.Module) -> bool:
            self.__dict__["_se_training_read"] = True
            return self.__dict__["_se_training"]

        def set_(self: nn.Module, value: bool) -> None:
            self.__dict__["_se_training"] = value

        spy = type(cls.__name__, (cls,), {"training": property(get, set_), "__module__": cls.__module__})
        _SPIES[cls] = spy
    return spy


class _TrainingFlag:
    """Stands for a submodule's ``training`` bool while its parent is traced, and notes being read.

    fx bakes such a read into the graph like ``self.training``, but the generated forward can only
    dispatch on the traced module's own flag, and a submodule can be in the other mode (a frozen
    BatchNorm in eval mode inside a block that trains)."""

    __slots__ = ("value", "read")

    def __init__(self, value: bool) -> None:
        self.value, self.read = value, False

    def __bool__(self) -> bool:
        self.read = True
        return self.value

    def __eq__(self, other: object) -> bool:
        self.read = True
        return self.value == other

    __hash__ = None  # type: ignore[assignment]


def _watch_training_flags(module: nn.Module) -> list[tuple[str, nn.Module, _TrainingFlag]]:
    flags = []
    for name, sub in module.named_modules():
        if sub is not module and isinstance(sub.__dict__.get("training"), bool):
            flag = _TrainingFlag(sub.__dict__["training"])
            sub.__dict__["training"] = flag
            flags.append((name, sub, flag))
    return flags


def _unwatch_training_flags(flags: list[tuple[str, nn.Module, _TrainingFlag]]) -> list[str]:
    """Put the submodules' bools back; return the names of those whose flag was read."""
    for _, sub, flag in flags:
        if sub.__dict__.get("training") is flag:
            sub.__dict__["training"] = flag.value
    return [name for name, _, flag in flags if flag.read]


def trace_forward(module: nn.Module, concrete_args: dict[str, Any], param_names: list[str],
                  training: bool) -> tuple[fx.Graph, bool]:
    """Trace ``module.forward`` as it runs with ``module.training == training``.

    Returns the graph and whether the forward read ``self.training`` (if not, the graph serves both
    modes). A forward that reads a submodule's flag is refused (`_TrainingFlag`); its children are
    leaves, so their own reads of it never reach the graph. So is one that does what the graph cannot
    keep (`trace_effects`), but for a read of autograd or autocast state and a checkpoint call, which
    are only noted (`state_reads`, `checkpoints`).
    """
    cls, was = type(module), module.__dict__["training"]
    module.__class__ = _spy_class(cls)
    del module.__dict__["training"]
    module.__dict__["_se_training"] = training
    flags = _watch_training_flags(module)
    try:
        with RandomDraws() as draws, StateWrites(module, ignore=("_se_training", "_se_training_read")) as writes, \
                StateReads() as state, Checkpoints() as checkpointing:
            graph = BlockTracer().trace(module, concrete_args=concrete_args or None)
    except Exception as exc:  # fx raises many types (TraceError, TypeError, RuntimeError...): all mean "cannot trace"
        first = first_line(exc)
        if _TrainingFlag.__name__ in first:  # a submodule's flag passed on as an argument (F.dropout(x, p, flag))
            raise TraceFailure("its forward passes the train/eval flag of a submodule (self.NAME.training) to a "
                               "function, which the traced graph would fix to the flag's value now") from None
        raise TraceFailure(f"fx cannot trace its forward ({first[:240]})") from None
    finally:
        read = module.__dict__.pop("_se_training_read", False)
        module.__dict__.pop("_se_training", None)
        module.__class__ = cls
        module.__dict__["training"] = was
        children_read = _unwatch_training_flags(flags)
    if children_read:
        raise TraceFailure(f"its forward reads the train/eval flag of a submodule (self.{children_read[0]}.training), "
                           "which the traced graph would fix to the flag's value now")
    if draws.drawn:
        raise TraceFailure("its forward draws random numbers outside tensor ops (random, NumPy, or torch.rand without "
                           "a tensor argument, as in Python-level stochastic depth); the traced graph would fix one "
                           "draw for every call")
    if writes.written:
        raise TraceFailure(f"its forward writes module state ({', '.join(writes.written[:3])}), which the traced graph "
                           "would not repeat")
    if writes.baked:
        raise TraceFailure(f"its forward reads a tensor it keeps in {writes.baked[0]} (filled by an earlier call), "
                           "which the traced graph would fix as a constant")
    _restore_parameter_names(graph, param_names)
    _explain_specialisations(graph, cls.__name__)
    if checkpointing.called or state.checkpointed:
        _CHECKPOINTING.add(graph)
    if state.read:
        _STATE_READS[graph] = tuple(state.read)
    return graph, read


# Graphs of forwards that called torch.utils.checkpoint (`checkpoints`), and of forwards that read global
# autograd or autocast state, with what they read (`state_reads`).
_CHECKPOINTING: weakref.WeakSet[fx.Graph] = weakref.WeakSet()
_STATE_READS: weakref.WeakKeyDictionary[fx.Graph, tuple[str, ...]] = weakref.WeakKeyDictionary()


def state_reads(graph: fx.Graph) -> tuple[str, ...]:
    """What the forward traced into ``graph`` read of global autograd or autocast state (`StateReads.read`):
    the graph keeps the branch that state chose while it was traced, and no ``torch.autocast`` or
    ``torch.no_grad`` block.

    Not a `TraceFailure`: the graph is what the forward computed then, which is all the analysis of the
    modules around it needs (a parent's attention after it, a child's layout), and a module that is not
    rewritten keeps its own forward. Only a module that would get SE would run the graph instead.
    """
    return _STATE_READS.get(graph, ())


def checkpoints(graph: fx.Graph) -> bool:
    """Whether the forward traced into ``graph`` called ``torch.utils.checkpoint``, which the graph inlines.

    Not a `TraceFailure`: the graph computes what the forward does, and a module that is not rewritten
    keeps its own forward, checkpointing included (timm's models and stages, where timm's
    ``set_grad_checkpointing`` puts its checkpoint calls). Only a module that would get SE loses it.
    """
    return graph in _CHECKPOINTING


_SPECIALISED = re.compile(r"(\w+) has been specialized to have value (.*) but got another value$", re.S)


def _explain_specialisations(graph: fx.Graph, owner: str) -> None:
    """Reword fx's checks on specialised arguments, which the generated forward keeps: the error a later
    call with another value raises should say where the constant came from and what to do."""
    for node in graph.nodes:
        if node.op != "call_function" or len(node.args) != 2 or not isinstance(node.args[1], str):
            continue
        found = _SPECIALISED.match(node.args[1])
        if found:
            name, value = found.groups()
            node.args = (node.args[0], (
                f"se_retrofit: {owner}.forward was rewritten for {name}={value}, the value apply's example forward "
                f"passed; the rewritten forward handles only that value. Call it with {name}={value}, or "
                f"retrofit with an example_input whose forward passes {name} as your calls do"))


class _Traces(threading.local):
    """Per thread, so that ``apply`` calls in two threads neither clear nor read each other's traces."""

    def __init__(self) -> None:
        self.by_id: dict[int, tuple[fx.Graph, bool] | TraceFailure] = {}


_CACHE = _Traces()


def cached_trace(module: nn.Module) -> tuple[fx.Graph, bool]:
    """Eval-mode trace of ``module`` called with tensors only, shared by the analysis and the layout pass.

    Within one ``apply`` the same module is traced as a candidate block and again when a parent's layout
    needs to see inside it; one trace serves both. ``clear_cache`` ends its life with the ``apply`` call.
    """
    cache = _CACHE.by_id
    key = id(module)
    if key not in cache:
        try:
            if is_compiled(module):  # compiled code: inspect cannot even read its forward
                raise TraceFailure("a TorchScript module: its forward is compiled code, which fx cannot trace")
            names = [p for p in inspect.signature(type(module).forward).parameters][1:]
            cache[key] = trace_forward(module, {}, names, training=False)
        except TraceFailure as exc:
            cache[key] = exc
    hit = cache[key]
    if isinstance(hit, TraceFailure):
        raise hit
    return hit


def clear_cache() -> None:
    _CACHE.by_id.clear()


def _restore_parameter_names(graph: fx.Graph, param_names: list[str]) -> None:
    """fx may rename placeholders (``shortcut`` -> ``shortcut_1``); callers pass keywords by the real names."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(param_names):
        return  # pytree-flattened arguments: the signature is written by fx's pytree codegen
    for node, name in zip(placeholders, param_names):
        node.target = name


def _graph_module(module: nn.Module, graph: fx.Graph) -> fx.GraphModule:
    """A GraphModule sharing (not copying) ``module``'s submodules and parameters."""
    return fx.GraphModule(module, graph, class_name=type(module).__name__)


def _plain_containers(obj: Any) -> Any:
    """fx's immutable_list / immutable_dict as list / dict: pytree tells them apart, the caller cannot.

    The replay builds them at any depth (``return out, {"aux": feat}`` comes back as a tuple holding an
    immutable_dict), so plain tuples, lists and dicts are looked into as well.
    """
    from torch.fx.immutable_collections import immutable_dict, immutable_list

    if isinstance(obj, immutable_list) or type(obj) is list:
        return [_plain_containers(v) for v in obj]
    if isinstance(obj, immutable_dict) or type(obj) is dict:
        return {k: _plain_containers(v) for k, v in obj.items()}
    if type(obj) is tuple:
        return tuple(_plain_containers(v) for v in obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a namedtuple keeps its type, as fx keeps it
        return type(obj)(*(_plain_containers(v) for v in obj))
    return obj


def same_outputs(a: Any, b: Any) -> bool:
    """Same structure and values (float tensors to 1e-5), fx's immutable containers counting as plain ones."""
    la, sa = tree_flatten(_plain_containers(a))
    lb, sb = tree_flatten(_plain_containers(b))
    if sa != sb or len(la) != len(lb):
        return False
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False
        if isinstance(x, torch.Tensor):
            if x.shape != y.shape or x.dtype != y.dtype:
                return False
            if x.is_floating_point():
                if not torch.allclose(x, y, rtol=1e-5, atol=1e-6, equal_nan=True):
                    return False
            elif not torch.equal(x, y):
                return False
    return True


class _ShapeProp(ShapeProp):
    """ShapeProp that hands leaf modules plain lists and dicts.

    fx's interpreter passes containers as immutable_list / immutable_dict; a module that mutates its
    list argument (HRNet: ``x[i] = branch(x[i])``) would fail here although it runs fine in the model.
    """

    def call_module(self, target: Any, args: tuple, kwargs: dict) -> Any:
        return super().call_module(target, _mutable(args), _mutable(kwargs))


def _mutable(value: Any) -> Any:
    if isinstance(value, list):
        return [_mutable(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_mutable(v) for v in value)
    if isinstance(value, dict):
        return {k: _mutable(v) for k, v in value.items()}
    return value


def propagate_shapes(module: nn.Module, graph: fx.Graph, call: Call, check_output: bool) -> None:
    """Run ``graph`` on the recorded arguments, storing ``tensor_meta`` on every node.

    With ``check_output`` the result must equal the recorded output of the real forward; a graph
    that does not is refused (TraceFailure), because rewriting it would change the model. The submodules
    run for real: a buffer they update is put back, so that every replay starts from the recorded state.
    """
    try:
        gm = _graph_module(module, graph)
    except Exception as exc:  # fx's code generation fails on some constants (a tuple default argument)
        raise TraceFailure(f"fx cannot generate code for its forward ({first_line(exc)[:240]})") from None
    args, kwargs = call.fresh_args()
    flat = _flatten_for_graph(module, graph, args, kwargs)
    with preserved_modes(module), preserved_tensors(module), torch.no_grad():
        gm.eval()
        try:
            out = _ShapeProp(gm).propagate(*flat)
        except Exception as exc:  # the graph failed on real inputs: it does not describe this module
            first = first_line(exc)
            raise TraceFailure(f"the traced graph fails on the recorded input ({first[:240]})") from None
    if check_output and not same_outputs(out, call.output):
        raise TraceFailure(_mismatch_reason(out, call.output))


def _mismatch_reason(out: Any, recorded: Any) -> str:
    """Why the graph's output differs from the forward's: containers fx rebuilds as plain ones (an
    OrderedDict comes back a dict, so the generated forward would change the output's type), or values."""
    lost = sorted(_container_types(recorded) - _container_types(_plain_containers(out)))
    if lost:
        return (f"the {lost[0]} in its output comes back from the traced graph (and would from a forward generated "
                "from it) as a plain dict, list or tuple, changing the output's type; return plain containers to "
                "retrofit it")
    return "the traced graph does not reproduce the module's output (Python control flow that fx cannot follow)"


def _container_types(obj: Any) -> set[str]:
    if isinstance(obj, (list, tuple)):
        return {type(obj).__name__}.union(*(_container_types(v) for v in obj))
    if isinstance(obj, dict):
        return {type(obj).__name__}.union(*(_container_types(v) for v in obj.values()))
    return set()


def _flatten_for_graph(module: nn.Module, graph: fx.Graph, args: tuple, kwargs: dict) -> list:
    """The recorded call as the graph's placeholders expect it: bound to the signature, then flattened
    in signature order (what fx's pytree codegen does for tuple and list arguments)."""
    sig = inspect.signature(type(module).forward)
    bound = sig.bind(module, *args, **kwargs)
    bound.apply_defaults()
    values = [bound.arguments[p] for p in list(sig.parameters)[1:]]
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) == len(values):
        return values
    flat, _ = tree_flatten(values)
    return flat
