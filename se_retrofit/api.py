"""``apply`` and ``find_sites``: the public pass, a thin layer over capture, tracing, analysis and rewrite."""
from __future__ import annotations

import copy
import dataclasses
import fnmatch
import functools
import itertools
import logging
import threading
import typing
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, TypeVar

import torch
import torch.fx as fx
from torch import nn
from torch.nn.parameter import is_lazy

from . import catalog, layout
from .capture import Call, capture_calls, describe, preserved_modes
from .codegen import original_class
from .compiled import adds_tensors, is_compiled
from .config import SEConfig
from .fingerprint import DIGESTS_ATTR, tensor_digests
from .fusion import fused_calls
from .messages import first_line
from .neighbours import attention_after
from .nesting import branch_calls, on_a_branch
from .rewrite import free_name, rewrite_block
from .se_block import SEBlock, hidden_width
from .sites import NESTED_REASON, Placement, analyze, tensor_adds
from .trace_effects import is_tracer_constant, preserved_tensors
from .tracing import (TraceFailure, bind_call, cached_trace, checkpoints, clear_cache, propagate_shapes,
                      state_reads, trace_forward)
from .wrappers import unwrapped

logger = logging.getLogger("se_retrofit")
T = TypeVar("T")

CONFIG_ATTR = "_se_retrofit_config"

# fx's tracer patches ``nn.Module.__call__`` and ``__getattr__`` process-wide while it traces, and restores what it
# found: two traces at once in two threads end with the patched call left in place, and every later forward and
# trace of the process fails ("module is not installed as a submodule"). `apply` and `find_sites` hold this lock
# for their whole work (traces, example forwards, checks), so calls from several threads take turns.
_TRACE_LOCK = threading.RLock()


class SERetrofitWarning(UserWarning):
    """Issued when ``apply`` leaves a model unchanged or partly unchanged for a reason worth knowing."""


@dataclass
class Site:
    """One SE block that ``apply`` inserts (or would insert).

    Attributes:
        block: qualified name of the module whose forward holds the addition ('' for the model itself).
        se_name: qualified name of the new SE module (``layer1.0.se``).
        kind: ``"residual"``, or ``"multi-branch"`` for a sum of parallel linear branches (RepVGG).
        shortcut: ``"identity"``, ``"projection"`` (a linear map), ``"activation"`` (one without a
            convolution: ``F.relu(x) + branch(x)``), ``"argument"`` (handed in by the caller) or ``"none"``.
        position: the config's position.
        channels: channels the block gates; hidden: its bottleneck width.
        spatial_dims: 1, 2 or 3 (``NCL``, ``NCHW``, ``NCTHW``).
        add: name of the addition's node in the block's graph.
        fused_add: whether the SE block does the residual addition itself, in training and eval mode
            (one pass instead of a multiply and an add; ``SEConfig.fuse_add``); None until ``apply``
            rewrites the block.
        early_squeeze: whether the block's eval-mode forward hands the SE block a gate computed from the
            input of the widening 1x1 conv and norm before it (``SEConfig.early_squeeze``; used where
            the norm runs on its running statistics, checked at every call); None until ``apply``
            rewrites the block.
    """

    block: str
    se_name: str
    kind: str
    shortcut: str
    position: str
    channels: int
    hidden: int
    spatial_dims: int
    add: str
    fused_add: bool | None = None
    early_squeeze: bool | None = None

    @property
    def params(self) -> int:
        """Parameters the block adds: two 1x1 convolutions with bias."""
        return 2 * self.channels * self.hidden + self.channels + self.hidden


@dataclass
class Skipped:
    """An addition (or a whole module, ``add=None``) left alone, and why.

    Attributes:
        block: qualified name of the module ('' for the model itself).
        add: name of the addition's node in that module's graph, or None when the whole module was skipped.
        reason: why, in words (also counted by ``SitePlan.reasons()``).
    """

    block: str
    add: str | None
    reason: str


