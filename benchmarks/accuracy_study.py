"""Transfer accuracy: does retrofitting a trained CNN with SE and fine-tuning it beat fine-tuning the original?

    python benchmarks/accuracy_study.py [--seeds 3] [--epochs 10] [--base-epochs 10] [--quick]

The data is scikit-learn's bundled 8x8 handwritten digits (no download), upscaled to 32x32, one channel.
Per seed, a small timm ResNet (``resnet10t`` at half width, random init) is trained on digits 0-4; it
then gets a new 5-way head and is adapted to digits 5-9 in six ways, all with the same number of
epochs, the same data order and augmentation, and the same new head:

1. ``base, all``: the base model, every parameter trains;
2. ``SE identity, all``: ``se_retrofit.apply(init="identity")``, then every parameter trains;
3. ``SE paper, all``: ``se_retrofit.apply(init="paper")``, then every parameter trains;
4. ``SE identity, se``: identity retrofit, only the SE blocks and the head train (``train="se"``);
5. ``SE paper, se``: the same with the paper's initialisation;
6. ``base, head``: the base model, only the head trains (a linear probe: the fair partner of 4 and 5).

Arms 1-3 share one learning rate (``--lr-all``), arms 4-6 another (``--lr-new``). The trainable set
and frozen batch norms are those of ``se_retrofit.finetune`` (``se_retrofit.training.freeze``), but
the loop is a small one in this file: ``finetune`` has no head-only mode for a model without SE, and
one loop for all six arms keeps them comparable. The 5-9 data is split once, stratified, with
``--split-seed``; the test half is never used for any choice, and the number reported is the last
epoch's, not the best one.

Step 0 is checked as well: the identity-retrofitted model must give exactly (``torch.equal``) the
logits of the model it was made from, on the 0-4 test images (the base model's own head) and on the
5-9 test images (the new head).

Writes ``benchmarks/results/accuracy_study.json``, ``docs/generated/accuracy_study.png`` and
``docs/generated/accuracy_study.md``; ``--render-only`` rewrites the last two from the JSON without
training. ``--quick`` (1 seed, 2 + 2 epochs, a few minutes less) writes
them to a temporary folder instead, unless ``--out`` says where, so a smoke run never replaces the
committed study.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from _common import RESULTS, machine
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import se_retrofit
from se_retrofit.training.freeze import (
    freeze_batchnorm,
    new_parameter_names,
    parameter_groups,
    set_trainable,
)

REPO = Path(__file__).resolve().parents[1]
GENERATED = REPO / "docs" / "generated"
NAME = "accuracy_study"

MODEL = "resnet10t"
# Half of resnet10t's widths: about 3x faster per step on a CPU, and still far more capacity than
# 8x8 digits need. One input channel (the digits are grey).
MODEL_KWARGS = {"in_chans": 1, "channels": (32, 64, 128, 256), "stem_width": 16}
IMAGE_SIZE = 32
SHIFT = IMAGE_SIZE // 8          # training augmentation: random shift of up to 4 px (as se_retrofit.data)
LABEL_SMOOTHING = 0.1            # the finetune default
WEIGHT_DECAY = 0.05              # the finetune default for AdamW; none on biases and norm weights
REDUCTION = 16

# (key, label, init or None for no SE, train mode, learning-rate group)
ARMS = [
    ("base_all", "base, all", None, "all", "all"),
    ("se_identity_all", "SE identity, all", "identity", "all", "all"),
    ("se_paper_all", "SE paper, all", "paper", "all", "all"),
    ("se_identity_se", "SE identity, se (SE + head)", "identity", "se", "new"),
    ("se_paper_se", "SE paper, se (SE + head)", "paper", "se", "new"),
    ("base_head", "base, head only (linear probe)", None, "head", "new"),
]
# Each arm against the arm it should be judged against (same trainable backbone, same learning rate).
PAIRS = [("se_identity_all", "base_all"), ("se_paper_all", "base_all"), ("se_identity_se", "base_head"),
         ("se_paper_se", "base_head")]


# ------------------------------------------------------------------------------------------- data

def load_data(split_seed: int) -> dict[str, torch.Tensor]:
    """Digits 0-4 (base task) and 5-9 (transfer task, relabelled 0-4), each split in train/test, stratified."""
    digits = load_digits()
    pixels = torch.from_numpy(digits.images).float().div(16).unsqueeze(1)
    images = F.interpolate(pixels, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False).clamp(0, 1)
    targets = torch.from_numpy(digits.target).long()
    data = {}
    for task, (low, test_size) in {"base": (0, 0.2), "transfer": (5, 0.5)}.items():
        idx = torch.nonzero((targets >= low) & (targets < low + 5)).flatten().numpy()
        train_idx, test_idx = train_test_split(idx, test_size=test_size, random_state=split_seed,
                                               stratify=targets[idx].numpy())
        for part, part_idx in (("train", np.sort(train_idx)), ("test", np.sort(test_idx))):
            data[f"{task}_{part}_x"] = images[part_idx]
            data[f"{task}_{part}_y"] = targets[part_idx] - low
    mean, std = data["base_train_x"].mean(), data["base_train_x"].std()  # statistics of the base task only
    for key in [k for k in data if k.endswith("_x")]:
        data[key] = (data[key] - mean) / std
    return data


def shifted(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Each image moved by up to SHIFT pixels in each direction (zero background after normalising)."""
    size = x.shape[-1]
    background = x.amin()
    padded = F.pad(x, (SHIFT,) * 4, value=float(background))
    offsets = torch.randint(0, 2 * SHIFT + 1, (len(x), 2), generator=gen).tolist()
    return torch.stack([padded[i, :, top:top + size, left:left + size] for i, (top, left) in enumerate(offsets)])


