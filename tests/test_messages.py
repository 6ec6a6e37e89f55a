"""Shared message pieces: one-line failures and shortened lists, including the odd exceptions."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import se_retrofit
from se_retrofit.messages import few, first_line


@pytest.mark.parametrize("exc, expected", [
    (RuntimeError(), "RuntimeError"),
    (ValueError("bad\nmore detail"), "ValueError: bad"),
    (OSError("\n  indented first line\nsecond"), "OSError: indented first line"),
    (TypeError("   \n"), "TypeError"),
])
def test_first_line_survives_odd_messages(exc, expected):
    assert first_line(exc) == expected, f"first_line({exc!r}) = {first_line(exc)!r}"


def test_first_line_is_cut_to_the_limit_with_a_mark():
    text = first_line(ValueError("x" * 500), 40)
    assert len(text) == 40 and text.endswith("..."), f"{len(text)} characters: {text!r}"


def test_few_counts_what_it_leaves_out():
    assert few(["a", "b"]) == "a, b"
    assert few([str(i) for i in range(9)], 3) == "0, 1, 2, ... (9 in all)"


class _Uncopyable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def __deepcopy__(self, memo: dict) -> nn.Module:
        raise RuntimeError()

    def forward(self, x):
        return self.conv(x) + self.conv(x)


def test_a_copy_failing_without_a_message_still_gives_the_hint():
    with pytest.raises(ValueError, match=r"cannot copy _Uncopyable to work on \(RuntimeError\).*inplace=True"):
        se_retrofit.apply(_Uncopyable())
    with pytest.raises(RuntimeError):
        copy.deepcopy(_Uncopyable())


class _Truncated(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int):
        raise OSError("image file is truncated: /data/cat/3.jpg")


def test_a_loader_workers_error_reaches_the_command_line_as_its_own_message():
    """torch re-raises a worker's error wrapped in the worker's traceback; the CLI prints one line."""
    from se_retrofit import cli

    with pytest.raises(OSError) as info:
        next(iter(torch.utils.data.DataLoader(_Truncated(), num_workers=1)))
    assert "Original Traceback" in str(info.value), "control: torch wraps the worker's error"
    assert cli._message(info.value) == "image file is truncated: /data/cat/3.jpg (in a data-loader worker)", \
        cli._message(info.value)
    assert cli._message(ValueError("two\nlines")) == "two\nlines", "other errors are printed as they are"


def test_the_command_prints_warnings_as_one_line_and_puts_the_format_back(monkeypatch):
    import warnings

    from se_retrofit import cli

    seen = []

    def format_during_the_command(args):
        seen.append(warnings.formatwarning("skipped 1 unreadable image file(s) under DIR", UserWarning,
                                           "/site-packages/se_retrofit/data.py", 404, "warnings.warn(...)"))
        return 0

    monkeypatch.setattr("se_retrofit.commands.sites.run", format_during_the_command)
    before = warnings.formatwarning
    assert cli.main(["sites", "resnet10t"]) == 0
    assert seen == ["se-retrofit: warning: skipped 1 unreadable image file(s) under DIR\n"], seen
    assert warnings.formatwarning is before, "the command must not change how the caller's warnings look"
