"""Render real blocks before and after ``se_retrofit.apply`` as the Python source fx generates.

    python docs/scripts/gen_block_graph.py [--check]

Writes, under ``docs/generated/``:

- ``bottleneck_diff.md``: the forward of torchvision ResNet-50's ``layer1.1`` Bottleneck as a diff,
  before -> after (the picture on the home page);
- ``bottleneck_before_after.md``: the same block in full: torchvision's own source, the fx trace
  se_retrofit analyses (every child a leaf), the forward installed by ``apply``, the module tree and
  the class it ends up with;
- ``positions.md``: that forward for each of the four ``position=`` values (the paper's Table 14);
- ``train_eval.md``: a block whose forward differs between train and eval mode, and the two
  generated forwards plus the dispatch on ``self.training``;
- ``se_block_source.md``: the source of ``SEBlock.forward``, ``_gate``, ``excite`` and ``init_identity``.

Nothing here is drawn by hand: every listing is the text the library produces or runs. Models are
built without pretrained weights (the graphs do not depend on weights).
"""
from __future__ import annotations

import difflib
import inspect
import sys
import textwrap
import warnings

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import se_retrofit
from se_retrofit.se_block import SEBlock
from se_retrofit.tracing import BlockTracer

from _gen import GENERATED, fence, header, write

SCRIPT = "gen_block_graph.py"
BLOCK = "layer1.1"   # an identity-shortcut Bottleneck; layer1.0 is the same with a projection shortcut
POSITIONS = ("standard", "pre", "post", "identity")


def fx_before(block: nn.Module) -> str:
    """The graph se_retrofit analyses: the block's own forward, every child module a leaf."""
    return _clean(BlockTracer().trace(block).python_code("self").src)


def generated(block: nn.Module, name: str = "forward") -> str:
    """Source of a method of the generated subclass (fx's code, installed by ``apply``)."""
    return _clean(inspect.getsource(getattr(type(block), name)))


def _clean(src: str) -> str:
    lines = [line.rstrip() for line in textwrap.dedent(src).strip("\n").splitlines()]
    return "\n".join(lines).strip("\n")


def attr_path(name: str) -> str:
    """``layer1.1`` -> ``layer1[1]``: how the block is reached in Python."""
    return "".join(f"[{part}]" if part.isdigit() else f".{part}" for part in name.split(".")).lstrip(".")


def _retrofit(model: nn.Module, **options) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", se_retrofit.SERetrofitWarning)
        return se_retrofit.apply(model, **options)


def bottleneck() -> tuple[str, str]:
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None)
    se_model = _retrofit(model)
    before_block = model.get_submodule(BLOCK)
    after_block = se_model.get_submodule(BLOCK)
    before = fx_before(before_block)
    after = generated(after_block)
    diff = "\n".join(line.rstrip() for line in difflib.unified_diff(
        before.splitlines(), after.splitlines(), "before", "after", n=100, lineterm=""))
    diff = "\n".join(diff.splitlines()[3:])  # drop the ---/+++/@@ header lines: the whole function is shown
    tv_source = _clean(inspect.getsource(torchvision.models.resnet.Bottleneck.forward))
    cls = type(after_block)
    ref = f"se_model.{attr_path(BLOCK)}"
    mro = " -> ".join(f"{c.__module__}.{c.__qualname__}" for c in cls.__mro__[:3])
    site = next(s for s in se_retrofit.get_plan(se_model).sites if s.block == BLOCK)
    versions = f"torch {torch.__version__}, torchvision {torchvision.__version__}"

    short = [header(SCRIPT),
             fence(diff, "diff", title=f"torchvision resnet50, {BLOCK}.forward: traced (-) and after se_retrofit.apply (+)")]

    full = [header(SCRIPT),
            f"All listings below are produced from `torchvision.models.resnet50(weights=None)` ({versions}); "
            f"block `{BLOCK}` (a Bottleneck whose shortcut is the identity).\n",
            "**1. torchvision's source** of `Bottleneck.forward`, what the block runs before the retrofit:\n",
            fence(tv_source, title="torchvision/models/resnet.py"),
            "**2. The graph se_retrofit analyses**: the same forward traced by torch.fx with every child module "
            "a leaf. `self.downsample is None` for this block, so the `if` is resolved at trace time and the "
            "shortcut is `x` itself.\n",
            fence(before, title=f"{BLOCK}, traced"),
            "**3. After `se_retrofit.apply`**: one `call_module` node is spliced on the end of the residual "
            "branch (`bn3`). Its output went straight into the addition, so the SE block is handed the shortcut "
            "too and does the addition itself (`shortcut + bn3 * gate` in one `torch.addcmul` pass; "
            "`SEConfig(fuse_add=False)` keeps `se = self.se(bn3); add = se + x` instead). torchvision wrote "
            "`out += identity`, so `inplace=True`: without autograd the sum goes into `bn3`'s memory, as that "
            "line put it there. `bn3` is `bn3(conv3(relu_1))` with a 1x1 `conv3`, so before `conv3` the block computes "
            "`gate_through(relu_1, conv3, bn3, se)` and hands it to the SE call as `gate`: in eval mode the "
            "SE's gate computed from the mean of the narrower `relu_1` mapped through `conv3` and `bn3` (without "
            "autograd `fc1`, `bn3` and `conv3` folded into one map), so that the SE call only does the gated add; "
            "None in training mode, and the SE block averages `bn3` itself; "
            "`SEConfig(early_squeeze=False)` leaves the call out. The shortcut is "
            "untouched. This is the `forward` of the block's new class:\n",
            fence(after, title=f"{BLOCK}, generated forward"),
            "**4. The difference**, line by line:\n",
            fence(diff, "diff"),
            f"**5. The module tree** of the retrofitted block: every original child is the same object with the "
            f"same weights; `se` is new (reduction 16: {site.channels} channels -> hidden {site.hidden}).\n",
            fence(repr(after_block), "text", title=f"print({ref})"),
            "**6. Its class** is a generated subclass of the original one, so `isinstance` checks, other methods "
            "and attributes keep working:\n",
            fence(f"type({ref}).__mro__[:3]\n# {mro}\n"
                  f"isinstance({ref}, torchvision.models.resnet.Bottleneck)  "
                  f"# {isinstance(after_block, torchvision.models.resnet.Bottleneck)}")]
    return "\n".join(short), "\n".join(full)


