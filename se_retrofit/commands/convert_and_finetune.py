"""``se-retrofit convert-and-finetune MODEL --data DIR --out DIR``: build, retrofit, fine-tune, save.

Everything that can be refused is checked before the first expensive step (options, device, the
``--out`` folder, then the model name, then the data), and nothing is written until all of it passed.
Under ``torchrun`` the same command trains with DDP; only rank 0 writes.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

from ..training.options import AMP_DTYPES, OPTIMIZERS, TRAIN_MODES, TrainOptions, parse_checkpoint_every
from ._options import INTERRUPTED_EXIT, add_conversion_options, conversion_kwargs


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "convert-and-finetune",
        help="add SE blocks to a model and fine-tune them on a dataset",
        description="Retrofit Squeeze-and-Excitation blocks into MODEL, fine-tune on --data, and write the run "
                    "(config, metrics, curves, report, weights, SE adapter, resumable checkpoints) to --out.",
    )
    parser.add_argument("model", metavar="MODEL", help="timm model name, or torchvision:NAME")
    parser.add_argument("--data", required=True, metavar="DIR", help="'digits' (built-in), or an ImageFolder "
                        "directory (DIR/train + DIR/val, or one folder of class subfolders split by --val-split)")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR",
                        help="run folder: must be new or empty, unless --resume")

    model = parser.add_argument_group("model")
    model.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=None,
                       help="start from the library's pretrained weights (needs a network); "
                            "default: yes, unless --checkpoint is given")
    model.add_argument("--checkpoint", type=Path, default=None, metavar="FILE",
                       help="local weights (.safetensors or .pth state dict) loaded before conversion")
    model.add_argument("--checkpoint-ema", action=argparse.BooleanOptionalAction, default=None,
                       help="from a training checkpoint holding raw and EMA weights (timm's train.py with "
                            "--model-ema, DeiT's model_ema), load the EMA ones; an error for a file without them "
                            "(default: the raw ones, with a warning)")
    add_conversion_options(parser)

    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=int, default=10, metavar="N", help="default 10")
    train.add_argument("--batch-size", type=int, default=32, metavar="B",
                       help="images per step, per process under torchrun (default 32)")
    train.add_argument("--lr", type=float, default=None, metavar="LR",
                       help="peak learning rate; default 1e-3 (AdamW) / 0.05 (SGD), 10x lower with --train all")
    train.add_argument("--train", choices=TRAIN_MODES, default="se",
                       help="se, se+head: SE blocks and head only (the same; default se); all: every layer; "
                            "staged: se+head, then all with the backbone at --backbone-lr-scale")
    train.add_argument("--stage1-epochs", type=int, default=None, metavar="N",
                       help="length of the first stage of --train staged (default half the epochs)")
    train.add_argument("--backbone-lr-scale", type=float, default=0.1, metavar="F",
                       help="backbone lr factor in stage 2 of --train staged (default 0.1)")
    train.add_argument("--opt", choices=OPTIMIZERS, default="adamw", help="default adamw")
    train.add_argument("--weight-decay", type=float, default=None, metavar="WD",
                       help="default 0.05 (AdamW) / 1e-4 (SGD); none on biases and norm weights")
    train.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    train.add_argument("--warmup-epochs", type=float, default=None, metavar="E",
                       help="linear warmup before the cosine decay (default 1; 0.1 when --epochs is 1)")
    train.add_argument("--min-lr", type=float, default=0.0, metavar="LR", help="end of the cosine (default 0)")
    train.add_argument("--label-smoothing", type=float, default=0.1, metavar="S", help="default 0.1")
    train.add_argument("--clip-grad", type=float, default=None, metavar="NORM",
                       help="clip the gradient norm (default: no clipping)")
    train.add_argument("--ema", action="store_true", help="validate and save an EMA of the weights")
    train.add_argument("--ema-decay", type=float, default=0.999, metavar="D", help="default 0.999")
    train.add_argument("--no-freeze-bn", dest="freeze_bn", action="store_false",
                       help="let frozen layers' batch norms update their running statistics "
                            "(by default they keep them, so the backbone stays exactly the pretrained one)")
    train.add_argument("--seed", type=int, default=0, help="weights of new layers, data split and order (default 0)")

    data = parser.add_argument_group("data")
    data.add_argument("--val-split", type=float, default=0.1, metavar="F",
                      help="validation fraction of a single-folder dataset (default 0.1)")
    data.add_argument("--image-size", type=int, default=None, metavar="N",
                      help="default: the model's input size (32 for digits)")
    data.add_argument("--verify-images", action=argparse.BooleanOptionalAction, default=True,
                      help="open and check every image before training, so that unreadable files are skipped "
                           "with a warning instead of stopping the run (default); --no-verify-images starts at "
                           "once on very large folders, and a bad file then stops the run when it is read")
    data.add_argument("--workers", type=int, default=2, metavar="N",
                      help="loader processes (default 2); 0 makes a resumed run bit-identical even with random "
                           "augmentation")

    runtime = parser.add_argument_group("runtime")
    runtime.add_argument("--device", default="auto", help="auto (default: CUDA when available), cpu, cuda or cuda:N")
    runtime.add_argument("--amp", action="store_true",
                         help="mixed precision: bfloat16 on the CPU and recent GPUs, else float16 with a grad scaler")
    runtime.add_argument("--amp-dtype", choices=AMP_DTYPES, default="auto", help="with --amp, force the AMP dtype (default auto)")
    runtime.add_argument("--channels-last", action="store_true", help="NHWC memory format")
    runtime.add_argument("--compile", action="store_true",
                         help="torch.compile the training forward (minutes of compiling on the CPU)")
    runtime.add_argument("--resume", action="store_true", help="continue the run in --out from last.pt")
    runtime.add_argument("--checkpoint-every", default="10m", metavar="STEPS|TIME",
                         help="mid-epoch checkpoints: a step count (200) or a duration (30s, 10m; default 10m); "
                              "0: only at the end of each epoch")
    runtime.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                         help="no progress bars (they are off anyway when stdout is not a terminal)")
    parser.set_defaults(func=run)
    return parser


def training_options(args: argparse.Namespace) -> TrainOptions:
    steps, seconds = parse_checkpoint_every(args.checkpoint_every)
    return TrainOptions(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, train=args.train, opt=args.opt,
        weight_decay=args.weight_decay, momentum=args.momentum, warmup_epochs=args.warmup_epochs,
        min_lr=args.min_lr, label_smoothing=args.label_smoothing, clip_grad=args.clip_grad, ema=args.ema,
        ema_decay=args.ema_decay, stage1_epochs=args.stage1_epochs, backbone_lr_scale=args.backbone_lr_scale,
        freeze_bn=args.freeze_bn, amp=args.amp, amp_dtype=args.amp_dtype, channels_last=args.channels_last,
        compile=args.compile, device=args.device, workers=args.workers, seed=args.seed,
        checkpoint_every_steps=steps, checkpoint_every_seconds=seconds)


def run(args: argparse.Namespace) -> int:
    from ..training.naming import command_options

    with command_options():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from .. import data as data_module
    from ..config import SEConfig
    from ..finetune import finetune
    from ..training import distributed, outputs
    from ..training.devices import amp_dtype, resolve_device
    from ..training.loop import seed_everything

    opts = training_options(args)
    se_config = SEConfig(**conversion_kwargs(args))
    if not 0.0 < args.val_split < 1.0:
        raise ValueError(f"--val-split must be between 0 and 1, got {args.val_split}; try 0.1")
    if args.image_size is not None and args.image_size < 8:
        raise ValueError(f"--image-size must be at least 8 pixels, got {args.image_size}")
    pretrained = args.pretrained if args.pretrained is not None else args.checkpoint is None
    if args.data != "digits" and not Path(args.data).exists():
        raise FileNotFoundError(f"--data {args.data} does not exist; pass 'digits' for the built-in dataset or an "
                                "ImageFolder directory (DIR/train + DIR/val, or DIR/CLASS/*.jpg)")
    if args.data != "digits":
        _check_apart(Path(args.out), Path(args.data))
    # last.pt holds every weight of a resumed run: the starting weights need not be there (moved, offline)
    from_last = args.resume and (Path(args.out) / outputs.LAST).is_file()
    if args.checkpoint is not None and not from_last and args.checkpoint.is_dir():
        raise ValueError(f"--checkpoint {args.checkpoint} is a folder; pass the .safetensors or .pth file in it")
    if args.checkpoint is not None and not from_last and not args.checkpoint.is_file():
        raise FileNotFoundError(f"--checkpoint {args.checkpoint} does not exist; pass a .safetensors or .pth file")

    device = resolve_device(opts.device, distributed.local_rank(), distributed.launched_world_size())
    amp_dtype(device, opts.amp, opts.amp_dtype)
    ctx = distributed.setup(device)
    try:
        distributed.main_first(lambda: outputs.prepare_out_dir(args.out, args.resume), ctx)
        seed_everything(opts.seed)
        model = (_build_model(args.model, False, None) if from_last else
                 _build_model(args.model, pretrained, args.checkpoint, args.checkpoint_ema))
        train_ds, val_ds, class_names = _datasets(args, model, opts.seed, ctx)
        run_info = {
            "model": {"name": args.model, "pretrained": pretrained,
                      "checkpoint": str(args.checkpoint.resolve()) if args.checkpoint else None,
                      **({"checkpoint_ema": args.checkpoint_ema} if args.checkpoint_ema is not None else {})},
            "data": {"data": args.data if args.data == "digits" else str(Path(args.data).resolve()),
                     # where a validation folder is used as it is, the fraction has no effect to record
                     **({"val_split": args.val_split} if data_module.splits_for_validation(args.data) else {}),
                     "image_size": data_module.image_size_used(args.data, model, args.image_size)},
        }
        # what versions before these two were resolved recorded: their run folders resume as they did
        before = {"data": {"val_split": args.val_split, "image_size": args.image_size}}
        result = finetune(model, train_ds, val_ds, out_dir=args.out, resume=args.resume, class_names=class_names,
                          se_config=se_config, base_model=args.model, run_info=run_info,
                          progress=args.progress, resume_hint=_resume_hint(args), run_info_before=before,
                          **_fields(opts))
    finally:
        distributed.teardown(ctx)
    return INTERRUPTED_EXIT if result.interrupted else 0


def _check_apart(out: Path, data: Path) -> None:
    """Refuse a run folder inside the data (it would become a class of the next run) or around it."""
    out, data = out.resolve(), data.resolve()
    if out == data or data in out.parents:
        raise ValueError(f"--out {out} is inside --data {data}: its files would be read as images of a class "
                         "by the next run; choose an --out outside the data folder")
    if out in data.parents:
        raise ValueError(f"--data {data} is inside --out {out}; choose an --out that does not hold the data")


def _fields(opts: TrainOptions) -> dict[str, Any]:
    return opts.to_dict()


def _build_model(spec: str, pretrained: bool, checkpoint: Path | None, prefer_ema: bool | None = None):
    """Create the model and load ``--checkpoint`` into it, resizing the head to the file's first."""
    from .. import checkpoint as ckpt
    from ..fitting import load_into
    from ..models import create_model, head_modules, reset_classifier

    model = create_model(spec, pretrained=pretrained)
    if checkpoint is not None:
        weights = ckpt.load_weights(checkpoint, prefer_ema=prefer_ema, model=model)
        saved_classes = _checkpoint_classes(model, weights)
        if saved_classes is not None:
            reset_classifier(model, saved_classes)
        prefixes = tuple(f"{name}." for name, _ in head_modules(model))
        if prefixes:
            own_head = {k: v for k, v in model.state_dict().items() if k.startswith(prefixes)}
            if not own_head.keys() & weights.keys():
                # a backbone saved without its classifier (num_classes=0): the head is fitted to the data anyway
                weights = {**weights, **own_head}
        load_into(model, weights, strict=True)
    return model


