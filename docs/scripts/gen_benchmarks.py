"""Render the benchmark results committed under ``benchmarks/results/`` as Markdown tables.

    python docs/scripts/gen_benchmarks.py [--check]

Writes ``docs/generated/benchmarks.md``. Each ``*.json`` written by ``benchmarks/apply_time.py``,
``benchmarks/latency.py`` (``--compile`` writes ``latency_compile.json``), ``benchmarks/train_step.py`` or
``benchmarks/gpu_throughput.py``
becomes a table, headed by the machine it was measured on. Nothing is measured here: no result file, no table, and the page says so.
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

from _gen import GENERATED, REPO, header, write

SCRIPT = "gen_benchmarks.py"
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO / "benchmarks"))
from _common import ratio_ci  # noqa: E402  (the scripts' own bootstrap, so derived intervals match theirs)


def paired(num: list[float], den: list[float]) -> str:
    """``median per-round ratio (95 % interval)`` of two models timed in the same rounds."""
    lo, hi = ratio_ci(num, den, paired=True)
    return f"{statistics.median(n / d for n, d in zip(num, den)):.3f} ({lo:.3f} to {hi:.3f})"


def spread(times: dict[str, list[float]]) -> str:
    """The range over models of one forward's standard deviation between rounds, in % of its median."""
    values = [100 * statistics.stdev(t) / statistics.median(t) for t in times.values() if len(t) > 1]
    if not values:
        return "?"
    low, high = f"{min(values):.0f}", f"{max(values):.0f}"
    return f"{low} %" if low == high else f"{low} to {high} %"


