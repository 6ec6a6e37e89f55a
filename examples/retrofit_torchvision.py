"""Retrofit a torchvision ResNet-18: dry run, options, a training step, saving and loading.

    python examples/retrofit_torchvision.py

- ``find_sites`` first: where SE would go, without changing anything;
- ``apply`` with options: reduction 8, SE only in the last two stages;
- one optimisation step on the SE blocks alone, which moves the outputs away from the original's while
  the backbone stays exactly as it was: its BatchNorm layers are kept in eval mode, as
  ``se-retrofit convert-and-finetune`` does (in train mode they would rewrite their running statistics,
  which changes the backbone's function without any optimizer);
- saving: the state_dict (the portable way) and the whole pickled model.

Runs offline on the CPU (``weights=None``; norm statistics are randomised as a stand-in for trained
weights). With a network, use ``weights="DEFAULT"`` and drop ``perturb_norms``.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch
import torchvision

import se_retrofit
from se_retrofit.testing import perturb_norms
from se_retrofit.training.freeze import freeze_batchnorm


def main() -> None:
    torch.manual_seed(0)
    model = perturb_norms(torchvision.models.resnet18(weights=None)).eval()
    options = dict(reduction=8, include=["layer3", "layer4"])

    # Dry run: nothing is modified.
    plan = se_retrofit.find_sites(model, **options)
    print(plan)

    se_model = se_retrofit.apply(model, **options)
    assert [s.se_name for s in plan.sites] == [n for n, _ in se_retrofit.se_blocks(se_model)]
    print(f"\nconfig recorded on the model: {se_retrofit.get_config(se_model)}")

    x = torch.rand(4, 3, 96, 96)
    with torch.no_grad():
        reference = model(x)
        assert torch.equal(reference, se_model.eval()(x)), "identity init must not change the outputs"

    # Train only the SE blocks for one step. The backbone is frozen: no gradients for its weights, and its
    # BatchNorm layers in eval mode so that the forward does not update their running statistics.
    for name, p in se_model.named_parameters():
        p.requires_grad = ".se." in name
    trainable = [p for p in se_model.parameters() if p.requires_grad]
    print(f"trainable: {sum(p.numel() for p in trainable):,} of {sum(p.numel() for p in se_model.parameters()):,} "
          "parameters")
    backbone = {k: v.clone() for k, v in se_model.state_dict().items() if ".se." not in k}
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    se_model.train()
    frozen_norms = freeze_batchnorm(se_model)          # after train(), which would switch them back
    loss = torch.nn.functional.cross_entropy(se_model(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    block = se_model.layer3[0].se
    print(f"first step: |grad fc2| = {block.fc2.weight.grad.abs().sum():.3e}, "
          f"|grad fc1| = {block.fc1.weight.grad.abs().sum():.3e} (fc1 learns once fc2 is non-zero)")
    optimizer.step()
    se_model.eval()
    after = se_model.state_dict()
    changed = [k for k, v in backbone.items() if not torch.equal(v, after[k])]
    assert not changed, f"the frozen backbone changed: {changed[:3]}"
    with torch.no_grad():
        moved = (se_model(x) - reference).abs().max().item()
    assert moved > 0, "the step did not change the SE blocks' output"
    print(f"after one step the outputs moved by up to {moved:.3e}, through the SE blocks alone: all "
          f"{len(backbone)} backbone tensors are unchanged ({frozen_norms} BatchNorm layers kept in eval mode)")

    with tempfile.TemporaryDirectory() as tmp:
        # Portable: a state_dict, loaded into the same architecture retrofitted with the same options.
        torch.save(se_model.state_dict(), Path(tmp) / "se_resnet18_state.pt")
        fresh = se_retrofit.apply(torchvision.models.resnet18(weights=None), se_retrofit.get_config(se_model))
        fresh.load_state_dict(torch.load(Path(tmp) / "se_resnet18_state.pt", weights_only=True))
        # Whole model: the generated block classes pickle by their source text. Loading a pickle runs code,
        # so only do it for files you made yourself (weights_only=False).
        torch.save(se_model, Path(tmp) / "se_resnet18.pt")
        loaded = torch.load(Path(tmp) / "se_resnet18.pt", weights_only=False)
        with torch.no_grad():
            expected = se_model(x)
            assert torch.equal(expected, fresh.eval()(x))
            assert torch.equal(expected, loaded.eval()(x))
        print(f"state_dict and pickled model both reload; loaded block class: {type(loaded.layer3[0]).__name__}")


if __name__ == "__main__":
    main()