def _checkpoint_classes(model: Any, weights: dict[str, Any]) -> int | None:
    """The checkpoint's number of classes where it differs from the model's, else None.

    Read from the head's output layers (every tensor of the head whose first dimension is the model's
    class count: a linear layer's, a 1x1 convolution's (DLA, DPN), an MLP head's last layer, a
    distillation head beside the classifier), so that any head timm's ``reset_classifier`` makes anew
    is resized before the file is loaded; a head whose output layers disagree is left to the load's
    shape error.
    """
    from ..models import head_modules, num_classes_of

    current = num_classes_of(model)
    prefixes = tuple(f"{name}." for name, _ in head_modules(model))
    if current is None or not prefixes:
        return None
    widths = {int(weights[k].shape[0]) for k, v in model.state_dict().items()
              if k.startswith(prefixes) and k in weights and v.ndim >= 1 and v.shape[0] == current
              and weights[k].ndim == v.ndim and weights[k].shape[1:] == v.shape[1:]}
    return widths.pop() if len(widths) == 1 and current not in widths else None


def _datasets(args: argparse.Namespace, model: Any, seed: int, ctx: Any) -> tuple[Any, Any, list[str]]:
    """Every rank scans the same folder: rank 0 alone warns, and an error is printed once (`on_every_rank`).

    Under torchrun the images are verified in shares (`_verify_in_shares`), and the ranks compare the
    data sets they built (two nodes with different copies of a folder would each shard their own list).
    """
    from .. import data as data_module
    from ..training import distributed

    folder = args.data != "digits"
    shared = folder and ctx.enabled and args.verify_images
    checked = _verify_in_shares(args, ctx) if shared else None
    progress = _ScanProgress(args.verify_images) if ctx.is_main and folder and not shared else None

    def scan() -> tuple[tuple[Any, Any, list[str]], tuple[int, int, int, str] | None]:
        found = data_module.build_datasets(args.data, model, val_split=args.val_split, seed=seed,
                                           image_size=args.image_size, verify_images=args.verify_images,
                                           progress=progress, checked=checked)
        # inside the shared error handling, and only where there are other processes to compare with (also
        # after shared verification, where files the listing did not reach were opened by each rank)
        return found, _data_digest(Path(args.data), *found) if folder and ctx.enabled else None

    with warnings.catch_warnings():
        if not ctx.is_main:
            warnings.simplefilter("ignore", UserWarning)
        found, digest = distributed.on_every_rank(scan, ctx)
    if progress is not None:
        progress.finish()
    if digest is not None:
        distributed.same_on_every_rank(digest, _describe_digest, ctx, hint=_SAME_FOLDER)
    return found