@dataclass
class SitePlan:
    """The result of the analysis: where SE goes and what was left alone, with reasons."""

    model: str
    config: SEConfig
    sites: list[Site] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    example_input: str = ""

    def reasons(self) -> Counter:
        """How many additions were left alone for each reason."""
        return Counter(s.reason for s in self.skipped)

    def __len__(self) -> int:
        return len(self.sites)

    def __str__(self) -> str:
        lines = [f"{self.model}: {len(self.sites)} SE site(s), {len(self.skipped)} skipped "
                 f"(position={self.config.position!r}, reduction={self.config.reduction:g}, "
                 f"example input {self.example_input})"]
        for s in self.sites:
            fast = [name for name, on in (("fused add", s.fused_add), ("early squeeze", s.early_squeeze)) if on]
            lines.append(f"  + {s.se_name:<40} {s.kind:<12} shortcut={s.shortcut:<10} C={s.channels:<5} "
                         f"hidden={s.hidden}" + (f"  ({', '.join(fast)})" if fast else ""))
        for s in self.skipped:
            where = f"{s.block or '<root>'}" + (f" [{s.add}]" if s.add else "")
            lines.append(f"  - {where:<40} {s.reason}")
        if not self.sites and not self.skipped:
            lines.append(f"  {_NO_ADDITIONS}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form: the config, the example input, every site and every skipped addition."""
        from dataclasses import asdict

        return {"model": self.model, "config": self.config.to_dict(), "example_input": self.example_input,
                "sites": [asdict(s) for s in self.sites], "skipped": [asdict(s) for s in self.skipped]}


@dataclass
class _BlockPlan:
    name: str
    module: nn.Module
    call: Call
    graphs: list[fx.Graph]
    placements: list[list[Placement]]


def _is_candidate(module: nn.Module) -> bool:
    """Modules whose own forward could hold a residual addition: anything with children but plain containers.

    A norm is no block either, though timm's norm + activation layers hold their activation as a child;
    the frozen one's ``x * scale + bias`` would be reported, norm by norm, as an addition of a constant.
    Nor is a TorchScript module or anything in it (`compiled`): compiled code, which fx cannot trace and
    which refuses the hooks that record calls; its parent calls it as it is.
    """
    if isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict, SEBlock, fx.GraphModule)) or \
            is_compiled(module):
        return False
    if catalog.is_conv(module) or catalog.is_channel_attention(module) or catalog.is_channel_first_norm(module):
        return False
    return next(module.children(), None) is not None


_HAS_ATTENTION = "already has channel attention"  # how every reason for a gated residual unit starts
_NO_ADDITIONS = ("no tensor addition in any traced module, so no residual branch to put SE on (networks that "
                 "only concatenate, such as DenseNet or VoVNet, have none)")
_GRAPH_MODULE_REASON = ("module skipped: an fx GraphModule regenerates its forward from its graph (recompile, "
                        "and the train/eval switch of torchvision's feature extractors), which would drop inserted "
                        "SE blocks; retrofit the model before tracing it with fx")

_COMPILED_REASON = ("module skipped: a TorchScript module (torch.jit.script or torch.jit.trace), whose forward is "
                    "compiled code that se_retrofit cannot trace or rewrite; it is called as it is. For SE inside it, "
                    "apply to the eager module before scripting or tracing it")


def _compiled_with_adds(model: nn.Module) -> list[Skipped]:
    """The outermost TorchScript modules whose compiled code adds two tensors: additions the plan would
    otherwise not mention (a model whose blocks are all scripted would seem to have none)."""
    found: list[Skipped] = []
    for name, m in model.named_modules():
        if is_compiled(m) and not any(name.startswith(f"{s.block}.") for s in found) and adds_tensors(m):
            found.append(Skipped(name, None, _COMPILED_REASON))
    return found


_CHECKPOINT_REASON = ("module skipped: its forward calls torch.utils.checkpoint, which the traced graph inlines: the "
                      "rewritten forward would no longer checkpoint (its memory saving lost); to get SE here, turn "
                      "this block's own checkpointing off before apply, then checkpoint the rewritten block from the "
                      "module that calls it")


def _state_read(graphs: list[fx.Graph]) -> list[str]:
    return list(dict.fromkeys(r for g in graphs for r in state_reads(g)))


def _state_read_reason(reads: list[str]) -> str:
    return (f"module skipped: its forward reads global autograd or autocast state ({', '.join(reads[:3])}), which the "
            "traced graph cannot follow: the rewritten forward would keep what that state was when apply traced it, "
            "under torch.autocast, torch.no_grad or torch.inference_mode too")


