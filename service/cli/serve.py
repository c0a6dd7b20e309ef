"""``cohortsim serve``: a site, or a coordinator over sites or shards (``--federate``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from service.cli.app import _DEVICE_HELP, CliError, _device, _say, app, cli_errors


@app.command()
@cli_errors
def serve(
    index: Annotated[Path | None, typer.Option(help="Index folder from cohortsim index build (a site).")] = None,
    federate: Annotated[
        Path | None,
        typer.Option(help="Serve a federated coordinator over the sites of this TOML file ([[site]] name, address, tls_ca/tls_cert/tls_key) instead of an index; with mode = \"shards\" at its top, over the shards of one index (each [[site]] also names its index folder)."),
    ] = None,
    site_deadline_s: Annotated[float, typer.Option(min=0.01, help="Coordinator: seconds to wait for the slowest site.")] = 5.0,
    encoder: Annotated[
        Path | None, typer.Option(help="Coordinator: the sites' encoder folder, so DICOM queries are embedded once here.")
    ] = None,
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="0 picks a free port.")] = 50051,
    tls_cert: Annotated[Path | None, typer.Option(help="TLS certificate chain (PEM); with --tls-key the port speaks TLS only.")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="TLS private key (PEM; owner-only, mode 0600).")] = None,
    tls_client_ca: Annotated[
        Path | None, typer.Option(help="CA (PEM) of client certificates: mutual TLS, clients without a valid one are refused.")
    ] = None,
    auth_tokens: Annotated[
        Path | None, typer.Option(help="JSON file mapping tokens (or sha256$salt$hash) to roles; mode 0600. Health stays open.")
    ] = None,
    audit_log: Annotated[
        Path | None, typer.Option(help="Append one SHA-256-chained JSON line per call; a call fails if its line cannot be written.")
    ] = None,
    audit_max_mb: Annotated[
        float | None, typer.Option(min=0.01, help="Rotate the audit log at this size: PATH.000001, ... continue one chain (`cohortsim audit verify PATH` checks them all).")
    ] = None,
    min_cell: Annotated[
        int, typer.Option(min=2, help="Researchers: smallest group a released count may describe; smaller counts are withheld.")
    ] = 11,
    reid_similarity: Annotated[
        float, typer.Option(min=0.5, max=1.0, help="Researchers: a neighbour this similar to the query counts as the same patient and is left out.")
    ] = 0.95,
    time_bins: Annotated[
        str | None, typer.Option(help="Federated site: comma-separated time bin edges of the counts released to researchers (default 0,6,12,24,36,60,120).")
    ] = None,
    trusted_coordinator: Annotated[
        list[str] | None,
        typer.Option(help="Federated site: principal id (token id or certificate name) of a coordinator whose forwarded end user the site keeps its record of researcher releases under; repeat for several."),
    ] = None,
    max_principals: Annotated[
        int, typer.Option(min=1, help="Researchers: callers with a record of released aggregates; a new caller beyond this is refused, none is forgotten.")
    ] = 1000,
    rate_limit: Annotated[float | None, typer.Option(min=0.001, help="Calls per second per principal (bursts of twice that).")] = None,
    max_concurrent_per_principal: Annotated[int | None, typer.Option(min=1, help="Calls one principal may have in flight.")] = None,
    device: Annotated[str, typer.Option(help="Where the index is searched: " + _DEVICE_HELP)] = "auto",
    config: Annotated[Path | None, typer.Option(help="TOML file of settings ([serve] table); environment COHORTSIM_<NAME> and flags override it.")] = None,
    metrics_port: Annotated[int | None, typer.Option(min=0, max=65535, help="Serve Prometheus /metrics on this port (0: a free one).")] = None,
    batch_window_ms: Annotated[float | None, typer.Option(min=0.0, max=2.0, help="Micro-batching window for concurrent searches, 0..2 ms (default 1).")] = None,
    max_batch: Annotated[int | None, typer.Option(min=1, help="Searches per batched index call (default 64).")] = None,
    max_queue: Annotated[int | None, typer.Option(min=1, help="Searches waiting before RESOURCE_EXHAUSTED (default 1024).")] = None,
    max_concurrent_rpcs: Annotated[int | None, typer.Option(min=1, help="Calls in progress before RESOURCE_EXHAUSTED (default unlimited).")] = None,
    workers: Annotated[int | None, typer.Option(min=1, help="Worker threads for searches and DICOM embedding (default 2).")] = None,
    blas_threads: Annotated[int | None, typer.Option(min=1, help="BLAS/OpenMP threads per search (default 1: parallelism comes from batches; COHORTSIM_BLAS_THREADS= empty keeps the environment's).")] = None,
    store: Annotated[Path | None, typer.Option(help="Cohort store that IngestStudies adds to and DeletePatient withdraws from.")] = None,
    log_format: Annotated[str | None, typer.Option(help="Log lines as 'text' or 'json' (structured, with request ids).")] = None,
    grace_s: Annotated[float | None, typer.Option(min=0.0, help="On SIGTERM, seconds in-flight calls may take to finish (default 20).")] = None,
    stop_delay_s: Annotated[
        float | None, typer.Option(min=0.0, help="On SIGTERM, seconds health says NOT_SERVING while calls are still taken (default 1).")
    ] = None,
    dicomweb: Annotated[str | None, typer.Option(help="PACS DICOMweb URL: SearchSimilar / EmbedStudy accept a study by StudyInstanceUID (PacsStudy).")] = None,
    pacs_user: Annotated[str | None, typer.Option(help="--dicomweb: HTTP basic user (with --pacs-password-file).")] = None,
    pacs_password_file: Annotated[Path | None, typer.Option(help="--dicomweb: file holding the password (mode 0600).")] = None,
    pacs_token_file: Annotated[Path | None, typer.Option(help="--dicomweb: file holding a bearer token (mode 0600).")] = None,
    pacs_ca_file: Annotated[Path | None, typer.Option(help="--dicomweb: CA bundle (PEM) of an https PACS.")] = None,
    pacs_timeout_s: Annotated[float, typer.Option(min=0.1, help="--dicomweb: longest wait for a study (a call's own deadline may be shorter).")] = 30.0,
) -> None:
    """Serve the index over gRPC (health and reflection included) until SIGTERM/Ctrl-C.

    A newer version published into the index folder (or a rollback) is picked up within
    seconds, without a restart and without failing a call."""
    import asyncio
    import dataclasses

    from indexing.snapshot import load_snapshot
    from service import logs
    from service.audit import AuditLog
    from service.auth import TokenStore
    from service.config import ConfigError, SecurityConfig, load_config
    from service.governance import DisclosurePolicy
    from service.server import serve as serve_async
    from service.tls import TlsConfig

    if (tls_cert is None) != (tls_key is None):
        raise CliError("give both --tls-cert and --tls-key (or neither)")
    if tls_client_ca is not None and tls_cert is None:
        raise CliError("--tls-client-ca needs --tls-cert and --tls-key")
    if (index is None) == (federate is None):
        raise CliError("give --index (serve a site) or --federate SITES.toml (a coordinator), not both")
    if federate is not None:
        pacs = None
        if dicomweb is not None:
            from service.pacs.commands import dicomweb_config

            pacs = dicomweb_config(
                dicomweb, user=pacs_user, password_file=pacs_password_file,
                token_file=pacs_token_file, ca_file=pacs_ca_file, timeout_s=pacs_timeout_s,
            )
        _serve_coordinator(
            federate, host, port, site_deadline_s, tls_cert, tls_key, tls_client_ca, auth_tokens, audit_log,
            min_cell, encoder, pacs,
        )
        return
    assert index is not None
    bins = _time_bins(time_bins)  # a bad --time-bins fails before the index is read
    dev = _device(device)
    try:
        settings = load_config(
            config,
            flags={
                "metrics_port": metrics_port,
                "batch_window_ms": batch_window_ms,
                "max_batch": max_batch,
                "max_queue": max_queue,
                "max_concurrent_rpcs": max_concurrent_rpcs,
                "max_workers": workers,
                "blas_threads": blas_threads,
                "store": store,
                "log_format": log_format,
                "grace_s": grace_s,
                "stop_delay_s": stop_delay_s,
            },
        )
    except ConfigError as exc:
        raise CliError(str(exc)) from None
    load_snapshot(index, device="cpu")  # fail fast with a clear reason before binding the port
    logs.configure(settings.log_format, settings.log_level, replace=True)
    tls = None
    if tls_cert is not None and tls_key is not None:
        tls = TlsConfig(tls_cert, tls_key, tls_client_ca)
        tls.server_credentials()  # checks the files (and the key's permissions) now
    max_bytes = max(4096, int(audit_max_mb * 2**20)) if audit_max_mb is not None else None
    pacs = None
    if dicomweb is not None:
        from service.pacs.commands import dicomweb_config

        pacs = dicomweb_config(
            dicomweb, user=pacs_user, password_file=pacs_password_file,
            token_file=pacs_token_file, ca_file=pacs_ca_file, timeout_s=pacs_timeout_s,
        )
    security = SecurityConfig(
        tls=tls,
        auth_tokens=TokenStore.load(auth_tokens) if auth_tokens is not None else None,
        audit_log=AuditLog(audit_log, max_bytes=max_bytes) if audit_log is not None else None,
        policy=DisclosurePolicy(
            min_cell=min_cell, reid_similarity=reid_similarity, time_bins=bins,
            max_principals=max_principals, trusted_coordinators=frozenset(trusted_coordinator or ()),
        ),
        rate_limit=rate_limit,
        max_concurrent_per_principal=max_concurrent_per_principal,
        pacs=pacs,
    )
    settings = dataclasses.replace(settings, host=host, port=port, device=dev)
    asyncio.run(
        serve_async(
            index, settings, security, ready=lambda p: _say(f"serving {index} on {host}:{p}")
        )
    )


def _time_bins(text: str | None) -> tuple[float, ...]:
    """``--time-bins "0,24,60"`` -> DisclosurePolicy's ``time_bins`` (None: the default)."""
    from indexing.aggregates import DEFAULT_BIN_EDGES, check_edges

    if text is None:
        return DEFAULT_BIN_EDGES
    try:
        return check_edges([float(v) for v in text.split(",")])
    except ValueError as exc:
        raise CliError(f"--time-bins: {exc}") from None