def table(headers: list[str], rows: list[list[str]]) -> str:
    align = ["---"] + ["--:"] * (len(headers) - 1)
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def committed_in(path: Path) -> str | None:
    """The commit that last wrote ``path`` (git history; None outside a clone): for results that predate
    recording the code's commit, the code that measured them is at most this one."""
    import subprocess

    try:
        done = subprocess.run(["git", "log", "-1", "--format=%h", "--abbrev=7", "--", str(path.relative_to(REPO))],
                              cwd=REPO, capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return done.stdout.strip() or None


def machine_line(data: dict[str, Any], path: Path | None = None) -> str:
    m = data.get("machine") or {}
    parts = [m.get("cpu") or "unknown CPU"]
    if m.get("logical_cpus") is not None:
        parts.append(f"{m['logical_cpus']} logical CPUs")
    if m.get("torch_threads") is not None:
        parts.append(f"{m['torch_threads']} torch threads")
    if m.get("cpu_capability"):
        parts.append(f"vector ISA {m['cpu_capability']}")
    if m.get("cuda"):
        parts.append(f"GPU {m['cuda']}")
    parts.append(f"torch {m.get('torch', '?')}" + (f", timm {m['timm']}" if m.get("timm") else "")
                 + f", Python {m.get('python', '?')}")
    if m.get("commit"):
        parts.append(f"code at commit `{m['commit'][:7]}`" + (" with uncommitted changes" if m.get("uncommitted_changes") else "")
                     + (f" ({m['commit_note']})" if m.get("commit_note") else
                        " (as named to the run by `SE_RETROFIT_COMMIT`: a copy of the tree sent to another machine)"
                        if m.get("commit_source") == "SE_RETROFIT_COMMIT" else ""))
    # a result moved to another file keeps the commit that first committed it
    elif sha := m.get("committed_in") or (path is not None and committed_in(path)):
        parts.append(f"code not recorded (the result was committed in `{sha}`, so measured with that commit's code "
                     "or older)")
    if m.get("allocator_env"):
        parts.append("allocator settings " + " ".join(f"`{k}={v}`" for k, v in sorted(m["allocator_env"].items())))
    return "Measured on: " + ", ".join(parts) + "."


def apply_time(data: dict[str, Any]) -> str:
    rows = [[f"`{r['model']}`", str(r["se_blocks"]), f"{r['build_s']:.3f}", f"{r['apply_s']:.3f}",
             f"{r['apply_over_build']:.2f}"] for r in data["rows"]]
    return "\n".join([
        f"Median of {data.get('repeats', '?')} runs per model (`benchmarks/apply_time.py`).\n",
        table(["model", "SE blocks", "build s", "apply s", "apply / build"], rows)])


def latency_base_and_retrofit(data: dict[str, Any]) -> str:
    """``latency.py --base-and-retrofit``: the two models only, with the paired ratio and both intervals."""
    rows = []
    for r in data["rows"]:
        lo, hi = r["retrofitted_over_base_ci95"]
        plo, phi = r["retrofitted_over_base_paired_ci95"]
        rows.append([f"`{r['model']}`", r["mode"], f"{r['median_s']['base'] * 1e3:.1f}",
                     f"{r['median_s']['retrofitted'] * 1e3:.1f}", f"{r['retrofitted_over_base']:.3f}",
                     f"{lo:.3f} to {hi:.3f}", f"{r['retrofitted_over_base_paired']:.3f}", f"{plo:.3f} to {phi:.3f}"])
    return "\n".join([
        f"Batch {data['batch']}, {data['size']}x{data['size']} input, eval mode; only the base model and the "
        f"retrofit, one timed forward each per round after {data['settle']} untimed one(s), in a new order each "
        f"round, {data['repeats']} rounds (`benchmarks/latency.py --base-and-retrofit`). Times in ms (medians). "
        "*paired*: the median of the per-round ratios. Intervals: bootstrap 95 % over rounds.\n",
        table(["base model", "mode", "base", "retrofitted", "retrofitted / base", "95 % interval", "paired",
               "95 % interval"], rows),
        "One forward's time varies between rounds by a standard deviation of "
        + "; ".join(f"{spread(r['times_s'])} ({r['model']})" for r in data["rows"] if "times_s" in r)
        + " of its median.\n"])


def latency(data: dict[str, Any]) -> str:
    """Both layouts: files with the "plain ops" retrofit (and intervals) and older ones with "unfused"."""
    rows = []
    first = data["rows"][0]["median_s"]
    if "hand-written SE" not in first:
        return latency_base_and_retrofit(data)
    extra, extra_ratio, note = None, None, ""
    if "retrofitted, plain ops" in first:
        extra, extra_ratio = "retrofitted, plain ops", "plain_over_hand_written"
        note = "*plain ops*: the retrofit with `fuse_add=False, early_squeeze=False`, the hand-written block's ops. "
    elif "retrofitted, unfused" in first:
        extra, extra_ratio = "retrofitted, unfused", "unfused_over_hand_written"
        note = "*unfused*: the retrofit with `fuse_add=False` (code before the in-place add and the early squeeze). "
    interval = all("retrofitted_over_base_ci95" in r for r in data["rows"])
    for r in data["rows"]:
        m = r["median_s"]
        row = [f"`{r['model']}`", r["mode"], f"{m['base'] * 1e3:.1f}", f"{m['hand-written SE'] * 1e3:.1f}",
               f"{m['retrofitted'] * 1e3:.1f}"]
        if extra:
            row.append(f"{m[extra] * 1e3:.1f}")
        row += [f"{r['hand_written_over_base']:.3f}", f"{r['retrofitted_over_base']:.3f}"]
        if interval:
            lo, hi = r["retrofitted_over_base_ci95"]
            row.append(f"{lo:.3f} to {hi:.3f}")
        row.append(f"{r['retrofitted_over_hand_written']:.3f}")
        if extra:
            row.append(f"{r[extra_ratio]:.3f}")
        if interval:
            row.append(paired(r["times_s"]["retrofitted"], r["times_s"]["hand-written SE"]))
        rows.append(row)
    label = extra.split(", ")[1] if extra else None
    headers = ["base model", "mode", "base", "hand-written SE", "retrofitted"] + ([label] if extra else [])
    headers += ["SE / base", "retrofitted / base"] + (["95 % interval"] if interval else [])
    headers += ["retrofitted / SE"] + ([f"{label} / SE"] if extra else [])
    headers += ["retrofitted / SE per round (95 % interval)"] if interval else []
    order = "in a new order each round" if interval else "in a fixed order"
    if "settle" in data:
        order += f", each timed forward after {data['settle']} untimed one(s) of the same model"
    elif interval:
        order += ", one forward per model per round (no untimed forward before it)"
    return "\n".join([
        f"Batch {data.get('batch', '?')}, {data.get('size', '?')}x{data.get('size', '?')} input, eval mode, "
        f"median of {data.get('repeats', '?')} interleaved rounds {order} (`benchmarks/latency.py`). Times in ms. "
        + note + ("The interval is a bootstrap 95 % interval of *retrofitted / base* over rounds; *per round*: the "
                  "median of the per-round ratios, with its bootstrap interval." if interval else "")
        + "\n",
        table(headers, rows)]
        + ([f"One forward's time varies between rounds by a standard deviation of "
            f"{'; '.join(spread(r['times_s']) + ' (' + r['model'] + ', ' + r['mode'] + ')' for r in data['rows'])} of "
            "its median.\n"]
           if interval else []))


def gpu_throughput(data: dict[str, Any]) -> str:
    rows = []
    base = {(r["kind"], r["compiled"]): r["median_step_s"] for r in data["rows"] if "(base)" in r["config"]}
    for r in data["rows"]:
        peak = f"{r['peak_mib_above_start']:.0f}" if r.get("peak_mib_above_start") is not None else ""
        over = base.get((r["kind"], r["compiled"]))
        steps = r.get("step_s") or []
        rows.append([r["kind"], "compiled" if r["compiled"] else "eager", r["config"], str(r["batch"]),
                     f"{r['images_per_s']:.0f}", f"{r['median_step_s'] * 1e3:.1f}",
                     f"{min(steps) * 1e3:.1f} to {max(steps) * 1e3:.1f}" if steps else "",
                     f"{r['median_step_s'] / over:.2f}" if over else "", peak])
    return "\n".join([
        f"{data.get('dtype', '?')} autocast, channels_last={data.get('channels_last', '?')}, {data.get('size', '?')} px, "
        f"median of {data.get('rounds', '?')} interleaved rounds of {data.get('steps', '?')} steps "
        "(`benchmarks/gpu_throughput.py`). Peak memory: above what was allocated before the configuration's "
        + ("steps, the weights and optimizer state (gradients and activations).\n" if data.get("memory_baseline") else
           "steps, which still held the previous step's gradients (activations, and gradients only as far as "
           "they exceed those; measured before the script freed them first).\n"),
        table(["kind", "mode", "configuration", "batch", "images/s", "ms/step", "range over rounds (ms)",
               "over base", "peak MiB"], rows), *gpu_pairs(data["rows"])])


def gpu_pairs(rows: list[dict[str, Any]]) -> list[str]:
    """Per kind and mode: the retrofit's step time over the hand-written model's, per round, where both
    ran in the same rounds (the configurations alternate within each round)."""
    lines = []
    for kind, compiled in dict.fromkeys((r["kind"], r["compiled"]) for r in rows):
        # both trained whole (", all"), not the retrofit with `--train se`
        pick = {r["config"].removesuffix(", all"): r.get("step_s") or [] for r in rows
                if (r["kind"], r["compiled"]) == (kind, compiled)}
        hand, retro = pick.get("seresnet50 (timm)"), pick.get("retrofitted resnet50")
        if hand and retro and len(hand) == len(retro) > 1:
            lines.append(f"- {kind}, {'compiled' if compiled else 'eager'}: retrofitted / hand-written step time per "
                         f"round {paired(retro, hand)}")
    return ["\n".join(lines) + "\n"] if lines else []


def train_step(data: dict[str, Any]) -> str:
    memory = data.get("memory") or {}
    # Before malloc_trim, the retrofit's baseline held the heap of the models built and dropped to make it:
    # its "training memory" came out too low, so only the peak is shown for such results.
    trusted = "malloc_trim" in data.get("memory_method", "")
    rows = []
    for name, seconds in data["median_seconds"].items():
        mem = memory.get(name) or {}
        runs = mem.get("training_mib_runs") or []
        training = (f"{mem['training_mib']:.0f}" + (f" ({min(runs):.0f} to {max(runs):.0f})" if len(runs) > 1 else "")
                    if "training_mib" in mem and trusted else "n/a")
        rows.append([name, f"{seconds * 1e3:.1f}", f"{mem['peak_mib']:.0f}" if "peak_mib" in mem else "", training])
    ratios = (f"retrofitted / hand-written (train all), step time: {data['ratio_retrofitted_vs_handwritten']:.3f}; "
              f"`--train se` / `--train all` (retrofitted): step time {data['ratio_se_vs_all_time']:.3f}"
              + (f", training memory {data['ratio_se_vs_all_training_memory']:.3f}." if trusted else "."))
    method = (data.get("memory_method", "see the script") if trusted else
              "peak RSS only; the training-memory column is not shown for this run, whose baseline (RSS after "
              "the build) still held the heap of the models built and dropped to make the retrofit, which made "
              "its training memory look about 90 MiB smaller (fixed in the script since)")
    return "\n".join([
        f"Batch {data.get('batch', '?')} at {data.get('size', '?')} px, {data.get('threads', '?')} thread(s), "
        f"median of {data.get('repeats', '?')} interleaved rounds (`benchmarks/train_step.py`). Memory: "
        f"{method}.\n",
        table(["configuration", "step ms", "peak RSS MiB", "training memory MiB (range over processes)"], rows),
        ratios + "\n"])


def se_ops(data: dict[str, Any]) -> str:
    rows_in = data["rows"]
    names = list(rows_in[0]["seconds"])
    rows = [[name] + [f"{r['seconds'][name] * 1e6:.0f}" for r in rows_in]
            + [f"{data['resnet50_totals_s'][name] * 1e3:.2f}"] for name in names]
    headers = ["op"] + [f"{r['channels']}x{r['size']} (us)" for r in rows_in] + ["per ResNet-50 forward (ms)"]
    where = ("Each call here runs after the stage's 1x1 convolution (`conv3`'s shape, untimed; `--cold`), as in a "
             "forward, where the convolution has just displaced the op's code and data: compare with the table "
             "without `--cold` to see what that costs the small ops (the matrix products on the `(8, C)` squeeze); "
             "the last row, no part of SE, is an op with next to no work, which costs as much there. "
             "For the large ops the convolution's freed output also sends the next allocation to fresh pages "
             "(page faults, see above), so compare those rows with the base model's residual add in the same "
             "table. "
             if data.get("cold") else
             "Each op here reads a map that the previous call left in cache; inside a forward the map has just "
             "been written by the batch norm and is mostly out of cache, which is why the squeeze costs more there "
             "(see the SE overhead table and the `--cold` table). ")
    return "\n".join([
        f"Batch {data.get('batch', '?')}, {data.get('threads', '?')} thread(s), eval, median of "
        f"{data.get('repeats', '?')} calls per op (`benchmarks/se_ops.py`); the last column weights each stage by "
        "its number of blocks (3, 4, 6, 3). " + where + "Read the rows as comparisons between forms of the "
        "same op.\n",
        table(headers, rows)])


def se_overhead(data: dict[str, Any]) -> str:
    model = data.get("model", "resnet50")
    faults = all("page_faults_per_forward" in r for r in data["rows"])
    paired = all("se_over_base_ci95" in r for r in data["rows"])  # interleaved rounds (older files: one block per model)
    rows = []
    for r in data["rows"]:
        top = ", ".join(f"`{op.removeprefix('aten::')}` {t * 1e3:+.1f}" for op, t in list(r["by_op_s"].items())[:4])
        share = f"{r['se_over_base_total'] * 100:.2f} %"
        if paired:
            lo, hi = r["se_over_base_ci95"]
            share += f" [{lo * 100:.2f}, {hi * 100:.2f}]"
        rows.append([r["model"], f"{r['total_s'] * 1e3:.1f}", f"{r['se_s'] * 1e3:.2f}", share]
                    + ([f"{r['page_faults_per_forward']:,.0f}"] if faults else []) + [top])
    fault_note = (f" *page faults*: minor page faults per forward (the base model: "
                  f"{data['base_page_faults_per_forward']:,.0f}); fresh pages cost time that the profiler charges "
                  "to whichever op first writes them, usually a convolution, so they are not in *SE ops*; the count "
                  "changes between identical runs (see the page-fault section above)."
                  if faults else "")
    headers = ["model", "op time (ms)", "SE ops (ms)", "SE / base"] + (["page faults"] if faults else [])
    warning = f"**Not meaningful**: {data['warning']}\n\n" if data.get("warning") else ""
    return "\n".join([
        warning + f"Batch {data.get('batch', '?')}, {data.get('size', '?')}x{data.get('size', '?')} input, eval, "
        + (f"{data.get('rounds', '?')} interleaved rounds of one profiled forward per model, medians over rounds "
           "(`benchmarks/se_overhead.py`). " if paired else
           f"{data.get('rounds', '?')} profiled forwards per model, one model after the other "
           "(`benchmarks/se_overhead.py` before it interleaved rounds). ")
        + f"The base `{model}` spends {data['base_total_s'] * 1e3:.1f} ms per forward in ops. *SE ops*: op time the model "
        "spends beyond the base model outside convolutions, batch norms and max-pooling, i.e. the squeeze, "
        "excitation, gate and the rescale's cost beyond the residual add; *SE / base*: that over the base "
        "model's op time (the paper: 1.8 %)"
        + (", with a bootstrap 95 % interval of its per-round values (each model paired with the base model "
           "profiled in the same round)." if paired else ".") + fault_note + " The last column lists the largest differences "
        "in ms.\n",
        table(headers + ["largest differences (ms)"], rows)])


def gate_overhead(data: dict[str, Any]) -> str:
    rows = []
    for r in data["rows"]:
        s = r["seconds"]
        rows.append([f"`{r['stage']}` ({r['channels']} ch)", f"{s['early gate'] * 1e6:.1f}", f"{s['its kernels'] * 1e6:.1f}",
                     f"{r['gate_overhead_s'] * 1e6:.1f}", f"{s['SE call'] * 1e6:.1f}", f"{s['its kernel'] * 1e6:.1f}",
                     f"{r['call_overhead_s'] * 1e6:.1f}"])
    total, kernels = data["per_forward_s"], data["kernels_per_forward_s"]
    return "\n".join([
        f"Batch {data.get('batch', '?')}, maps of 1x1, {data.get('threads', '?')} thread(s), eval, medians of "
        f"{data.get('rounds', '?')} rounds of {data.get('calls', '?')} calls (`benchmarks/gate_overhead.py"
        + (" --after-conv`; each call timed alone, right after what precedes it in the forward, untimed, on its "
           "stage's map of a batch of 8 at 224x224: the early gate after the block's `conv2`, `bn2` and `act2`, the "
           "SE call after `conv3` and `bn3`). " if data.get("after_conv") else "`). ")
        + "Microseconds per call of the two SE calls in a retrofitted bottleneck's forward and of the kernels they "
        "run, called directly; *overhead*: the difference, paired within each round, i.e. the Python around the "
        "kernels. Over a ResNet-50 forward (3, 4, 6, 3 bottlenecks) that Python takes "
        f"**{total * 1e3:.2f} ms**, {total / kernels:.2f}x the time of the kernels on these 1x1 maps "
        f"({kernels * 1e3:.2f} ms).\n",
        table(["block", "early gate", "its kernels", "overhead", "SE call", "its kernel (`addcmul`)", "overhead"],
              rows)])


def overhead_parts(data: dict[str, Any]) -> str:
    """``overhead_parts.py``: one table per thread count, each variant against the base model."""
    out = [f"Batch {data.get('batch', '?')}, {data.get('size', '?')}x{data.get('size', '?')} input, eval mode; the "
           "retrofitted `resnet50` (one model object) run with parts of its SE work taken out or done another way, "
           "interleaved with the base model, each timed forward after an untimed one, in a new order each round "
           "(`benchmarks/overhead_parts.py`; the variants are described above). Times in ms (medians); *over base*: "
           "the median of the per-round ratios, with a bootstrap 95 % interval over rounds.\n"]
    for result in data["results"]:
        base = result["rows"][0]["median_s"]
        kernels = next((r["times_s"] for r in result["rows"] if r["variant"] == "kernels only"), None)
        rows = []
        for r in result["rows"][1:]:
            lo, hi = r["over_base_paired_ci95"]
            against = (paired(r["times_s"], kernels) if kernels is not None and r["variant"] != "kernels only"
                       else "")
            rows.append([r["variant"], f"{r['median_s'] * 1e3:.1f}", f"{(r['median_s'] - base) * 1e3:+.2f}",
                         f"{r['over_base_paired']:.3f}", f"{lo:.3f} to {hi:.3f}", against])
        out += [f"{result['threads']} threads, {result['rounds']} rounds; the base model: {base * 1e3:.1f} ms. One "
                "forward's time varies between rounds by a standard deviation of "
                f"{spread({r['variant']: r['times_s'] for r in result['rows']})} of its median.\n",
                table(["variant", "ms", "minus base (ms)", "over base", "95 % interval",
                       "over *kernels only* per round (95 % interval)"], rows)]
    return "\n".join(out)


def accuracy_study(data: dict) -> str:
    return "The transfer study has its own page, with its table and plot: [Accuracy after transfer](accuracy.md).\n"


RENDERERS = {"accuracy_study": ("Accuracy study", accuracy_study),
             "apply_time": ("Time to apply the retrofit", apply_time),
             "train_step": ("Training step: time and memory", train_step),
             "latency_compile": ("Inference latency, eager and torch.compile", latency),
             "latency": ("Inference latency", latency),
             "gpu_throughput": ("GPU training and inference throughput", gpu_throughput),
             "se_ops": ("The SE block's own ops", se_ops),
             "se_overhead": ("What SE costs inside the forward", se_overhead),
             "gate_overhead": ("The Python around SE's kernels", gate_overhead),
             "overhead_parts": ("Where the retrofit's time over the base model goes", overhead_parts)}
# Files named PREFIX_SUFFIX.json (the same benchmark on another machine or setting) get PREFIX's table.
SUFFIXES = {"cold": "each op after a convolution, as in the forward",
            "h100_host": "on the H100 machine's 16-core CPU (older code)",
            "h200_host": "on the H200 machine's 16-core CPU",
            "h200_host_base_and_retrofit_16threads": "on the H200 machine's CPU, base model and retrofit only, "
                                                     "16 threads",
            "h200_host_base_and_retrofit_4threads": "on the H200 machine's CPU, base model and retrofit only, "
                                                    "4 threads",
            "h200_host_base_and_retrofit_16threads_current": "on the H200 machine's CPU, base model and retrofit "
                                                             "only, 16 threads, a later session's code",
            "compile_infer": "inference, eager and torch.compile",
            "h100_compile_train": "on the H100, compiled training only (base model, timm's seresnet50, retrofit)",
            "h100_host_base_and_retrofit_16threads": "on the H100 machine's CPU, base model and retrofit only, "
                                                     "16 threads",
            "h100_host_base_and_retrofit_4threads": "on the H100 machine's CPU, base model and retrofit only, "
                                                    "4 threads",
            "h100_host_16threads": "on the H100 machine's CPU, 16 threads",
            "h100": "on the H100 (eager training and inference)",
            "h100_train_rerun": "on the H100, eager training rerun (hand-written, retrofit, plain ops)",
            "h100_host_base_and_retrofit_16threads_omp_active": "on the H100 machine's CPU, base model and "
                                                                "retrofit only, 16 threads, `OMP_WAIT_POLICY=ACTIVE`",
            "h100_host_base_and_retrofit_16threads_omp_passive": "on the H100 machine's CPU, base model and "
                                                                 "retrofit only, 16 threads, "
                                                                 "`OMP_WAIT_POLICY=PASSIVE`",
            "h100_host_one_thread": "on one core of the H100 machine's CPU",
            "h100_host_base_and_retrofit_16threads_run1": "on the H100 machine's CPU, base model and retrofit only, "
                                                          "16 threads, first of two runs in a row",
            "h100_host_base_and_retrofit_16threads_run2": "on the H100 machine's CPU, base model and retrofit only, "
                                                          "16 threads, second of two runs in a row",
            "h100_host_base_and_retrofit_16threads_2dab483": "on the H100 machine's CPU, base model and retrofit "
                                                             "only, 16 threads, at `2dab483`",
            "h100_host_base_and_retrofit_2threads": "on the H100 machine's CPU, base model and retrofit only, "
                                                    "2 threads on 2 of its otherwise idle cores (`taskset`)",
            "h100_host_base_and_retrofit_2threads_rerun": "on the H100 machine's CPU, base model and retrofit only, "
                                                          "2 threads on 2 of its otherwise idle cores, a second, "
                                                          "shorter run on another machine of that kind",
            "h100_host_16threads_rerun": "on the H100 machine's CPU, 16 threads, a later session's run",
            "after_conv_h100_host_16threads": "each call right after a convolution, as in a forward, on the H100 "
                                              "machine's CPU at 16 threads",
            "h100_host_16_and_4_threads": "on the H100 machine's CPU, 16 and 4 threads",
            "resnext50_32x4d": "ResNeXt-50 32x4d",
            "after_conv": "each call right after a convolution, as in a forward",
            "code_9253b73": "the code of `9253b73`",
            "batch1": "ResNet-50 at batch 1, the paper's setting (one 224x224 image)",
            "previous_code": "the code before the cached fold's quick checks (0600c8b)",
            "resnet50_settled": "ResNet-50, each timed forward after an untimed one",
            "resnet50_settled_81rounds": "ResNet-50, settled, 81 rounds",
            "resnet50_tiny_input": "ResNet-50 at batch 1 and 32x32, where only the per-op overhead is left",
            "resnet50_settled_malloc_kept": "ResNet-50, settled, glibc malloc keeping freed memory",
            "resnet50_base_and_retrofit": "ResNet-50, base model and retrofit only",
            "resnet50_base_and_retrofit_201rounds": "ResNet-50, base model and retrofit only, 201 rounds",
            "resnet50_base_and_retrofit_41rounds": "ResNet-50, base model and retrofit only, 41 rounds",
            "resnet50_base_and_retrofit_501rounds": "ResNet-50, base model and retrofit only, 501 rounds",
            "resnet50_base_and_retrofit_501rounds_run2": "ResNet-50, base model and retrofit only, 501 rounds, "
                                                         "second run",
            "2core_151": "on the 2-core machine, 2 threads, 151 rounds",
            "resnet50_base_and_retrofit_malloc_kept": "ResNet-50, base model and retrofit only, glibc malloc keeping "
                                                      "freed memory"}


# Runs of one setting on one machine whose rounds are pooled into one figure: each round times both models back
# to back, so its ratio stands on its own, and one run's interval is narrower than the runs' differences.
POOLED_RUNS = ("latency_resnet50_base_and_retrofit_201rounds", "latency_resnet50_base_and_retrofit_501rounds",
               "latency_resnet50_base_and_retrofit_501rounds_run2")


def pooled_runs(results: Path) -> str:
    """The retrofit over the base model, per run of `POOLED_RUNS` and with their rounds pooled; empty where a
    run's file is missing."""
    paths = [results / f"{stem}.json" for stem in POOLED_RUNS]
    if not all(p.is_file() for p in paths):
        return ""
    rows, base, retro, machines = [], [], [], set()
    for path in paths:
        data = json.loads(path.read_text(encoding="utf-8"))
        m = data["machine"]
        machines.add((m.get("cpu"), m.get("logical_cpus"), m.get("torch_threads"), data["batch"], data["size"]))
        times = next(r for r in data["rows"] if r["model"] == "resnet50" and r["mode"] == "eager")["times_s"]
        base += times["base"]
        retro += times["retrofitted"]
        rows.append([f"`{path.name}`", f"`{m['commit'][:7]}`", str(len(times["base"])),
                     paired(times["retrofitted"], times["base"])])
    if len(machines) > 1:
        raise SystemExit(f"{', '.join(POOLED_RUNS)}: pooled runs from different machines or settings ({machines})")
    rows.append(["all rounds pooled", "", str(len(base)), paired(retro, base)])
    cpu, cpus, threads, batch, size = machines.pop()
    return "\n".join([
        "### ResNet-50 over the base model, 2-core machine, runs pooled\n",
        f"The runs above of `benchmarks/latency.py --models resnet50 --base-and-retrofit` on one machine ({cpu}, "
        f"{cpus} logical CPUs, {threads} torch threads, batch {batch}, {size}x{size}), each round's ratio of the "
        "retrofit's forward to the base model's pooled over runs: one run's interval is narrower than the "
        "differences between runs. *Paired*: the median per-round ratio, with a bootstrap 95 % interval over "
        "rounds; the paper's SE-ResNet-50 costs 1.018x its ResNet-50 on a CPU.\n",
        table(["run", "code", "rounds", "paired (95 % interval)"], rows)])


def renderer_for(name: str) -> tuple[str | None, Any]:
    for prefix in sorted(RENDERERS, key=len, reverse=True):
        if name == prefix or name.startswith(prefix + "_"):
            title, renderer = RENDERERS[prefix]
            suffix = name[len(prefix) + 1:]
            if suffix:
                title += f", {SUFFIXES.get(suffix, suffix.replace('_', ' '))}"
            return title, renderer
    return None, None


def render(results: Path = RESULTS) -> str:
    files = sorted(results.glob("*.json")) if results.is_dir() else []
    out = [header(SCRIPT)]
    if not files:
        out.append("!!! note \"No results yet\"\n"
                   "    No benchmark results are committed: `benchmarks/results/` holds no `*.json` file. Run the "
                   "scripts above and then `make docs-gen` to fill this section.\n")
        return "\n".join(out)
    for path in files:
        name = path.stem
        title, renderer = renderer_for(name)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise SystemExit(f"{path}: not a readable JSON file ({exc})") from None
        if renderer is None:
            out.append(f"### `{path.name}`\n\nNo renderer for this file in `docs/scripts/gen_benchmarks.py`.\n")
            continue
        out += [f"### {title}\n", machine_line(data, path) + "\n", renderer(data)]
    pooled = pooled_runs(results)
    if pooled:
        out.append(pooled)
    return "\n".join(out)


def main() -> int:
    return write(GENERATED / "benchmarks.md", render())


if __name__ == "__main__":
    sys.exit(main())
