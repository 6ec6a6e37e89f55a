"""``se-retrofit sites``: the dry run on the command line, its JSON, its input size and its errors."""
from __future__ import annotations

import json

import pytest

from se_retrofit import cli


def test_json_lists_the_sites_and_converts_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["sites", "resnet10t", "--format", "json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    blocks = [site["block"] for site in plan["sites"]]
    assert blocks == ["layer1.0", "layer2.0", "layer3.0", "layer4.0"], f"sites of resnet10t: {blocks}"


def test_input_size_sets_height_and_width_and_keeps_a_video_models_frames(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["sites", "torchvision:r3d_18", "--input-size", "16"]) == 0
    out = capsys.readouterr().out
    assert "example input Tensor(2, 3, 8, 16, 16)" in out, f"--input-size should size height and width only:\n{out}"


def test_input_size_takes_the_syntax_of_report(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["sites", "resnet10t", "--input-size", "48x32"]) == 0
    assert "example input Tensor(2, 3, 48, 32)" in capsys.readouterr().out, "HxW should set height, then width"
    assert cli.main(["sites", "resnet10t", "--input-size", "1x3x40x40"]) == 0
    assert "example input Tensor(1, 3, 40, 40)" in capsys.readouterr().out, "a full shape is taken as given"
    assert cli.main(["sites", "torchvision:r3d_18", "--input-size", "24x16"]) == 0
    assert "example input Tensor(2, 3, 8, 24, 16)" in capsys.readouterr().out, "a video keeps its frames"
    with pytest.raises(SystemExit):
        cli.main(["sites", "resnet10t", "--input-size", "0"])
    assert "positive integers" in capsys.readouterr().err


def test_an_input_the_model_refuses_gets_a_command_line_hint(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["sites", "vit_tiny_patch16_224", "--input-size", "64"]) == 2
    err = capsys.readouterr().err
    assert "could not run an example forward" in err and "--input-size" in err, err
    assert "example_input=" not in err, f"the Python argument is no option of the command:\n{err}"


def test_an_unknown_model_is_one_error_line_with_a_suggestion(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["sites", "resnt10t"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "error:" in err and "resnet10t" in err, err


def test_no_example_input_survives_pickling_as_a_worker_process_returns_it() -> None:
    import pickle

    from se_retrofit.capture import NoExampleInput

    error = NoExampleInput("Net", ["input Tensor(2, 3, 64, 64): ValueError: no"]).with_hint("Try --input-size.")
    back = pickle.loads(pickle.dumps(error))
    assert isinstance(back, NoExampleInput) and str(back) == str(error) and back.hint == "Try --input-size.", back