def _copy(model: nn.Module, other_way: str = ", or pass inplace=True to apply") -> nn.Module:
    """``copy.deepcopy`` with every module's train/eval flag as in ``model``; ``other_way`` ends the error's
    advice for a model that does not copy (the caller's own alternative, if it has one).

    Some modules' ``__deepcopy__`` calls ``train()`` (torchvision's DualGraphModule, under timm's
    ``features_only=True, feature_cls="fx"``); the copy must not come back in another mode.
    """
    try:
        clone = copy.deepcopy(model)
    except Exception as exc:  # deepcopy raises what the failing object raises (RuntimeError, TypeError...)
        raise ValueError(
            f"cannot copy {type(model).__name__} to work on ({first_line(exc)}). "
            "Models reparametrised with hooks (torch.nn.utils.prune, the old torch.nn.utils.weight_norm) do not "
            f"deep-copy: make the change permanent first (prune.remove, remove_weight_norm){other_way}.") from exc
    for original, copied in zip(model.modules(), clone.modules()):
        copied.training = original.training
    return clone


def _check_model(model: Any) -> None:
    """User errors that would otherwise surface deep inside the analysis."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise ValueError(f"model is a TorchScript module ({type(model).__name__}): its forward is compiled code that "
                         "se_retrofit cannot trace or rewrite. Pass the eager model it was scripted from; to take the "
                         "result out of Python, trace (torch.jit.trace) or export (torch.export, ONNX) the model apply "
                         "returns: torch.jit.script cannot compile its generated forwards.")
    if unwrapped(model) is not model:
        inner = "_orig_mod" if type(model).__name__ == "OptimizedModule" else "module"
        raise ValueError(f"model is wrapped ({type(model).__name__}): compiled code would run where se_retrofit "
                         "checks each rewritten block against the original's output, and (Distributed)DataParallel "
                         f"would not see the new parameters. Pass the model inside, model.{inner}, and compile or "
                         "wrap the model apply returns.")
    if any(is_lazy(t) for t in itertools.chain(model.parameters(), model.buffers())):
        raise ValueError(f"{type(model).__name__} has uninitialised parameters of lazy modules (nn.LazyConv2d, ...): "
                         "their shapes are only known after a forward pass. Run the model once on a real input "
                         "(and load its weights), then apply.")
    if any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers())):
        raise ValueError(f"{type(model).__name__} has tensors on the meta device: se_retrofit runs the model once "
                         "to find the residual additions and checks each rewritten block on real values. "
                         "Materialise it first (model.to_empty(device='cpu') and load its weights).")


_CONFIG_KEYWORDS = ("reduction", "init", "position", "include", "exclude")
_SECONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(SEConfig))


def _config_or_keywords(function: Callable[..., T]) -> Callable[..., T]:
    """Refuse a ``config`` together with SE options as keywords, even ones equal to the defaults.

    Only the call itself knows which keywords were passed (``apply(m, SEConfig(reduction=8),
    reduction=16)`` would otherwise use 8 without a word); the wrapper keeps the signature for the docs.
    """
    @functools.wraps(function)
    def checked(model: nn.Module, config: SEConfig | None = None, **keywords: Any) -> T:
        config_only = sorted(k for k in keywords if k in _SECONFIG_FIELDS and k not in _CONFIG_KEYWORDS)
        if config_only:
            raise TypeError(f"{function.__name__}() takes {', '.join(config_only)} only in an SEConfig (the keywords "
                            f"are {', '.join(_CONFIG_KEYWORDS)}); pass {function.__name__}(model, "
                            f"SEConfig({config_only[0]}=...)), with any other options in that SEConfig too")
        given = sorted(k for k in _CONFIG_KEYWORDS if keywords.get(k) is not None)
        if config is not None and given:
            raise ValueError(f"pass options either in config or as keywords, not both (got config and {given}); "
                             f"put them in the config: dataclasses.replace(config, {given[0]}=...)")
        return function(model, config, **keywords)
    return checked


def _resolve_config(config: SEConfig | None, options: dict[str, Any]) -> SEConfig:
    if config is None:
        return SEConfig(**options)
    if not isinstance(config, SEConfig):
        raise TypeError(f"config must be an SEConfig, got {type(config).__name__}; build one with "
                        "se_retrofit.SEConfig(reduction=..., ...) or SEConfig.from_dict(...)")
    # A copy, validated again: fields set after construction skip __post_init__, and the model records its
    # config (get_config, save_adapter): the caller's object, changed for the next experiment, would change
    # what this model says it was made with.
    return dataclasses.replace(config)


def _matches(name: str, patterns: Sequence[str]) -> bool:
    """A pattern selects a block when it matches the block's name or the name of a module above it."""
    parts = name.split(".") if name else [""]
    prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(fnmatch.fnmatchcase(p, pat) for p in prefixes for pat in patterns)


