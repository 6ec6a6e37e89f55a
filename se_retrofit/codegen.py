"""Give one module instance a new ``forward`` generated from an fx graph, keeping its class.

The rewritten block is not turned into a ``GraphModule``: that would drop its class, its other
methods and any attribute the graph does not read. Instead the instance moves to a generated
subclass of its own class whose only change is ``forward`` (and, when the module's code branches
on ``self.training``, one generated forward per mode and a dispatch on ``self.training``). Pickling
rebuilds the subclass from its source text, so ``torch.save(model)`` loads in a fresh process.
"""
from __future__ import annotations

import copy
import hashlib
import inspect
import pickle
import linecache
from typing import Any

import torch.fx as fx
from torch.fx.graph_module import _format_import_block
from torch.package import sys_importer

_CLASS_CACHE: dict[tuple, type] = {}


def _source(graph: fx.Graph, fn_name: str) -> tuple[str, dict[str, Any]]:
    """Python source of ``graph`` as a method named ``fn_name``, and the globals it needs."""
    code = graph.python_code(root_module="self")
    src = code.src.replace("def forward(", f"def {fn_name}(", 1)
    namespace = dict(code.globals)
    codegen = graph._codegen
    info = getattr(codegen, "pytree_info", None)
    if info is not None:
        # fx's pytree codegen reads the argument structure from self._in_spec / self._out_spec;
        # keep them with the generated function instead of on the module.
        src = src.replace("self._in_spec", f"_{fn_name}_in_spec").replace("self._out_spec", f"_{fn_name}_out_spec")
        namespace[f"_{fn_name}_in_spec"] = info.in_spec
        namespace[f"_{fn_name}_out_spec"] = info.out_spec
    return src, namespace


def _signature_line(src: str) -> str:
    for line in src.splitlines():
        if line.startswith("def "):
            return line
    raise ValueError("generated source has no function definition")


def _dispatch_source(train_src: str) -> str:
    """``forward`` with the generated signature that calls the train or eval graph by ``self.training``."""
    line = _signature_line(train_src)
    params = line[line.index("(") + 1: line.rindex(")")].split(",")[1:]
    names = [p.split("=")[0].split(":")[0].strip() for p in params if p.strip()]
    call = ", ".join(names)
    header = line.replace("def _se_forward_train(", "def forward(", 1)
    return (f"{header}\n"
            f"    if self.training:\n"
            f"        return self._se_forward_train({call})\n"
            f"    return self._se_forward_eval({call})\n")


def build_sources(eval_graph: fx.Graph, train_graph: fx.Graph | None) -> tuple[str, dict[str, Any]]:
    """The source text of the new forward(s) and their globals; one forward when the modes agree."""
    eval_src, eval_ns = _source(eval_graph, "forward")
    if train_graph is None:
        return eval_src, eval_ns
    train_src, train_ns = _source(train_graph, "_se_forward_train")
    eval_src, eval_ns = _source(eval_graph, "_se_forward_eval")
    namespace = {**train_ns, **eval_ns}
    return "\n".join([train_src, eval_src, _dispatch_source(train_src)]), namespace


