"""The zoo sweep: run ``apply`` over every torchvision classifier and one model per timm family.

For each model it records whether it was built, what the analysis found, what was inserted, the
reasons for everything left alone, whether the identity-initialised model keeps its outputs, whether
it trains (a backward pass reaches the new blocks), and how long ``apply`` took. Failures are rows,
not crashes: the sweep exists to show users what happens to their model before they try it. A model
that was converted but fails one of the two checks is a row too, with its own status ("check
failed"): counting it as retrofitted would hide exactly what the checks are there to find.
"""
from __future__ import annotations

import json
import math
import time
import traceback
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from .api import apply, get_plan
from .capture import candidate_described
from .messages import first_line
from .models import create_model, parse_model_spec, unknown_model_message
from .se_block import se_blocks
from .testing import perturb_norms

IDENTITY_TOLERANCE = 1e-4
"""Largest output difference the identity init may cause; above it (or non-finite) the row's check failed."""

FAILING = ("failed", "check failed")
"""Statuses that make ``se-retrofit coverage`` exit 1: an error, or a model whose checks failed."""


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C during a sweep, carrying the rows finished before it.

    A full sweep takes most of an hour; the caller still writes, and totals, what was done.
    """

    def __init__(self, rows: list[CoverageRow]) -> None:
        super().__init__(f"interrupted after {len(rows)} models")
        self.rows = rows

    def __reduce__(self) -> tuple[type, tuple[list[CoverageRow]]]:
        # Exceptions pickle as ``cls(*args)``, and ``args`` holds the message, not the rows.
        return type(self), (self.rows,)


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
    check_failed: str | None = None

    @property
    def status(self) -> str:
        """failed (an error), check failed (identity or backward check), retrofitted, or unchanged.

        The checks are looked at here too, not only through ``check_failed``, so a row built by hand
        or read from an older JSON file cannot pass as retrofitted with a failed check.
        """
        if self.error:
            return "failed"
        if self.check_failed or failed_checks(self):
            return "check failed"
        return "retrofitted" if self.inserted else "unchanged"


def failed_checks(row: CoverageRow) -> str | None:
    """What went wrong with the row's measurements, or None when both checks passed or were not run.

    A non-finite difference fails too: NaN compares False with any tolerance, so it would otherwise pass.
    """
    problems = []
    diff = row.identity_max_diff
    if diff is not None and not (math.isfinite(diff) and diff <= IDENTITY_TOLERANCE):
        problems.append(f"identity check: max output difference {diff:.1e} "
                        f"(must be finite and at most {IDENTITY_TOLERANCE:.0e})")
    if row.backward_ok is False:
        problems.append("backward check: a new SE block got no gradient")
    return "; ".join(problems) or None


def resolve_models(specs: Iterable[str]) -> list[tuple[str, str, str]]:
    """(zoo, family, name) for each of the user's ``--models``, every name checked before any model is.

    Names go through ``parse_model_spec``, as in ``sites`` and ``report``, so ``timm:NAME`` works. A
    misspelt name is the user's mistake, not a library failure: it must stop the command at once with
    a hint, not become a "failed" row after the models before it took minutes.
    """
    resolved, unknown = [], []
    for spec in specs:
        zoo, name = parse_model_spec(spec)
        message = unknown_model_message(zoo, name)
        if message:
            unknown.append(message)
        resolved.append((zoo, "-", name))
    if unknown:
        raise ValueError(" ".join(unknown))
    return resolved


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


def timm_models() -> Iterator[tuple[str, str]]:
    """(family, name): the smallest model (by parameter count, counted on the meta device) of each timm module.

    A generator, in ``timm.list_modules()`` order: finding a family's smallest model builds all of its
    models on the meta device, about 14 minutes for the whole of timm, so each family is counted only
    when the sweep reaches it. ``--limit N`` then costs N families, and the first row comes at once.
    """
    import timm

    for module in timm.list_modules():
        names = timm.list_models(module=module)
        if not names:
            continue
        counted = [(c, n) for n in names if (c := _param_count_meta(n)) is not None]
        yield module, min(counted)[1] if counted else names[0]


def _build(zoo: str, name: str) -> nn.Module:
    """Build through ``models.create_model``, as every command does (random weights, no backbone download)."""
    return create_model(f"{zoo}:{name}", pretrained=False)


def _tensors(value: Any) -> list[torch.Tensor]:
    flat, _ = tree_flatten(value)
    return [t for t in flat if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _max_diff(a: Any, b: Any) -> float:
    ta, tb = _tensors(a), _tensors(b)
    if len(ta) != len(tb) or any(x.shape != y.shape for x, y in zip(ta, tb)):
        return float("inf")
    # an empty output (a detector that found nothing) has no difference; max() of it would raise
    return max((float((x - y).abs().max()) for x, y in zip(ta, tb) if x.numel()), default=0.0)


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
        row.skipped = dict(plan.reasons())
        args, kwargs = candidate_described(model, plan.example_input)
        se_model.eval()
        with torch.no_grad():
            row.identity_max_diff = _max_diff(model(*args, **kwargs), se_model(*args, **kwargs))
        if row.inserted:
            row.backward_ok = _backward_ok(se_model, args, kwargs)
        row.check_failed = failed_checks(row)
    except Exception as exc:  # the sweep reports failures instead of stopping on them
        row.error = first_line(exc, 300)
        row.error += " | " + traceback.format_exc().strip().splitlines()[-3].strip()[:200]
    return row


def _backward_ok(model: nn.Module, args: tuple, kwargs: dict) -> bool | None:
    """Does a backward pass reach every SE block (a non-zero gradient on the bias of its last layer)?

    None (not checked) when the outputs hold no element to differentiate, as a random-weight
    detector's empty detections do: no gradient then says nothing about the blocks.

    The bias, not the weight: under the identity init the weight's gradient is the outer product of
    the gate's gradient and the hidden ReLU's output, and on two near-identical example images all of
    a narrow block's hidden units can be inactive (seen on random-weight fastvit_t8 and
    efficientformerv2_s0 in some runs), which says nothing about whether the block is wired in.
    Run in eval mode: in train mode stochastic depth may drop a whole branch for a small batch, and a
    dropped branch rightly gets no gradient. The train-mode graph is checked by the tests instead.
    """
    model.eval()
    try:
        outs = [t for t in _tensors(model(*args, **kwargs)) if t.numel()]
        if not outs:
            return None
        gen = torch.Generator().manual_seed(0)
        loss = sum((t.float() * torch.randn(t.shape, generator=gen)).sum() for t in outs)
        loss.backward()
        return all(se.fc2.weight.grad is not None and se.fc2.bias.grad is not None
                   and bool(se.fc2.bias.grad.abs().sum() > 0) for _, se in se_blocks(model))
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def run(models: Iterable[tuple[str, str, str]], out: Path | None = None, log: Any = None) -> list[CoverageRow]:
    """Check every (zoo, family, name); with ``out``, rewrite the JSON after each model so a long sweep keeps its rows.

    Ctrl-C raises ``SweepInterrupted`` with the rows finished so far, for the caller to write.
    """
    rows: list[CoverageRow] = []
    try:
        for zoo, family, name in models:
            row = check_model(zoo, family, name)
            rows.append(row)
            if log is not None:
                diff = "-" if row.identity_max_diff is None else f"{row.identity_max_diff:.1e}"
                print(f"{zoo:<12}{name:<40}{row.status:<12} SE {row.inserted:>3}  diff {diff:<8} "
                      f"{row.error or row.check_failed or ''}", file=log, flush=True)
            if out is not None:
                write_json(rows, out)
    except KeyboardInterrupt as exc:
        raise SweepInterrupted(rows) from exc
    return rows


def to_json(rows: list[CoverageRow]) -> str:
    """The rows as strict JSON, a non-finite float (a NaN or infinite identity difference) written as null.

    ``json.dumps`` would otherwise write the bare tokens ``NaN`` / ``Infinity``, which jq, JavaScript
    and other strict parsers reject; the row's ``check_failed`` keeps the value as text.
    """
    data = [{k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in asdict(r).items()}
            for r in rows]
    return json.dumps(data, indent=1, allow_nan=False) + "\n"


def write_json(rows: list[CoverageRow], path: Path) -> None:
    path.write_text(to_json(rows))


def totals(rows: list[CoverageRow]) -> dict[str, dict[str, int]]:
    """Rows per status, per zoo (in the order the zoos first appear)."""
    result: dict[str, dict[str, int]] = {}
    for r in rows:
        zoo = result.setdefault(r.zoo, {"retrofitted": 0, "unchanged": 0, "failed": 0, "check failed": 0})
        zoo[r.status] += 1
    return result


def totals_line(counts: dict[str, int]) -> str:
    """One zoo's totals as text; "check failed" only when there are such rows, so pages without any read as before."""
    text = f"{counts['retrofitted']} retrofitted, {counts['unchanged']} unchanged, {counts['failed']} failed"
    return text + (f", {counts['check failed']} check failed" if counts["check failed"] else "")


