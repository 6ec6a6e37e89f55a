"""The package's import surface: lazy (the CLI's --help without torch) and the same names as eager imports."""
from __future__ import annotations

import subprocess
import sys
import types

import pytest

import se_retrofit


def _run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    if done.returncode:
        pytest.fail(f"the subprocess failed:\n{done.stderr}")
    return done.stdout.strip()


def test_import_and_cli_help_do_not_import_torch() -> None:
    out = _run("import sys, contextlib, io\n"
               "import se_retrofit, se_retrofit.cli\n"
               "with contextlib.redirect_stdout(io.StringIO()) as help_text:\n"
               "    parser = se_retrofit.cli.build_parser()\n"
               "    parser.print_help()\n"
               "print('torch' in sys.modules, 'timm' in sys.modules, 'convert-and-finetune' in help_text.getvalue())")
    assert out == "False False True", f"(torch imported, timm imported, help lists the commands) = {out}"


@pytest.mark.parametrize("name", sorted(set(se_retrofit.__all__) - {"__version__"}))
def test_every_public_name_resolves_to_its_object(name: str) -> None:
    value = getattr(se_retrofit, name)
    assert not isinstance(value, types.ModuleType), f"se_retrofit.{name} is a module, not the public object"
    assert getattr(value, "__name__", name) == name, f"se_retrofit.{name} resolved to {value!r}"


def test_functions_named_like_their_modules_stay_functions_after_the_modules_load() -> None:
    out = _run("import se_retrofit.report, se_retrofit.finetune, se_retrofit.commands.report\n"
               "import se_retrofit\n"
               "from se_retrofit import report, finetune\n"
               "print(callable(se_retrofit.report), callable(se_retrofit.finetune), callable(report),"
               " callable(finetune), type(se_retrofit.report).__name__)")
    assert out == "True True True True function", f"after importing the submodules: {out}"


def test_unknown_names_raise_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        se_retrofit.not_a_name  # noqa: B018


def test_installed_version_is_the_code_version() -> None:
    """Run folders and adapter files record ``__version__``: the installed distribution must report the same."""
    import importlib.metadata

    try:
        installed = importlib.metadata.version("se_retrofit")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("se_retrofit is not installed (run from a source tree)")
    assert installed == se_retrofit.__version__, (
        f"installed metadata says {installed}, the code {se_retrofit.__version__}: reinstall with pip install -e .")