def _split_specs(namespace: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    specs = {k: v for k, v in namespace.items() if k.endswith("_spec")}
    return {k: v for k, v in namespace.items() if k not in specs}, specs


def program_text(source: str, namespace: dict[str, Any]) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """Self-contained text (imports + source), the argument specs, and globals that cannot be imported.

    The text is what pickling stores. A global with no importable name (a local function the model's
    forward calls) is kept as the object itself; pickling then needs pickle to find it, and
    ``_reduce_ex`` says so when it cannot.
    """
    plain, specs = _split_specs(namespace)
    lines: set[str] = set()
    local: dict[str, Any] = {}
    for name, obj in plain.items():
        if isinstance(obj, str):  # a string annotation (``from __future__ import annotations``); older fx fails on it
            lines.add(f"{name} = {obj!r}")
            continue
        try:
            lines.add(_format_import_block({name: obj}, sys_importer))
        except Exception:  # no importable name: keep the object
            local[name] = obj
    return "\n".join(sorted(lines)) + "\n" + source, specs, local


def retrofitted_class(base: type, text: str, specs: dict[str, Any], local_globals: dict[str, Any] | None = None
                      ) -> type:
    """The generated subclass of ``base`` whose forward is ``text``; one class per (base, text)."""
    key = (base, text, tuple(sorted((k, repr(v)) for k, v in specs.items())))
    cls = _CLASS_CACHE.get(key)
    if cls is not None and not local_globals:
        return cls
    digest = hashlib.sha1(text.encode()).hexdigest()[:12]
    filename = f"<se_retrofit {base.__qualname__} {digest}>"
    linecache.cache[filename] = (len(text), None, text.splitlines(True), filename)
    ns: dict[str, Any] = {**(local_globals or {}), **specs}
    exec(compile(text, filename, "exec"), ns)
    attrs: dict[str, Any] = {
        "__module__": base.__module__,
        "__qualname__": f"SE{base.__qualname__}",
        "__doc__": base.__doc__,
        "_se_retrofit_base": base,
        "_se_retrofit_text": text,
        "_se_retrofit_specs": specs,
        "_se_retrofit_globals": dict(local_globals or {}),
        "__reduce_ex__": _reduce_ex,
        "__deepcopy__": _deepcopy,
    }
    for name in ("forward", "_se_forward_train", "_se_forward_eval"):
        if name in ns:
            attrs[name] = ns[name]
    for name in DEPLOY_METHODS:
        if _is_deploy_method(getattr(base, name, None)):
            attrs[name] = _deploy(base, name)
    cls = type(f"SE{base.__name__}", (base,), attrs)
    if not local_globals:
        _CLASS_CACHE[key] = cls
    return cls


# The methods timm's ``reparameterize_model`` (and RepVGG-style code generally) calls to fuse a block's
# training-time branches into one convolution.
DEPLOY_METHODS = ("reparameterize", "switch_to_deploy", "fuse")


def _is_deploy_method(method: Any) -> bool:
    """timm's fusing methods take nothing but ``self``; a ``fuse(a, b)`` helper the forward calls is not one."""
    if not callable(method):
        return False
    try:
        params = list(inspect.signature(method).parameters.values())[1:]
    except (TypeError, ValueError):
        return False
    return all(p.default is not inspect.Parameter.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
               for p in params)


def _deploy(base: type, name: str) -> Any:
    """A stand-in for ``base.<name>``: fusing the block's branches would delete (``reparameterize``,
    ``switch_to_deploy``) what the generated forward calls, or return a plain module without the SE block
    (``fuse``). The first two run where the SE block can move into the fused forward's attention slot
    (`deploy_fusion`); otherwise, and for ``fuse``, they say why not instead of failing later or dropping
    the SE block."""
    from .deploy_fusion import fuse_keeping_se, refusal

    def deploy(self: Any, *args: Any, **kwargs: Any) -> Any:
        if name == "fuse":
            raise RuntimeError(refusal(base, name, "it returns a new module in place of the block"))
        return fuse_keeping_se(self, base, name, *args, **kwargs)
    deploy.__name__ = deploy.__qualname__ = name
    return deploy


def _reduce_ex(self: Any, protocol: int) -> tuple:
    cls = type(self)
    local = cls._se_retrofit_globals
    if local:
        try:
            pickle.dumps(local, protocol)
        except Exception as exc:
            raise TypeError(f"{cls.__name__}'s forward calls {', '.join(sorted(local))}, which pickle cannot find "
                            f"by name ({type(exc).__name__}: {exc}), so the block cannot be pickled; save its "
                            "state_dict() instead and rebuild the model with se_retrofit.apply") from None
    args = (cls._se_retrofit_base, cls._se_retrofit_text, cls._se_retrofit_specs, local)
    return (_rebuild, args, self.__dict__.copy())


def _deepcopy(self: Any, memo: dict[int, Any]) -> Any:
    """A copy in the same generated class: unlike pickling it needs no importable name for anything."""
    cls = type(self)
    new = cls.__new__(cls)
    memo[id(self)] = new
    for key, value in self.__dict__.items():
        new.__dict__[key] = copy.deepcopy(value, memo)
    return new


def _rebuild(base: type, text: str, specs: dict[str, Any], local_globals: dict[str, Any] | None = None) -> Any:
    """Unpickling: regenerate the subclass from its text (the class object itself is not importable)."""
    cls = retrofitted_class(base, text, specs, local_globals)
    return cls.__new__(cls)


def original_class(module: Any) -> type:
    return getattr(type(module), "_se_retrofit_base", type(module))


def install_forward(module: Any, source: str, namespace: dict[str, Any]) -> type:
    """Move ``module`` to the generated subclass of its (original) class; return the previous class."""
    previous = type(module)
    text, specs, local_globals = program_text(source, namespace)
    module.__class__ = retrofitted_class(original_class(module), text, specs, local_globals)
    return previous
