"""Save only the SE weights (and a new head) of a retrofitted model, and rebuild it on the base model.

    python examples/load_adapter.py [--model resnet50]

``save_adapter`` writes ``se_adapter.safetensors`` (the SE blocks, plus the modules named in
``extra_modules``) and ``se_adapter_config.json`` (the SEConfig, the SE module names, the base model's
name). ``se_retrofit.load(folder, base_model)`` re-runs ``apply`` with the saved config on the base
model and loads the saved tensors; the classifier is resized first when the adapter carries one of
another width.

"Training" is simulated by randomising the SE blocks and giving the model a new 10-class head, so the
script runs offline in seconds; the base model is built with ``pretrained=False``, and the same base
object is handed to ``load`` (it is not modified). In real use both sides create the base model the
same way, e.g. ``timm.create_model("resnet50", pretrained=True)``.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import timm
import torch

import se_retrofit
from se_retrofit.testing import perturb_norms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50", help="a timm model name (default resnet50)")
    args = parser.parse_args()

    torch.manual_seed(0)
    base = perturb_norms(timm.create_model(args.model, pretrained=False)).eval()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}

    se_model = se_retrofit.apply(base)
    se_model.reset_classifier(10)                      # a new task with 10 classes
    with torch.no_grad():                              # stand-in for fine-tuning
        for _, block in se_retrofit.se_blocks(se_model):
            block.fc2.weight.normal_(std=0.05)

    with tempfile.TemporaryDirectory() as tmp:
        head = se_model.pretrained_cfg["classifier"]   # the classifier's module name: "fc", "head.fc", ...
        folder = se_retrofit.save_adapter(se_model, Path(tmp) / "adapter", base_model=args.model,
                                          extra_modules=[head])
        meta = json.loads((folder / "se_adapter_config.json").read_text())
        adapter_bytes = (folder / "se_adapter.safetensors").stat().st_size
        full_bytes = sum(t.numel() * t.element_size() for t in se_model.state_dict().values())
        print(f"adapter folder: {sorted(p.name for p in folder.iterdir())}")
        print(f"  {len(meta['se_modules'])} SE modules + extra modules {meta['extra_modules']}, "
              f"config {meta['se_config']}")
        print(f"  se_adapter.safetensors: {adapter_bytes:,} bytes; the whole state_dict: {full_bytes:,} bytes "
              f"({adapter_bytes / full_bytes:.1%})")

        rebuilt = se_retrofit.load(folder, base).eval()

    x = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        gap = (rebuilt(x) - se_model.eval()(x)).abs().max().item()
    assert gap == 0.0, gap
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in base_state.items()), "load() modified the base"
    assert rebuilt.get_classifier().out_features == 10
    print(f"rebuilt model: {rebuilt.get_classifier().out_features}-class head, "
          f"max |output difference| to the saved model = {gap:.1e}; the base model is unchanged")


if __name__ == "__main__":
    main()
