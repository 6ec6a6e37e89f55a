"""Distributed training on the CPU: gloo, two processes, rank 0 writing.

With ``train="se"`` (frozen BN) and SGD, two processes of 4 images per step see exactly the images one
process of 8 would (``DistributedSampler`` deals rank r the positions r, r+2, ... of one permutation),
and DDP averages their gradients: the weights must match a single-process run up to float rounding.
That test forks the two ranks from the test process (no second import of torch, so it is fast); the
slow one runs the real command under ``python -m torch.distributed.run``.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import traceback
import warnings
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from se_retrofit.finetune import finetune
from se_retrofit.models import create_model
from se_retrofit.training.distributed import DistContext
from se_retrofit.training.sampling import ShardSampler, TrainBatches
from test_finetune import MODEL, SIZE, Quadrants, pretrained_like, write_image_folder

REPO = Path(__file__).resolve().parents[1]
OPTIONS = dict(epochs=2, train="se", opt="sgd", lr=0.05, warmup_epochs=0, label_smoothing=0.1, clip_grad=5.0,
               verbose=False, progress=False)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_samplers_shard_every_image_once_and_resume_mid_epoch() -> None:
    data = Quadrants(20)
    ranks = [DistContext(rank=r, world_size=2) for r in range(2)]
    val = [list(ShardSampler(data, ctx)) for ctx in ranks]
    assert sorted(val[0] + val[1]) == list(range(20)), f"validation shards overlap or miss images: {val}"

    loaders = [TrainBatches(data, batch_size=4, workers=0, seed=3, ctx=ctx) for ctx in ranks]
    epoch = [[b[1].tolist() for b in loader.epoch(1)] for loader in loaders]
    single = TrainBatches(data, batch_size=8, workers=0, seed=3, ctx=DistContext())
    together = [b[1].tolist() for b in single.epoch(1)]
    assert loaders[0].steps_per_epoch == single.steps_per_epoch == 2
    for step in range(2):
        assert sorted(epoch[0][step] + epoch[1][step]) == sorted(together[step]), (
            f"step {step}: the two ranks' batches are not the single-process batch")
    resumed = [b[1].tolist() for b in loaders[0].epoch(1, skip_batches=1)]
    assert resumed == epoch[0][1:], "skipping a batch on resume must continue the same order"
    assert [b[1].tolist() for b in loaders[0].epoch(2)] != epoch[0], "each epoch must reshuffle"


class _RandomDraws(torch.utils.data.Dataset):
    """What augmentation draws in a loader worker: a number from the worker's torch generator."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.randint(0, 2**30, (1,)), index


def test_loader_workers_of_each_rank_draw_their_own_augmentation() -> None:
    """timm seeds with seed + rank: with the same worker seeds on every rank, N ranks would give N different
    images the same crop and flip at every step. Rank 0 keeps the seeds of a single-process run."""
    draws = {}
    for rank, world in ((0, 2), (1, 2), (0, 1)):
        loader = TrainBatches(_RandomDraws(), batch_size=2, workers=1, seed=3, ctx=DistContext(rank=rank, world_size=world))
        draws[rank, world] = [d.flatten().tolist() for d, _ in loader.epoch(0)]
    assert draws[0, 2] != draws[1, 2], f"both ranks drew the same augmentation numbers: {draws[0, 2]}"
    assert draws[0, 2][0] == draws[0, 1][0], "rank 0 should draw what a single process draws first"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_two_ranks(target, args: tuple, timeout: float) -> list[int | None]:
    """Fork two ranks of ``target(rank, port, *args)`` on a free port; their exit codes (killed if stuck)."""
    context = multiprocessing.get_context("fork")
    port = _free_port()
    procs = [context.Process(target=target, args=(rank, port, *args)) for rank in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=timeout)
        if proc.is_alive():
            proc.kill()
    return [proc.exitcode for proc in procs]


def _rank_main(rank: int, port: int, out: Path, weights: Path) -> None:
    """One forked rank: the environment torchrun would give it, then the public API."""
    try:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
        torch.set_num_threads(1)
        model = create_model(MODEL)
        model.load_state_dict(load_file(str(weights)))
        result = finetune(model, Quadrants(24), Quadrants(10, seed=1), out_dir=out, batch_size=4, **OPTIONS)
        save_file({k: v.contiguous() for k, v in result.model.state_dict().items()},
                  str(out.parent / f"rank{rank}.safetensors"))
        (out.parent / f"rank{rank}.top1").write_text(repr(result.history[-1]["val_top1"]))
    except BaseException:
        traceback.print_exc()
        os._exit(1)
    os._exit(0)