def _trace_block(name: str, module: nn.Module, call: Call, position: str
                 ) -> tuple[_BlockPlan | None, list[Skipped], list[frozenset[int]]]:
    """Trace, check and analyse one module; a module whose forward cannot be trusted is skipped whole.

    Also returns, for each residual unit, the modules its branch runs (`nesting.branch_calls`).
    """
    if call.varies is not None:
        return None, [Skipped(name, None, "module skipped: called again with other non-tensor arguments "
                                          f"({call.varies}); a traced forward fixes those of its first call")], []
    if "forward" in module.__dict__:
        return None, [Skipped(name, None, "module skipped: its forward is replaced on the instance (module.forward = "
                                          "...); se_retrofit rewrites the class's forward, which this module does "
                                          "not run")], []
    if _defines_init_subclass(type(module)):
        return None, [Skipped(name, None, f"module skipped: {type(module).__name__}'s class hierarchy defines "
                                          "__init_subclass__, which the rewrite's generated subclass would run "
                                          "(class registries, required class arguments)")], []
    graphs: list[fx.Graph] = []
    traced: list[fx.Graph] = []  # every graph traced, a train graph kept or not: what they noted counts
    try:
        param_names, concrete = bind_call(module, call)
        if concrete:
            eval_graph, reads_training = trace_forward(module, concrete, param_names, training=False)
        else:
            eval_graph, reads_training = cached_trace(module)
        graphs.append(eval_graph)
        traced.append(eval_graph)
        fused = [Skipped(name, n.name, f"already has channel attention: SEBlock at '{n.target}' (doing the add)")
                 for n in fused_calls(eval_graph, module)]
        # a converted model's adds are quantized ops, not additions: they are looked for too
        quantized = [n for n, child in module.named_children() if catalog.is_quantization_functional(child)]
        if not tensor_adds(eval_graph) and not (quantized and _quantized_adds(eval_graph)):
            return None, fused, branch_calls(eval_graph, module, [], [])
        if quantized:
            return None, [Skipped(name, None, f"module skipped: its additions go through '{quantized[0]}', a "
                                              f"{type(getattr(module, quantized[0])).__name__} for eager-mode "
                                              "quantization, which turns them into quantized adds that an SE block "
                                              "would bypass; retrofit the float model instead (torchvision.models.NAME, "
                                              "not torchvision.models.quantization.NAME)")], []
        propagate_shapes(module, eval_graph, call, check_output=True)
        if reads_training:
            train_graph, _ = trace_forward(module, concrete, param_names, training=True)
            traced.append(train_graph)
            if train_graph.python_code("self").src != eval_graph.python_code("self").src:
                graphs.append(train_graph)
                propagate_shapes(module, train_graph, call, check_output=False)
    except TraceFailure as exc:
        reads = _state_read(traced)  # the likely cause of a graph that does not reproduce the output
        return None, [Skipped(name, None, _state_read_reason(reads) if reads else f"module skipped: {exc}")], []
    all_placements = []
    rejections = []
    for graph in graphs:
        layouts = layout.infer_layouts(graph, module)
        placed, rejected = analyze(graph, module, layouts, position, param_names)
        all_placements.append(placed)
        rejections.append(rejected)
    if len(graphs) == 2 and [p.signature() for p in all_placements[0]] != [p.signature() for p in all_placements[1]]:
        return None, [Skipped(name, None, "module skipped: its residual structure differs between train and eval mode")], []
    skipped = fused + [Skipped(name, r.add, r.reason) for r in rejections[0]]
    units = branch_calls(eval_graph, module, all_placements[0], rejections[0])
    if not all_placements[0]:
        return None, skipped, units
    # what the graph cannot keep, but only a module that would run it instead of its forward loses; such a
    # module's units still enclose what their branches run (`nesting`). The train graph counts even where its
    # code is the eval graph's: a checkpoint call or a state read made only in training leaves no trace in it.
    reads = _state_read(traced)
    if reads:
        return None, skipped + [Skipped(name, None, _state_read_reason(reads))], units
    if any(checkpoints(g) for g in traced):
        return None, skipped + [Skipped(name, None, _CHECKPOINT_REASON)], units
    return _BlockPlan(name, module, call, graphs, all_placements), skipped, units


