"""The zoo sweep (``se-retrofit coverage``): its rows, its files, and that failures become rows, not crashes.

CI runs a bounded subset (a handful of small models); the full sweep over both zoos is the command
itself, run by hand (about an hour on two CPU cores), or the slow test below for the first models.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import se_retrofit
from se_retrofit import coverage
from se_retrofit.cli import main


def test_row_of_a_retrofitted_model():
    row = coverage.check_model("torchvision", "resnet", "resnet18")
    assert row.error is None, row.error
    assert (row.built, row.inserted, row.sites, row.status) == (True, 8, 8, "retrofitted"), row
    assert row.identity_max_diff == 0.0, f"identity init changed resnet18's output by {row.identity_max_diff}"
    assert row.backward_ok is True and row.apply_s > 0


def test_row_of_an_unchanged_model_has_its_reasons():
    row = coverage.check_model("timm", "seresnet", "seresnet18")
    assert row.status == "unchanged" and row.inserted == 0 and row.backward_ok is None, row
    assert any("already has channel attention" in reason for reason in row.skipped), row.skipped


def test_a_failure_is_a_row_not_a_crash():
    row = coverage.check_model("timm", "nothing", "no_such_model_xyz")
    assert row.status == "failed" and not row.built, row
    assert "no_such_model_xyz" in row.error, row.error


def test_backward_check_sees_a_block_cut_off_from_the_loss():
    model = se_retrofit.apply(torchvision_resnet18()).eval()
    x = torch.rand(2, 3, 64, 64)
    assert coverage._backward_ok(model, (x,), {})
    se = se_retrofit.se_blocks(model)[0][1]
    se.fc2.bias.requires_grad_(False)
    assert not coverage._backward_ok(model, (x,), {}), "a block whose last layer gets no gradient must fail"


def test_sweep_is_reproducible():
    a = coverage.check_model("timm", "resnet", "resnet10t")
    b = coverage.check_model("timm", "resnet", "resnet10t")
    assert (a.inserted, a.skipped, a.identity_max_diff, a.backward_ok) == (b.inserted, b.skipped, b.identity_max_diff,
                                                                            b.backward_ok)


def test_command_writes_json_and_markdown(tmp_path: Path, capsys: pytest.CaptureFixture):
    out, page = tmp_path / "cov.json", tmp_path / "cov.md"
    code = main(["coverage", "--models", "resnet10t", "torchvision:squeezenet1_0", "--out", str(out),
                 "--markdown", str(page)])
    assert code == 0, capsys.readouterr()
    rows = json.loads(out.read_text())
    assert [(r["zoo"], r["model"], r["inserted"]) for r in rows] == [("timm", "resnet10t", 4),
                                                                     ("torchvision", "squeezenet1_0", 0)]
    text = page.read_text()
    assert "- **timm**: 1 retrofitted, 0 unchanged, 0 failed" in text, text
    assert "- **torchvision**: 0 retrofitted, 1 unchanged, 0 failed" in text, text
    assert "timm: 1 retrofitted" in capsys.readouterr().out


def test_command_exits_non_zero_when_a_model_fails(tmp_path: Path, capsys: pytest.CaptureFixture):
    assert main(["coverage", "--models", "no_such_model_xyz", "--out", str(tmp_path / "c.json")]) == 1
    assert main(["coverage", "--limit", "0", "--out", str(tmp_path / "c.json")]) == 2
    assert "--limit must be >= 1" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("zoo", ["torchvision", "timm"])
def test_first_models_of_each_zoo(zoo: str, tmp_path: Path):
    out = tmp_path / "cov.json"
    assert main(["coverage", "--zoo", zoo, "--limit", "8", "--out", str(out)]) == 0
    for row in json.loads(out.read_text()):
        assert row["error"] is None, f"{row['model']}: {row['error']}"
        if row["inserted"]:
            assert row["identity_max_diff"] <= 1e-5 and row["backward_ok"], row


def torchvision_resnet18() -> torch.nn.Module:
    import torchvision

    return torchvision.models.resnet18()
