"""Run ``se_retrofit.find_sites`` on small models that show each decision of the analysis, and record the output.

    python docs/scripts/gen_find_sites.py [--check]

Writes, under ``docs/generated/``:

- ``skip_reasons.md``: a hand-written network with one block per case (a plain residual, a projection
  shortcut, a RepVGG-like multi-branch sum, a branch that already has SE, a partial-channel add, a
  channels-last residual, a token residual, a broadcast position embedding) and what ``find_sites``
  says about each;
- ``mobilenet_v3_small.md``: ``find_sites`` on ``torchvision.models.mobilenet_v3_small``, whose blocks
  partly carry torchvision's ``SqueezeExcitation`` already;
- ``tracing_wrap.md``: a block fx cannot trace, and the same block with its shape-dependent code
  behind ``torch.fx.wrap``;
- ``tracing_example_input.md``: a model that needs ``example_input=``, without and with it;
- ``tracing_attention.md``: a home-made attention module before and after ``register_channel_attention``.

Every listing is the library's own output for the code shown.
"""
from __future__ import annotations

import inspect
import sys
import textwrap
import warnings

import torch
import torch.fx
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.ops import SqueezeExcitation

import se_retrofit

from _gen import GENERATED, fence, header, write

SCRIPT = "gen_find_sites.py"
C = 16


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout))


# ------------------------------------------------------------------------------------ one block per case

class Residual(nn.Module):
    """x + conv-bn-relu-conv-bn(x): a residual branch; gets SE."""

    def __init__(self, c):
        super().__init__()
        self.conv1, self.conv2 = conv_bn(c, c), conv_bn(c, c)

    def forward(self, x):
        return F.relu(x + self.conv2(F.relu(self.conv1(x))))


class Projection(nn.Module):
    """A strided block whose shortcut is a 1x1 conv + BN: still a residual; gets SE."""

    def __init__(self, c):
        super().__init__()
        self.conv1, self.conv2 = conv_bn(c, c, stride=2), conv_bn(c, c)
        self.shortcut = conv_bn(c, c, k=1, stride=2)

    def forward(self, x):
        return F.relu(self.shortcut(x) + self.conv2(F.relu(self.conv1(x))))


class MultiBranch(nn.Module):
    """RepVGG-like: 3x3, 1x1 and BN-only branches of one input summed; one SE after the sum."""

    def __init__(self, c):
        super().__init__()
        self.k3, self.k1, self.bn = conv_bn(c, c), conv_bn(c, c, k=1), nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(self.k3(x) + self.k1(x) + self.bn(x))


class RepOnBranch(nn.Module):
    """GhostNetV3/RepGhostNet-like: a RepVGG-like layer on a residual branch; one SE, for the residual unit."""

    def __init__(self, c):
        super().__init__()
        self.rep, self.conv = MultiBranch(c), conv_bn(c, c)

    def forward(self, x):
        return x + self.conv(self.rep(x))


class AlreadySE(nn.Module):
    """A residual branch that already holds torchvision's SqueezeExcitation: left alone."""

    def __init__(self, c):
        super().__init__()
        self.conv1, self.conv2 = conv_bn(c, c), conv_bn(c, c)
        self.se = SqueezeExcitation(c, 8)

    def forward(self, x):
        return F.relu(x + self.se(self.conv2(F.relu(self.conv1(x)))))


class PartialChannel(nn.Module):
    """RexNet/GhostNet-like: the shortcut is added to the first channels of a wider output."""

    def __init__(self, c):
        super().__init__()
        self.conv1, self.conv2 = conv_bn(c, c), conv_bn(c, 2 * c)
        self.reduce = nn.Conv2d(2 * c, c, 1)

    def forward(self, x):
        out = self.conv2(F.relu(self.conv1(x)))
        out = torch.cat([out[:, :C] + x, out[:, C:]], dim=1)
        return self.reduce(out)


class ChannelsLast(nn.Module):
    """MambaOut-like: a branch with a depthwise conv, added to a [B, H, W, C] tensor (channel axis last)."""

    def __init__(self, c):
        super().__init__()
        self.dwconv = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.mlp = nn.Sequential(nn.Linear(c, 2 * c), nn.GELU(), nn.Linear(2 * c, c))

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        y = self.dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        x = x + self.mlp(self.norm(y))
        return x.permute(0, 3, 1, 2)


class Tokens(nn.Module):
    """ViT-like: a residual over [B, N, C] tokens."""

    def __init__(self, c):
        super().__init__()
        self.norm = nn.LayerNorm(c)
        self.mlp = nn.Sequential(nn.Linear(c, 2 * c), nn.GELU(), nn.Linear(2 * c, c))

    def forward(self, x):
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)
        t = t + self.mlp(self.norm(t))
        return t.transpose(1, 2).reshape(b, c, h, w)