def test_two_gloo_processes_match_one_process_with_twice_the_batch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    weights = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in pretrained_like(create_model(MODEL)).state_dict().items()}, str(weights))

    model = create_model(MODEL)
    model.load_state_dict(load_file(str(weights)))
    single = finetune(model, Quadrants(24), Quadrants(10, seed=1), batch_size=8, **OPTIONS)

    codes = _run_two_ranks(_rank_main, (tmp_path / "ddp", weights), timeout=240)
    assert codes == [0, 0], f"DDP ranks failed (exit codes {codes})"

    rank0, rank1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2))
    unsynced = [k for k in rank0 if not torch.equal(rank0[k], rank1[k])]
    assert not unsynced, f"ranks ended with different weights: {unsynced[:3]}"
    reference = single.model.state_dict()
    for key, value in rank0.items():
        assert torch.allclose(value, reference[key], rtol=1e-4, atol=1e-6), (
            f"{key}: DDP 2x4 differs from one process x8 by {(value - reference[key]).abs().max():.3g}")
    assert any(v.abs().sum() > 0 for k, v in rank0.items() if k.endswith("se.fc2.weight")), "SE blocks did not train"
    top1 = float((tmp_path / "rank1.top1").read_text())
    assert top1 == pytest.approx(single.history[-1]["val_top1"]), "validation must cover the whole set across ranks"

    out = tmp_path / "ddp"
    rows = (out / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3, f"metrics.csv should have a header and 2 rows (rank 0 only writes): {rows}"
    saved = torch.load(out / "last.pt", weights_only=True)
    assert len(saved["ranks"]) == 2, "the checkpoint must hold both ranks' RNG states"
    assert (out / "se_adapter.safetensors").exists() and (out / "model.safetensors").exists()


def _driver(tmp_path: Path) -> Path:
    """A script that runs the CLI, for torchrun to start (torchrun takes a script, not a console entry point)."""
    driver = tmp_path / "driver.py"
    driver.write_text(
        "import sys\n"
        "from se_retrofit import cli\n"
        "sys.exit(cli.main(sys.argv[1:]))\n")
    return driver


def _torchrun_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")


@pytest.mark.slow
def test_torchrun_cli_trains_with_two_processes(tmp_path: Path) -> None:
    """The real launcher, ``--train staged --ema``: stage 2 re-wraps DDP over the whole network."""
    data = write_image_folder(tmp_path / "images", train_per_class=8, val_per_class=3)
    driver = _driver(tmp_path)
    out = tmp_path / "run"
    env = _torchrun_env()
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(driver),
         "convert-and-finetune", MODEL, "--data", str(data), "--out", str(out), "--no-pretrained",
         "--image-size", str(SIZE), "--batch-size", "4", "--epochs", "2", "--workers", "0", "--device", "cpu",
         "--checkpoint-every", "2", "--train", "staged", "--ema"],
        env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"torchrun run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert done.stdout.count("best top-1") == 1, f"the summary must be printed by rank 0 only:\n{done.stdout}"
    assert len((out / "metrics.csv").read_text().splitlines()) == 3
    config = (out / "config.json").read_text()
    assert '"world_size": 2' in config, config
    saved = torch.load(out / "last.pt", weights_only=True)
    assert saved["progress"]["complete"] and len(saved["ranks"]) == 2
    for name in ("model.safetensors", "report.md", "curves.png"):
        assert (out / name).is_file(), f"{name} missing after the DDP run"
    assert not (out / "se_adapter.safetensors").exists(), "staged training changes the backbone: no adapter"
    assert "stage 2" in done.stdout, f"the switch to stage 2 (and the DDP re-wrap) did not happen:\n{done.stdout}"

    # resuming with another number of processes is refused before anything in the run folder changes
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    alone = subprocess.run(
        [sys.executable, str(driver), "convert-and-finetune", MODEL, "--data", str(data), "--out", str(out),
         "--no-pretrained", "--image-size", str(SIZE), "--batch-size", "4", "--epochs", "2", "--workers", "0",
         "--device", "cpu", "--checkpoint-every", "2", "--train", "staged", "--ema", "--resume"],
        env=env, capture_output=True, text=True, timeout=300)
    assert alone.returncode == 2 and "written by 2 process(es), this run has 1" in alone.stderr, alone.stderr[-2000:]
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert after == before, f"a refused resume changed {sorted(k for k in after if after[k] != before.get(k))}"


