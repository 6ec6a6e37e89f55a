"""What a forward does while fx traces it that the traced graph cannot keep.

fx runs a module's Python once with proxies for its tensors. Everything that is not an op on a proxy
happens once, at trace time, and is gone from the graph: a random draw in Python (``random.random()``,
NumPy, ``torch.rand(1).item()`` — a torch call with no proxy argument runs for real) becomes one fixed
outcome, so stochastic depth written that way would always keep (or always drop) its branch; a write
to module state (``self.feat = out``, ``self.calls += 1``, ``self.history.append(out)``) is not repeated
by the generated forward and, worse, leaves a proxy in the module; a tensor read from a cache that an
earlier call filled becomes a constant. A branch on global autograd or autocast state
(``if torch.is_autocast_enabled():``) is decided once, by the state while fx traces, and a
``torch.autocast`` or ``torch.no_grad`` block in the forward is not recorded at all; a call to
``torch.utils.checkpoint`` is inlined, so the generated forward no longer checkpoints. These are detected
here, undone (the random generators and the modules' state are put back as they were), and reported, so
that the module is skipped with the reason instead of rewritten into something else (the last two only
when it would be rewritten: the graph still shows what the forward computed while traced).

`apply` also runs real forwards (the example forward, each graph's replay, the check of a rewritten block), in
eval mode under no_grad; a module may still update a buffer there (an EMA, a running-mean normaliser for test-time
adaptation, a call counter). `preserved_tensors` puts the buffers back after each, with the tensor snapshots
that undo a traced write.
"""
from __future__ import annotations

import contextlib
import functools
import random
import re
import sys
import types
from typing import Any, Iterator

import torch
import torch.utils.checkpoint
from torch import nn

from .call_watch import WatchCalls

# fx stores a tensor the forward makes without a proxy (``torch.zeros(3)``) on the traced module under
# this name, and the graph reads it from there: a write of the tracer's, not of the forward's.
_TRACER_CONSTANT = re.compile(r"_tensor_constant\d+$")


def is_tracer_constant(name: str) -> bool:
    """Whether ``name`` is one fx gives a tensor constant it stores on the module it traces."""
    return _TRACER_CONSTANT.match(name) is not None


class RandomDraws:
    """Context: whether anything drew from Python's, NumPy's or torch's global random generators inside.

    The generators are restored on exit, so that tracing never moves the user's random streams.
    """

    def __enter__(self) -> RandomDraws:
        self.drawn = False
        self._before = _generator_states()
        return self

    def __exit__(self, *exc: object) -> None:
        after = _generator_states()
        self.drawn = not _same_states(self._before, after)
        if self.drawn:
            _restore_states(self._before)


