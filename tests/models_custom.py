"""Small hand-written networks that exercise one feature of the pass each."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout))


class AddSpelling(nn.Module):
    """A residual block whose addition is written in one of the ways Python and torch allow."""

    def __init__(self, channels: int, spelling: str) -> None:
        super().__init__()
        self.spelling = spelling
        self.conv1 = conv_bn(channels, channels)
        self.conv2 = conv_bn(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(F.relu(self.conv1(x)))
        if self.spelling == "plus":
            out = out + x
        elif self.spelling == "iadd":
            out += x
        elif self.spelling == "torch.add":
            out = torch.add(out, x)
        elif self.spelling == "Tensor.add":
            out = out.add(x)
        elif self.spelling == "reversed":
            out = x + out
        return F.relu(out)


class Net(nn.Module):
    def __init__(self, blocks: list[nn.Module], channels: int = 16, num_classes: int = 5) -> None:
        super().__init__()
        self.stem = conv_bn(3, channels)
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.relu(self.stem(x)))
        return self.fc(x.mean((2, 3)))


class FunctionalDropoutBlock(nn.Module):
    """Functional dropout and a ``self.training`` branch in the block's own forward: fx bakes both."""

    def __init__(self, channels: int, p: float = 0.5) -> None:
        super().__init__()
        self.p = p
        self.conv1 = conv_bn(channels, channels)
        self.conv2 = conv_bn(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.conv1(x))
        out = F.dropout(out, self.p, training=self.training)
        out = self.conv2(out)
        if self.training:
            out = out * 1.0
        return F.relu(out + x)


class ShortcutArgBlock(nn.Module):
    """DLA-style: the caller may hand in the shortcut; ``None`` means "use the input"."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = conv_bn(channels, channels)
        self.conv2 = conv_bn(channels, channels)

    def forward(self, x: torch.Tensor, shortcut: torch.Tensor | None = None) -> torch.Tensor:
        if shortcut is None:
            shortcut = x
        return F.relu(self.conv2(F.relu(self.conv1(x))) + shortcut)


class ShortcutArgNet(nn.Module):
    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        self.stem = conv_bn(3, channels)
        self.project = nn.Conv2d(channels, channels, 1)
        self.a = ShortcutArgBlock(channels)
        self.b = ShortcutArgBlock(channels)
        self.fc = nn.Linear(channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = self.a(x, self.project(x))
        x = self.b(x)
        return self.fc(x.mean((2, 3)))


class NotResidual(nn.Module):
    """Same-shape additions that are not residual branches: channels-last, tokens, an embedding."""

    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 4, 4)
        self.pos = nn.Parameter(torch.randn(1, channels, 4, 4))
        self.norm = nn.LayerNorm(channels)
        self.mlp = nn.Sequential(nn.Linear(channels, channels), nn.GELU(), nn.Linear(channels, channels))
        self.fc = nn.Linear(channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x) + self.pos                      # position embedding (a parameter)
        x = x.permute(0, 2, 3, 1)                        # channels-last from here on
        x = x + self.mlp(self.norm(x))                   # channels-last residual: no SE
        t = x.flatten(1, 2)                              # tokens [B, N, C]
        t = t + self.mlp(self.norm(t))                   # token residual: no SE
        return self.fc(t.mean(1))


class ParallelConvs(nn.Module):
    """A RepVGG-like block: three parallel light branches summed; gets exactly one SE."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.k3 = conv_bn(channels, channels)
        self.k1 = nn.Sequential(nn.Conv2d(channels, channels, 1, bias=False), nn.BatchNorm2d(channels))
        self.identity = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.k3(x) + self.k1(x) + self.identity(x))


class PlainNet(nn.Module):
    """No addition at all (VGG-like)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(conv_bn(3, 8), nn.ReLU(), conv_bn(8, 8), nn.ReLU())
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean((2, 3)))


class InPlaceWrites(nn.Module):
    """Residual blocks where an in-place write makes the graph's data flow incomplete.

    ``scaled``: the branch is scaled in place before the add; ``unbound``: ``out.add_(x)`` whose result
    is dropped and the sum read through ``out``; ``into_clone``: the sum goes into a clone of the input;
    ``masked``: one channel of the branch is set to zero by item assignment before the add;
    ``scaled_<alias>``: as ``scaled``, through an alias of the branch (`through`).
    """

    def __init__(self, channels: int, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.conv1 = conv_bn(channels, channels)
        self.conv2 = conv_bn(channels, channels)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.relu(self.conv1(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind.startswith("scaled"):
            out = self.branch(x)
            through(out, self.kind.partition("_")[2] or "direct").mul_(0.5)
            out += x
            return F.relu(out)
        if self.kind == "masked":
            out = self.branch(x)
            out[:, 0] = 0.0
            return F.relu(out + x)
        if self.kind == "unbound":
            out = self.branch(x)
            out.add_(x)
            return F.relu(out)
        y = x.clone()
        y.add_(self.branch(x))
        return F.relu(y)


def through(t: torch.Tensor, alias: str) -> torch.Tensor:
    """``t`` itself or a tensor sharing its memory, made as fx records it: a write into it is a write into ``t``."""
    if alias == "direct":
        return t
    if alias == "float":  # a float tensor's .float() is the tensor itself
        return t.float()
    if alias == "atleast_3d":
        return torch.atleast_3d(t)
    return getattr(t, alias)  # attribute views: mT, data


class ScaledConv3Bottleneck(nn.Module):
    """A bottleneck whose ``conv3`` output is scaled in place (through ``alias``, see `through`) before
    ``bn3``: a gate computed from ``conv3``'s input (the early squeeze) would not see the scaling."""

    def __init__(self, channels: int, alias: str = "direct") -> None:
        super().__init__()
        self.alias = alias
        mid = channels // 4
        self.conv1 = nn.Sequential(nn.Conv2d(channels, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU())
        self.conv3 = nn.Conv2d(mid, channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv3(self.conv1(x))
        through(c, self.alias).mul_(0.5)
        out = self.bn3(c)
        out += x
        return F.relu(out)


class CalledTwice(nn.Module):
    """One residual block called twice with a different flag: one traced graph cannot serve both calls."""

    def __init__(self, channels: int = 16, flag: object = True, other: object = False) -> None:
        super().__init__()
        self.stem = conv_bn(3, channels)
        self.block = FlaggedBlock(channels)
        self.flags = (flag, other)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block(F.relu(self.stem(x)), self.flags[0])
        return self.block(x, self.flags[1]).mean((2, 3))


class FlaggedBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = conv_bn(channels, channels)
        self.conv2 = conv_bn(channels, channels)

    def forward(self, x: torch.Tensor, flag: object = True) -> torch.Tensor:
        out = self.conv2(F.relu(self.conv1(x)))
        if flag is True or flag == torch.float32:
            out = out + x
        return F.relu(out)


class InPlaceInputNet(nn.Module):
    """Changes its input in place first (``ReLU(inplace=True)`` on the image), as some stems do."""

    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        self.act = nn.ReLU(inplace=True)
        self.net = Net([AddSpelling(channels, "plus")], channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.act(x))


class BasicBlock(nn.Module):
    """ResNet's basic block: two conv + norm layers on the branch, a 1x1 conv + norm projection where the
    shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv_bn(cin, cout, stride)
        self.conv2 = conv_bn(cout, cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.down is None else self.down(x)
        return F.relu(self.conv2(F.relu(self.conv1(x))) + shortcut)
