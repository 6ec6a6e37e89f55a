"""Add SE blocks to a timm ResNet and check what the retrofit promises.

    python examples/retrofit_timm.py [--model resnet50]

1. every original weight is still there, bit-identical, and only SE tensors are new;
2. with the default ``init="identity"`` the outputs do not change;
3. each block keeps its class (a generated subclass of it);
4. for ``resnet50``, ``init="paper"`` gives timm's hand-written ``seresnet50``: same parameter count,
   same state_dict keys, and the same outputs once given the same weights;
5. a backward pass reaches the new SE blocks.

Runs offline on the CPU: the model is built with ``pretrained=False`` and its norm layers are given
random statistics as a stand-in for trained weights (a freshly built timm ResNet zeroes the last
BatchNorm of every residual branch, so its branches output exactly 0 and check 2 would be vacuous).
With a network, use ``timm.create_model(name, pretrained=True)`` and drop ``perturb_norms``.
"""
from __future__ import annotations

import argparse
import time

import timm
import torch

import se_retrofit
from se_retrofit.testing import perturb_norms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50", help="a timm model name (default resnet50)")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = perturb_norms(timm.create_model(args.model, pretrained=False)).eval()

    start = time.perf_counter()
    se_model = se_retrofit.apply(model)           # a new model; `model` is not touched
    seconds = time.perf_counter() - start
    plan = se_retrofit.get_plan(se_model)
    print(f"se_retrofit.apply({args.model}): {len(plan.sites)} SE blocks in {seconds:.1f} s")
    print(plan)

    # 1. The original state_dict is a subset of the new one, tensor for tensor.
    before, after = model.state_dict(), se_model.state_dict()
    changed = [k for k, v in before.items() if k not in after or not torch.equal(v, after[k])]
    new = [k for k in after if k not in before]
    assert not changed, f"original tensors changed: {changed[:3]}"
    assert all(".se" in k for k in new), new
    print(f"\n1. all {len(before)} original tensors kept bit-identical; {len(new)} new tensors, "
          f"e.g. {new[0]}")

    # 2. Identity init: same function.
    x = torch.rand(2, 3, 160, 160)
    se_model.eval()
    with torch.no_grad():
        diff = (model(x) - se_model(x)).abs().max().item()
    assert diff < 1e-5, diff
    print(f"2. identity init: max |output difference| = {diff:.2e}")

    # 3. Classes are kept.
    name, block = next((n, m) for n, m in se_model.named_modules() if hasattr(m, "se") and n)
    original_class = type(model.get_submodule(name))
    assert isinstance(block, original_class)
    print(f"3. {name} is a {type(block).__name__}, a subclass of {original_class.__module__}."
          f"{original_class.__name__}")

    # 4. resnet50 + init="paper" is seresnet50.
    if args.model == "resnet50":
        hand = timm.create_model("seresnet50", pretrained=False).eval()
        paper = se_retrofit.apply(model, init="paper").eval()
        n_paper = sum(p.numel() for p in paper.parameters())
        n_hand = sum(p.numel() for p in hand.parameters())
        assert n_paper == n_hand, (n_paper, n_hand)
        paper.load_state_dict(hand.state_dict())      # strict: the very same keys and shapes
        with torch.no_grad():
            gap = (paper(x) - hand(x)).abs().max().item()
        assert gap < 1e-4, gap
        print(f"4. init='paper': {n_paper:,} parameters, as timm's seresnet50 ({n_hand:,}); with its weights "
              f"loaded, max |output difference| = {gap:.2e}")

    # 5. Gradients reach the SE blocks (fc2 on the first step; fc1 once fc2 is no longer zero).
    se_model.train()
    se_model(x).logsumexp(dim=1).mean().backward()
    first = se_retrofit.se_blocks(se_model)[0][1]
    grad = first.fc2.weight.grad.abs().sum().item()
    assert grad > 0
    print(f"5. after one backward pass, |grad| of {se_retrofit.se_blocks(se_model)[0][0]}.fc2.weight "
          f"sums to {grad:.3e}")


if __name__ == "__main__":
    main()
