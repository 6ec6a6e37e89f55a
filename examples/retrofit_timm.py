"""Add SE blocks to a timm ResNet and check what the retrofit promises.

    python examples/retrofit_timm.py [--model resnet50]

1. every original weight is still there, bit-identical, and only SE tensors are new;
2. with the default ``init="identity"`` the outputs do not change;
3. a converted block (the first site of the plan) keeps its class: its new class is a generated
   subclass of the original one;
4. for ``resnet50``, ``init="paper"`` gives timm's hand-written ``seresnet50``: same parameter count,
   same state_dict keys, and the same outputs once given the same weights;
5. a backward pass reaches the new SE blocks.

A model in which ``apply`` finds no place for an SE block (``--model seresnet18``, which has its own)
prints the plan, says so and exits 0.

Runs offline on the CPU: the model is built with ``pretrained=False`` and its norm layers are given
random statistics as a stand-in for trained weights. A freshly built timm ResNet zeroes the last
BatchNorm of every residual branch, so its branches output exactly 0: check 2 would hold whatever
the SE blocks compute, and so would check 4 (the ``seresnet50`` it compares with gets the same
treatment). With a network, use ``timm.create_model(name, pretrained=True)`` and drop ``perturb_norms``.
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
    if not plan.sites:
        assert se_model.state_dict().keys() == model.state_dict().keys() and not se_retrofit.se_blocks(se_model)
        print(f"\nNo SE block was inserted into {args.model}: the lines above say why for each residual "
              "addition. Nothing to check.")
        return

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

    # 3. Classes are kept: the block of the first site really was converted, into a subclass of its class.
    site = plan.sites[0]
    block = se_model.get_submodule(site.block)
    original_class = type(model.get_submodule(site.block))
    assert type(block) is not original_class, f"{site.block} was not converted"
    assert isinstance(block, original_class), (type(block), original_class)
    assert dict(se_retrofit.se_blocks(se_model)).get(site.se_name) is se_model.get_submodule(site.se_name)
    print(f"3. {site.block or '<root>'} is a {type(block).__name__}, a subclass of {original_class.__module__}."
          f"{original_class.__name__}, holding the SE block {site.se_name}")

    # 4. resnet50 + init="paper" is seresnet50. The reference gets random norm statistics too: as built,
    # its residual branches output 0, and the comparison would pass whatever the SE blocks computed.
    if args.model == "resnet50":
        hand = perturb_norms(timm.create_model("seresnet50", pretrained=False)).eval()
        paper = se_retrofit.apply(model, init="paper").eval()
        n_paper = sum(p.numel() for p in paper.parameters())
        n_hand = sum(p.numel() for p in hand.parameters())
        assert n_paper == n_hand, (n_paper, n_hand)
        paper.load_state_dict(hand.state_dict())      # strict: the very same keys and shapes
        plain = timm.create_model("resnet50", pretrained=False).eval()
        plain.load_state_dict({k: v for k, v in hand.state_dict().items() if ".se." not in k})
        with torch.no_grad():
            reference = hand(x)
            gap = (paper(x) - reference).abs().max().item()
            without_se = (plain(x) - reference).abs().max().item()
        assert gap < 1e-4, gap
        assert without_se > 1e3 * gap, (without_se, gap)   # the SE blocks do shape these outputs
        print(f"4. init='paper': {n_paper:,} parameters, as timm's seresnet50 ({n_hand:,}); with its weights "
              f"loaded, max |output difference| = {gap:.2e} (the same weights without the SE blocks: "
              f"{without_se:.2e})")

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
