"""The PACS parts of the command line: ``cohortsim ingest --dicomweb URL`` (a pull) and
``cohortsim listen`` (the C-STORE SCP); :func:`register` adds ``listen`` to the app.

Kept out of ``service/cli/`` so that the main CLI only names the options; both import
dicomweb-client / pynetdicom lazily (the ``pacs`` extra).
"""

from __future__ import annotations

import json
import signal
import threading
from datetime import date
from pathlib import Path
from typing import Annotated, Any

import typer

from service.pacs.dicomweb import DicomwebConfig
from service.pacs.errors import PacsError


def dicomweb_config(
    url: str,
    *,
    user: str | None,
    password_file: Path | None,
    token_file: Path | None,
    ca_file: Path | None,
    timeout_s: float,
) -> DicomwebConfig:
    """The PACS settings of the CLI options, checked (``PacsError`` kind ``config``)."""
    cfg = DicomwebConfig(
        url, user=user, password_file=password_file, token_file=token_file,
        ca_file=ca_file, timeout_s=timeout_s,
    )
    cfg.check()
    return cfg


def ingest_dicomweb(
    cfg: DicomwebConfig,
    *,
    store: Path,
    pseudonymizer: Any,
    study: list[str],
    since: str | None,
    modality: str | None,
    spool: Path | None,
    index: Path | None,
    site: str,
    workers: int | None,
    series_rule: Any,
    progress: Any,
    regions: Any = None,
) -> dict[str, Any]:
    """Pull from the PACS into ``store`` (and publish into ``index``); the JSON report:
    the folder ingest's fields plus ``pacs`` (what was fetched) and ``published``.
    ``regions``: reader regions by raw study uid or patient id (``--regions``), stored
    with the pulled studies."""
    from dataclasses import asdict

    from service.pacs.inflow import Inflow
    from service.pacs.pull import pull_studies

    since_date = None
    if since:
        try:
            since_date = date.fromisoformat(since)
        except ValueError:
            raise PacsError("config", "invalid_since", f"--since {since!r} is not a date YYYY-MM-DD") from None
    inflow = Inflow(Path(store), pseudonymizer, index_dir=index, site=site, workers=workers, series_rule=series_rule,
                    regions=regions)
    report, counts = pull_studies(
        cfg,
        inflow.store(),
        pseudonymizer=pseudonymizer,
        spool=spool or Path(f"{store}.dicomweb-spool"),
        study_uids=study,
        since=since_date,
        modality=modality,
        ingest=inflow.ingest,
        progress=progress,
    )
    published = inflow.publish()
    out = report.to_dict()
    out["pacs"] = asdict(counts)
    out["published"] = (
        {"version": published.version, "added": published.added, "retrained": published.retrained}
        if published is not None
        else None
    )
    return out


def register(app: typer.Typer) -> None:
    """Add ``cohortsim listen`` to ``app``."""
    from service.cli import CliError, _say, cli_errors

    @app.command()
    @cli_errors
    def listen(
        store: Annotated[Path, typer.Option(help="Cohort store the received studies are ingested into (created if missing).")],
        index: Annotated[Path | None, typer.Option(help="Index folder: new studies are embedded with its encoder and published (servers pick them up).")] = None,
        ae_title: Annotated[str, typer.Option(help="Our AE title (the called AE title senders must use).")] = "COHORTSIM",
        host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
        port: Annotated[int, typer.Option(min=0, max=65535, help="DICOM port (0 picks a free one).")] = 11112,
        spool: Annotated[Path | None, typer.Option(help="Private folder (0700) for received instances (default STORE.spool).")] = None,
        allow_ae: Annotated[list[str] | None, typer.Option(help="Calling AE title allowed to send (repeat; default any).")] = None,
        allow_host: Annotated[list[str] | None, typer.Option(help="Peer IP address allowed to connect (repeat; default any).")] = None,
        stable_s: Annotated[float, typer.Option(min=0.0, help="A study is ingested this many seconds after its last instance.")] = 10.0,
        incomplete_hold_s: Annotated[float, typer.Option(min=0.0, help="A study whose association broke is held this long for a re-send, then ingested as it is.")] = 86400.0,
        site: Annotated[str, typer.Option(help="Site name recorded with each study.")] = "local",
        secret_file: Annotated[Path | None, typer.Option(help="Site secret for pseudonyms (default $COHORTSIM_SITE_SECRET or ~/.config/cohortsim/site-secret).")] = None,
        workers: Annotated[int, typer.Option(min=1, help="Processes reading studies (default 2: a decoder that crashes on a hostile file costs only its study; 1 = in the listener itself).")] = 2,
        allow_burned_in: Annotated[bool, typer.Option(help="Accept series flagged BurnedInAnnotation YES.")] = False,
        fsync: Annotated[bool, typer.Option(help="fsync each instance before acknowledging it (survives power loss; a killed process loses nothing either way).")] = True,
    ) -> None:
        """Receive studies over DICOM (C-STORE SCP with C-ECHO) and ingest each once stable.

        Runs until SIGTERM / Ctrl-C; instances acknowledged before a stop stay spooled and
        are ingested on the next start."""
        from encoders.deid import Pseudonymizer
        from encoders.dicom import SeriesRule
        from service.pacs.inflow import Inflow
        from service.pacs.listener import ListenerConfig, StoreListener

        if index is not None and not (index / "CURRENT").is_file():
            raise CliError(f"{index} holds no published index; run cohortsim index build first")
        pseudo = Pseudonymizer.from_env_or_file(secret_file)
        inflow = Inflow(store, pseudo, index_dir=index, site=site, workers=workers,
                        series_rule=SeriesRule(allow_burned_in=allow_burned_in))
        inflow.publish()  # studies ingested by an earlier run but not yet published
        config = ListenerConfig(
            spool=spool or Path(f"{store}.spool"), ae_title=ae_title, host=host, port=port,
            allowed_aets=tuple(allow_ae or ()), allowed_hosts=tuple(allow_host or ()),
            stable_s=stable_s, incomplete_hold_s=incomplete_hold_s, fsync=fsync,
        )
        listener = StoreListener(config, inflow, on_tick=inflow.publish_pending)
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        bound = listener.start()
        _say(f"listening as {ae_title} on {host}:{bound}")
        try:
            while not stop.wait(0.5):
                pass
        finally:
            listener.stop()
        _say(json.dumps({"received": listener.received, "refused": listener.refused}))
