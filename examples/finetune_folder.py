"""Fine-tune the SE blocks of a small timm ResNet on a folder of images, then rebuild it from the adapter.

    python examples/finetune_folder.py [--model resnet10t] [--epochs 1] [--keep DIR]

Writes a tiny ImageFolder (``train/CLASS/*.png`` and ``val/CLASS/*.png``, three colours) into a
temporary folder and runs :func:`se_retrofit.finetune.finetune` on it: the engine behind

    se-retrofit convert-and-finetune resnet10t --data DIR --out RUN --epochs 1 --no-pretrained

It then lists the run folder and rebuilds the fine-tuned model from ``se_adapter.safetensors`` with
:func:`se_retrofit.load`. Offline, on the CPU, with random weights whose norm statistics are
randomised as a stand-in for trained ones; with a network, start from ``pretrained=True``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import se_retrofit
from se_retrofit.data import build_datasets
from se_retrofit.finetune import finetune
from se_retrofit.models import create_model
from se_retrofit.testing import perturb_norms

SIZE = 32


def write_image_folder(root: Path, classes: int = 3, train: int = 12, val: int = 4, seed: int = 0) -> Path:
    """``root/{train,val}/classN/*.png``: noisy images, each class tinted one colour."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("val", val)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.uniform(0, 80, (SIZE, SIZE, 3))
                pixels[..., c % 3] += 150
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    return root


def base_model(name: str) -> torch.nn.Module:
    """The model before the retrofit; the same weights every call (seeded), as pretrained ones would be."""
    torch.manual_seed(0)
    return perturb_norms(create_model(name, pretrained=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet10t", help="timm name or torchvision:NAME (default resnet10t)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--keep", type=Path, default=None,
                        help="copy the run folder to this new folder (it must not exist) instead of deleting it")
    args = parser.parse_args()
    if args.keep is not None and os.path.lexists(args.keep):
        # Checked now, not when copying: the copy comes after the whole training run.
        parser.error(f"--keep {args.keep}: already exists; name a folder that does not exist yet")

    with tempfile.TemporaryDirectory() as tmp:
        data = write_image_folder(Path(tmp) / "images")
        model = base_model(args.model)
        train, val, classes = build_datasets(str(data), model, image_size=SIZE)
        print(f"data: {len(train)} train / {len(val)} val images, classes {classes}")

        out = Path(tmp) / "run"
        result = finetune(model, train, val, out_dir=out, epochs=args.epochs, batch_size=8, lr=1e-2,
                          warmup_epochs=0, train="se", device="cpu", workers=0, base_model=args.model,
                          progress=False)
        files = sorted(p.name for p in out.iterdir())
        missing = {"config.json", "metrics.csv", "model.safetensors", "se_adapter.safetensors"} - set(files)
        assert not missing, f"run folder lacks {sorted(missing)}"
        print("\nrun folder:", ", ".join(files))
        print((out / "metrics.csv").read_text().strip())

        # The adapter holds the SE blocks and the new 3-class head; the backbone comes from the base model.
        rebuilt = se_retrofit.load(out, base_model(args.model)).eval()
        trained = result.model.eval()
        x = torch.rand(2, 3, SIZE, SIZE)
        with torch.no_grad():
            gap = (rebuilt(x) - trained(x)).abs().max().item()
        assert gap == 0.0, gap
        adapter = (out / "se_adapter.safetensors").stat().st_size
        full = (out / "model.safetensors").stat().st_size
        print(f"\nrebuilt from the adapter ({adapter:,} bytes; the full model.safetensors is {full:,}): "
              f"max |output difference| = {gap:.1e}")
        if args.keep is not None:
            shutil.copytree(out, args.keep)
            print(f"run folder copied to {args.keep}")


if __name__ == "__main__":
    main()