@pytest.mark.slow
def test_torchrun_reports_a_refused_out_once(tmp_path: Path) -> None:
    """Every rank re-raises rank 0's refusal (so none waits in a collective); only rank 0 prints it."""
    data = write_image_folder(tmp_path / "images", train_per_class=2, val_per_class=1)
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(_driver(tmp_path)),
         "convert-and-finetune", MODEL, "--data", str(data), "--out", str(out), "--no-pretrained",
         "--image-size", str(SIZE), "--device", "cpu", "--workers", "0"],
        env=_torchrun_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode != 0, "a refused --out must fail the launch"
    printed = (done.stdout + done.stderr).count("refusing to overwrite it")
    assert printed == 1, f"the refusal was printed {printed} times:\n{done.stderr[-3000:]}"
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_torchrun_reports_a_data_problem_once(tmp_path: Path) -> None:
    """Every rank scans the same folder; its warnings and errors are rank 0's to print."""
    def launch(data: Path, *extra: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
             str(_driver(tmp_path)), "convert-and-finetune", MODEL, "--data", str(data), "--out",
             str(tmp_path / f"run{len(extra)}"), "--no-pretrained", "--image-size", str(SIZE), "--device", "cpu",
             "--workers", "0", *extra],
            env=_torchrun_env(), capture_output=True, text=True, timeout=300)
        assert done.returncode != 0, "the launch should fail"
        return done.stdout + done.stderr

    text = launch(write_image_folder(tmp_path / "one", classes=1, train_per_class=2, val_per_class=1))
    assert text.count("but a classifier needs at least 2 classes") == 1, f"the error should be printed once:\n{text[-3000:]}"
    data = write_image_folder(tmp_path / "two", classes=2, train_per_class=2, val_per_class=1)
    (data / "train" / "class0" / "broken.png").write_bytes(b"not a png")
    text = launch(data, "--batch-size", "64")
    assert text.count("skipped 1 unreadable image file") == 1, f"the warning should be printed once:\n{text[-3000:]}"
    assert text.count("fewer than one batch") == 1, f"the batch error should be printed once:\n{text[-3000:]}"


def _error_of_rank(rank: int, port: int, out: Path, body) -> None:
    """One forked rank with a process group: ``body(rank, ctx)``, then ``out/rank{rank}.txt`` holds "no error"
    or the error it raised and whether it is marked as an echo of another rank's (printed by that one)."""
    try:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
        from se_retrofit.training import distributed

        ctx = distributed.setup(torch.device("cpu"))
        try:
            body(rank, ctx)
            (out / f"rank{rank}.txt").write_text("no error")
        except (ValueError, OSError) as exc:
            (out / f"rank{rank}.txt").write_text(f"{exc}|{getattr(exc, 'echo_of_rank0', False)}")
        distributed.teardown(ctx)
    except BaseException:
        traceback.print_exc()
        os._exit(1)
    os._exit(0)


def _fail_on_rank1_only(rank: int, ctx: DistContext) -> None:
    from se_retrofit.training import distributed

    def check() -> str:
        if rank == 1:
            raise FileNotFoundError("data missing on this node")
        return "fine"

    distributed.on_every_rank(check, ctx)


def test_an_error_on_one_rank_only_is_raised_everywhere_and_printed_by_that_rank(tmp_path: Path) -> None:
    """A problem only rank 1 meets must neither go unprinted nor leave rank 0 waiting in a collective."""
    codes = _run_two_ranks(_error_of_rank, (tmp_path, _fail_on_rank1_only), timeout=120)
    assert codes == [0, 0], f"ranks failed: {codes}"
    rank0, rank1 = ((tmp_path / f"rank{r}.txt").read_text() for r in range(2))
    assert rank1 == "data missing on this node|False", f"rank 1 should print its own error: {rank1}"
    assert rank0 == "on rank 1: data missing on this node|True", f"rank 0 should raise a quiet copy: {rank0}"


def _scan_own_copy(folders: list[Path], verify: bool = True):
    def scan(rank: int, ctx: DistContext) -> None:
        import argparse

        from se_retrofit.commands.convert_and_finetune import _datasets

        args = argparse.Namespace(data=str(folders[rank]), val_split=0.1, image_size=SIZE, verify_images=verify)
        _datasets(args, create_model(MODEL), 0, ctx)
    return scan