def _generator_states() -> dict[str, Any]:
    states: dict[str, Any] = {"random": random.getstate(), "torch": torch.random.get_rng_state()}
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        states["numpy"] = numpy.random.get_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _same_states(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a.keys() != b.keys() or a["random"] != b["random"] or not torch.equal(a["torch"], b["torch"]):
        return False
    if "numpy" in a:
        (kind_a, keys_a, *rest_a), (kind_b, keys_b, *rest_b) = a["numpy"], b["numpy"]
        if kind_a != kind_b or rest_a != rest_b or not (keys_a == keys_b).all():
            return False
    return "cuda" not in a or all(torch.equal(x, y) for x, y in zip(a["cuda"], b["cuda"]))


def _restore_states(states: dict[str, Any]) -> None:
    random.setstate(states["random"])
    torch.random.set_rng_state(states["torch"])
    if "numpy" in states:
        sys.modules["numpy"].random.set_state(states["numpy"])
    if "cuda" in states:
        torch.cuda.set_rng_state_all(states["cuda"])


# The readers of global autograd and autocast state. ``torch.autocast``, ``torch.no_grad``,
# ``torch.enable_grad`` and ``torch.set_grad_enabled`` read it on entering, which is how such a block in a
# forward is seen (``torch.inference_mode`` does not: a block of it is not).
_STATE_READERS = ("is_grad_enabled", "is_inference_mode_enabled", "is_autocast_enabled", "is_autocast_cpu_enabled",
                  "get_autocast_dtype", "get_autocast_cpu_dtype", "get_autocast_gpu_dtype")
# Where a read is a block being entered, and what to call it in a reason.
_BLOCKS = {torch.amp.autocast_mode.__file__: "a torch.autocast block",
           torch.autograd.grad_mode.__file__: "a torch.no_grad, enable_grad or set_grad_enabled block"}
# Reads made inside a checkpoint call are not the forward's but checkpoint's own: every version of it, reentrant
# or not, records the autocast state to recompute under (``torch.is_autocast_enabled``,
# ``torch.get_autocast_dtype``), so they are how a checkpoint call is seen (`StateReads.checkpointed`).
_CHECKPOINT_FILE = torch.utils.checkpoint.__file__


class StateReads(WatchCalls):
    """Context: ``read``, what inside read global autograd or autocast state (``torch.is_autocast_enabled``,
    ``a torch.autocast block``), in call order without repeats; ``checkpointed``, whether anything inside
    called ``torch.utils.checkpoint`` (see `Checkpoints`).

    The generated forward takes the branch the state chose at trace time: under ``torch.autocast`` a
    block that casts back to float32 only when autocast is on would return bfloat16.
    """

    def __init__(self) -> None:
        super().__init__(torch, _STATE_READERS)

    @property
    def read(self) -> list[str]:
        found = [_BLOCKS.get(callers[0], f"torch.{name}") for name, callers in self.calls
                 if _CHECKPOINT_FILE not in callers]
        return list(dict.fromkeys(found))

    @property
    def checkpointed(self) -> bool:
        return any(_CHECKPOINT_FILE in callers for _, callers in self.calls)


# Where this torch has ``_checkpoint_impl`` (the decorator form of ``checkpoint``, 2026), every public way in
# (``checkpoint``, ``checkpoint_sequential``, timm's ``checkpoint_seq``) reaches it through the module's
# globals, however the caller imported them. Older versions have none such, and ``checkpoint`` imported
# by name before ``apply`` is not seen here: checkpoint's own state reads are (`StateReads.checkpointed`).
_CHECKPOINT_FUNCTIONS = ("checkpoint", "checkpoint_sequential", "_checkpoint_impl")


class Checkpoints(WatchCalls):
    """Context: ``called``, whether anything inside called one of ``torch.utils.checkpoint``'s functions
    `_CHECKPOINT_FUNCTIONS` through the module.

    fx runs the checkpointed function with proxies like any other code, so its ops land in the graph
    one by one: a generated forward would compute the same, but keep every activation for backward.
    """

    def __init__(self) -> None:
        super().__init__(torch.utils.checkpoint, _CHECKPOINT_FUNCTIONS)

    @property
    def called(self) -> bool:
        return bool(self.calls)


class StateWrites:
    """Context: the state of ``module`` and its submodules that changed inside, restored on exit.

    Each module's ``__dict__`` is compared by identity (a rebound attribute, ``+= 1`` on a number), and
    so, down to `_DEPTH` levels, are the items of the lists, dicts and sets it holds and the attributes of
    plain objects (``self.history.append(out)``, ``self.stats["feats"].append(out)``, ``self.rec.last =
    out``); this includes the module's parameter, buffer and submodule tables. Tensors held there are
    compared by version counter: fx hands a forward its buffers as real tensors, so ``self.calls += 1`` on
    a buffer runs for real (their values are put back). The spy attributes `tracing` sets on the traced
    module itself, and fx's own tensor constants on it, are not the forward's writes; neither are new
    entries of a dict named as a cache and keyed by a traced value (`_memo_entries`), restored silently.

    ``baked`` lists the tensors kept as dict values in the modules' state (a cache an earlier call filled)
    that the graph took as constants: it would use that value for every later call.
    """

    def __init__(self, module: nn.Module, ignore: tuple[str, ...] = ()) -> None:
        self.module = module
        self.ignore = ignore

    def __enter__(self) -> StateWrites:
        self.written: list[str] = []
        self.baked: list[str] = []
        self._saved = [(name, m, _snapshot(dict(m.__dict__), _DEPTH + 1)) for name, m in self.module.named_modules()]
        return self

    def __exit__(self, *exc: object) -> None:
        held: dict[int, str] = {}
        for name, _, snap in self._saved:
            held.update(_held_tensors(snap, f"self.{name}." if name else "self."))
        for name, m, snap in self._saved:
            ignore = self.ignore if m is self.module else ()
            prefix = f"self.{name}." if name else "self."
            for key, changed in _changes(m.__dict__, snap, ignore):
                if not _memo_entries(key, m.__dict__.get(key), snap):
                    self.written.append(prefix + changed)
            _restore(m.__dict__, snap, ignore)
        for key, value in self.module.__dict__.items():
            if is_tracer_constant(key) and id(value) in held:
                self.baked.append(held[id(value)])


# How far below a module attribute containers and plain objects are compared and restored.
_DEPTH = 2
# A dict named as a cache (timm's ``attention_bias_cache``: biases gathered once per device in eval mode)
# memoises what the forward computes anyway. Keyed by the input's device, its key while fx traces is the
# string of a traced value, so the trace computes the value (from proxies) and the generated forward,
# which recomputes it every call, computes the same; those entries are dropped, silently.
_CACHE = re.compile(r"(^|_)cache$")
_TRACED_KEY = "Proxy("


def _plain_object(value: Any) -> bool:
    """An object whose attributes are state (a ``SimpleNamespace``, a helper instance): not a module, tensor,
    function, class or Python module, whose own machinery is not the forward's to change."""
    return (hasattr(value, "__dict__") and not isinstance(value, (nn.Module, torch.Tensor, type, types.ModuleType,
                                                                   types.FunctionType, types.MethodType,
                                                                   types.BuiltinFunctionType, functools.partial)))


def _snapshot(value: Any, depth: int) -> tuple | None:
    """What to compare with and restore later: ``(kind, shallow copy, snapshots of the items)``."""
    if depth <= 0:
        return None
    if isinstance(value, torch.Tensor):
        if isinstance(value, nn.Parameter):  # fx traces parameters as proxies: a forward cannot write them
            return ("tensor", _version(value), None)
        return ("tensor", _version(value), value.detach().clone())
    if isinstance(value, dict):
        return ("dict", dict(value), {k: _snapshot(v, depth - 1) for k, v in value.items()})
    if isinstance(value, list):
        return ("list", list(value), [_snapshot(v, depth - 1) for v in value])
    if isinstance(value, set):
        return ("set", set(value), None)
    if _plain_object(value):
        attrs = dict(vars(value))
        return ("object", attrs, {k: _snapshot(v, depth - 1) for k, v in attrs.items()})
    return None


def _version(t: torch.Tensor) -> int | None:
    """The version counter; None for an inference tensor, which has none (and cannot be written outside
    ``torch.inference_mode``, where tracing does not run)."""
    try:
        return t._version
    except RuntimeError:
        return None


def _held_tensors(snap: tuple | None, where: str, top: bool = True) -> dict[int, str]:
    """The tensors kept as values of dicts in a module's state (a cache; not its own attributes or tables,
    nor lists of tensors set up once, such as anchors), by id, with where each is kept."""
    found: dict[int, str] = {}
    if snap is None or snap[0] not in ("dict", "list", "object"):
        return found
    items = snap[1].items() if snap[0] != "list" else enumerate(snap[1])
    for key, value in items:
        inner = snap[2][key]
        if isinstance(value, torch.Tensor):
            if not top and snap[0] == "dict":
                found[id(value)] = f"{where}[{key!r}]"
        elif inner is not None and not (top and key in ("_parameters", "_buffers", "_modules")):
            found.update(_held_tensors(inner, f"{where}{key}" if top else f"{where}[{key!r}]", top=False))
    return found


def _differs(value: Any, snap: tuple | None) -> bool:
    if snap is None:
        return False
    kind, copy, inner = snap
    if kind == "tensor":
        return _version(value) != copy
    if kind == "dict":
        return (not isinstance(value, dict) or value.keys() != copy.keys()
                or any(value[k] is not copy[k] or _differs(value[k], inner[k]) for k in copy))
    if kind == "list":
        return (not isinstance(value, list) or len(value) != len(copy)
                or any(a is not b or _differs(a, i) for a, b, i in zip(value, copy, inner)))
    if kind == "set":
        return {id(v) for v in value} != {id(v) for v in copy}
    now = vars(value)
    return now.keys() != copy.keys() or any(now[k] is not copy[k] or _differs(now[k], inner[k]) for k in copy)


def _skipped(key: str, ignore: tuple[str, ...]) -> bool:
    return key in ignore or is_tracer_constant(key)


def _changes(attrs: dict[str, Any], snap: tuple, ignore: tuple[str, ...]) -> list[tuple[str, str]]:
    """``(attribute, what to call the change)`` for every changed attribute of one module."""
    _, then, inner = snap
    out = []
    for key in sorted(attrs.keys() | then.keys()):
        if _skipped(key, ignore):
            continue
        if key not in attrs or key not in then or attrs[key] is not then[key]:
            out.append((key, key))
        elif _differs(attrs[key], inner[key]):
            out.append((key, _table_entry(key, attrs[key], inner[key])))
    return out


def _table_entry(key: str, now: Any, snap: tuple) -> str:
    """The name of the entry that changed (the buffer ``calls``) where it is one of a module's tables."""
    if key in ("_parameters", "_buffers", "_modules") and isinstance(now, dict):
        then, items = snap[1], snap[2]
        changed = sorted(str(k) for k in now.keys() | then.keys()
                         if k not in now or k not in then or now[k] is not then[k] or _differs(now[k], items[k]))
        if changed:
            return changed[0]
    return key


def _memo_entries(key: str, now: Any, snap: tuple) -> bool:
    """Whether the only change to attribute ``key`` is new entries of a cache keyed by a traced value."""
    then = snap[1].get(key)
    if not (_CACHE.search(key) and isinstance(now, dict) and now is then):
        return False
    before = snap[2][key][1]
    return (all(k in now and now[k] is v for k, v in before.items())
            and all(isinstance(k, str) and _TRACED_KEY in k for k in now.keys() - before.keys()))


def _restore(attrs: dict[str, Any], snap: tuple, ignore: tuple[str, ...]) -> None:
    _, then, inner = snap
    for key in list(attrs):
        if key not in then and not _skipped(key, ignore):
            del attrs[key]
    for key, value in then.items():
        if not _skipped(key, ignore):
            attrs[key] = value
            _restore_value(value, inner[key])


def _restore_value(value: Any, snap: tuple | None) -> None:
    if snap is None or not _differs(value, snap):
        return
    kind, copy, inner = snap
    if kind == "tensor":
        if inner is not None:
            _put_back(value, inner)
    elif kind == "dict":
        value.clear()
        value.update(copy)
        for k, v in copy.items():
            _restore_value(v, inner[k])
    elif kind == "list":
        value[:] = copy
        for v, i in zip(copy, inner):
            _restore_value(v, i)
    elif kind == "set":
        value.clear()
        value.update(copy)
    else:
        attrs = vars(value)
        attrs.clear()
        attrs.update(copy)
        for k, v in copy.items():
            _restore_value(v, inner[k])


def _put_back(t: torch.Tensor, saved: torch.Tensor) -> None:
    """Copy ``saved`` into ``t`` itself, so that references to ``t`` held elsewhere see it; a tensor resized
    in place takes ``saved``'s storage instead, and an inference tensor is written inside ``torch.inference_mode``."""
    with torch.inference_mode() if t.is_inference() else torch.no_grad():
        if t.shape == saved.shape:
            t.copy_(saved)
        else:
            t.set_(saved)


class ParameterWritten(RuntimeError):
    """A forward that `apply` ran wrote a parameter in place, which `preserved_tensors` cannot put back."""


@contextlib.contextmanager
def preserved_tensors(module: nn.Module) -> Iterator[None]:
    """Context: every buffer of ``module`` and its submodules as it was on entry, whatever happened inside;
    on a normal exit, `ParameterWritten` if a parameter's version counter moved.

    `apply` promises every original buffer bit-identical, and each replay of a forward must see the state
    the example forward was recorded with. A value is copied back into the tensor object itself (a
    reference held elsewhere stays valid) where its version counter or its value moved (a write through
    ``.data`` moves no counter); a buffer or parameter the forward rebound, deleted or registered is put
    back in its module's table. Parameters are not copied (that would cost the model's memory once more),
    only checked; a meta tensor has no value to put back.
    """
    # a TorchScript module's tables are its compiled code's own (no rebinding there): only values are put back
    tables = [(m, dict(m._buffers), dict(m._parameters), set(m._non_persistent_buffers_set))
              for m in module.modules() if not isinstance(m, torch.jit.ScriptModule)]
    saved: dict[int, tuple[torch.Tensor, int | None, torch.Tensor]] = {}
    for m in module.modules():
        for t in m._buffers.values():
            if t is not None and id(t) not in saved and not t.is_meta:
                saved[id(t)] = (t, _version(t), t.detach().clone())
    versions = [(name, p, _version(p)) for name, p in module.named_parameters()]
    try:
        yield
    finally:
        for m, buffers, parameters, non_persistent in tables:
            _put_table(m._buffers, buffers)
            _put_table(m._parameters, parameters)
            if m._non_persistent_buffers_set != non_persistent:
                m._non_persistent_buffers_set.clear()
                m._non_persistent_buffers_set.update(non_persistent)
        for t, version, copy in saved.values():
            if _moved(t, version, copy):
                _put_back(t, copy)
    written = [name for name, p, version in versions if version is not None and _version(p) != version]
    if written:
        raise ParameterWritten(
            f"a forward that se_retrofit ran (eval mode, under torch.no_grad) wrote parameter {written[0]!r} of "
            f"{type(module).__name__} in place, which apply cannot undo: the model it works on (yours with "
            "inplace=True) no longer has its original weights. Keep state that the forward updates in a buffer "
            "(register_buffer), which apply puts back after each of its forwards, or update it outside forward.")


def _put_table(now: dict[str, Any], then: dict[str, Any]) -> None:
    if now.keys() != then.keys() or any(now[k] is not v for k, v in then.items()):
        now.clear()
        now.update(then)


def _moved(t: torch.Tensor, version: int | None, saved: torch.Tensor) -> bool:
    if _version(t) != version:
        return True
    try:
        return not torch.equal(t, saved)
    except Exception:  # a tensor torch.equal cannot compare (some subclasses): its version counter has to do
        return False
