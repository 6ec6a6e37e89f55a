"""What a forward does while fx traces it that the traced graph cannot keep.

fx runs a module's Python once with proxies for its tensors. Everything that is not an op on a proxy
happens once, at trace time, and is gone from the graph: a random draw in Python (``random.random()``,
NumPy, ``torch.rand(1).item()`` — a torch call with no proxy argument runs for real) becomes one fixed
outcome, so stochastic depth written that way would always keep (or always drop) its branch; a write
to module state (``self.feat = out``, ``self.calls += 1``, ``self.cache.append(out)``) is not repeated
by the generated forward and, worse, leaves a proxy in the module. Both are detected here, undone (the
random generators and the modules' attributes are put back as they were), and reported, so that the
module is skipped with the reason instead of rewritten into something else.
"""
from __future__ import annotations

import random
import re
import sys
from typing import Any

import torch
from torch import nn

# fx stores a tensor the forward makes without a proxy (``torch.zeros(3)``) on the traced module under
# this name, and the graph reads it from there: a write of the tracer's, not of the forward's.
_TRACER_CONSTANT = re.compile(r"_tensor_constant\d+$")


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


class StateWrites:
    """Context: the attributes of ``module`` and its submodules that changed inside, restored on exit.

    Each module's ``__dict__`` is compared by identity (a rebound attribute, ``+= 1`` on a number) and
    so are the items of the lists, dicts and sets it holds (``self.history.append(out)``); this includes
    the module's parameter, buffer and submodule tables. The spy attributes `tracing` sets on the traced
    module itself, fx's own tensor constants on it, and new entries of a dict named as a cache
    (restored, not reported) are not writes that change what the forward computes.
    """

    def __init__(self, module: nn.Module, ignore: tuple[str, ...] = ()) -> None:
        self.module = module
        self.ignore = ignore

    def __enter__(self) -> StateWrites:
        self.written: list[str] = []
        self._saved = [(name, m, dict(m.__dict__), _contents(m.__dict__)) for name, m in self.module.named_modules()]
        return self

    def __exit__(self, *exc: object) -> None:
        for name, m, attrs, contents in self._saved:
            ignore = self.ignore if m is self.module else ()
            changed = _changed(m, attrs, contents, ignore)
            self.written.extend(f"self.{name}.{a}" if name else f"self.{a}" for a in changed)
            if _any_change(m, attrs, contents, ignore):
                _restore(m, attrs, contents, ignore)


def _contents(attrs: dict[str, Any]) -> dict[str, Any]:
    """Shallow copies of the containers among ``attrs``, to compare their items later."""
    out: dict[str, Any] = {}
    for key, value in attrs.items():
        for kind in (dict, list, set):
            if isinstance(value, kind):
                out[key] = kind(value)
                break
    return out


def _same_items(now: Any, then: Any) -> bool:
    if isinstance(now, dict):
        return now.keys() == then.keys() and all(now[k] is then[k] for k in now)
    if isinstance(now, set):
        return {id(v) for v in now} == {id(v) for v in then}
    return len(now) == len(then) and all(a is b for a, b in zip(now, then))


def _skipped(key: str, ignore: tuple[str, ...]) -> bool:
    return key in ignore or _TRACER_CONSTANT.match(key) is not None


# A dict named as a cache (timm's ``attention_bias_cache``: biases gathered once per device in eval mode)
# memoises what the forward computes anyway: the generated forward, which recomputes it every call,
# computes the same. Its new entries are dropped (they hold proxies), but they make no difference.
_CACHE = re.compile(r"(^|_)cache$")


def _changed(m: nn.Module, attrs: dict[str, Any], contents: dict[str, Any], ignore: tuple[str, ...]) -> list[str]:
    now = m.__dict__
    names = []
    for key in sorted(now.keys() | attrs.keys()):
        if _skipped(key, ignore):
            continue
        if key not in now or key not in attrs or now[key] is not attrs[key]:
            names.append(key)
        elif key in contents and not _same_items(now[key], contents[key]):
            if not (_CACHE.search(key) and isinstance(now[key], dict)):
                names.append(_container_item(key, now[key], contents[key]))
    return names


def _any_change(m: nn.Module, attrs: dict[str, Any], contents: dict[str, Any], ignore: tuple[str, ...]) -> bool:
    now = m.__dict__
    return any(not _skipped(key, ignore) and (
        key not in now or key not in attrs or now[key] is not attrs[key]
        or (key in contents and not _same_items(now[key], contents[key]))) for key in now.keys() | attrs.keys())


def _container_item(key: str, now: Any, then: Any) -> str:
    """``_buffers['x']`` rather than ``_buffers`` where one entry of a module table changed."""
    if isinstance(now, dict):
        keys = sorted(str(k) for k in now.keys() | then.keys() if k not in now or k not in then or now[k] is not then[k])
        if key in ("_parameters", "_buffers", "_modules") and keys:
            return keys[0]
    return key


def _restore(m: nn.Module, attrs: dict[str, Any], contents: dict[str, Any], ignore: tuple[str, ...]) -> None:
    now = m.__dict__
    for key in list(now):
        if key not in attrs and not _skipped(key, ignore):
            del now[key]
    for key, value in attrs.items():
        if not _skipped(key, ignore):
            now[key] = value
    for key, items in contents.items():
        container = now[key]
        if isinstance(container, dict):
            container.clear()
            container.update(items)
        elif isinstance(container, set):
            container.clear()
            container.update(items)
        else:
            container[:] = items
