"""Retrofit a torchvision ResNet-18: dry run, options, a training step, saving and loading.

    python examples/retrofit_torchvision.py

- ``find_sites`` first: where SE would go, without changing anything;
- ``apply`` with options: reduction 8, SE only in the last two stages;
- one optimisation step on the SE blocks alone, which moves the outputs away from the original's;
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

    # Train only the SE blocks for one step.
    for name, p in se_model.named_parameters():
        p.requires_grad = ".se." in name
    trainable = [p for p in se_model.parameters() if p.requires_grad]
    print(f"trainable: {sum(p.numel() for p in trainable):,} of {sum(p.numel() for p in se_model.parameters()):,} "
          "parameters")
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    se_model.train()
    loss = torch.nn.functional.cross_entropy(se_model(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    block = se_model.layer3[0].se
    print(f"first step: |grad fc2| = {block.fc2.weight.grad.abs().sum():.3e}, "
          f"|grad fc1| = {block.fc1.weight.grad.abs().sum():.3e} (fc1 learns once fc2 is non-zero)")
    optimizer.step()
    se_model.eval()
    with torch.no_grad():
        moved = (se_model(x) - reference).abs().max().item()
    print(f"after one step the outputs moved by up to {moved:.3e}")

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