def _reject_sites(block: _BlockPlan, plan: SitePlan, reasons: dict[str, str]) -> bool:
    """Move the block's sites named in ``reasons`` (add -> why) to ``plan.skipped``; False when none is left."""
    if not reasons:
        return True
    keep = [i for i, p in enumerate(block.placements[0]) if p.add not in reasons]
    plan.skipped.extend(Skipped(block.name, add, why) for add, why in reasons.items())
    block.placements = [[placed[i] for i in keep] for placed in block.placements]
    return bool(keep)


def _sites_beside_attention(model: nn.Module, block: _BlockPlan) -> dict[str, str]:
    """The block's sites whose sum the parent hands straight to channel attention."""
    beside = attention_after(model, block.name, block.module, block.graphs[0], [p.add for p in block.placements[0]])
    return {add: f"already has channel attention: {where} in the parent, on this module's output"
            for add, where in beside.items()}


def _sites_on_enclosing_branch(block: _BlockPlan, units: dict[str, list[frozenset[int]]]) -> dict[str, str]:
    """The block's linear sums, when another block's residual unit runs it on its branch (see `nesting`)."""
    if not any(p.linear for p in block.placements[0]) or on_a_branch(block.module, units) is None:
        return {}
    return {p.add: NESTED_REASON for p in block.placements[0] if p.linear}


def _defines_init_subclass(cls: type) -> bool:
    return any("__init_subclass__" in vars(k) for k in cls.__mro__ if k not in (nn.Module, object, typing.Generic))


def _uncalled_with_adds(name: str, module: nn.Module) -> Skipped | None:
    try:
        graph, _ = cached_trace(module)
    except TraceFailure:  # it was not run and cannot be traced: nothing more to learn about it
        return None
    if tensor_adds(graph):
        return Skipped(name, None, "module skipped: not run by the example forward, so its shapes are unknown")
    return None


def _plan(model: nn.Module, config: SEConfig, example_input: Any) -> tuple[SitePlan, list[_BlockPlan]]:
    clear_cache()
    candidates = {name: m for name, m in model.named_modules() if _is_candidate(m)}
    calls, used = capture_calls(model, candidates, example_input)
    plan = SitePlan(type(model).__name__, config, example_input=describe(*used))
    plan.skipped.extend(Skipped(name, None, _GRAPH_MODULE_REASON) for name, m in model.named_modules()
                        if isinstance(m, fx.GraphModule) and tensor_adds(m.graph))
    plan.skipped.extend(_compiled_with_adds(model))
    blocks: list[_BlockPlan] = []
    units: dict[str, list[frozenset[int]]] = {}  # block -> the modules each of its residual units runs on its branch
    try:
        for name, module in candidates.items():
            if name not in calls:
                skipped = _uncalled_with_adds(name, module)
                if skipped:
                    plan.skipped.append(skipped)
                continue
            block, skipped, units[name] = _trace_block(name, module, calls[name], config.position)
            plan.skipped.extend(skipped)
            if block is not None and _reject_sites(block, plan, _sites_beside_attention(model, block)):
                blocks.append(block)
    finally:
        clear_cache()
    _select(plan, blocks, config, units)
    return plan, blocks


