"""The zoo sweep: run ``apply`` over every torchvision classifier and one model per timm family.

For each model it records whether it was built, what the analysis found, what was inserted, the
reasons for everything left alone, whether the identity-initialised model keeps its outputs, whether
it trains (a backward pass reaches the new blocks), and how long ``apply`` took. Failures are rows,
not crashes: the sweep exists to show users what happens to their model before they try it.
"""
from __future__ import annotations

import json
import time
import traceback
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from .api import apply, get_plan
from .se_block import se_blocks
from .testing import perturb_norms


@dataclass
class CoverageRow:
    zoo: str
    family: str
    model: str
    built: bool = False
    sites: int = 0
    inserted: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    identity_max_diff: float | None = None
    backward_ok: bool | None = None
    apply_s: float | None = None
    example_input: str = ""
    error: str | None = None

    @property
    def status(self) -> str:
        if self.error:
            return "failed"
        return "retrofitted" if self.inserted else "unchanged"


def torchvision_models() -> list[tuple[str, str]]:
    """(family, name) for every torchvision classifier; the family is the defining module."""
    import torchvision

    out = []
    for name in torchvision.models.list_models(module=torchvision.models):
        fn = torchvision.models.get_model_builder(name)
        out.append((fn.__module__.rsplit(".", 1)[-1], name))
    return out


def _param_count_meta(name: str) -> int | None:
    import timm

    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
    except Exception:  # a model that cannot be built on the meta device is ranked last
        return None
    return sum(p.numel() for p in model.parameters())


def timm_models() -> list[tuple[str, str]]:
    """(family, name): the smallest model (by parameter count, counted on the meta device) of each timm module."""
    import timm

    out = []
    for module in timm.list_modules():
        names = timm.list_models(module=module)
        if not names:
            continue
        counted = [(c, n) for n in names if (c := _param_count_meta(n)) is not None]
        out.append((module, min(counted)[1] if counted else names[0]))
    return out


def _build(zoo: str, name: str) -> nn.Module:
    if zoo == "torchvision":
        import torchvision

        return torchvision.models.get_model(name, weights=None)
    import timm

    return timm.create_model(name, pretrained=False)


def _tensors(value: Any) -> list[torch.Tensor]:
    flat, _ = tree_flatten(value)
    return [t for t in flat if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _max_diff(a: Any, b: Any) -> float:
    ta, tb = _tensors(a), _tensors(b)
    if len(ta) != len(tb) or any(x.shape != y.shape for x, y in zip(ta, tb)):
        return float("inf")
    return max((float((x - y).abs().max()) for x, y in zip(ta, tb)), default=0.0)


def check_model(zoo: str, family: str, name: str) -> CoverageRow:
    """Retrofit one model and measure it; every exception becomes the row's ``error``.

    Runs under a fixed seed (the new blocks' initialisation), so a sweep gives the same rows run after
    run, without touching the caller's random state.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return _check_model(zoo, family, name)


def _check_model(zoo: str, family: str, name: str) -> CoverageRow:
    row = CoverageRow(zoo, family, name)
    try:
        model = perturb_norms(_build(zoo, name)).eval()
        row.built = True
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            se_model = apply(model)
        row.apply_s = time.perf_counter() - start
        plan = get_plan(se_model)
        row.example_input = plan.example_input
        row.inserted = len(se_blocks(se_model))
        row.sites = len(plan.sites)
        row.skipped = dict(Counter(s.reason for s in plan.skipped))
        args, kwargs = plan.example_args
        se_model.eval()
        with torch.no_grad():
            row.identity_max_diff = _max_diff(model(*args, **kwargs), se_model(*args, **kwargs))
        if row.inserted:
            row.backward_ok = _backward_ok(se_model, args, kwargs)
    except Exception as exc:  # the sweep reports failures instead of stopping on them
        row.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        row.error += " | " + traceback.format_exc().strip().splitlines()[-3].strip()[:200]
    return row


def _backward_ok(model: nn.Module, args: tuple, kwargs: dict) -> bool:
    """Does a backward pass reach every SE block (a non-zero gradient on the bias of its last layer)?

    The bias, not the weight: under the identity init the weight's gradient is the outer product of
    the gate's gradient and the hidden ReLU's output, and on two near-identical example images all of
    a narrow block's hidden units can be inactive (seen on random-weight fastvit_t8 and
    efficientformerv2_s0 in some runs), which says nothing about whether the block is wired in.
    Run in eval mode: in train mode stochastic depth may drop a whole branch for a small batch, and a
    dropped branch rightly gets no gradient. The train-mode graph is checked by the tests instead.
    """
    model.eval()
    try:
        outs = _tensors(model(*args, **kwargs))
        if not outs:
            return False
        gen = torch.Generator().manual_seed(0)
        loss = sum((t.float() * torch.randn(t.shape, generator=gen)).sum() for t in outs)
        loss.backward()
        return all(se.fc2.weight.grad is not None and se.fc2.bias.grad is not None
                   and bool(se.fc2.bias.grad.abs().sum() > 0) for _, se in se_blocks(model))
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def run(models: Iterable[tuple[str, str, str]], out: Path | None = None, log: Any = None) -> list[CoverageRow]:
    """Check every (zoo, family, name); with ``out``, rewrite the JSON after each model so a long sweep keeps its rows."""
    rows: list[CoverageRow] = []
    for zoo, family, name in models:
        row = check_model(zoo, family, name)
        rows.append(row)
        if log is not None:
            diff = "-" if row.identity_max_diff is None else f"{row.identity_max_diff:.1e}"
            print(f"{zoo:<12}{name:<40}{row.status:<12} SE {row.inserted:>3}  diff {diff:<8} "
                  f"{row.error or ''}", file=log, flush=True)
        if out is not None:
            out.write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")
    return rows


def totals(rows: list[CoverageRow]) -> dict[str, dict[str, int]]:
    result: dict[str, dict[str, int]] = {}
    for r in rows:
        zoo = result.setdefault(r.zoo, {"retrofitted": 0, "unchanged": 0, "failed": 0})
        zoo[r.status] += 1
    return result


def to_markdown(rows: list[CoverageRow]) -> str:
    """The docs page: totals per zoo, then one table per zoo, sorted by family."""
    lines = ["# Model coverage", "",
             "Generated by `se-retrofit coverage` (random weights with perturbed norm statistics, "
             "`init=\"identity\"`, default options). *retrofitted*: SE inserted; *unchanged*: returned "
             "as it was, with the reasons; *failed*: an error (a bug to fix).", ""]
    for zoo, t in totals(rows).items():
        lines.append(f"- **{zoo}**: {t['retrofitted']} retrofitted, {t['unchanged']} unchanged, {t['failed']} failed")
    for zoo in sorted({r.zoo for r in rows}):
        lines += ["", f"## {zoo}", "", "| family | model | status | SE | max diff | backward | apply s | left alone (reason: count) |",
                  "|---|---|---|---:|---:|---|---:|---|"]
        for r in sorted((r for r in rows if r.zoo == zoo), key=lambda r: (r.family, r.model)):
            diff = "" if r.identity_max_diff is None else f"{r.identity_max_diff:.1e}"
            back = "" if r.backward_ok is None else ("ok" if r.backward_ok else "**no**")
            secs = "" if r.apply_s is None else f"{r.apply_s:.2f}"
            why = r.error or "; ".join(f"{k.replace('|', '/')}: {v}" for k, v in sorted(r.skipped.items()))
            lines.append(f"| {r.family} | `{r.model}` | {r.status} | {r.inserted} | {diff} | {back} | {secs} | {why} |")
    return "\n".join(lines) + "\n"