def _serve_coordinator(
    sites_file: Path,
    host: str,
    port: int,
    deadline_s: float,
    tls_cert: Path | None,
    tls_key: Path | None,
    tls_client_ca: Path | None,
    auth_tokens: Path | None,
    audit_log: Path | None,
    min_cell: int,
    encoder: Path | None,
    pacs: Any = None,
) -> None:
    """``serve --federate``: the coordinator (service.coordinator) until SIGTERM/Ctrl-C."""
    import asyncio

    from service.audit import AuditLog
    from service.auth import TokenStore
    from service.coordinator import serve_coordinator
    from service.federation import SitesConfigError, load_topology
    from service.tls import TlsConfig

    try:
        mode, sites = load_topology(sites_file)
    except SitesConfigError as exc:
        raise CliError(str(exc)) from None
    for s in sites:
        if s.index is not None and not (s.index / "CURRENT").is_file():
            raise CliError(f"{sites_file}: shard {s.name}: no published index in {s.index}")
    if encoder is not None and not (encoder / "card.json").is_file():
        raise CliError(f"--encoder {encoder}: no encoder card (card.json) there; give the folder of cohortsim train")
    tls = None
    if tls_cert is not None and tls_key is not None:
        tls = TlsConfig(tls_cert, tls_key, tls_client_ca)
        tls.server_credentials()
    names = ", ".join(s.name for s in sites)
    asyncio.run(
        serve_coordinator(
            sites, host=host, port=port, deadline_s=deadline_s, tls=tls,
            auth_tokens=TokenStore.load(auth_tokens) if auth_tokens is not None else None,
            audit_log=AuditLog(audit_log) if audit_log is not None else None,
            min_cell=min_cell,
            encoder_dir=encoder,
            mode=mode,
            pacs=pacs,
            ready=lambda p: _say(
                f"coordinating {len(sites)} {'shards' if mode == 'shards' else 'sites'} ({names}) on {host}:{p}"
            ),
        )
    )