class PositionEmbedding(nn.Module):
    """A learned (1, C, H, W) embedding added to every image of the batch: broadcasting, not a residual."""

    def __init__(self, c):
        super().__init__()
        self.conv = conv_bn(c, c)
        self.pos = nn.Parameter(torch.zeros(1, c, 16, 16))

    def forward(self, x):
        return F.relu(self.conv(x)) + self.pos


class ScaledInPlace(nn.Module):
    """The branch is scaled in place (`out.mul_`) before the addition, a write the data-flow graph does not show.

    An SE block inserted after `conv` would read the value before the scaling."""

    def __init__(self, c):
        super().__init__()
        self.conv = conv_bn(c, c)

    def forward(self, x):
        out = self.conv(x)
        out.mul_(0.5)
        out += x
        return F.relu(out)


class Cases(nn.Module):
    def __init__(self, c: int = C):
        super().__init__()
        self.stem = conv_bn(3, c, stride=4)
        self.residual = Residual(c)
        self.projection = Projection(c)
        self.upsample = nn.Upsample(scale_factor=2)
        self.multi_branch = MultiBranch(c)
        self.rep_on_branch = RepOnBranch(c)
        self.already_se = AlreadySE(c)
        self.partial_channel = PartialChannel(c)
        self.channels_last = ChannelsLast(c)
        self.tokens = Tokens(c)
        self.pos_embed = PositionEmbedding(c)
        self.scaled_in_place = ScaledInPlace(c)
        self.fc = nn.Linear(c, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = self.upsample(self.projection(self.residual(x)))
        x = self.partial_channel(self.already_se(self.rep_on_branch(self.multi_branch(x))))
        x = self.scaled_in_place(self.pos_embed(self.tokens(self.channels_last(x))))
        return self.fc(x.mean((2, 3)))


CASE_CLASSES = (Residual, Projection, MultiBranch, RepOnBranch, AlreadySE, PartialChannel, ChannelsLast, Tokens,
                PositionEmbedding, ScaledInPlace)


def source(obj) -> str:
    return textwrap.dedent(inspect.getsource(obj)).strip()


def plan_table(plan: se_retrofit.SitePlan) -> str:
    """The plan as a Markdown table: one row per SE site and per addition (or module) left alone."""
    rows = ["| | block | addition | result |", "|---|---|---|---|"]
    for s in plan.sites:
        rows.append(f"| + | `{s.block}` | `{s.add}` | SE block `{s.se_name}`: {s.kind}, shortcut {s.shortcut}, "
                    f"{s.channels} channels, hidden {s.hidden} |")
    for s in plan.skipped:
        rows.append(f"| - | `{s.block or '<root>'}` | {f'`{s.add}`' if s.add else '(whole module)'} | {s.reason} |")
    return "\n".join(rows) + "\n"


def skip_reasons() -> str:
    torch.manual_seed(0)
    model = Cases()
    x = torch.rand(2, 3, 64, 64)
    plan = se_retrofit.find_sites(model, example_input=x)
    rows = ["| block | class | what it shows |", "|---|---|---|"]
    for name, module in model.named_children():
        if type(module) in CASE_CLASSES:
            doc = type(module).__doc__.strip().splitlines()[0]
            rows.append(f"| `{name}` | `{type(module).__name__}` | {doc} |")
    code = "\n\n\n".join(source(cls) for cls in CASE_CLASSES + (Cases,))
    return "\n".join([
        header(SCRIPT),
        "\n".join(rows) + "\n",
        '??? example "The network\'s code"\n',
        textwrap.indent(fence(code), "    "),
        "What `se_retrofit.find_sites(model, example_input=torch.rand(2, 3, 64, 64))` reports (`+`: an SE "
        "block would go there; `-`: left alone, with the fx node of the addition and the reason):\n",
        plan_table(plan),
        '??? note "The same plan, as `print(plan)` shows it"\n',
        textwrap.indent(fence(str(plan), "text"), "    "),
    ])


def mobilenet() -> str:
    torch.manual_seed(0)
    plan = se_retrofit.find_sites(torchvision.models.mobilenet_v3_small(weights=None))
    return "\n".join([
        header(SCRIPT),
        fence("import se_retrofit, torchvision\n"
              "print(se_retrofit.find_sites(torchvision.models.mobilenet_v3_small(weights=None)))"),
        fence(str(plan), "text"),
    ])


# --------------------------------------------------------------------------------- when tracing fails

class ShapeCheck(nn.Module):
    """Pads odd-sized inputs: Python control flow on a shape, which fx cannot trace."""

    def __init__(self, c):
        super().__init__()
        self.conv1, self.conv2 = conv_bn(c, c), conv_bn(c, c)

    def forward(self, x):
        if x.shape[-1] % 2:
            x = F.pad(x, (0, 1, 0, 1))
        return F.relu(x + self.conv2(F.relu(self.conv1(x))))


def pad_to_even(x):
    if x.shape[-1] % 2:
        x = F.pad(x, (0, 1, 0, 1))
    return x


torch.fx.wrap("pad_to_even")  # at module level, in the module that calls it: fx keeps the call opaque


class ShapeCheckWrapped(ShapeCheck):
    """The same block with the shape-dependent code moved into a function fx treats as one opaque call."""

    def forward(self, x):
        x = pad_to_even(x)
        return F.relu(x + self.conv2(F.relu(self.conv1(x))))


class Net(nn.Module):
    def __init__(self, block: type, c: int = C):
        super().__init__()
        self.stem = conv_bn(3, c)
        self.block = block(c)
        self.fc = nn.Linear(c, 10)

    def forward(self, x):
        return self.fc(self.block(F.relu(self.stem(x))).mean((2, 3)))


class ImageAndMetadata(nn.Module):
    """A model whose forward takes an image and a second tensor."""

    def __init__(self, c: int = C):
        super().__init__()
        self.stem = conv_bn(3, c)
        self.block = Residual(c)
        self.fc = nn.Linear(c + 4, 10)

    def forward(self, image, metadata):
        features = self.block(F.relu(self.stem(image))).mean((2, 3))
        return self.fc(torch.cat([features, metadata], dim=1))


class Gate(nn.Module):
    """A home-made channel attention module, unknown to se_retrofit."""

    def __init__(self, c):
        super().__init__()
        self.fc = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc(x.mean((2, 3), keepdim=True)))


