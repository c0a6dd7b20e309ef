"""The typer app, its sub-apps and what every command shares: the one-line error edge
(:func:`cli_errors`, :class:`CliError`), ``--version``, option enums, progress bars on
stderr, ``--json`` output on stdout and ``--ray`` argument handling."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from enum import StrEnum
from typing import Annotated, Any, NoReturn, TypeVar

import click
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from typer.core import TyperGroup

log = logging.getLogger("cohortsim")


# Non-terminal output (pipes, logs) gets a wide console so tables do not fold.
out = Console(width=None if sys.stdout.isatty() else 160)


err = Console(stderr=True)


class _OneLineErrors(TyperGroup):
    """The root command: click's usage errors (unknown option, bad choice, missing
    argument) print as one ``cohortsim: error: ...`` line like every other error, with
    the usual exit code 2, instead of typer's framed panel."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        try:
            rv = super().main(
                args,
                prog_name,
                complete_var,
                standalone_mode=False,
                windows_expand_args=windows_expand_args,
                **extra,
            )
        except click.exceptions.NoArgsIsHelpError as exc:  # the help was printed already
            if not standalone_mode:
                raise
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            if not standalone_mode:
                raise
            ctx = getattr(exc, "ctx", None)
            hint = f" (see {ctx.command_path if ctx is not None else 'cohortsim'} --help)"
            line = " ".join(exc.format_message().split())
            err.print(f"cohortsim: error: {line}{hint}", markup=False, highlight=False, soft_wrap=True)
            sys.exit(exc.exit_code)
        except click.exceptions.Abort:
            if not standalone_mode:
                raise
            err.print("cohortsim: error: aborted", markup=False, highlight=False)
            sys.exit(1)
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)  # an Exit(code) comes back as its code


app = typer.Typer(
    name="cohortsim",
    help="Patient similarity search over medical imaging: which earlier patients looked "
    "like this one, and what happened to them?",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=_OneLineErrors,
)


index_app = typer.Typer(help="Build and inspect index snapshots.", no_args_is_help=True)


app.add_typer(index_app, name="index")


audit_app = typer.Typer(help="Check the record of access (audit log).", no_args_is_help=True)


app.add_typer(audit_app, name="audit")


auth_app = typer.Typer(help="Make credentials for cohortsim serve --auth-tokens.", no_args_is_help=True)


app.add_typer(auth_app, name="auth")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cohortsim")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def _print_version(value: bool) -> None:
    if value:
        out.print(f"cohortsim {_version()}", highlight=False)
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    pass


# Fixed sets of option values: typer shows them in --help and refuses others.
class Method(StrEnum):
    simclr = "simclr"
    vicreg = "vicreg"


class Region(StrEnum):
    lesion = "lesion"
    whole = "whole"


class Pooling(StrEnum):
    attention = "attention"
    mean = "mean"


class Calibration(StrEnum):
    tissue = "tissue"
    none = "none"


class Device(StrEnum):
    auto = "auto"
    cpu = "cpu"
    gpu = "gpu"
    cuda = "cuda"


F = TypeVar("F", bound=Callable[..., Any])


class CliError(Exception):
    """A user-facing error: printed as one line, exit code ``code``."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def _fail(message: str, code: int = 2) -> NoReturn:
    err.print(f"cohortsim: error: {message}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def cli_errors(fn: F) -> F:
    """Turn known exceptions into a one-line reason and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from encoders.errors import CohortsimError
        from service.auth import AuthConfigError
        from service.client import CohortsimClientError
        from service.pacs.errors import PacsError

        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except CliError as exc:
            _fail(str(exc), exc.code)
        except CohortsimClientError as exc:
            _fail(str(exc), 1 if exc.code in ("UNAVAILABLE", "INTERNAL", "DEADLINE_EXCEEDED") else 2)
        except CohortsimError as exc:  # the encoders' and indexing's typed errors
            _fail(exc.message, exc.exit_code)
        except (AuthConfigError, FileNotFoundError, NotADirectoryError, PermissionError) as exc:
            _fail(str(exc) or type(exc).__name__)
        except PacsError as exc:
            _fail(str(exc), 1 if exc.kind in ("unavailable", "deadline") else 2)
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except OSError as exc:
            _fail(f"{exc.strerror or exc} ({exc.filename})" if exc.filename else str(exc), 1)

    return wrapper  # type: ignore[return-value]


@contextmanager
def progress_bar(description: str, total: int | None = None) -> Iterator[Callable[..., None]]:
    """A rich progress bar on stderr; yields ``update(done, total=None, **fields)``."""
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[extra]}"),
    ]
    with Progress(*columns, console=err, transient=False, disable=not err.is_terminal and os.environ.get("COHORTSIM_PROGRESS") != "1") as bar:
        task = bar.add_task(description, total=total, extra="")

        def update(done: int, total: int | None = None, extra: str = "") -> None:
            bar.update(task, completed=done, total=total if total is not None else bar.tasks[0].total, extra=extra)

        yield update


def _say(message: str) -> None:
    err.print(message, highlight=False)


def _print_json(report: Any) -> None:
    """One JSON document on stdout (plain: no colour codes, whatever the terminal)."""
    sys.stdout.write(json.dumps(report, default=str) + "\n")
    sys.stdout.flush()


_RAY_HELP = (
    "Run on Ray (pip install 'cohortsim[ray]'): a bare --ray starts a local Ray; an ADDRESS "
    "(auto, HOST:PORT, ray://HOST:PORT) joins a cluster. Store and index folders must be "
    "on a file system every node sees at the same path."
)


def ray_address_argv(argv: list[str]) -> list[str]:
    """``argv`` with a bare ``--ray`` given the value ``local``, so ``--ray`` works as a flag
    and as ``--ray ADDRESS``: the next word is taken as the address only when it is
    ``auto`` or ``local`` or holds a ``:`` (HOST:PORT, ray://...)."""
    out: list[str] = []
    for i, word in enumerate(argv):
        out.append(word)
        if word == "--ray":
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if nxt is None or not (nxt in ("auto", "local") or ":" in nxt):
                out.append("local")
    return out


_DEVICE_HELP = "auto (a GPU when one is visible), cpu or gpu."


def _device(device: str) -> str:
    """A --device value as the libraries name it (gpu -> cuda)."""
    if device not in tuple(Device):
        raise CliError(f"--device must be auto, cpu or gpu, not {device!r}")
    return "cuda" if device == Device.gpu else str(Device(device).value)
