"""Smoke-run every example in ``examples/`` in a fresh interpreter, as a user would.

The fast tests pass the examples a tiny model (timm ``resnet10t``), so that each costs little more
than starting Python and importing torch; the runs with the examples' own defaults (ResNet-50 and
friends), the two that convert a model three times or train, and the two-process torchrun script are
marked slow. Each example checks its own claims with ``assert``; here it only has to exit 0
and print what it promises.
"""
from __future__ import annotations

import os
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
    for claim in ("1. all", "2. identity init", "3. layer1.0 is a SEBasicBlock", "5. after one backward"):
        assert claim in out, out


def test_report_tiny() -> None:
    out = run_example("report.py", *TINY, "--input-size", "64")
    assert "SE retrofit cost of resnet10t at input 1x3x64x64" in out and "4 SE blocks add" in out, out


def test_load_adapter_tiny() -> None:
    out = run_example("load_adapter.py", *TINY)
    assert "10-class head" in out and "the base model is unchanged" in out, out


# ----------------------------------------------------------------------------------------------- slow

@pytest.mark.slow
def test_retrofit_torchvision() -> None:
    out = run_example("retrofit_torchvision.py")
    assert "excluded by include/exclude" in out and "state_dict and pickled model both reload" in out, out


@pytest.mark.slow
def test_finetune_folder() -> None:
    out = run_example("finetune_folder.py")
    for name in ("config.json", "metrics.csv", "model.safetensors", "se_adapter.safetensors"):
        assert name in out, out
    assert "rebuilt from the adapter" in out, out


@pytest.mark.slow
def test_retrofit_timm_resnet50_is_seresnet50() -> None:
    out = run_example("retrofit_timm.py")
    assert "4. init='paper': 28,088,024 parameters" in out, out


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