class GatedResidual(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.conv2 = conv_bn(c, c), conv_bn(c, c)
        self.gate = Gate(c)

    def forward(self, x):
        return F.relu(x + self.gate(self.conv2(F.relu(self.conv1(x)))))


def tracing_wrap() -> str:
    torch.manual_seed(0)
    return "\n".join([
        header(SCRIPT),
        fence(source(ShapeCheck.forward), title="ShapeCheck.forward"),
        fence(str(se_retrofit.find_sites(Net(ShapeCheck))), "text", title="print(se_retrofit.find_sites(Net(ShapeCheck)))"),
        "Moving the shape-dependent lines into a module-level function registered with `torch.fx.wrap` "
        "makes fx record one opaque call to it, and the rest of the block traces:\n",
        fence(source(pad_to_even) + '\n\n\ntorch.fx.wrap("pad_to_even")\n\n\n' + source(ShapeCheckWrapped.forward),
              title="ShapeCheckWrapped"),
        fence(str(se_retrofit.find_sites(Net(ShapeCheckWrapped))), "text",
              title="print(se_retrofit.find_sites(Net(ShapeCheckWrapped)))")])


def tracing_example_input() -> str:
    torch.manual_seed(0)
    error = ""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", se_retrofit.SERetrofitWarning)
            se_retrofit.find_sites(ImageAndMetadata())
    except ValueError as exc:
        error = f"ValueError: {exc}"
    example = (torch.rand(2, 3, 32, 32), torch.rand(2, 4))
    return "\n".join([
        header(SCRIPT),
        fence(source(ImageAndMetadata.forward), title="ImageAndMetadata.forward"),
        "Without `example_input`, every input se_retrofit tries fails, and the error lists them:\n",
        fence(error, "text", title="se_retrofit.find_sites(ImageAndMetadata())"),
        "A tuple is passed as positional arguments (a dict would be keyword arguments):\n",
        fence(str(se_retrofit.find_sites(ImageAndMetadata(), example_input=example)), "text",
              title="print(se_retrofit.find_sites(model, example_input=(torch.rand(2, 3, 32, 32), torch.rand(2, 4))))")])


def tracing_attention() -> str:
    torch.manual_seed(0)
    before = se_retrofit.find_sites(Net(GatedResidual))
    se_retrofit.register_channel_attention(Gate)
    after = se_retrofit.find_sites(Net(GatedResidual))
    return "\n".join([
        header(SCRIPT),
        fence(source(Gate.forward), title="Gate.forward (used in GatedResidual's branch)"),
        "Unregistered, the gate is a leaf the analysis does not look into, and the branch would get a second one:\n",
        fence(str(before), "text", title="print(se_retrofit.find_sites(Net(GatedResidual)))"),
        "After `se_retrofit.register_channel_attention(Gate)`:\n",
        fence(str(after), "text", title="print(se_retrofit.find_sites(Net(GatedResidual)))")])


def main() -> int:
    return max(write(GENERATED / "skip_reasons.md", skip_reasons()),
               write(GENERATED / "mobilenet_v3_small.md", mobilenet()),
               write(GENERATED / "tracing_wrap.md", tracing_wrap()),
               write(GENERATED / "tracing_example_input.md", tracing_example_input()),
               write(GENERATED / "tracing_attention.md", tracing_attention()))


if __name__ == "__main__":
    sys.exit(main())