def _verify_in_shares(args: argparse.Namespace, ctx: Any) -> Any:
    """Under torchrun, verify each image once per run instead of once per process: every rank lists the
    folder, the ranks check that they list the same files (else shares would miss some), each opens its
    share, and every rank gets every share's problems, as `ImageChecks` for `build_datasets`. The
    warnings the checks raise (Pillow's) are re-raised by rank 0, which alone warns."""
    from .. import data as data_module
    from ..training import distributed

    listing_progress = _ScanProgress(False, listing=True) if ctx.is_main else None

    def listed() -> tuple[Any, tuple[int, str, str | None]]:
        found = data_module.list_images(args.data, progress=listing_progress)
        return found, _list_digest(Path(args.data), found)

    listing, digest = distributed.on_every_rank(listed, ctx)
    if listing_progress is not None:
        listing_progress.finish()
    distributed.same_on_every_rank(digest, _describe_list, ctx, hint=_SAME_FOLDER)
    progress = _ScanProgress(True, processes=ctx.world_size) if ctx.is_main else None

    def check_share() -> tuple[dict[int, Any], list[tuple[type[Warning], str]]]:
        share = listing.files[ctx.rank::ctx.world_size]
        # recorded under the user's filters: one that turns a warning into an error makes the file unreadable,
        # as in a single process
        with warnings.catch_warnings(record=True) as caught:
            found = data_module.check_images(share, progress=progress)
        # by position in the list every rank holds (paths differ where nodes mount the folder differently)
        return ({ctx.rank + k * ctx.world_size: result for k, result in found.items()},
                [(_sendable(w.category), str(w.message)) for w in caught])

    share_problems, share_warnings = distributed.on_every_rank(check_share, ctx)
    if progress is not None:
        progress.finish()
    problems: dict[int, Any] = {}
    for found, raised in distributed.gather((share_problems, share_warnings), ctx):
        problems.update(found)
        for category, message in raised if ctx.is_main else ():
            warnings.warn(message, category, stacklevel=2)
    return data_module.ImageChecks(listing, problems)


