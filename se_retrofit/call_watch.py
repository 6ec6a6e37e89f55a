"""Note which of some library functions a piece of code calls, and from where, without changing what they do.

A forward can consult state fx never sees (``torch.is_autocast_enabled()``) or call a function whose
effect fx cannot record (``torch.utils.checkpoint``): nothing in the traced graph shows it. The only
place to see such a call is the function itself, so for as long as a `WatchCalls` context is open the
function's module attribute is a pass-through wrapper that notes the call. The wrappers are shared:
the first open context installs one and the last to close puts the original back, and a call counts only
for the contexts open in the thread that made it, so contexts that overlap (nested, or in other threads)
neither keep nor remove each other's wrappers. That is bookkeeping, not thread safety for tracing: fx
itself patches ``nn.Module.__call__`` for every thread while it traces, so ``apply`` in several threads at
once does not work anyway.
"""
from __future__ import annotations

import functools
import sys
import threading
import types
from typing import Any, Callable


class _Open(threading.local):
    def __init__(self) -> None:
        self.contexts: list[WatchCalls] = []


_OPEN = _Open()
_LOCK = threading.Lock()
# (id(owner), name) -> [owner, original function, open contexts using the wrapper]
_INSTALLED: dict[tuple[int, str], list[Any]] = {}


class WatchCalls:
    """Context: ``calls``, the ``(function name, callers)`` of every call made inside, in this thread, of the
    functions ``names`` of ``owner`` (a Python module; names it lacks are left out); ``callers`` are the
    files of the calling frames, the caller's first.

    Only calls that look the function up on ``owner`` are seen: ``torch.is_grad_enabled()``, not a
    ``from torch import is_grad_enabled`` made earlier.
    """

    def __init__(self, owner: types.ModuleType, names: tuple[str, ...]) -> None:
        self.owner = owner
        self.names = tuple(n for n in names if callable(getattr(owner, n, None)))

    def __enter__(self) -> WatchCalls:
        self.calls: list[tuple[str, tuple[str, ...]]] = []
        with _LOCK:
            for name in self.names:
                _install(self.owner, name)
        _OPEN.contexts.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _OPEN.contexts.remove(self)
        with _LOCK:
            for name in self.names:
                _uninstall(self.owner, name)


def _install(owner: types.ModuleType, name: str) -> None:
    entry = _INSTALLED.get((id(owner), name))
    if entry is None:
        original = getattr(owner, name)
        entry = _INSTALLED[(id(owner), name)] = [owner, original, 0]
        setattr(owner, name, _noting(original, owner, name))
    entry[2] += 1


def _uninstall(owner: types.ModuleType, name: str) -> None:
    entry = _INSTALLED[(id(owner), name)]
    entry[2] -= 1
    if entry[2] == 0:
        setattr(owner, name, entry[1])
        del _INSTALLED[(id(owner), name)]


def _noting(original: Callable[..., Any], owner: types.ModuleType, name: str) -> Callable[..., Any]:
    @functools.wraps(original)
    def noted(*args: Any, **kwargs: Any) -> Any:
        if _OPEN.contexts:
            callers = _callers(sys._getframe(1))
            for context in _OPEN.contexts:
                if context.owner is owner and name in context.names:
                    context.calls.append((name, callers))
        return original(*args, **kwargs)
    return noted


def _callers(frame: types.FrameType | None) -> tuple[str, ...]:
    files = []
    while frame is not None:
        files.append(frame.f_code.co_filename)
        frame = frame.f_back
    return tuple(files)
