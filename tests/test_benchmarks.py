"""The benchmark scripts still run, and the docs generator renders what they write and what is committed.

Nothing here times anything (the scripts measure; the tests only check that they work at the
smallest settings). Each script runs in this interpreter, writing into a temporary results folder,
and its JSON goes through `docs/scripts/gen_benchmarks.py` as `make docs-gen` would put it on the
Benchmarks page. The cheapest script runs in the fast suite, the others in the slow one.
"""
from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
DOC_SCRIPTS = REPO / "docs" / "scripts"


@pytest.fixture
def gen_benchmarks(monkeypatch):
    monkeypatch.syspath_prepend(str(DOC_SCRIPTS))
    import gen_benchmarks

    return gen_benchmarks


@pytest.fixture
def run_script(monkeypatch, tmp_path):
    """Run ``benchmarks/NAME`` with ``args`` as ``__main__``; return the JSON files it wrote."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import _common

    monkeypatch.setattr(_common, "RESULTS", tmp_path)
    threads = torch.get_num_threads()

    def run(name: str, *args: str) -> dict[str, dict]:
        monkeypatch.setattr(sys, "argv", [name, *args])
        try:
            runpy.run_path(str(BENCHMARKS / name), run_name="__main__")
        finally:
            torch.set_num_threads(threads)  # the scripts set their own
        written = {p.stem: json.loads(p.read_text()) for p in tmp_path.glob("*.json")}
        if not written:
            raise AssertionError(f"{name} {' '.join(args)} wrote no JSON into the results folder")
        return written

    return run


def _rendered(gen_benchmarks, name: str, data: dict) -> str:
    title, renderer = gen_benchmarks.renderer_for(name)
    assert renderer is not None, f"no renderer in gen_benchmarks.py for results/{name}.json"
    text = renderer(data)
    # the accuracy study links to its own page, where its table is; every other result is a table here
    assert "| --- |" in text or "(accuracy.md)" in text, f"{name}: the rendered section has no table:\n{text}"
    return text


def test_every_committed_result_renders(gen_benchmarks):
    files = sorted((BENCHMARKS / "results").glob("*.json"))
    assert files, "benchmarks/results/ holds no result"
    for path in files:
        _rendered(gen_benchmarks, path.stem, json.loads(path.read_text()))


def test_gate_overhead_runs_and_renders(run_script, gen_benchmarks):
    data = run_script("gate_overhead.py", "--rounds", "2", "--calls", "2")["gate_overhead"]
    assert [r["stage"] for r in data["rows"]] == ["layer1", "layer2", "layer3", "layer4"], data["rows"]
    assert data["kernels_per_forward_s"] > 0, data
    text = _rendered(gen_benchmarks, "gate_overhead", data)
    assert "`layer4` (2048 ch)" in text, text


def test_gate_overhead_after_conv_writes_its_own_file_and_says_so(run_script, gen_benchmarks):
    written = run_script("gate_overhead.py", "--rounds", "1", "--calls", "1", "--after-conv")
    assert list(written) == ["gate_overhead_after_conv"], f"--after-conv wrote {list(written)}, not its own file"
    data = written["gate_overhead_after_conv"]
    assert data["after_conv"] is True and data["rounds"] == 1, {k: v for k, v in data.items() if k != "rows"}
    text = _rendered(gen_benchmarks, "gate_overhead_after_conv", data)
    assert "--after-conv`" in text and "right after" in text, text


@pytest.mark.slow
def test_se_overhead_short_run_renders_without_page_faults(run_script, gen_benchmarks):
    written = run_script("se_overhead.py", "--batch", "1", "--size", "32", "--rounds", "2", "--no-page-faults",
                         "--variants", "retrofitted", "--name", "se_overhead_smoke")
    data = written["se_overhead_smoke"]
    assert [r["model"] for r in data["rows"]] == ["retrofitted"], data["rows"]
    assert "base_page_faults_per_forward" not in data, "page faults were counted despite --no-page-faults"
    text = _rendered(gen_benchmarks, "se_overhead", data)
    assert "page faults" not in text
    # at 32 px the base ResNet-50's own convolutions leave oneDNN, so the run must say its figures mean nothing
    assert "--size" in data.get("warning", ""), f"a 32 px run recorded no warning: {sorted(data)}"
    assert text.startswith("**Not meaningful**"), text


@pytest.fixture
def se_overhead(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import se_overhead

    return se_overhead


def test_se_overhead_warns_when_the_base_models_convolutions_leave_onednn(se_overhead):
    """At small --size the trunk's own convolutions run as _slow_conv2d_forward, which the trunk ops left out
    of 'SE ops' do not include: their time then counted as SE's (SE / base -14 % and +128 % at 32 px)."""
    trunk_only = {"aten::mkldnn_convolution": 0.05, "aten::native_batch_norm": 0.01, "aten::add_": 0.001}
    assert se_overhead.trunk_warning([trunk_only, trunk_only], 224) is None
    slow = {**trunk_only, "aten::thnn_conv2d": 1e-5, "aten::_slow_conv2d_forward": 0.012}
    warning = se_overhead.trunk_warning([trunk_only, slow], 32)
    assert warning is not None, "a base model whose convolutions ran as _slow_conv2d_forward gave no warning"
    assert "_slow_conv2d_forward" in warning and "32x32" in warning and "--size" in warning, warning