def _sendable(category: type[Warning]) -> type[Warning]:
    """``category`` where another process can unpickle it (a class it can import by name), else UserWarning."""
    module = sys.modules.get(category.__module__)
    return category if module is not None and getattr(module, category.__qualname__, None) is category else UserWarning


def _list_digest(root: Path, listing: Any) -> tuple[int, str, str | None]:
    """``(files, hash of their paths relative to the folder, why the listing stopped early)``: nodes may
    mount the folder at different places. (File names that are not valid UTF-8 hash as their bytes.)"""
    import hashlib

    digest = hashlib.sha256()
    for path in listing.files:
        digest.update(f"{Path(path).relative_to(root).as_posix()}\n".encode("utf-8", "surrogateescape"))
    return len(listing.files), digest.hexdigest()[:16], listing.stopped


def _describe_list(digest: tuple[int, str, str | None]) -> str:
    files, names, stopped = digest
    return f"{files:,} image files (file list {names})" + (f", listed up to this error: {stopped}" if stopped else "")


_SAME_FOLDER = ("Every process must read the same folder (a shared file system, or identical copies on every "
                "node); where the counts agree, file names differ.")


def _data_digest(root: Path, train: Any, val: Any, classes: list[str]) -> tuple[int, int, int, str]:
    """``(classes, training images, validation images, hash of the file list)``, paths taken relative to the
    folder (so nodes may mount it at different places)."""
    import hashlib

    digest = hashlib.sha256()
    for part in (train, val):
        for path, label in part.samples:
            line = f"{Path(path).relative_to(root).as_posix()}\t{label}\n"
            digest.update(line.encode("utf-8", "surrogateescape"))
        digest.update(b"--\n")
    return len(classes), len(train), len(val), digest.hexdigest()[:16]