def positions() -> str:
    """One apply per position on the block alone (the block is the root module here): the generated
    forward is the one the block gets inside the whole model, at a fraction of the time."""
    torch.manual_seed(0)
    block = torchvision.models.resnet50(weights=None).get_submodule(BLOCK)
    x = torch.rand(2, block.conv1.in_channels, 56, 56)
    out = [header(SCRIPT),
           f"Block `{BLOCK}` of `torchvision.models.resnet50(weights=None)`, retrofitted with "
           f"`se_retrofit.apply(block, position=..., example_input=x)`: its generated forward for each position.\n"]
    for position in POSITIONS:
        se_block = _retrofit(block, position=position, example_input=x)
        site = next(iter(se_retrofit.get_plan(se_block).sites))
        out.append(f'=== "{position}"\n')
        body = fence(generated(se_block), title=f"position='{position}', SE on {site.channels} channels")
        out.append("\n".join(("    " + line) if line else "" for line in body.splitlines()) + "\n")
    return "\n".join(out)


def conv_bn(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels))


class DropoutBlock(nn.Module):
    """A residual block that calls dropout functionally: its graph depends on ``self.training``."""

    def __init__(self, channels: int, p: float = 0.1) -> None:
        super().__init__()
        self.p = p
        self.conv1 = conv_bn(channels)
        self.conv2 = conv_bn(channels)

    def forward(self, x):
        out = F.relu(self.conv1(x))
        out = F.dropout(out, self.p, training=self.training)
        return F.relu(self.conv2(out) + x)


class TinyNet(nn.Module):
    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.block = DropoutBlock(channels)
        self.fc = nn.Linear(channels, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.block(F.relu(self.stem(x))).mean((2, 3)))


def train_eval() -> str:
    torch.manual_seed(0)
    se_model = _retrofit(TinyNet())
    cls = type(se_model.block)
    out = [header(SCRIPT),
           "The block, as written (defined in `docs/scripts/gen_block_graph.py`):\n",
           fence(_clean(inspect.getsource(DropoutBlock.forward)), title="DropoutBlock.forward"),
           "Its generated class, after `se_retrofit.apply`: one forward per mode, and a `forward` that picks "
           "one by `self.training`:\n"]
    for name in ("_se_forward_train", "_se_forward_eval", "forward"):
        out.append(fence(generated(se_model.block, name), title=f"{cls.__name__}.{name}"))
    return "\n".join(out)


def se_block_source() -> str:
    out = [header(SCRIPT)]
    for fn in (SEBlock.forward, SEBlock._gate, SEBlock.excite, SEBlock.init_identity):
        out.append(fence(_clean(inspect.getsource(fn)),
                         title=f"se_retrofit/se_block.py: SEBlock.{fn.__name__}"))
    return "\n".join(out)


def main() -> int:
    short, full = bottleneck()
    codes = [write(GENERATED / "bottleneck_diff.md", short),
             write(GENERATED / "bottleneck_before_after.md", full),
             write(GENERATED / "positions.md", positions()),
             write(GENERATED / "train_eval.md", train_eval()),
             write(GENERATED / "se_block_source.md", se_block_source())]
    return max(codes)


if __name__ == "__main__":
    sys.exit(main())
