"""The zoo sweep (``se-retrofit coverage``): its rows, its files, and that failures become rows, not crashes.

CI runs a bounded subset (a handful of small models); the full sweep over both zoos is the command
itself, run by hand (about an hour on two CPU cores), or the slow test below for the first models.
"""
from __future__ import annotations

import json
import re
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


def test_command_exits_non_zero_when_a_model_fails(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                  monkeypatch: pytest.MonkeyPatch):
    def broken(zoo: str, name: str) -> torch.nn.Module:
        raise RuntimeError("cannot build this one")

    monkeypatch.setattr(coverage, "_build", broken)
    assert main(["coverage", "--models", "resnet10t", "--out", str(tmp_path / "c.json")]) == 1, \
        "a model whose build raises must make the command exit 1"
    assert main(["coverage", "--limit", "0", "--out", str(tmp_path / "c.json")]) == 2
    assert "--limit must be >= 1" in capsys.readouterr().err


def test_models_are_resolved_like_in_the_other_commands():
    got = coverage.resolve_models(["resnet10t", "timm:resnet10t", "torchvision:resnet18"])
    assert got == [("timm", "-", "resnet10t"), ("timm", "-", "resnet10t"), ("torchvision", "-", "resnet18")], \
        f"timm:NAME must resolve as in `sites` and `report`, got {got}"


