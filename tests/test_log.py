"""The package's logging: warnings reach stderr as ``warning: text`` with no setup, and the level can be set."""

from __future__ import annotations

import logging

import pytest

from hf_otfusion.log import get_logger, set_verbosity, verbosity_of


@pytest.fixture(autouse=True)
def _default_level():
    yield
    set_verbosity(logging.WARNING)


def test_a_module_warning_reaches_stderr_without_any_setup(capsys):
    get_logger("hf_otfusion.some_module").warning("plan cache: %s", "cannot write")
    assert capsys.readouterr().err == "warning: plan cache: cannot write\n"


def test_information_shows_only_when_asked(capsys):
    log = get_logger("hf_otfusion.some_module")
    log.info("rank 0 of 2")
    assert capsys.readouterr().err == ""
    set_verbosity(logging.INFO)
    log.info("rank 0 of 2")
    assert capsys.readouterr().err == "rank 0 of 2\n"


def test_quiet_never_hides_a_warning():
    assert verbosity_of(quiet=True, verbose=0) == logging.WARNING
    assert verbosity_of(quiet=False, verbose=0) == logging.INFO
    assert verbosity_of(quiet=False, verbose=1) == logging.DEBUG
    set_verbosity(verbosity_of(quiet=True, verbose=0))
    assert get_logger("hf_otfusion.x").isEnabledFor(logging.WARNING)


@pytest.mark.parametrize(("flags", "level"), [(["-q"], logging.WARNING), ([], logging.INFO), (["-v"], logging.DEBUG)])
def test_the_commands_quiet_and_verbose_flags_set_the_level(tmp_path, flags, level):
    from typer.testing import CliRunner

    from hf_otfusion.cli import app

    result = CliRunner().invoke(app, ["push", str(tmp_path / "missing"), "you/model", *flags])
    assert result.exit_code == 1  # the folder is missing: refused before any upload
    assert logging.getLogger("hf_otfusion").level == level
