"""``cohortsim audit verify`` and ``cohortsim auth token``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from service.cli.app import CliError, _fail, _print_json, audit_app, auth_app, cli_errors, out


@audit_app.command("verify")
@cli_errors
def audit_verify(
    path: Annotated[Path, typer.Argument(metavar="PATH", help="An audit log written by cohortsim serve --audit-log.")],
    expect_head: Annotated[
        str | None, typer.Option(help="The hash the log must end with (kept elsewhere), to catch lines cut from its end.")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON report on stdout (exit 1 still marks a broken chain).")] = False,
) -> None:
    """Check the SHA-256 chain of an audit log (and its rotated files PATH.000001, ...);
    names the first edited, removed or reordered record."""
    from service.audit import rotated_files, verify

    if not path.is_file() and not rotated_files(path):
        raise CliError(f"{path} is not a file")
    result = verify(path, expect_head=expect_head)
    if json_out:
        _print_json(
            {
                "path": str(path),
                "ok": result.ok,
                "records": result.records,
                "head": result.head,
                "bad_line": result.bad_line,
                "reason": result.reason,
            }
        )
        if not result.ok:
            raise typer.Exit(1)
        return
    if not result.ok:
        _fail(result.describe(path), 1)
    out.print(result.describe(path), highlight=False)


@auth_app.command("token")
@cli_errors
def auth_token(
    role: Annotated[str, typer.Option(help="clinician, researcher, admin or service.")],
    id: Annotated[str | None, typer.Option("--id", help="Name of the holder in the audit record.")] = None,
) -> None:
    """Make a random bearer token; prints it and its salted-hash entry for the --auth-tokens file."""
    from service.auth import new_token, token_file_entry

    token = new_token()
    entry = token_file_entry(token, role, id)
    out.print_json(json.dumps({"token": token, "entry": entry}))
