"""Nothing lost: a run stopped by SIGKILL or Ctrl-C and resumed ends bit-identical to an uninterrupted one.

This is what the checkpoint content, the step-indexed data order and the RNG bookkeeping are for. The
runs use ``--train staged --ema --clip-grad`` so that the resumed state covers a stage switch, BN
statistics, the EMA and the schedule, and timm's random training transforms so that a wrongly
restored RNG would show. One intra-op thread and ``--workers 0`` make CPU kernels deterministic.
"""
from __future__ import annotations

import csv
import multiprocessing
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import Dataset

from se_retrofit.finetune import finetune
from se_retrofit.models import create_model
from test_finetune import MODEL, SIZE, Quadrants, pretrained_like, write_image_folder

REPO = Path(__file__).resolve().parents[1]

# Runs the CLI; after the first mid-epoch ``last.pt`` it prints MARK, and then, depending on
# SE_TEST_INTERRUPT, blocks before the next checkpoint write (so the test's SIGKILL lands after at least
# one step of lost work, never after a later checkpoint) or sends itself SIGINT (Ctrl-C).
DRIVER = textwrap.dedent('''
    import os, signal, sys, time
    import torch
    torch.set_num_threads(1)
    import se_retrofit.checkpoint as ckpt

    mode = os.environ.get("SE_TEST_INTERRUPT", "")
    original_save = ckpt.atomic_save
    marked = []

    def atomic_save(obj, path, **kwargs):
        if marked and mode == "kill":
            time.sleep(600)
        result = original_save(obj, path, **kwargs)
        progress = obj.get("progress", {}) if isinstance(obj, dict) else {}
        if not marked and progress.get("step_in_epoch", 0) > 0:
            marked.append(progress["global_step"])
            print(f"MARK step {progress['global_step']}", flush=True)
            if mode == "sigint":
                os.kill(os.getpid(), signal.SIGINT)
        return result

    ckpt.atomic_save = atomic_save

    from se_retrofit import cli
    sys.exit(cli.main(sys.argv[1:]))
''')


pytestmark = pytest.mark.usefixtures("one_thread")


def assert_same_weights(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], what: str) -> None:
    assert expected.keys() == got.keys(), f"{what}: different tensors saved: {sorted(expected.keys() ^ got.keys())[:5]}"
    differ = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not differ, (f"{what}: {len(differ)} of {len(expected)} tensors differ from the uninterrupted run, e.g. "
                        f"{differ[:3]} (max abs diff {(expected[differ[0]] - got[differ[0]]).abs().max():.3g})")


def metric_rows(path: Path) -> list[dict[str, str]]:
    """metrics.csv without the wall-time column, which legitimately differs."""
    with open(path) as handle:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(handle)]


# ---------------------------------------------------------------------------------------- in-process

class Augmented(Quadrants):
    """Quadrants plus noise from the torch, NumPy and Python RNGs: all three must be restored on resume."""

    def __init__(self, n: int, interrupt_at: int | None = None) -> None:
        super().__init__(n)
        self.interrupt_at = interrupt_at
        self.loaded = 0

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        import random

        self.loaded += 1
        if self.loaded == self.interrupt_at:
            signal.raise_signal(signal.SIGINT)  # what Ctrl-C does, delivered mid-step
        image, target = super().__getitem__(index)
        noise = torch.randn(image.shape) * 0.1 + float(np.random.rand()) * 0.1 + random.random() * 0.1
        return image + noise, target


def _train(out: Path, data: Dataset, resume: bool = False):
    torch.manual_seed(0)
    model = pretrained_like(create_model(MODEL))
    torch.manual_seed(1234)  # finetune must not depend on the caller's RNG state
    return finetune(model, data, Quadrants(6, seed=1), out_dir=out, resume=resume, epochs=2, batch_size=8,
                    train="staged", ema=True, clip_grad=1.0, checkpoint_every_steps=2, verbose=False, progress=False)


@pytest.fixture(scope="module")
def api_reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("api") / "reference"
    assert not _train(out, Augmented(24)).interrupted
    return out