def _select(plan: SitePlan, blocks: list[_BlockPlan], config: SEConfig, units: dict[str, list[frozenset[int]]]
            ) -> None:
    """Apply include/exclude, leave alone linear sums on a selected unit's branch, name the new modules, and
    fill ``plan.sites``; drops the blocks left without sites.

    Units of blocks that include/exclude leave out do not count: ``include="*.ghost1"`` asks for SE in
    the ghost modules rather than on the bottlenecks that run them.

    A pattern may name blocks whose residual unit already has channel attention (those of a model
    ``apply`` retrofitted before): they are no typo, and what the call then leaves alone is in the plan."""
    site_blocks = [b.name for b in blocks]
    gated = [s.block for s in plan.skipped if s.reason.startswith(_HAS_ATTENTION)]
    known = list(dict.fromkeys(site_blocks + gated))
    for option in ("include", "exclude"):
        for pattern in getattr(config, option) or ():
            if not any(_matches(n, [pattern]) for n in known):
                examples = ", ".join(repr(n) for n in known[:5]) or "none"
                raise ValueError(f"{option} pattern {pattern!r} matches no block with a residual site; "
                                 f"blocks with sites (or with channel attention already) are named like {examples}. "
                                 "Patterns are fnmatch patterns on module names ('layer3.*' or 'layer3').")

    def selected(name: str) -> bool:
        return (config.include is None or _matches(name, config.include)) and not (
            config.exclude is not None and _matches(name, config.exclude))

    live_units = {name: unit_list for name, unit_list in units.items() if selected(name)}
    kept = []
    for block in blocks:
        if not selected(block.name):
            plan.skipped.extend(Skipped(block.name, p.add, "excluded by include/exclude") for p in block.placements[0])
            continue
        if not _reject_sites(block, plan, _sites_on_enclosing_branch(block, live_units)):
            continue
        kept.append(block)
        taken: set[str] = set()
        for p in block.placements[0]:
            se_attr = free_name(block.module, taken)
            taken.add(se_attr)
            hidden = hidden_width(p.channels, config.reduction, config.divisor, config.min_hidden)
            se_name = f"{block.name}.{se_attr}" if block.name else se_attr
            plan.sites.append(Site(block.name, se_name, p.kind, p.shortcut, config.position, p.channels, hidden,
                                   p.spatial_dims, p.add))
    blocks[:] = kept


def _make_se(site: Site, config: SEConfig, like: nn.Module) -> SEBlock:
    se = SEBlock(site.channels, site.hidden, site.spatial_dims, gain=config.gain)
    if config.init == "identity":
        se.init_identity()
    se.train(like.training)  # a block in eval mode gets its SE in eval mode
    ref = next((t for t in list(like.parameters()) + list(like.buffers()) if t.is_floating_point()), None)
    if ref is not None:
        se.to(device=ref.device, dtype=ref.dtype)
    return se


