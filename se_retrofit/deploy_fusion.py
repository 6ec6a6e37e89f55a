"""Deploy-time fusion of a rewritten block with its SE block kept.

RepVGG-style blocks (timm's ``RepVggBlock`` and ``MobileOneBlock``; FastViT's ``MobileOneBlock`` and
``ReparamLargeKernelConv`` have the same slot) train with parallel branches that ``timm.utils.reparameterize_model``
fuses into one convolution for deployment, through the block's ``reparameterize()`` or
``switch_to_deploy()``. Their fused forward applies an attention slot (``attn`` or ``se``: an
``nn.Identity``, or None, when the block was built without attention) to that convolution's output,
which is exactly where ``apply`` puts SE: on the sum of the branches. Such a block fuses with its SE
block moved into the slot, and keeps the function it had.

Whether the slot computes what the rewritten forward computed is checked, never assumed: on a copy of
the block (in float64, without autocast or the user's hooks), with its SE block given a gate far from 1
(an identity-initialised SE block would pass in any slot, or in none), the fused copy must give the
rewritten block's output on a probe input. Where no slot
does (SE on a residual branch whose sum the fusion absorbs, as in FastViT's ``RepMixer``), the fusion is
refused with the reason and the block is left as it was. ``fuse()``, which returns a new module in
place of the block, is always refused: the SE block would have nowhere to go.
"""
from __future__ import annotations

import copy
from typing import Any

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
    ses = [(child, module) for child, module in block.named_children() if isinstance(module, SEBlock)]
    if len(ses) != 1:
        raise RuntimeError(refusal(base, name, f"the block holds {len(ses)} SE blocks, not one"))
    se_name = ses[0][0]
    probe = _probe(block)
    if probe is None:
        raise RuntimeError(refusal(base, name, "it has no 2-D convolution to size a probe input from"))
    failures = []
    for slot in _slots(block, se_name):
        try:
            alike = _fuses_alike(block, base, name, args, kwargs, se_name, slot, probe)
        except Exception as exc:  # the block's own code, on a copy: whatever it raises means "not this slot"
            failures.append(f"with the SE block in {slot!r}, fusing a copy failed ({type(exc).__name__}: {exc})")
            continue
        if alike:
            return _fuse(block, base, name, args, kwargs, se_name, slot)
    why = "its fused forward has no attention slot (`attn` or `se`) where the SE block computes what it computes now"
    raise RuntimeError(refusal(base, name, why + "".join(f"; {f}" for f in failures)))


def refusal(base: type, name: str, why: str) -> str:
    """The error for a deploy method that cannot run on a rewritten block: the reason, then the ways out."""
    return (f"{base.__qualname__}.{name}() cannot run on this block se_retrofit rewrote: {why}. Fusing its "
            "branches would drop the SE block or change what the block computes. Re-parameterise the model "
            "before se_retrofit.apply (a fused block has no residual sum left and gets no SE), or keep this block "
            "unfused; for training, the retrofitted model is the right form.")


def _slots(block: nn.Module, se_name: str) -> list[str]:
    """Where the SE block may go: where it is (a slot that was None), then each unused slot."""
    return [se_name] * (se_name in SLOTS) + [s for s in SLOTS if type(block._modules.get(s)) is nn.Identity]


def _probe(block: nn.Module) -> torch.Tensor | None:
    """A seeded float64 input for the block: two images of 16x16 with its first convolution's channels."""
    conv = next((m for m in block.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        return None
    generator = torch.Generator().manual_seed(0)
    return torch.randn(2, conv.in_channels, 16, 16, generator=generator, dtype=torch.float64)


def _fuse(block: nn.Module, base: type, name: str, args: tuple, kwargs: dict, se_name: str, slot: str) -> Any:
    """Fuse ``block`` with the base class's own method and put its SE block in ``slot``.

    The block is an instance of ``base`` while the method runs, so that a deploy method calling another
    (GhostNetV3's ``reparameterize`` calls ``switch_to_deploy``) reaches the base's, not this module again;
    and the SE block is out of it, so that the method's clean-up (timm's detaches every parameter but the
    fused convolution's) leaves the SE block's parameters as they were."""
    se, rewritten = block._modules.pop(se_name), block.__class__
    block.__class__ = base
    try:
        result = getattr(base, name)(block, *args, **kwargs)
    except BaseException:  # as it was, as far as the method left it
        block.__class__ = rewritten
        block._modules[se_name] = se
        raise
    if slot in block._modules:
        del block._modules[slot]
    setattr(block, slot, se)
    return result


def _fuses_alike(block: nn.Module, base: type, name: str, args: tuple, kwargs: dict, se_name: str, slot: str,
                 probe: torch.Tensor) -> bool:
    """Whether fusing a copy of ``block`` with its SE block in ``slot`` keeps the copy's output: in float64
    (the check is about where the SE block goes, not about rounding; float32 on MPS, which has no float64),
    in eval mode, without autocast or the block's hooks, with the SE gate made non-trivial first."""
    trial = _copy_without_hooks(block).eval()
    device = next((t.device for t in trial.parameters()), torch.device("cpu"))
    dtype = torch.float32 if device.type == "mps" else torch.float64
    trial.to(dtype)
    se = trial._modules[se_name]
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        for p in se.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p.device, p.dtype))
        x = probe.to(device, dtype)
        before = trial(x)
        _fuse(trial, base, name, args, kwargs, se_name, slot)
        after = trial(x)
    if not isinstance(before, torch.Tensor) or not isinstance(after, torch.Tensor) or after.shape != before.shape:
        return False
    scale = before.abs().max().item() or 1.0
    tolerance = 1e-4 if dtype == torch.float32 else 1e-8
    return torch.allclose(after, before, rtol=tolerance, atol=tolerance * scale)


def _copy_without_hooks(block: nn.Module) -> nn.Module:
    """A deep copy of ``block`` whose modules have no hooks: the user's hooks neither run on the probe nor
    need to be copyable."""
    memo: dict[int, Any] = {}
    for module in block.modules():
        for attr in ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                     "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
                     "_backward_pre_hooks", "_state_dict_hooks", "_state_dict_pre_hooks",
                     "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks"):
            hooks = module.__dict__.get(attr)
            if hooks is not None:
                memo[id(hooks)] = type(hooks)()
    return copy.deepcopy(block, memo)