@pytest.mark.parametrize("verify", [True, False], ids=["verified in shares", "not verified"])
def test_processes_that_see_different_data_are_stopped(tmp_path: Path, verify: bool) -> None:
    """Two nodes with different copies of the folder would each shard their own image list: an error, not a run.
    Verifying, the ranks compare their file lists before splitting the verification between them (else a file
    only one rank lists could go unchecked); without it, the data sets they built."""
    same = [write_image_folder(tmp_path / f"node{r}", classes=2, train_per_class=3, val_per_class=1) for r in range(2)]
    for folder in same:  # each rank finds the broken file of its share under its own path
        for name in ("0broken.png", "broken.png"):
            (folder / "train" / "class1" / name).write_bytes(b"not a png")
    codes = _run_two_ranks(_error_of_rank, (tmp_path, _scan_own_copy(same, verify)), timeout=120)
    assert codes == [0, 0], f"ranks failed: {codes}"
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)] == ["no error"] * 2, \
        "identical copies at different paths must be accepted"
    extra = tmp_path / "node1" / "train" / "class0" / "extra.png"
    extra.write_bytes((extra.parent / "0.png").read_bytes())
    codes = _run_two_ranks(_error_of_rank, (tmp_path, _scan_own_copy(same, verify)), timeout=120)
    assert codes == [0, 0], f"ranks failed: {codes}"
    rank0, rank1 = ((tmp_path / f"rank{r}.txt").read_text() for r in range(2))
    counts = ("rank 0 has 10 image files", "rank 1 has 11 image files") if verify else \
        ("rank 0 has 8 training", "rank 1 has 9 training")
    assert all(c in rank0 for c in counts) and rank0.endswith("|False"), rank0
    assert rank1.endswith("|True"), f"rank 1 should raise a copy that rank 0 prints: {rank1}"


def test_a_folder_missing_on_one_node_is_named_when_the_lists_differ(tmp_path: Path) -> None:
    """The listing stops quietly where a folder is wrong (the scan after it raises); when that happens on one
    node only, the lists differ, and the message must say why rather than only count the files."""
    here = write_image_folder(tmp_path / "node0", classes=2, train_per_class=3, val_per_class=1)
    codes = _run_two_ranks(_error_of_rank, (tmp_path, _scan_own_copy([here, tmp_path / "unmounted"])), timeout=120)
    assert codes == [0, 0], f"ranks failed: {codes}"
    rank0, rank1 = ((tmp_path / f"rank{r}.txt").read_text() for r in range(2))
    assert "rank 1 has 0 image files" in rank0 and "listed up to this error: FileNotFoundError: data folder" in rank0 \
        and "unmounted" in rank0 and rank0.endswith("|False"), rank0
    assert rank1.endswith("|True"), f"rank 1 should raise a copy that rank 0 prints: {rank1}"


