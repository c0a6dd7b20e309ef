"""Run the cohortsim CLI in-process for the end-to-end tests."""

from __future__ import annotations

from typer.testing import CliRunner

from service.cli import app

runner = CliRunner()


def cli(*args: str) -> tuple[int, str, str]:
    """``(exit code, stdout, stderr)`` of ``cohortsim ARGS``; exceptions other than exits
    propagate, so a crash fails the test with its traceback."""
    res = runner.invoke(app, list(args))
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res.exit_code, res.stdout, res.stderr