# ------------------------------------------------------------------------------------------ model

def make_model(num_classes: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(MODEL, pretrained=False, num_classes=num_classes, **MODEL_KWARGS)


def retrofit(model: torch.nn.Module, init: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)  # the paper init draws the SE weights
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # The one-channel stem rejects apply's default RGB probe, so pass an example input.
        return se_retrofit.apply(model, reduction=REDUCTION, init=init,
                                 example_input=torch.zeros(2, 1, IMAGE_SIZE, IMAGE_SIZE))


@torch.no_grad()
def logits_of(model: torch.nn.Module, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)])


@torch.no_grad()
def gate_stats(model: torch.nn.Module, x: torch.Tensor) -> dict[str, float] | None:
    """Mean and spread of the SE gates (every block, channel and image): identity is exactly 1 +- 0."""
    blocks = se_retrofit.se_blocks(model)
    if not blocks:
        return None
    gates: list[torch.Tensor] = []
    hooks = [block.fc2.register_forward_hook(lambda mod, inp, out, b=block: gates.append(b.gain * torch.sigmoid(out)))
             for _, block in blocks]
    try:
        logits_of(model, x)
    finally:
        for hook in hooks:
            hook.remove()
    values = torch.cat([g.flatten() for g in gates])
    return {"mean": values.mean().item(), "std": values.std().item(), "min": values.min().item(),
            "max": values.max().item()}


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return 100.0 * (logits.argmax(1) == y).float().mean().item()


# --------------------------------------------------------------------------------------- training