def to_markdown(rows: list[CoverageRow]) -> str:
    """The docs page: totals per zoo, then one table per zoo, sorted by family."""
    lines = ["# Model coverage", "",
             "Generated by `se-retrofit coverage` (random weights with perturbed norm statistics, "
             "`init=\"identity\"`, default options). *retrofitted*: SE inserted; *unchanged*: returned "
             "as it was, with the reasons; *failed*: an error (a bug to fix)." + _check_failed_legend(rows), ""]
    for zoo, t in totals(rows).items():
        lines.append(f"- **{zoo}**: {totals_line(t)}")
    for zoo in sorted({r.zoo for r in rows}):
        lines += ["", f"## {zoo}", "", "| family | model | status | SE | max diff | backward | apply s | left alone (reason: count) |",
                  "|---|---|---|---:|---:|---|---:|---|"]
        for r in sorted((r for r in rows if r.zoo == zoo), key=lambda r: (r.family, r.model)):
            diff = "" if r.identity_max_diff is None else f"{r.identity_max_diff:.1e}"
            back = "" if r.backward_ok is None else ("ok" if r.backward_ok else "**no**")
            secs = "" if r.apply_s is None else f"{r.apply_s:.2f}"
            lines.append(f"| {r.family} | `{r.model}` | {r.status} | {r.inserted} | {diff} | {back} | {secs} | {_why(r)} |")
    return "\n".join(lines) + "\n"


def _check_failed_legend(rows: list[CoverageRow]) -> str:
    """The legend entry for *check failed*, on pages that have such rows (the others read as before)."""
    if not any(r.status == "check failed" for r in rows):
        return ""
    return (f" *check failed*: built and run, but the identity-init output difference is above "
            f"{IDENTITY_TOLERANCE:.0e} or not finite, or a new SE block got no gradient (a bug to fix).")


def _why(row: CoverageRow) -> str:
    """The last column: the error, or the failed check and the reasons for what was left alone.

    A ``|`` in the text would split the cell (an error always holds one, before its traceback line),
    so it is escaped.
    """
    reasons = "; ".join(f"{k.replace('|', '/')}: {v}" for k, v in sorted(row.skipped.items()))
    text = row.error or "; ".join(t for t in (row.check_failed or failed_checks(row), reasons) if t)
    return text.replace("|", "\\|")