def _verify(module: nn.Module, call: Call, identity: bool) -> str | None:
    """Run the rewritten block on its recorded input: same output under the identity init, same shapes otherwise.

    The block's buffers are put back afterwards: the model apply returns keeps them as they were.
    """
    from torch.utils._pytree import tree_flatten

    from .tracing import same_outputs

    args, kwargs = call.fresh_args()
    with preserved_modes(module), preserved_tensors(module), torch.no_grad():
        module.eval()
        try:
            out = module.forward(*args, **kwargs)  # as recorded: what forward saw and returned, hooks aside
        except Exception as exc:  # the rewrite broke the block: report it and undo
            return f"rewritten block fails: {first_line(exc)}"
    if identity:
        return None if same_outputs(out, call.output) else "rewritten block changes the output under the identity init"
    shapes = [tuple(t.shape) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
    expected = [tuple(t.shape) for t in tree_flatten(call.output)[0] if isinstance(t, torch.Tensor)]
    return None if shapes == expected else "rewritten block changes the output shape"


@_config_or_keywords
def find_sites(model: nn.Module, config: SEConfig | None = None, *, reduction: float = 16,
               init: str = "identity", position: str = "standard", include: str | Sequence[str] | None = None,
               exclude: str | Sequence[str] | None = None, example_input: Any = None) -> SitePlan:
    """Dry run of `apply`: where SE would go, and every addition left alone with the reason.

    The model is not modified (the analysis runs on a copy, since fx may attach constants to what it traces).
    """
    config = _resolve_config(config, dict(reduction=reduction, init=init, position=position,
                                          include=include, exclude=exclude))
    _check_model(model)
    work = _copy(model)
    with _TRACE_LOCK:
        plan, _ = _plan(work, config, example_input)
    return plan


@_config_or_keywords
def apply(model: nn.Module, config: SEConfig | None = None, *, reduction: float = 16, init: str = "identity",
          position: str = "standard", include: str | Sequence[str] | None = None,
          exclude: str | Sequence[str] | None = None, inplace: bool = False, example_input: Any = None
          ) -> nn.Module:
    """Insert an SE block on every residual branch of ``model``; return the retrofitted model.

    The model keeps its class, methods and every original state_dict entry (bit-identical); new
    parameters live under the blocks (``layer1.0.se.fc1.weight``). With ``init="identity"`` the
    outputs are unchanged until training moves the new weights. ``example_input`` is only needed
    when the model does not take a batch of images (it is found for timm, torchvision classifiers
    and detectors). With ``inplace=False`` (default) ``model`` itself is never touched. Called under
    ``torch.inference_mode()``, it still makes the copy and the new parameters as ordinary tensors,
    so the result trains. With ``inplace=True`` there is no copy: a model whose own weights are
    inference tensors (built or loaded under ``torch.inference_mode()``) keeps them, and its backward
    fails ("Inference tensors cannot be saved for backward"); retrofit such a model with
    ``inplace=False``, or build it outside inference mode.

    To find the residual additions and check each rewritten block, ``apply`` (as ``find_sites``) runs
    one eval-mode forward without gradients on a copy of ``example_input`` (the caller's tensors are
    never changed) or a random batch. A hook that collects activations or statistics into the user's
    objects sees that forward too. A buffer a forward updates even in eval mode (an EMA) is put back after
    each forward ``apply`` runs; a forward that writes a parameter in place raises RuntimeError. The
    returned model (``inplace=False``) is a deep copy, and so are its hooks: a plain function or closure
    still writes where it did, but a hook that is a bound method (``obj.hook``) is bound to a copy of its
    object, so ``obj`` sees nothing of the new model.
    Register such hooks on the model ``apply`` returns, after ``apply``.

    Calls of ``apply`` and `find_sites` from several threads take turns (one lock). Other code must not run
    forwards in other threads meanwhile: torch.fx replaces ``nn.Module.__call__`` process-wide while it
    traces, so such a forward would be recorded into the trace instead of run.

    Raises:
        ValueError: a bad option (naming it and the allowed values), an include/exclude pattern that
            matches nothing, no example input the model accepts, or options given both in ``config``
            and as keywords.
        TypeError: ``model`` is not an ``nn.Module``, or ``config`` is not an ``SEConfig``.
    """
    config = _resolve_config(config, dict(reduction=reduction, init=init, position=position,
                                          include=include, exclude=exclude))
    _check_model(model)
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be True or False, got {inplace!r}")
    previous = get_config(model) if any(isinstance(m, SEBlock) for m in model.modules()) else None
    # outside the caller's torch.inference_mode: the copy and the new parameters would be inference tensors,
    # which autograd refuses, and the retrofitted model could not train
    with _TRACE_LOCK, torch.inference_mode(False):
        target, plan, done = _retrofit(model, config, previous, inplace, example_input)
    if not done:
        reasons = "; ".join(f"{r} ({n}x)" for r, n in plan.reasons().most_common(4)) or _NO_ADDITIONS
        again = (" (it was already retrofitted; get_config and get_plan still describe that call; for SE in other "
                 "blocks or with other options, retrofit the original model)") if previous else ""
        # stacklevel 3: past the keyword check wrapping apply, to the caller's line
        warnings.warn(f"se_retrofit.apply: no SE block inserted into {type(model).__name__}{again}: {reasons}. "
                      "The model is returned unchanged.", SERetrofitWarning, stacklevel=3)
    logger.info("se_retrofit: %d SE block(s) inserted into %s, %d addition(s) left alone",
                len(done), type(model).__name__, len(plan.skipped))
    return target


def _retrofit(model: nn.Module, config: SEConfig, previous: SEConfig | None, inplace: bool, example_input: Any
              ) -> tuple[nn.Module, SitePlan, list[Site]]:
    """`apply`'s work: plan, insert and check the SE blocks; the model, its plan and the sites done."""
    target = model if inplace else _copy(model)
    constants = _tracer_constants(target)
    try:
        plan, blocks = _plan(target, config, example_input)
    except BaseException:  # a refused plan (a pattern matching nothing...) leaves no fx constant behind either
        _drop_unused_constants(target, constants)
        raise
    if previous is not None and plan.sites:
        _drop_unused_constants(target, constants)
        raise ValueError(_second_apply_message(model, previous, plan))
    sites = iter(plan.sites)
    done: list[Site] = []
    for block in blocks:
        block_sites = [next(sites) for _ in block.placements[0]]
        new = [(s.se_name.rsplit(".", 1)[-1], _make_se(s, config, block.module)) for s in block_sites]
        try:
            rewritten = rewrite_block(block.module, block.graphs, block.placements, new, config.fuse_add,
                                      config.early_squeeze)
        except Exception as exc:  # a failed splice leaves the block as it was; say why and go on
            plan.skipped.extend(Skipped(block.name, s.add, f"rewrite failed: {exc}") for s in block_sites)
            continue
        problem = _verify(block.module, block.call, config.init == "identity")
        if problem:
            rewritten.undo()
            plan.skipped.extend(Skipped(block.name, s.add, problem) for s in block_sites)
            continue
        for site, (attr, _) in zip(block_sites, new):
            site.fused_add = attr in rewritten.fused_add
            site.early_squeeze = attr in rewritten.early_squeeze
        done.extend(block_sites)
    plan.sites = done
    _drop_unused_constants(target, constants)
    if previous is None:  # a second call inserts nothing (above): the first call's record describes the model
        target._se_retrofit_plan = plan  # says why, also where nothing was inserted
        if done:  # a call that inserted nothing leaves no SE block: the model is not retrofitted (get_config None)
            setattr(target, CONFIG_ATTR, dataclasses.replace(config))  # its own: an edit of plan.config is the plan's
            target.__dict__[DIGESTS_ATTR] = tensor_digests(target, [s.se_name for s in done])
    return target, plan, done


def _quantized_adds(graph: fx.Graph) -> bool:
    """Whether ``graph`` calls a quantized add (``quantized::add``, ``add_relu``, ``add_scalar``...): what
    quantization's convert leaves of the additions of an eager-quantizable block."""
    return any(n.op == "call_function" and "quantized.add" in str(n.target) for n in graph.nodes)


def _tracer_constants(model: nn.Module) -> set[tuple[int, str]]:
    return {(id(m), key) for m in model.modules() for key in m.__dict__ if is_tracer_constant(key)}


def _drop_unused_constants(model: nn.Module, before: set[tuple[int, str]]) -> None:
    """Remove the tensor constants fx stored on modules it traced whose forward was not rewritten: only a
    rewritten forward reads them, and on the user's own model (``inplace=True``) they would be left behind."""
    for m in model.modules():
        if original_class(m) is type(m):
            for key in [k for k in m.__dict__ if is_tracer_constant(k) and (id(m), k) not in before]:
                delattr(m, key)


def _second_apply_message(model: nn.Module, previous: SEConfig, plan: SitePlan) -> str:
    names = [s.se_name for s in plan.sites]
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return (f"{type(model).__name__} was already retrofitted by se_retrofit.apply ({previous}); this call would add "
            f"{len(names)} more SE block(s) ({shown}) with options of its own, and the model would no longer be "
            "the result of one apply call, which get_config, save_adapter and load describe and rebuild. Retrofit "
            "the original model once, with include/exclude naming every block to get SE.")


def get_config(model: nn.Module) -> SEConfig | None:
    """A copy of the `SEConfig` that `apply` used on ``model``, or None if it was not retrofitted.

    A copy: the record describes the SE blocks the model holds, and `save_adapter` writes it for `load` to
    rebuild them; an edit to the returned object (``get_config(m).reduction = 4``) must not change it."""
    config = getattr(model, CONFIG_ATTR, None)
    return None if config is None else dataclasses.replace(config)


def get_plan(model: nn.Module) -> SitePlan | None:
    """The `SitePlan` of the `apply` call that produced ``model`` (what went where, what not)."""
    return getattr(model, "_se_retrofit_plan", None)