def _scan_and_record(data: Path, out: Path):
    """A rank's scan of ``data`` as the CLI does it, recording which files this process opened to verify and
    what it built."""
    def scan(rank: int, ctx: DistContext) -> None:
        import argparse

        from se_retrofit import data as data_module
        from se_retrofit.commands.convert_and_finetune import _datasets

        opened: list[str] = []
        check = data_module._check_image

        def recorded(path):
            opened.append(str(path))
            if path.name.startswith("odd"):
                warnings.warn(f"odd file {path.name}")  # as Pillow warns about some files it reads
            return check(path)

        data_module._check_image = recorded  # this forked process only
        args = argparse.Namespace(data=str(data), val_split=0.1, image_size=SIZE, verify_images=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train, val, classes = _datasets(args, create_model(MODEL), 0, ctx)
        (out / f"opened{rank}.json").write_text(json.dumps(opened))
        (out / f"built{rank}.json").write_text(json.dumps({
            "train": [str(p) for p, _ in train.samples], "val": [str(p) for p, _ in val.samples],
            "warnings": [str(w.message) for w in caught if "unreadable" in str(w.message)],
            "odd": sorted(str(w.message) for w in caught if "odd file" in str(w.message))}))
    return scan


def test_torchrun_verifies_each_image_once_and_every_rank_skips_the_same_broken_ones(tmp_path: Path) -> None:
    """Under torchrun the ranks split the verification: each image is opened by one process (not by every
    one, which on ImageNet is 1.28M files read N times), and every rank still leaves out the same broken file."""
    data = write_image_folder(tmp_path / "data", classes=2, train_per_class=5, val_per_class=2)
    broken = data / "train" / "class1" / "broken.png"
    broken.write_bytes(b"not a png")
    for name in ("odd0.png", "odd1.png"):  # next to each other in the list, so in the two ranks' shares
        (data / "train" / "class0" / name).write_bytes((data / "train" / "class0" / "0.png").read_bytes())
    out = tmp_path / "out"
    out.mkdir()
    codes = _run_two_ranks(_error_of_rank, (out, _scan_and_record(data, out)), timeout=120)
    assert codes == [0, 0], f"ranks failed: {codes}"
    assert [(out / f"rank{r}.txt").read_text() for r in range(2)] == ["no error"] * 2
    opened = [json.loads((out / f"opened{r}.json").read_text()) for r in range(2)]
    every = sorted(str(p) for p in data.rglob("*.png"))
    assert sorted(opened[0] + opened[1]) == every, f"each of the {len(every)} files should be opened once: {opened}"
    assert opened[0] and opened[1], f"both ranks should verify a share: {opened}"
    built = [json.loads((out / f"built{r}.json").read_text()) for r in range(2)]
    assert built[0]["train"] == built[1]["train"] and built[0]["val"] == built[1]["val"], "the ranks differ"
    assert str(broken) not in built[0]["train"] + built[0]["val"], "the broken file was not left out"
    assert len(built[0]["train"]) + len(built[0]["val"]) == len(every) - 1, built[0]
    assert [len(b["warnings"]) for b in built] == [1, 0], f"rank 0 alone should warn, once: {built}"
    assert built[0]["odd"] == ["odd file odd0.png", "odd file odd1.png"] and built[1]["odd"] == [], \
        f"rank 0 should re-raise the warnings of every share, rank 1 none: {built}"


def _outcome_of_rank(rank: int, port: int, out: Path, work: Callable[[], object], caught: type[Exception]) -> None:
    """Run ``work`` as one of two ranks and write to ``out/rank{rank}.txt`` what it ended with: "no error", or
    the ``caught`` error's message and whether it is rank 0's echo; exit 1 on anything else."""
    try:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
        torch.set_num_threads(1)
        try:
            work()
            (out / f"rank{rank}.txt").write_text("no error")
        except caught as exc:
            (out / f"rank{rank}.txt").write_text(f"{exc}|{getattr(exc, 'echo_of_rank0', False)}")
    except BaseException:
        traceback.print_exc()
        os._exit(1)
    os._exit(0)


def _finetune_own_size(rank: int, port: int, out: Path) -> None:
    _outcome_of_rank(rank, port, out, lambda: finetune(create_model(MODEL), Quadrants(12 + 4 * rank),
                                                       Quadrants(6, seed=1), batch_size=4, **OPTIONS), ValueError)


def test_finetune_refuses_processes_with_datasets_of_different_sizes(tmp_path: Path) -> None:
    """The library path: each rank hands its own dataset; shards of different lists would train on neither."""
    codes = _run_two_ranks(_finetune_own_size, (tmp_path,), timeout=180)
    assert codes == [0, 0], f"ranks failed: {codes}"
    rank0, rank1 = ((tmp_path / f"rank{r}.txt").read_text() for r in range(2))
    assert "rank 0 has 12 training" in rank0 and "rank 1 has 16 training" in rank0, rank0
    assert rank0.endswith("|False") and rank1.endswith("|True"), (rank0, rank1)


class _NanImages(Quadrants):
    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, target = super().__getitem__(index)
        return torch.full_like(image, float("nan")), target


def _finetune_nan_on_rank1(rank: int, port: int, out: Path) -> None:
    data = _NanImages(24) if rank == 1 else Quadrants(24)
    _outcome_of_rank(rank, port, out, lambda: finetune(pretrained_like(create_model(MODEL)), data,
                                                       Quadrants(6, seed=1), out_dir=out / "run", batch_size=4,
                                                       **OPTIONS), RuntimeError)


def test_a_nan_loss_on_one_rank_stops_every_rank_at_the_same_step(tmp_path: Path) -> None:
    """Rank 1 alone has a NaN loss at step 1 (rank 0's turns NaN a step later, through the averaged
    gradients): both must stop with the same error, printed once, and neither wait in a collective."""
    codes = _run_two_ranks(_finetune_nan_on_rank1, (tmp_path,), timeout=180)
    assert codes == [0, 0], f"ranks failed or hung: {codes}"
    rank0, rank1 = ((tmp_path / f"rank{r}.txt").read_text() for r in range(2))
    assert "NaN or inf at epoch 1/2, step 1 (of 3)" in rank0, rank0
    assert rank0.rsplit("|", 1)[0] == rank1.rsplit("|", 1)[0], f"the ranks disagree:\n{rank0}\n{rank1}"
    assert rank0.endswith("|False") and rank1.endswith("|True"), "rank 0 alone should print it"
    assert not (tmp_path / "run" / "model.safetensors").exists() and not (tmp_path / "run" / "last.pt").exists()