def test_misspelt_models_stop_the_command_before_any_model(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                         monkeypatch: pytest.MonkeyPatch):
    checked = fake_sweep(monkeypatch)
    out = tmp_path / "c.json"
    code = main(["coverage", "--models", "resnet10t", "resnt10t", "torchvision:resnet1", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2, f"misspelt names are a user error (exit 2), got {code}: {err}"
    assert checked == [], f"no model may be checked before every name is validated, checked {checked}"
    assert len(err.strip().splitlines()) == 1 and err.startswith("se-retrofit coverage: error: "), \
        f"expected one error line, got: {err!r}"
    assert "unknown timm model 'resnt10t'. Did you mean: resnet10t" in err, f"no hint for the timm typo: {err}"
    assert "unknown torchvision model 'resnet1'. Did you mean:" in err, f"no hint for the torchvision typo: {err}"
    assert not out.exists(), "a rejected command must not write --out"


@pytest.mark.parametrize("extra", [["--zoo", "torchvision"], ["--limit", "1"]])
def test_models_cannot_be_combined_with_zoo_or_limit(extra: list[str], tmp_path: Path, capsys: pytest.CaptureFixture,
                                                    monkeypatch: pytest.MonkeyPatch):
    checked = fake_sweep(monkeypatch)
    code = main(["coverage", "--models", "resnet10t", *extra, "--out", str(tmp_path / "c.json")])
    err = capsys.readouterr().err
    assert code == 2 and "cannot be combined with --zoo or --limit" in err, \
        f"--models with {extra} must be refused, not silently ignored (exit {code}, stderr {err!r})"
    assert checked == [], f"nothing may be checked when the options conflict, checked {checked}"


@pytest.mark.parametrize("diff, backward, failed", [
    (0.0, True, None), (0.0, None, None), (float("nan"), True, "identity"), (float("inf"), True, "identity"),
    (1e-3, True, "identity"), (0.0, False, "backward")])
def test_failed_checks_get_their_own_status(diff: float, backward: bool | None, failed: str | None):
    row = coverage.CoverageRow("timm", "-", "m", built=True, inserted=0 if backward is None else 3,
                               identity_max_diff=diff, backward_ok=backward)
    if failed is None:
        assert row.status in ("retrofitted", "unchanged") and coverage.failed_checks(row) is None, row
        return
    assert row.status == "check failed", f"diff {diff} / backward {backward} must not count as {row.status!r}"
    assert failed in coverage.failed_checks(row), coverage.failed_checks(row)
    assert coverage.totals([row]) == {"timm": {"retrofitted": 0, "unchanged": 0, "failed": 0, "check failed": 1}}


def test_a_failed_check_is_counted_and_written_as_strict_json(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                              monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(coverage, "_build", lambda zoo, name: OverflowingNet())
    out, page = tmp_path / "c.json", tmp_path / "c.md"
    code = main(["coverage", "--models", "resnet10t", "--out", str(out), "--markdown", str(page)])
    stdout = capsys.readouterr().out
    assert code == 1, f"a model failing its checks must make the command exit 1, got {code}"
    assert "timm: 0 retrofitted, 0 unchanged, 0 failed, 1 check failed" in stdout, stdout

    def reject(token: str) -> None:
        raise ValueError(f"{token} is not JSON")

    rows = json.loads(out.read_text(), parse_constant=reject)
    assert rows[0]["identity_max_diff"] is None, f"a NaN difference must be written as null: {rows[0]}"
    assert "identity check" in rows[0]["check_failed"] and "nan" in rows[0]["check_failed"], rows[0]
    reloaded = coverage.CoverageRow(**rows[0])
    assert reloaded.status == "check failed", f"the status must survive the JSON round trip (gen_coverage.py): {reloaded}"
    text = page.read_text()
    assert "*check failed*:" in text and "1 check failed" in text, f"legend or totals miss 'check failed':\n{text}"


def test_markdown_escapes_pipes_in_errors():
    failed = coverage.CoverageRow("timm", "-", "m", error="RuntimeError: bad | File \"x.py\", line 1, in f")
    checked = coverage.CoverageRow("timm", "-", "n", built=True, inserted=1, identity_max_diff=0.0,
                                   backward_ok=True, skipped={"a | b": 2})
    lines = [line for line in coverage.to_markdown([failed, checked]).splitlines() if line.startswith("|")]
    cells = {len(re.split(r"(?<!\\)\|", line)) for line in lines}
    assert len(cells) == 1, "every table row must have as many cells as the header:\n" + "\n".join(lines)


@pytest.mark.parametrize("option", ["--out", "--markdown"])
@pytest.mark.parametrize("kind", ["directory", "parent is a file"])
def test_unwritable_outputs_fail_before_the_first_model(option: str, kind: str, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch):
    checked = fake_sweep(monkeypatch)
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("")
    bad = tmp_path / "adir" if kind == "directory" else tmp_path / "afile" / "c.out"
    paths = {"--out": tmp_path / "c.json", "--markdown": tmp_path / "c.md", option: bad}
    code = main(["coverage", "--models", "resnet10t", "resnet18", "--out", str(paths["--out"]),
                 "--markdown", str(paths["--markdown"])])
    err = capsys.readouterr().err
    assert code == 2 and f"{option} {bad}" in err, f"expected a one-line error naming {option}, got {code}: {err!r}"
    assert checked == [], f"an unwritable {option} must be found before the first model, checked {checked}"
    assert not (tmp_path / "c.md").exists(), "the check must not leave an empty page behind"


def test_limit_counts_only_the_families_it_checks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import timm

    counted: list[str] = []
    monkeypatch.setattr(coverage, "_param_count_meta", lambda name: counted.append(name) or len(name))
    checked = fake_sweep(monkeypatch)
    assert main(["coverage", "--zoo", "timm", "--limit", "1", "--out", str(tmp_path / "c.json")]) == 0
    first = next(m for m in timm.list_modules() if timm.list_models(module=m))
    assert len(checked) == 1, checked
    assert sorted(counted) == sorted(timm.list_models(module=first)), \
        f"--limit 1 must count only the first family's ({first}) models, counted {len(counted)}"


def test_timm_selection_is_the_smallest_model_of_each_family(monkeypatch: pytest.MonkeyPatch):
    """The rule the committed coverage.json was made with: per non-empty module, in order, the min of (count, name)."""
    import timm

    def count(name: str) -> int | None:
        return None if name.endswith("_224") else len(name)

    monkeypatch.setattr(coverage, "_param_count_meta", count)
    expected = []
    for module in timm.list_modules():
        names = timm.list_models(module=module)
        counted = [(count(n), n) for n in names if count(n) is not None]
        if names:
            expected.append((module, min(counted)[1] if counted else names[0]))
    assert list(coverage.timm_models()) == expected, "the full sweep's timm selection changed"


def test_ctrl_c_writes_the_rows_so_far(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch):
    checked = fake_sweep(monkeypatch, interrupt_at=2)
    out, page = tmp_path / "c.json", tmp_path / "c.md"
    try:
        code = main(["coverage", "--models", "resnet10t", "resnet18", "resnet34", "--out", str(out),
                     "--markdown", str(page)])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped the command as a KeyboardInterrupt instead of ending it with exit code 130")
    captured = capsys.readouterr()
    assert code == 130, f"Ctrl-C must exit 130, got {code}"
    assert [r["model"] for r in json.loads(out.read_text())] == ["resnet10t"], out.read_text()
    assert "- **timm**: 1 retrofitted, 0 unchanged, 0 failed" in page.read_text(), "no markdown for the rows so far"
    assert "timm: 1 retrofitted" in captured.out, f"no totals printed: {captured.out}"
    assert captured.err.strip() == f"interrupted after 1 model; their rows are in {out} and {page}", captured.err
    assert checked == ["resnet10t", "resnet18"], checked


class EmptyDetections(torch.nn.Module):
    """A residual model whose output, like a random-weight detector's, holds no element."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.body = torch.nn.Sequential(torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.BatchNorm2d(16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        x = torch.relu(x + self.body(x))
        return x.flatten(1)[:, :0]


def test_backward_is_not_checked_when_the_outputs_are_empty():
    se_model = se_retrofit.apply(EmptyDetections().eval())
    assert se_retrofit.se_blocks(se_model), "the test model should get an SE block"
    got = coverage._backward_ok(se_model, (torch.rand(2, 3, 16, 16),), {})
    assert got is None, f"no element to differentiate must read 'not checked', not {got}"


def test_max_diff_of_empty_outputs_is_zero():
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0)}
    assert coverage._max_diff(empty, empty) == 0.0, "a detector that found nothing must not fail the identity check"


def test_committed_page_is_rendered_from_the_committed_json():
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "docs" / "scripts" / "gen_coverage.py"
    done = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"docs/scripts/gen_coverage.py would change coverage.md: {done.stderr[-500:]}"


@pytest.mark.slow
@pytest.mark.parametrize("zoo", ["torchvision", "timm"])
def test_first_models_of_each_zoo(zoo: str, tmp_path: Path):
    out = tmp_path / "cov.json"
    assert main(["coverage", "--zoo", zoo, "--limit", "8", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert len(rows) == 8 and len({row["model"] for row in rows}) == 8, \
        f"--limit 8 should give 8 rows of distinct models, got {[row['model'] for row in rows]}"
    assert any(row["inserted"] for row in rows), f"no {zoo} model among the first 8 got SE: the checks below are empty"
    for row in rows:
        assert row["error"] is None, f"{row['model']}: {row['error']}"
        # exact: the gate is exactly 1 under identity init and x * 1 is exact; a model with no SE is a copy
        assert row["identity_max_diff"] == 0.0, f"{row['model']}: identity init changed the outputs: {row}"
        if row["inserted"]:
            assert row["backward_ok"], f"{row['model']}: a new SE block got no gradient: {row}"


def torchvision_resnet18() -> torch.nn.Module:
    import torchvision

    return torchvision.models.resnet18()


def fake_sweep(monkeypatch: pytest.MonkeyPatch, interrupt_at: int | None = None) -> list[str]:
    """Replace ``check_model`` with an instant one that passes; return the names it was asked to check.

    With ``interrupt_at`` the n-th call (from 1) raises KeyboardInterrupt, as Ctrl-C would.
    """
    checked: list[str] = []

    def check(zoo: str, family: str, name: str) -> coverage.CoverageRow:
        checked.append(name)
        if len(checked) == interrupt_at:
            raise KeyboardInterrupt
        return coverage.CoverageRow(zoo, family, name, built=True, inserted=1, identity_max_diff=0.0, backward_ok=True)

    monkeypatch.setattr(coverage, "check_model", check)
    return checked


class OverflowingNet(torch.nn.Module):
    """One residual block, then logits that overflow to inf: the identity check gives NaN, the backward check fails."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.bn(self.conv(x)))
        return torch.exp(x.mean((2, 3)) * 1e4)


def test_an_interrupted_sweep_keeps_its_rows_through_pickling():
    import pickle

    rows = [coverage.CoverageRow("timm", "-", f"m{i}", built=True) for i in range(3)]
    back = pickle.loads(pickle.dumps(coverage.SweepInterrupted(rows)))
    assert back.rows == rows and "after 3 models" in str(back), f"{back!r} lost its rows"


@pytest.mark.parametrize("markdown", ["same", "relative", "link"])
def test_out_and_markdown_naming_one_file_are_refused_before_the_first_model(
        markdown: str, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch):
    """The page was written over the JSON rows, and the command exited 0."""
    checked = fake_sweep(monkeypatch)
    out = tmp_path / "keep.json"
    out.write_text("[]")
    monkeypatch.chdir(tmp_path)
    if markdown == "link":
        (tmp_path / "page.md").symlink_to(out)
    page = {"same": str(out), "relative": "keep.json", "link": "page.md"}[markdown]
    code = main(["coverage", "--models", "resnet10t", "--out", str(out), "--markdown", page])
    err = capsys.readouterr().err
    assert code == 2 and "are the same file" in err and "--markdown another file" in err, \
        f"expected a one-line error, got {code}: {err!r}"
    assert checked == [] and out.read_text() == "[]", "the refused sweep ran or wrote"
