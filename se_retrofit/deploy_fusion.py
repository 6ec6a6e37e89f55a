"""Deploy-time fusion of a rewritten block with its SE block kept.

RepVGG-style blocks (timm's ``RepVggBlock`` and ``MobileOneBlock``, FastViT's ``MobileOneBlock`` and
``ReparamLargeKernelConv``) train with parallel branches that ``timm.utils.reparameterize_model``
fuses into one convolution for deployment, through the block's ``reparameterize()`` or
``switch_to_deploy()``. Their fused forward applies an attention slot (``attn`` or ``se``: an
``nn.Identity``, or None, when the block was built without attention) to that convolution's output,
which is exactly where ``apply`` puts SE: on the sum of the branches. Such a block fuses with its SE
block moved into the slot, and keeps the function it had.

Whether the slot computes what the rewritten forward computed is checked, never assumed: on a copy of
the block, with its SE block given a gate far from 1 (an identity-initialised SE block would pass in any
slot, or in none), the fused copy must give the rewritten block's output on a probe input. Where no slot
does (SE on a residual branch whose sum the fusion absorbs, as in FastViT's ``RepMixer``), the fusion is
refused with the reason and the block is left as it was. ``fuse()``, which returns a new module in
place of the block, is always refused: the SE block would have nowhere to go.
"""
from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from torch import nn

from .se_block import SEBlock

# Attention slots that RepVGG-style blocks apply to the fused convolution's output.
SLOTS = ("attn", "se")


def fuse_keeping_se(block: nn.Module, base: type, name: str, *args: Any, **kwargs: Any) -> Any:
    """Run ``base.<name>`` (``reparameterize`` / ``switch_to_deploy``) on ``block``, a block ``apply``
    rewrote, with its SE block moved into the slot of the fused forward; the block becomes an instance of
    ``base`` again. Raises ``RuntimeError`` (block untouched) where the fused block would not compute what
    the rewritten one does. ``args`` and ``kwargs`` go to the method."""
    unbound = getattr(base, name)

    def method(target: nn.Module) -> Any:
        return unbound(target, *args, **kwargs)
    ses = [(child, module) for child, module in block.named_children() if isinstance(module, SEBlock)]
    if len(ses) != 1:
        raise RuntimeError(refusal(base, name, f"the block holds {len(ses)} SE blocks, not one"))
    se_name, se = ses[0]
    probe = _probe(block)
    if probe is None:
        raise RuntimeError(refusal(base, name, "it has no 2-D convolution to size a probe input from"))
    for slot in _slots(block, se_name):
        try:
            alike = _fuses_alike(block, base, method, se_name, slot, probe)
        except Exception as exc:  # the block's own code on a copy: whatever it raises means "not verified"
            raise RuntimeError(refusal(base, name, f"fusing a copy of it failed ({type(exc).__name__}: {exc})")) from exc
        if alike:
            result = method(block)
            _into_slot(block, base, se_name, slot, se)
            return result
    raise RuntimeError(refusal(base, name, "its fused forward has no attention slot (`attn` or `se`) where the SE "
                                           "block computes what it computes now"))


def refusal(base: type, name: str, why: str) -> str:
    return (f"{base.__qualname__}.{name}() cannot run on this block se_retrofit rewrote: {why}, so fusing its "
            "branches would drop the SE block or change what the block computes. Re-parameterise the model "
            "before se_retrofit.apply (a fused block has no residual sum left and gets no SE), or keep this block "
            "unfused; for training, the retrofitted model is the right form.")


def _slots(block: nn.Module, se_name: str) -> list[str]:
    """Where the SE block may go: where it is (a slot that was None), then each unused slot."""
    return [se_name] * (se_name in SLOTS) + [s for s in SLOTS if type(block._modules.get(s)) is nn.Identity]


def _probe(block: nn.Module) -> torch.Tensor | None:
    """A seeded input for the block: two images of 16x16 with its first convolution's channels."""
    conv = next((m for m in block.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        return None
    weight = conv.weight
    generator = torch.Generator().manual_seed(0)
    return torch.randn(2, conv.in_channels, 16, 16, generator=generator, dtype=weight.dtype).to(weight.device)


def _fuses_alike(block: nn.Module, base: type, method: Callable, se_name: str, slot: str,
                 probe: torch.Tensor) -> bool:
    """Whether fusing a copy of ``block`` with its SE block in ``slot`` keeps the copy's output (eval mode,
    the SE gate made non-trivial first)."""
    trial = copy.deepcopy(block).eval()
    se = trial._modules[se_name]
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in se.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device))
        before = trial(probe)
        method(trial)
        _into_slot(trial, base, se_name, slot, se)
        after = trial(probe)
    if not isinstance(before, torch.Tensor) or not isinstance(after, torch.Tensor) or after.shape != before.shape:
        return False
    scale = before.abs().max().item() or 1.0
    return torch.allclose(after, before, rtol=1e-4, atol=1e-4 * scale)


def _into_slot(block: nn.Module, base: type, se_name: str, slot: str, se: SEBlock) -> None:
    """Give the fused ``block`` its class's own forward, with ``se`` in ``slot``."""
    block.__class__ = base
    if slot != se_name:
        del block._modules[se_name]
        setattr(block, slot, se)