def _describe_digest(digest: tuple[int, int, int, str]) -> str:
    classes, train, val, files = digest
    return f"{train:,} training and {val:,} validation images in {classes} classes (file list {files})"


class _ScanProgress:
    """A line after a class folder when ``every`` seconds have passed since the last one (a million images
    take minutes to verify, and a silent start looks like a hang), and one when the scan ends; nothing for
    a quick scan."""

    def __init__(self, verifying: bool, every: float = 10.0, clock: Callable[[], float] = time.monotonic,
                 processes: int = 1, listing: bool = False) -> None:
        self.verifying, self.every, self.clock = verifying, every, clock
        # listing (under torchrun, before the processes share the verification) opens no file
        self.doing, self.done, self.things = ("listing", "listed", "files") if listing else ("scanning", "scanned",
                                                                                           "images")
        # under torchrun each process verifies its share of the images; rank 0 reports its own
        self.share = f" of this process's share (1/{processes})" if processes > 1 else ""
        self.start = self.last = clock()
        self.images = 0
        self.shown = False

    def __call__(self, images: int) -> None:
        self.images = images
        now = self.clock()
        if now - self.last >= self.every:
            hint = "; --no-verify-images skips opening each one" if self.verifying else ""
            print(f"{self.doing} the data: {images:,} {self.things}{self.share} so far ({now - self.start:.0f} s"
                  f"{hint})", flush=True)
            self.last, self.shown = now, True

    def finish(self) -> None:
        if self.shown:
            print(f"{self.done} {self.images:,} {self.things}{self.share} in {self.clock() - self.start:.0f} s",
                  flush=True)


def _resume_hint(args: argparse.Namespace) -> str:
    from ..training import distributed

    argv = sys.argv[1:]
    processes = distributed.launched_world_size()
    # the checkpoint holds every rank's state: resuming needs as many processes, so the launcher too
    launcher = "se-retrofit " if processes == 1 else f"torchrun --nproc_per_node={processes} -m se_retrofit.cli "
    if "convert-and-finetune" in argv:
        command = launcher + " ".join(shlex.quote(a) for a in argv[argv.index("convert-and-finetune"):])
        if "--resume" not in argv:
            command += " --resume"
    else:
        command = f"the same command with --resume (it continues from {args.out / 'last.pt'})"
        if processes > 1:
            command += f", under torchrun with {processes} processes"
    return f"to continue: {command}"