def test_committed_se_overhead_results_carry_no_warning(gen_benchmarks):
    for path in sorted((BENCHMARKS / "results").glob("se_overhead*.json")):
        data = json.loads(path.read_text())
        assert "warning" not in data, f"{path.name} says its figures are meaningless: {data['warning']}"
        assert "Not meaningful" not in _rendered(gen_benchmarks, "se_overhead", data), path.name


@pytest.mark.slow
def test_latency_base_and_retrofit_runs_and_renders(run_script, gen_benchmarks):
    written = run_script("latency.py", "--batch", "1", "--size", "32", "--repeats", "3", "--models", "resnet50",
                         "--base-and-retrofit", "--name", "latency_smoke")
    _rendered(gen_benchmarks, "latency", written["latency_smoke"])


@pytest.mark.slow
def test_se_ops_runs_and_renders(run_script, gen_benchmarks):
    written = run_script("se_ops.py", "--batch", "1", "--repeats", "2")
    _rendered(gen_benchmarks, "se_ops", written["se_ops"])


@pytest.mark.slow
def test_overhead_parts_runs_and_renders(run_script, gen_benchmarks):
    written = run_script("overhead_parts.py", "--batch", "1", "--size", "32", "--threads", "1", "--rounds", "2",
                         "--name", "overhead_parts_smoke")
    data = written["overhead_parts_smoke"]
    variants = [r["variant"] for r in data["results"][0]["rows"]]
    assert variants == ["base", "retrofitted", "kernels only", "gate given", "small ops on 1 thread",
                        "weight on the left"], variants
    assert data["machine"]["torch_threads"] is None, "the thread count belongs to each table, not the machine"
    text = _rendered(gen_benchmarks, "overhead_parts", data)
    assert "1 threads, 2 rounds" in text, text


def test_the_commit_a_copy_is_named_by_wins_over_its_stale_git_and_says_so(monkeypatch):
    """On the GPU machine the tree arrives with an older .git: its HEAD named the old commit, with the new tree
    as uncommitted changes. SE_RETROFIT_COMMIT names the tree sent; where it is this clone's own HEAD, git's
    word on uncommitted changes still counts."""
    import subprocess

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import _common

    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    if not head:
        pytest.skip("not a git clone")
    other = "0" * 40
    monkeypatch.setenv("SE_RETROFIT_COMMIT", other)
    assert _common.code_version() == {"commit": other, "uncommitted_changes": None,
                                      "commit_source": "SE_RETROFIT_COMMIT"}, _common.code_version()
    monkeypatch.setenv("SE_RETROFIT_COMMIT", head)
    own = _common.code_version()
    assert own["commit"] == head and own["uncommitted_changes"] is not None and "commit_source" not in own, own


def _base_and_retrofit_run(base: list[float], retro: list[float], threads: int = 2) -> dict:
    machine = {"cpu": "CPU", "logical_cpus": 2, "torch_threads": threads, "commit": "0" * 40}
    return {"machine": machine, "batch": 8, "size": 224,
            "rows": [{"model": "resnet50", "mode": "eager", "times_s": {"base": base, "retrofitted": retro}}]}


def test_pooled_runs_pool_the_rounds_of_every_run_and_refuse_mixed_machines(gen_benchmarks, tmp_path):
    runs = gen_benchmarks.POOLED_RUNS
    ratios = [[1.0, 1.0, 1.0], [1.1, 1.1, 1.1, 1.1, 1.1], [1.3]]  # pooled median 1.1; each run's its own
    for stem, r in zip(runs, ratios):
        (tmp_path / f"{stem}.json").write_text(json.dumps(_base_and_retrofit_run([2.0] * len(r), [2.0 * x for x in r])))
    text = gen_benchmarks.pooled_runs(tmp_path)
    pooled = next(line for line in text.splitlines() if line.startswith("| all rounds pooled"))
    assert "| 9 | 1.100 (" in pooled, f"the pooled row is not 9 rounds with median ratio 1.100:\n{text}"
    assert "| 1 | 1.300 (" in text, f"a run's own row is missing:\n{text}"

    (tmp_path / f"{runs[-1]}.json").write_text(json.dumps(_base_and_retrofit_run([2.0], [2.6], threads=16)))
    with pytest.raises(SystemExit, match="different machines"):
        gen_benchmarks.pooled_runs(tmp_path)
    (tmp_path / f"{runs[-1]}.json").unlink()
    assert gen_benchmarks.pooled_runs(tmp_path) == "", "a missing run must drop the pooled section, not pool the rest"