def test_ctrl_c_saves_and_resume_is_bit_identical(api_reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "stopped"
    stopped = _train(out, Augmented(24, interrupt_at=8 + 3))  # during the 2nd batch
    assert stopped.interrupted, "SIGINT did not stop the run"
    saved = torch.load(out / "last.pt", weights_only=True)
    assert saved["progress"]["global_step"] == 2 and saved["progress"]["step_in_epoch"] == 2, (
        f"expected the stop after the step in progress (step 2), checkpoint says {saved['progress']}")
    assert not (out / "model.safetensors").exists(), "an interrupted run must not look finished"

    resumed = _train(out, Augmented(24), resume=True)
    assert not resumed.interrupted and len(resumed.history) == 2
    assert_same_weights(load_file(str(api_reference / "model.safetensors")),
                        load_file(str(out / "model.safetensors")), "Ctrl-C + resume")
    assert metric_rows(api_reference / "metrics.csv") == metric_rows(out / "metrics.csv")


def _killable_child(out: Path, conn: Connection) -> None:
    """Forked run that reports its first mid-epoch checkpoint, then hangs before writing the next one."""
    import se_retrofit.checkpoint as ckpt

    original = ckpt.atomic_save
    marked: list[int] = []

    def atomic_save(obj: dict, path: Path, **kwargs: object) -> Path:
        if marked:
            time.sleep(600)
        written = original(obj, path, **kwargs)
        if obj["progress"]["step_in_epoch"] > 0:
            marked.append(obj["progress"]["global_step"])
            conn.send(marked[0])
        return written

    ckpt.atomic_save = atomic_save
    try:
        _train(out, Augmented(24))
    finally:
        os._exit(0)


def test_sigkill_mid_epoch_then_resume_is_bit_identical_forked(api_reference: Path, tmp_path: Path) -> None:
    """The fast variant: the run is forked from the test process (no re-import), killed, then resumed here."""
    out = tmp_path / "killed"
    context = multiprocessing.get_context("fork")
    parent, child = context.Pipe()
    proc = context.Process(target=_killable_child, args=(out, child))
    proc.start()
    try:
        assert parent.poll(180), "the forked run wrote no mid-epoch checkpoint within 180 s"
        step = parent.recv()
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(60)
    finally:
        if proc.is_alive():
            proc.kill()
    assert proc.exitcode == -signal.SIGKILL, f"expected death by SIGKILL, got exit code {proc.exitcode}"
    saved = torch.load(out / "last.pt", weights_only=True)
    assert saved["progress"]["global_step"] == step and saved["progress"]["step_in_epoch"] > 0, saved["progress"]
    assert not (out / "model.safetensors").exists(), "the killed run must not have finished"

    resumed = _train(out, Augmented(24), resume=True)
    assert not resumed.interrupted
    assert_same_weights(load_file(str(api_reference / "model.safetensors")),
                        load_file(str(out / "model.safetensors")), "SIGKILL + resume")
    assert metric_rows(api_reference / "metrics.csv") == metric_rows(out / "metrics.csv")


def test_resume_refuses_a_changed_config(api_reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "copy"
    out.mkdir()
    for path in api_reference.iterdir():
        (out / path.name).write_bytes(path.read_bytes())
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"holds a different run \(train.lr: 0.001 -> 0.5"):
        finetune(pretrained_like(create_model(MODEL)), Augmented(24), Quadrants(6, seed=1), out_dir=out, resume=True,
                 epochs=2, batch_size=8, train="staged", ema=True, clip_grad=1.0, checkpoint_every_steps=2, lr=0.5,
                 verbose=False)
    assert before == {p.name: p.read_bytes() for p in out.iterdir()}, "a refused resume modified the run folder"


# ------------------------------------------------------------------------------------------ subprocess

@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("resume")
    data = write_image_folder(root / "images")
    torch.manual_seed(0)
    weights = root / "base.safetensors"
    save_file({k: v.contiguous() for k, v in pretrained_like(create_model(MODEL)).state_dict().items()}, str(weights))
    driver = root / "driver.py"
    driver.write_text(DRIVER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return {"root": root, "data": data, "weights": weights, "driver": driver, "env": env}


def _argv(setup: dict, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(setup["driver"]), "convert-and-finetune", MODEL, "--data", str(setup["data"]),
            "--out", str(out), "--checkpoint", str(setup["weights"]), "--image-size", str(SIZE), "--batch-size", "8",
            "--epochs", "2", "--workers", "0", "--train", "staged", "--ema", "--clip-grad", "1",
            "--checkpoint-every", "2", *extra]


def _run(setup: dict, out: Path, mode: str = "", *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(_argv(setup, out, *extra), env=dict(setup["env"], SE_TEST_INTERRUPT=mode),
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def reference_run(cli_setup: dict) -> Path:
    out = cli_setup["root"] / "reference"
    done = _run(cli_setup, out)
    assert done.returncode == 0, f"uninterrupted run failed:\n{done.stdout}\n{done.stderr}"
    return out


def _wait_for_mark(proc: subprocess.Popen, timeout: float) -> list[str]:
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    seen = []
    while True:
        try:
            line = lines.get(timeout=timeout)
        except queue.Empty:
            proc.kill()
            raise AssertionError(f"no mid-epoch checkpoint within {timeout}s; output so far:\n{''.join(seen)}")
        seen.append(line)
        if line.startswith("MARK"):
            return seen
        if proc.poll() is not None and lines.empty():
            raise AssertionError(f"run ended before a mid-epoch checkpoint:\n{''.join(seen)}")


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_is_bit_identical(cli_setup: dict, reference_run: Path) -> None:
    out = cli_setup["root"] / "killed"
    proc = subprocess.Popen(_argv(cli_setup, out), env=dict(cli_setup["env"], SE_TEST_INTERRUPT="kill"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_mark(proc, timeout=180)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, f"expected death by SIGKILL, got {proc.returncode}"
    saved = torch.load(out / "last.pt", weights_only=True)
    assert saved["progress"]["step_in_epoch"] > 0, f"checkpoint is not mid-epoch: {saved['progress']}"
    assert not (out / "model.safetensors").exists(), "the killed run must not have finished"

    resumed = _run(cli_setup, out, "", "--resume")
    assert resumed.returncode == 0, f"resume failed:\n{resumed.stdout}\n{resumed.stderr}"
    assert "resuming" in resumed.stdout, resumed.stdout
    assert_same_weights(load_file(str(reference_run / "model.safetensors")),
                        load_file(str(out / "model.safetensors")), "SIGKILL + resume")
    assert metric_rows(reference_run / "metrics.csv") == metric_rows(out / "metrics.csv")


@pytest.mark.slow
def test_sigint_exits_cleanly_with_a_resume_hint(cli_setup: dict, reference_run: Path) -> None:
    out = cli_setup["root"] / "sigint"
    stopped = _run(cli_setup, out, "sigint")
    assert stopped.returncode == 130, f"Ctrl-C should exit with 130, got {stopped.returncode}:\n{stopped.stderr}"
    assert "SIGINT received" in stopped.stderr, stopped.stderr
    assert "--resume" in stopped.stdout and "last.pt" in stopped.stdout, stopped.stdout
    assert "Traceback" not in stopped.stderr, stopped.stderr

    weights = cli_setup["weights"]
    moved = weights.rename(weights.with_suffix(".moved"))  # last.pt holds every weight: the start file may go
    try:
        resumed = _run(cli_setup, out, "", "--resume")
    finally:
        moved.rename(weights)
    assert resumed.returncode == 0, f"resume failed:\n{resumed.stdout}\n{resumed.stderr}"
    assert_same_weights(load_file(str(reference_run / "model.safetensors")),
                        load_file(str(out / "model.safetensors")), "SIGINT + resume")


def test_a_forked_worker_neither_announces_nor_requests_the_stop(capfd: pytest.CaptureFixture) -> None:
    """Data-loader workers are forked with the main process's handler; Ctrl-C reaches them too, and each
    printed the stop message once more before this."""
    from se_retrofit.training.interrupt import GracefulStop

    with GracefulStop() as stop:
        pid = os.fork()
        if pid == 0:
            os.kill(os.getpid(), signal.SIGINT)
            os._exit(1 if stop.requested else 0)
        _, status = os.waitpid(pid, 0)
        assert not stop.requested, "the worker's signal stopped the main process's run"
    assert os.waitstatus_to_exitcode(status) == 0, "the forked worker took the stop request for itself"
    assert "received" not in capfd.readouterr().err, "the forked worker announced the stop"


def test_the_resume_hint_under_torchrun_names_the_launcher_and_the_process_count(monkeypatch) -> None:
    """Following a hint without torchrun only meets the world-size refusal."""
    import argparse

    from se_retrofit.commands.convert_and_finetune import _resume_hint

    argv = ["se-retrofit", "convert-and-finetune", "resnet10t", "--data", "my data", "--out", "run"]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setenv("WORLD_SIZE", "2")
    hint = _resume_hint(argparse.Namespace(out=Path("run")))
    assert hint == ("to continue: torchrun --nproc_per_node=2 -m se_retrofit.cli convert-and-finetune resnet10t "
                    "--data 'my data' --out run --resume"), hint
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert _resume_hint(argparse.Namespace(out=Path("run"))).startswith("to continue: se-retrofit convert-and-finetune")


def test_a_resumed_run_checks_its_adapter_against_the_base_it_started_from(tmp_path: Path) -> None:
    """The CLI resumes by building the model from random weights and loading last.pt into it: apply's record
    of the base must come from the checkpoint, or save_adapter warns that the whole backbone changed."""
    import warnings

    def run(model: nn.Module, resume: bool):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            finetune(model, Quadrants(8), None, out_dir=tmp_path / "run", resume=resume, epochs=1, batch_size=8,
                     train="se", verbose=False, progress=False)
        return [str(w.message) for w in caught if "changed since se_retrofit.apply" in str(w.message)]

    torch.manual_seed(0)
    assert not run(pretrained_like(create_model(MODEL)), resume=False), "the first run warned about its own base"
    torch.manual_seed(1)
    said = run(create_model(MODEL), resume=True)
    assert not said, f"resuming into a randomly built model warned falsely: {said[0][:200]}"


def test_resuming_a_finished_run_leaves_its_files_as_they_were(tmp_path: Path) -> None:
    """A finished run resumed writes its final files again (to repair a lost one), and must write the same
    bytes: the adapter's safetensors metadata came out in a random order. Five resumes, so that the old
    behaviour passes once in 32."""
    import hashlib

    def digests() -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())}

    out = tmp_path / "run"
    torch.manual_seed(0)
    model = pretrained_like(create_model(MODEL))
    finetune(model, Quadrants(8), Quadrants(6, seed=1), out_dir=out, epochs=1, batch_size=8, train="se",
             verbose=False, progress=False)
    before = digests()
    assert "se_adapter.safetensors" in before and "best.safetensors" in before, f"files: {sorted(before)}"
    for attempt in range(5):
        torch.manual_seed(0)
        finetune(pretrained_like(create_model(MODEL)), Quadrants(8), Quadrants(6, seed=1), out_dir=out, resume=True,
                 epochs=1, batch_size=8, train="se", verbose=False, progress=False)
        after = digests()
        changed = sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))
        assert not changed, f"resume {attempt + 1} of a finished run rewrote {changed} with other bytes"


@pytest.mark.parametrize("lost", ["report.json", "report.md", "se_adapter.safetensors", "metrics.csv"])
def test_a_file_deleted_from_a_finished_run_comes_back_on_resume_as_it_was(tmp_path: Path, lost: str) -> None:
    """The guide promises that a finished run resumed writes its final files again, one deleted since coming
    back byte for byte; report.json was written only when report.md was missing too."""
    out = tmp_path / "run"
    args = dict(out_dir=out, epochs=1, batch_size=8, train="se", verbose=False, progress=False)
    torch.manual_seed(0)
    finetune(pretrained_like(create_model(MODEL)), Quadrants(8), Quadrants(6, seed=1), **args)
    before = (out / lost).read_bytes()
    (out / lost).unlink()
    torch.manual_seed(0)
    finetune(pretrained_like(create_model(MODEL)), Quadrants(8), Quadrants(6, seed=1), resume=True, **args)
    assert (out / lost).exists(), f"{lost}, deleted from a finished run, did not come back on --resume"
    assert (out / lost).read_bytes() == before, f"{lost} came back with other bytes"
