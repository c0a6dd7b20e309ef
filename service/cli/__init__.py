"""The ``cohortsim`` command line: synth, ingest, train, index build, serve, query, demo.

Every command exits 0 on success and, on bad input, prints one line
``cohortsim: error: <reason>`` to stderr and exits non-zero (2 for bad input, 1 for a
failure of the system itself). Progress of long work goes to stderr, so ``--json``
output on stdout stays machine-readable.

One module per command group; each registers its commands on :data:`app` when imported:

* :mod:`~service.cli.app` — the typer app and its sub-apps, the one-line error edge
  (:func:`cli_errors`, :class:`CliError`), ``--version``, option enums, progress bars,
  ``--json`` output, ``--ray`` argument handling;
* :mod:`~service.cli.data` — ``synth``, ``ingest`` (folders, DICOMweb, Ray);
* :mod:`~service.cli.train` — ``train``, ``eval``;
* :mod:`~service.cli.index` — ``index build | list | rollback | prune | compact``,
  ``delete``, ``outcomes``, ``compact``;
* :mod:`~service.cli.serve` — ``serve`` (a site, or a coordinator with ``--federate``);
* :mod:`~service.cli.admin` — ``audit verify``, ``auth token``;
* :mod:`~service.cli.query` — ``query`` and the printed answer;
* :mod:`~service.cli.demo` — ``demo``;
* ``listen`` (:mod:`service.pacs.commands`) and ``federate server | site``
  (:mod:`service.federate`) are registered here.
"""

from __future__ import annotations

import logging
import os
import sys

import typer

# isort: off
# Command modules register their commands on `app` when imported, in --help order.
from service.cli import data, train, index, serve, admin, query, demo  # noqa: F401
# isort: on
from service.cli.app import (
    CliError,
    _fail,
    _print_json,
    _say,
    app,
    cli_errors,
    err,
    out,
    progress_bar,
    ray_address_argv,
)
from service.cli.query import _parse_region, print_quality, print_result

__all__ = [
    "CliError",
    "_fail",
    "_parse_region",
    "_print_json",
    "_say",
    "app",
    "cli_errors",
    "err",
    "main",
    "out",
    "print_quality",
    "print_result",
    "progress_bar",
    "ray_address_argv",
]


def _register_pacs() -> None:
    from service.pacs.commands import register

    register(app)  # cohortsim listen (service/pacs)

_register_pacs()

# `cohortsim federate server | site` (service/federate.py; Flower is imported only when run)
from service import federate as _federate  # noqa: E402

federate_app = typer.Typer(
    help="Federated encoder training with Flower (needs the extra cohortsim\\[federated]).",
    no_args_is_help=True,
)

federate_app.command("server")(cli_errors(_federate.server))

federate_app.command("site")(cli_errors(_federate.site))

app.add_typer(federate_app, name="federate")

def main() -> None:
    """Console-script entry point."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys.argv = ray_address_argv(sys.argv)
    try:
        app()
    except SystemExit:
        raise
    except Exception as exc:  # last resort: one line, no traceback, non-zero exit
        err.print(f"cohortsim: error: unexpected {type(exc).__name__}: {exc}", markup=False, highlight=False)
        if os.environ.get("COHORTSIM_DEBUG"):
            raise
        sys.exit(1)