def train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, mode: str, epochs: int, lr: float,
          batch_size: int, seed: int, test: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
    """AdamW, linear warm-up over the first 10% of steps then cosine to 0; returns per-epoch test accuracy.

    ``mode`` is "all" (every parameter), "se" (SE blocks + head) or "head" (head only; on a model
    without SE blocks the "new" parameters are exactly the head). Frozen batch norms stay in eval mode.
    """
    new = new_parameter_names(model)
    backbone = mode == "all"
    n_trainable_tensors = set_trainable(model, new, backbone=backbone)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    groups = parameter_groups(model, new, "all" if backbone else "se", WEIGHT_DECAY, 1.0)
    optimizer = torch.optim.AdamW(groups, lr=lr)
    steps_per_epoch = -(-len(x) // batch_size)
    total = epochs * steps_per_epoch
    warmup = max(1, total // 10)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + np.cos(np.pi * (step - warmup) / max(1, total - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    gen = torch.Generator().manual_seed(seed)  # data order and augmentation: identical for every arm of a seed
    history = [accuracy(logits_of(model, test[0]), test[1])] if test is not None else []
    losses = []
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        if not backbone:
            freeze_batchnorm(model)
        order = torch.randperm(len(x), generator=gen)
        epoch_loss = 0.0
        for i in range(0, len(x), batch_size):
            idx = order[i:i + batch_size]
            loss = F.cross_entropy(model(shifted(x[idx], gen)), y[idx], label_smoothing=LABEL_SMOOTHING)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            epoch_loss += loss.item() * len(idx)
        losses.append(epoch_loss / len(x))
        if test is not None:
            history.append(accuracy(logits_of(model, test[0]), test[1]))
    return {"test_acc": history, "train_loss": losses, "seconds": time.perf_counter() - start,
            "trainable_params": trainable, "trainable_tensors": n_trainable_tensors, "steps": total}


# ------------------------------------------------------------------------------------------- study

def run_seed(seed: int, data: dict[str, torch.Tensor], args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    base = make_model(5, seed)
    base_run = train(base, data["base_train_x"], data["base_train_y"], mode="all", epochs=args.base_epochs,
                     lr=args.lr_base, batch_size=args.batch_size, seed=seed)
    base_test = (data["base_test_x"], data["base_test_y"])
    base_logits = logits_of(base, base_test[0])
    out = {"seed": seed, "base": {"train_loss": base_run["train_loss"], "seconds": base_run["seconds"],
                                  "params": sum(p.numel() for p in base.parameters()),
                                  "test_acc_0_4": accuracy(base_logits, base_test[1])}}

    # Step 0 on the base task (the base model's own 0-4 head): identity must change nothing.
    checks = {}
    for init in ("identity", "paper"):
        se = retrofit(base, init, seed + 2000)
        se_logits = logits_of(se, base_test[0])
        checks[f"base_task_{init}"] = {
            "logits_equal": bool(torch.equal(se_logits, base_logits)),
            "max_abs_diff": (se_logits - base_logits).abs().max().item(),
            "test_acc_0_4": accuracy(se_logits, base_test[1]),
            "se_blocks": len(se_retrofit.se_blocks(se)),
            "se_params": sum(p.numel() for p in se.parameters()) - out["base"]["params"]}

    # The transfer starting point: the base backbone with a fresh 5-way head, the same for every arm.
    start = copy.deepcopy(base)
    torch.manual_seed(seed + 1000)
    start.reset_classifier(5)
    test = (data["transfer_test_x"], data["transfer_test_y"])
    start_logits = logits_of(start, test[0])

    arms = {}
    for key, label, init, mode, lr_group in ARMS:
        model = retrofit(start, init, seed + 2000) if init else copy.deepcopy(start)
        if init == "identity":
            step0 = logits_of(model, test[0])
            checks[f"transfer_task_{key}"] = {"logits_equal": bool(torch.equal(step0, start_logits)),
                                              "max_abs_diff": (step0 - start_logits).abs().max().item()}
        lr = args.lr_all if lr_group == "all" else args.lr_new
        run = train(model, data["transfer_train_x"], data["transfer_train_y"], mode=mode, epochs=args.epochs,
                    lr=lr, batch_size=args.batch_size, seed=seed + 3000, test=test)
        preds = logits_of(model, test[0]).argmax(1)
        arms[key] = {"label": label, "init": init, "train": mode, "lr": lr, **run,
                     "gates_after": gate_stats(model, test[0]), "_preds": preds}
        print(f"  seed {seed} {label:<32} step 0 {run['test_acc'][0]:6.2f}%  after {args.epochs} epochs "
              f"{run['test_acc'][-1]:6.2f}%  ({run['seconds']:.0f}s)", flush=True)
    for key, ref in PAIRS:  # how many test predictions the SE arm changed relative to its partner
        arms[key]["predictions_differing_from"] = {
            "arm": ref, "count": int((arms[key]["_preds"] != arms[ref]["_preds"]).sum())}
    for arm in arms.values():
        del arm["_preds"]
    out.update(checks=checks, arms=arms, seconds=time.perf_counter() - t0)
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def pm(values: list[float], digits: int = 1) -> str:
    mean, std = mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def paired_p_value(diffs: list[float]) -> float | None:
    """Two-sided paired t-test of the per-seed differences against 0 (None: fewer than 2 seeds or no spread)."""
    from scipy import stats

    if len(diffs) < 2 or statistics.stdev(diffs) == 0:
        return None
    return float(stats.ttest_1samp(diffs, 0.0).pvalue)


def summarise(seeds: list[dict]) -> dict:
    summary = {}
    for key, label, *_ in ARMS:
        finals = [s["arms"][key]["test_acc"][-1] for s in seeds]
        starts = [s["arms"][key]["test_acc"][0] for s in seeds]
        summary[key] = {"label": label, "final": finals, "step0": starts,
                        "final_mean_std": mean_std(finals), "step0_mean_std": mean_std(starts),
                        "trainable_params": seeds[0]["arms"][key]["trainable_params"]}
    for key, ref in PAIRS:
        diffs = [s["arms"][key]["test_acc"][-1] - s["arms"][ref]["test_acc"][-1] for s in seeds]
        summary[key]["vs"] = {"arm": ref, "diff": diffs, "diff_mean_std": mean_std(diffs),
                              "p_value": paired_p_value(diffs)}
    return summary


# ------------------------------------------------------------------------------------------ output

def verdict(result: dict) -> list[str]:
    """One sentence per comparison, computed from the numbers (no judgement typed in by hand)."""
    summary, seeds = result["summary"], result["seeds"]
    n = len(seeds)
    lines = []
    for key, ref in PAIRS:
        vs = summary[key]["vs"]
        diffs = vs["diff"]
        mean, std = vs["diff_mean_std"]
        changed = [s["arms"][key]["predictions_differing_from"]["count"] for s in seeds]
        if all(c == 0 for c in changed):
            call = "the same accuracy on every seed: the SE blocks changed no test prediction"
        elif all(d == 0 for d in diffs):
            call = "the same accuracy on every seed"
        else:
            higher, lower = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
            call = f"higher on {higher} of {n} seed(s), lower on {lower}"
            if vs["p_value"] is not None:
                significant = vs["p_value"] < 0.05
                call += (f"; paired t-test p = {vs['p_value']:.2g}, "
                         + ("a difference at the 5% level" if significant
                            else f"not a significant difference at the 5% level with {n} seeds"))
            elif n < 2:
                call += "; one seed, so no test of significance"
        lines.append(f"- **{summary[key]['label']}** vs **{summary[ref]['label']}**: "
                     f"{mean:+.1f} ± {std:.1f} pp; {call}.")
    return lines


def markdown(result: dict) -> str:
    cfg, seeds, summary = result["config"], result["seeds"], result["summary"]
    n = len(seeds)
    m = result["machine"]
    lines = [f"<!-- Generated by benchmarks/{NAME}.py; do not edit by hand. -->", ""]
    lines.append(f"Test accuracy (%) on digits 5-9 ({cfg['transfer_test']} held-out images), after "
                 f"{cfg['epochs']} epochs of {cfg['transfer_steps_per_epoch']} steps on {cfg['transfer_train']} "
                 f"training images; mean ± sample standard deviation over {n} seed(s) "
                 f"({', '.join(str(s['seed']) for s in seeds)}). Step 0 is the model before any transfer "
                 "training (a fresh, random 5-way head: chance is 20%). Δ is the paired per-seed difference to "
                 "the arm in brackets.")
    lines += ["", "| Arm | Trains | Trainable params | LR | Step 0 | After training | Δ (paired) | Per seed |",
              "| --- | --- | --: | --: | --: | --: | --: | --: |"]
    for key, label, init, mode, _ in ARMS:
        s = summary[key]
        vs = s.get("vs")
        delta = f"{pm(vs['diff'])} (vs {vs['arm']})" if vs else "—"
        trains = {"all": "everything", "se": "SE blocks + head", "head": "head only"}[mode]
        lines.append(f"| {label} | {trains} | {s['trainable_params']:,} | {seeds[0]['arms'][key]['lr']:g} | "
                     f"{pm(s['step0'])} | **{pm(s['final'])}** | {delta} | "
                     f"{', '.join(f'{v:.1f}' for v in s['final'])} |")
    lines += ["", "What the numbers say (computed by the script):", ""] + verdict(result)

    lines += ["", ("What the SE blocks did by the end (gates `gain * sigmoid(...)` over every block, channel and "
                   "5-9 test image; the identity init starts at exactly 1 ± 0, the paper init near 0.5), and how "
                   "many test predictions differ from the partner arm's:"), "",
              "| Arm | Gate mean | Gate std | Gate range | Test predictions changed |", "| --- | --: | --: | --: | --: |"]
    for key, ref in PAIRS:
        gates = [s["arms"][key]["gates_after"] for s in seeds]
        changed = [s["arms"][key]["predictions_differing_from"]["count"] for s in seeds]
        lines.append(f"| {summary[key]['label']} | {pm([g['mean'] for g in gates], 3)} | "
                     f"{pm([g['std'] for g in gates], 3)} | {min(g['min'] for g in gates):.2f} to "
                     f"{max(g['max'] for g in gates):.2f} | {pm(changed)} of {cfg['transfer_test']} "
                     f"(vs {ref}) |")

    eq_base = all(s["checks"]["base_task_identity"]["logits_equal"] for s in seeds)
    eq_transfer = all(c["logits_equal"] for s in seeds for k, c in s["checks"].items() if k.startswith("transfer_task"))
    max_diff = max(c["max_abs_diff"] for s in seeds for k, c in s["checks"].items()
                   if k.startswith("transfer_task") or k == "base_task_identity")
    paper_diff = [s["checks"]["base_task_paper"]["max_abs_diff"] for s in seeds]
    eq_paper = all(s["checks"]["base_task_paper"]["logits_equal"] for s in seeds)
    identity_acc = pm([s["checks"]["base_task_identity"]["test_acc_0_4"] for s in seeds])
    paper_acc = pm([s["checks"]["base_task_paper"]["test_acc_0_4"] for s in seeds])
    first = seeds[0]
    lines += ["", "Step-0 checks, before any transfer training:", "",
              "| Model | Digits 0-4 test accuracy (base head) | Logits equal to the base model's |",
              "| --- | --: | --- |",
              (f"| base model (trained on 0-4, {cfg['base_epochs']} epochs) | "
               f"{pm([s['base']['test_acc_0_4'] for s in seeds])} | — |"),
              (f"| + SE, `init=\"identity\"` | {identity_acc} | {'yes, bit for bit' if eq_base else 'NO'} "
               f"(`torch.equal`, all seeds; max abs diff {max_diff:g}) |"),
              (f"| + SE, `init=\"paper\"` | {paper_acc} | {'yes' if eq_paper else 'no'} "
               f"(max abs diff {min(paper_diff):.3g} to {max(paper_diff):.3g}) |"),
              "",
              (f"On the 5-9 task, with the new head, the identity-retrofitted models' logits equal the base "
               f"model's on every test image: **{'yes' if eq_transfer else 'NO'}** (`torch.equal`, every seed, "
               f"both identity arms). {first['checks']['base_task_identity']['se_blocks']} SE blocks, "
               f"{first['checks']['base_task_identity']['se_params']:,} SE parameters on a "
               f"{first['base']['params']:,}-parameter model (reduction {cfg['reduction']})."),
              "",
              (f"Model: timm `{cfg['model']}` ({', '.join(f'{k}={v}' for k, v in cfg['model_kwargs'].items())}), "
              f"random init, {cfg['image_size']}x{cfg['image_size']} px. Base training: {cfg['base_train']} images "
              f"of digits 0-4, {cfg['base_epochs']} epochs, AdamW lr {cfg['lr_base']:g}. Transfer: AdamW, batch "
              f"{cfg['batch_size']}, weight decay {cfg['weight_decay']:g}, label smoothing {cfg['label_smoothing']:g}, "
              f"10% warm-up then cosine, random shifts of up to {cfg['shift']} px; split seed {cfg['split_seed']}. "
              f"Measured on {m['cpu']}, {cfg['threads']} torch thread(s), torch {m['torch']}, timm {cfg['timm']}; "
              f"the whole study took {result['seconds'] / 60:.1f} min.")]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds, summary, cfg = result["seeds"], result["summary"], result["config"]
    colors = ["#555555", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.4), gridspec_kw={"width_ratios": [1.25, 1]})
    epochs = np.arange(cfg["epochs"] + 1)
    for (key, label, *_), color in zip(ARMS, colors):
        curves = np.array([s["arms"][key]["test_acc"] for s in seeds])
        mean = curves.mean(0)
        style = "--" if key in ("se_identity_se", "se_paper_se", "base_head") else "-"
        # The baselines are drawn wide and pale underneath, so an arm that coincides with one stays visible.
        wide = {"lw": 5, "alpha": 0.45, "zorder": 1} if key in ("base_all", "base_head") else {"zorder": 2}
        ax1.plot(epochs, mean, style, color=color, label=label, marker="o", ms=3, **wide)
        if len(seeds) > 1:
            ax1.fill_between(epochs, curves.min(0), curves.max(0), color=color, alpha=0.12, lw=0)
    ax1.set(xlabel="epoch (0 = before transfer training)", ylabel="test accuracy, digits 5-9 (%)",
            title=f"Test accuracy during transfer (mean; band: min-max over {len(seeds)} seed(s))")
    ax1.set_xticks(epochs)
    ax1.axhline(20, color="k", lw=0.5, ls=":")
    ax1.legend(fontsize=8, loc="lower right")
    ax1.grid(alpha=0.3)

    labels = [summary[key]["label"].replace(" (", "\n(") for key, *_ in ARMS]
    for i, ((key, *_), color) in enumerate(zip(ARMS, colors)):
        finals = summary[key]["final"]
        mean, std = summary[key]["final_mean_std"]
        ax2.bar(i, mean, yerr=std if len(finals) > 1 else None, color=color, alpha=0.75, capsize=4)
        jitter = np.linspace(-0.12, 0.12, len(finals)) if len(finals) > 1 else [0.0]
        ax2.scatter(i + np.asarray(jitter), finals, color="k", s=12, zorder=3)
    lows = [min(summary[key]["final"]) for key, *_ in ARMS]
    ax2.set_ylim(max(0.0, min(lows) - 5), 100.5)
    ax2.set_xticks(range(len(ARMS)), labels, fontsize=7.5, rotation=20, ha="right")
    ax2.set(ylabel="test accuracy (%)", title=f"After {cfg['epochs']} epochs (mean ± std; dots: seeds)")
    ax2.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(result: dict) -> None:
    summary = result["summary"]
    print(f"\n{'arm':<34}{'trainable':>11}{'step 0 %':>16}{'final %':>16}{'Δ paired (pp)':>22}")
    for key, label, *_ in ARMS:
        s = summary[key]
        vs = f"{pm(s['vs']['diff'])} vs {s['vs']['arm']}" if "vs" in s else ""
        print(f"{label:<34}{s['trainable_params']:>11,}{pm(s['step0']):>16}{pm(s['final']):>16}   {vs}")
    for key, ref in PAIRS:
        gates = [s["arms"][key]["gates_after"] for s in result["seeds"]]
        changed = [s["arms"][key]["predictions_differing_from"]["count"] for s in result["seeds"]]
        print(f"{summary[key]['label']:<34} SE gates after: mean {pm([g['mean'] for g in gates], 3)}, std "
              f"{pm([g['std'] for g in gates], 3)}; test predictions changed vs {ref}: {pm(changed)}")
    for line in verdict(result):
        print(line.replace("**", ""))
    checks = [(s["seed"], k, c["logits_equal"], c["max_abs_diff"]) for s in result["seeds"]
              for k, c in s["checks"].items() if "paper" not in k]
    print("identity retrofit logits == base logits (torch.equal): "
          + ("yes, " if all(c[2] for c in checks) else "NO, ") + f"{len(checks)} checks, max abs diff "
          + f"{max(c[3] for c in checks):g}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (0, 1, ...)")
    parser.add_argument("--epochs", type=int, default=10, help="transfer epochs, the same for every arm")
    parser.add_argument("--base-epochs", type=int, default=10, help="epochs of the base training on digits 0-4")
    parser.add_argument("--lr-all", type=float, default=1e-3, help="learning rate of the arms that train everything")
    parser.add_argument("--lr-new", type=float, default=1e-2, help="learning rate of the SE + head and head-only arms")
    parser.add_argument("--lr-base", type=float, default=2e-3, help="learning rate of the base training")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the stratified train/test splits")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a shared box)")
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 base + 2 transfer epochs, written to a "
                        "temporary folder unless --out is given (a smoke run)")
    parser.add_argument("--render-only", action="store_true", help="train nothing: redraw the PNG and rewrite the "
                        "Markdown from the JSON of an earlier run (in --out, else benchmarks/results)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for the JSON, PNG and Markdown (default: benchmarks/results + docs/generated)")
    parser.add_argument("--check", action="store_true", help="with --render-only: write nothing, exit 1 when the "
                        "Markdown differs from what the JSON gives (the PNG is not compared: renderers differ)")
    args = parser.parse_args()
    if args.check and not args.render_only:
        parser.error("--check compares the rendered Markdown: use it with --render-only")
    if args.quick:
        args.seeds, args.epochs, args.base_epochs = 1, 2, 2
        args.out = args.out or Path(tempfile.mkdtemp(prefix=f"{NAME}_quick_"))
    if min(args.seeds, args.epochs, args.base_epochs, args.batch_size, args.threads) < 1:
        parser.error("--seeds, --epochs, --base-epochs, --batch-size and --threads must be >= 1")

    json_path = (args.out or RESULTS) / f"{NAME}.json"
    docs = args.out or GENERATED
    if args.render_only:
        if not json_path.is_file():
            parser.error(f"--render-only: no {json_path}; run the study first (or point --out at its folder)")
        result = json.loads(json_path.read_text(encoding="utf-8"))
        result["summary"] = summarise(result["seeds"])
        if args.check:
            page = docs / f"{NAME}.md"
            if not page.is_file() or page.read_text(encoding="utf-8") != markdown(result):
                print(f"{page} is stale: regenerate it with `make docs-gen`", file=sys.stderr)
                return 1
            print(f"{page} is up to date")
            return 0
        print_table(result)
        write_outputs(result, json_path, docs)
        return 0

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    start = time.perf_counter()
    data = load_data(args.split_seed)
    steps = -(-len(data["transfer_train_y"]) // args.batch_size)
    print(f"{MODEL} {MODEL_KWARGS}; digits 0-4: {len(data['base_train_y'])} train / {len(data['base_test_y'])} test; "
          f"digits 5-9: {len(data['transfer_train_y'])} train / {len(data['transfer_test_y'])} test; "
          f"{args.epochs} transfer epochs x {steps} steps", flush=True)
    seeds = []
    for seed in range(args.seeds):
        seeds.append(run_seed(seed, data, args))
        print(f"seed {seed}: base model {seeds[-1]['base']['test_acc_0_4']:.1f}% on digits 0-4 test, "
              f"{seeds[-1]['seconds']:.0f}s", flush=True)
    config = {"model": MODEL, "model_kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in MODEL_KWARGS.items()},
              "image_size": IMAGE_SIZE, "reduction": REDUCTION, "epochs": args.epochs, "base_epochs": args.base_epochs,
              "lr_all": args.lr_all, "lr_new": args.lr_new, "lr_base": args.lr_base, "batch_size": args.batch_size,
              "weight_decay": WEIGHT_DECAY, "label_smoothing": LABEL_SMOOTHING, "shift": SHIFT,
              "split_seed": args.split_seed, "threads": args.threads, "quick": args.quick, "timm": timm.__version__,
              "base_train": len(data["base_train_y"]), "base_test": len(data["base_test_y"]),
              "transfer_train": len(data["transfer_train_y"]), "transfer_test": len(data["transfer_test_y"]),
              "transfer_steps_per_epoch": steps, "arms": [dict(zip(("key", "label", "init", "train", "lr_group"), a))
                                                          for a in ARMS]}
    result = {"machine": machine(), "config": config, "seeds": seeds, "seconds": time.perf_counter() - start}
    result["summary"] = summarise(seeds)
    print_table(result)

    write_outputs(result, json_path, docs)
    return 0


def write_outputs(result: dict, json_path: Path, docs: Path) -> None:
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    plot(result, docs / f"{NAME}.png")
    (docs / f"{NAME}.md").write_text(markdown(result), encoding="utf-8")
    print(f"written {json_path}, {docs / f'{NAME}.png'}, {docs / f'{NAME}.md'} (study: {result['seconds']:.0f}s)")


if __name__ == "__main__":
    sys.exit(main())
