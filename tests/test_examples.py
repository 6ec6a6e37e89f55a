"""Smoke-run every example in ``examples/`` in a fresh interpreter, as a user would.

The fast tests pass the examples a tiny model (timm ``resnet10t``), so that each costs little more
than starting Python and importing torch; the runs with the examples' own defaults (ResNet-50 and
friends), the two that convert a model three times or train, and the two-process torchrun script are
marked slow. Each example checks its own claims with ``assert``; here it only has to exit 0
and print what it promises. Three quick cases (a model with no SE site, check 3 on a MobileNetV3, a
refused ``--keep``) run the example in this interpreter instead: a fresh one would spend ~10 s
importing torch and timm on a check that takes a fraction of that.
"""
from __future__ import annotations

import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
TINY = ["--model", "resnet10t"]

# Every file in examples/ and the tests that run it; a new example without a test fails below.
COVERED = {
    "retrofit_timm.py", "retrofit_torchvision.py", "report.py", "finetune_folder.py", "load_adapter.py",
    "finetune_torchrun.sh",
}


def run_example(*argv: str, timeout: float = 300) -> str:
    command = [sys.executable, str(EXAMPLES / argv[0]), *argv[1:]] if argv[0].endswith(".py") else \
        ["bash", str(EXAMPLES / argv[0]), *argv[1:]]
    env = dict(os.environ, PYTHON=sys.executable, PYTHONUNBUFFERED="1")
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{' '.join(argv)} exited {done.returncode}:\n{output[-4000:]}"
    return output


def run_in_process(*argv: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    """Run an example as ``__main__`` in this interpreter; return its exit code and what it printed."""
    monkeypatch.setattr(sys, "argv", [str(EXAMPLES / argv[0]), *argv[1:]])
    try:
        runpy.run_path(str(EXAMPLES / argv[0]), run_name="__main__")
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_every_example_has_a_test_and_a_docstring() -> None:
    files = {p.name for p in EXAMPLES.iterdir() if p.is_file() and p.suffix in (".py", ".sh")}
    assert files == COVERED, f"examples without a test: {sorted(files - COVERED)}; gone: {sorted(COVERED - files)}"
    for name in files:
        text = (EXAMPLES / name).read_text()
        opening = text.lstrip().startswith('"""') if name.endswith(".py") else "\n# " in text[:400]
        assert opening, f"{name} does not open with a description of what it shows"


# ----------------------------------------------------------------------------------------------- fast

def test_retrofit_timm_tiny() -> None:
    out = run_example("retrofit_timm.py", *TINY)
    for claim in ("1. all", "2. identity init", "3. layer1.0 is a SEBasicBlock", "holding the SE block layer1.0.se",
                  "5. after one backward"):
        assert claim in out, out


@pytest.mark.filterwarnings("ignore:se_retrofit.apply. no SE block inserted")
def test_retrofit_timm_model_without_a_site_exits_0(one_thread: None, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """seresnet18 has its own SE in every block: the plan says so and the script stops, without a traceback."""
    code, out = run_in_process("retrofit_timm.py", "--model", "seresnet18", capsys=capsys, monkeypatch=monkeypatch)
    assert code == 0, out
    assert "0 SE site(s), 8 skipped" in out and "No SE block was inserted into seresnet18" in out, out
    assert "1. all" not in out, out


def test_retrofit_timm_checks_a_converted_block(one_thread: None, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """In a MobileNetV3 the first block with an ``se`` is timm's own; check 3 must look at the plan's site."""
    code, out = run_in_process("retrofit_timm.py", "--model", "mobilenetv3_small_050", capsys=capsys,
                               monkeypatch=monkeypatch)
    assert code == 0, out
    assert "3. blocks.1.1 is a SEInvertedResidual, a subclass of timm.models._efficientnet_blocks.InvertedResidual, "\
           "holding the SE block blocks.1.1.se_1" in out, out


def test_finetune_folder_refuses_an_existing_keep_before_training(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The copy to --keep comes after training: an existing folder must be refused before any work."""
    (tmp_path / "kept").mkdir()
    code, out = run_in_process("finetune_folder.py", "--keep", str(tmp_path / "kept"), capsys=capsys,
                               monkeypatch=monkeypatch)
    assert code == 2, out
    assert "already exists" in out and "data:" not in out, out


def test_report_tiny() -> None:
    out = run_example("report.py", *TINY, "--input-size", "64")
    assert "SE retrofit cost of resnet10t at input 1x3x64x64" in out and "4 SE blocks add" in out, out


@pytest.mark.parametrize("model", ["resnet10t", "mobilenetv3_small_050"])  # the head: fc, classifier
def test_load_adapter_tiny(model: str) -> None:
    out = run_example("load_adapter.py", "--model", model)
    assert "10-class head" in out and "the base model is unchanged" in out, out


# ----------------------------------------------------------------------------------------------- slow

@pytest.mark.slow
def test_retrofit_torchvision() -> None:
    out = run_example("retrofit_torchvision.py")
    assert "excluded by include/exclude" in out and "state_dict and pickled model both reload" in out, out
    assert "through the SE blocks alone: all 122 backbone tensors are unchanged (20 BatchNorm layers" in out, out


@pytest.mark.slow
def test_finetune_folder(tmp_path: Path) -> None:
    kept = tmp_path / "kept"
    out = run_example("finetune_folder.py", "--keep", str(kept))
    for name in ("config.json", "metrics.csv", "model.safetensors", "se_adapter.safetensors"):
        assert name in out and (kept / name).is_file(), out
    assert "rebuilt from the adapter" in out, out


@pytest.mark.slow
def test_retrofit_timm_resnet50_is_seresnet50() -> None:
    out = run_example("retrofit_timm.py")
    assert "4. init='paper': 28,088,024 parameters" in out and "the same weights without the SE blocks" in out, out


@pytest.mark.slow
def test_report_resnet50() -> None:
    out = run_example("report.py")
    assert "16 SE blocks add" in out, out


@pytest.mark.slow
def test_load_adapter_resnet50() -> None:
    out = run_example("load_adapter.py")
    assert "16 SE modules" in out, out


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_finetune_torchrun_two_cpu_processes(tmp_path: Path) -> None:
    out_dir = tmp_path / "run"
    out = run_example("finetune_torchrun.sh", str(out_dir), timeout=600)
    for name in ("config.json", "metrics.csv", "model.safetensors", "se_adapter.safetensors", "last.pt"):
        assert (out_dir / name).is_file(), out
    assert '"world_size": 2' in (out_dir / "config.json").read_text()
