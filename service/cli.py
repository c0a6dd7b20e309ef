"""The ``cohortsim`` command line: synth, ingest, train, index build, serve, query, demo.

Every command exits 0 on success and, on bad input, prints one line
``cohortsim: error: <reason>`` to stderr and exits non-zero (2 for bad input, 1 for a
failure of the system itself). Progress of long work goes to stderr, so ``--json``
output on stdout stays machine-readable.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

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
from rich.table import Table

log = logging.getLogger("cohortsim")

app = typer.Typer(
    name="cohortsim",
    help="Patient similarity search over medical imaging: which earlier patients looked "
    "like this one, and what happened to them?",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
index_app = typer.Typer(help="Build and inspect index snapshots.", no_args_is_help=True)
app.add_typer(index_app, name="index")

# Non-terminal output (pipes, logs) gets a wide console so tables do not fold.
out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True)

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
        from encoders.errors import DicomError, EncoderError
        from indexing.errors import (
            DimensionError,
            FilterError,
            ModelVersionError,
            QueryError,
            SnapshotError,
            StoreError,
            UnknownStudyError,
        )
        from service.client import CohortsimClientError

        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except CliError as exc:
            _fail(str(exc), exc.code)
        except CohortsimClientError as exc:
            _fail(str(exc), 1 if exc.code in ("UNAVAILABLE", "INTERNAL", "DEADLINE_EXCEEDED") else 2)
        except (
            DicomError,
            EncoderError,
            StoreError,
            SnapshotError,
            DimensionError,
            FilterError,
            ModelVersionError,
            QueryError,
            FileNotFoundError,
            NotADirectoryError,
            PermissionError,
        ) as exc:
            _fail(str(exc) or type(exc).__name__)
        except UnknownStudyError as exc:
            _fail(str(exc.args[0]) if exc.args else "unknown study")
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


# --------------------------------------------------------------------------- synth
@app.command()
@cli_errors
def synth(
    out_dir: Annotated[Path, typer.Argument(metavar="OUT", help="Folder to write OUT/dicom/ and OUT/outcomes.csv into.")],
    patients: Annotated[int, typer.Option(min=1, max=100_000, help="Number of synthetic patients.")] = 40,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same cohort).")] = 0,
) -> None:
    """Generate a synthetic CT cohort as real DICOM files plus an outcomes table."""
    from encoders.synth import synth_cohort

    with progress_bar("synth", patients) as update:
        info = synth_cohort(out_dir, patients=patients, seed=seed, progress=lambda d, t: update(d, t))
    _say(
        f"wrote {info.n_patients} patients ({info.n_files} DICOM files, scanners: "
        f"{', '.join(info.scanners)}) to {out_dir}/dicom and outcomes to {out_dir}/outcomes.csv"
    )


# --------------------------------------------------------------------------- ingest
@app.command()
@cli_errors
def ingest(
    dicom_dir: Annotated[Path, typer.Argument(help="Folder of DICOM files (searched recursively; grouped by UIDs).")],
    store: Annotated[Path, typer.Option(help="Cohort store folder (created if missing).")],
    outcomes: Annotated[Path | None, typer.Option(help="Outcomes CSV/Parquet: patient_id,time,event,<labels...>.")] = None,
    site: Annotated[str, typer.Option(help="Site name recorded with each study.")] = "local",
    secret_file: Annotated[
        Path | None,
        typer.Option(help="Site secret for pseudonyms (default $COHORTSIM_SITE_SECRET or ~/.config/cohortsim/site-secret)."),
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON report on stdout.")] = False,
) -> None:
    """Read DICOM studies into the cohort store (pseudonymised, preprocessed, with acquisition metadata)."""
    from encoders.deid import Pseudonymizer
    from indexing.ingest import ingest_folder, read_outcomes
    from indexing.store import CohortStore

    if not dicom_dir.is_dir():
        raise CliError(f"{dicom_dir} is not a folder")
    pseudo = Pseudonymizer.from_env_or_file(secret_file)
    cohort = CohortStore(store, create=True)
    with progress_bar("ingest") as update:
        report = ingest_folder(dicom_dir, cohort, pseudonymizer=pseudo, site=site, progress=lambda d, t: update(d, t))
    if outcomes is not None:
        table = read_outcomes(outcomes, pseudo)
        report.outcomes_rows = cohort.set_outcomes(table)
    if json_out:
        out.print_json(json.dumps(report.to_dict()))
    else:
        _say(
            f"ingested {report.studies_ingested} new studies ({report.studies_already_present} already present, "
            f"{len(report.studies_rejected)} studies and {len(report.files_rejected)} files rejected) into {store}"
        )
        for r in report.files_rejected[:20]:
            _say(f"  rejected file {r['path']}: {r['reason']}")
        for r in report.studies_rejected[:20]:
            _say(f"  rejected study {r['study']}: {r['message']}")
        if outcomes is not None:
            _say(f"outcomes: {report.outcomes_rows} patients updated")


# --------------------------------------------------------------------------- train
@app.command()
@cli_errors
def train(
    store: Annotated[Path, typer.Option(help="Cohort store to train on (self-supervised: no labels used).")],
    out_dir: Annotated[Path, typer.Option("--out", help="Model folder: model.safetensors + card.json.")],
    backbone: Annotated[str, typer.Option(help="Any timm model name, e.g. resnet10t, resnet18, test_resnet.")] = "resnet10t",
    epochs: Annotated[int, typer.Option(min=1, max=10_000)] = 10,
    batch_size: Annotated[int, typer.Option(min=2, max=4096)] = 16,
    method: Annotated[str, typer.Option(help="simclr or vicreg.")] = "simclr",
    embedding_dim: Annotated[int, typer.Option(min=8, max=4096)] = 128,
    lr: Annotated[float, typer.Option(min=1e-7, max=1.0)] = 1e-3,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    seed: Annotated[int, typer.Option()] = 0,
    time_budget: Annotated[float | None, typer.Option(help="Stop training after this many seconds.")] = None,
) -> None:
    """Train a self-supervised study encoder on the store's volumes (resumable)."""
    from indexing.store import CohortStore

    if method not in ("simclr", "vicreg"):
        raise CliError(f"--method must be simclr or vicreg, not {method!r}")
    cohort = CohortStore(store)
    out_dir.mkdir(parents=True, exist_ok=True)
    card = _train_on_store(
        cohort,
        out_dir,
        backbone=backbone,
        embedding_dim=embedding_dim,
        method=method,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        device=device,
        seed=seed,
        time_budget_s=time_budget,
    )
    _say(f"saved encoder {card.version} ({card.backbone}, {card.method}, {card.epochs} epochs, dim {card.embedding_dim}) to {out_dir}")


def _train_on_store(cohort: Any, out_dir: Path, *, batch_size: int, **kw: Any) -> Any:
    """Train on every volume of a store, save the encoder in ``out_dir``; returns its card.

    A resumable checkpoint lives in ``out_dir/checkpoint`` while training runs and is
    removed once the encoder is saved.
    """
    import hashlib

    from encoders.model import save_encoder
    from encoders.spec import InputSpec
    from encoders.train import resolve_device, train_ssl

    resolve_device(kw.get("device", "auto"))
    uids, volumes = cohort.load_volumes()
    if len(uids) < 2:
        raise CliError(f"the store at {cohort.root} holds {len(uids)} studies; at least 2 are needed to train")
    spec = InputSpec.from_dict(json.loads(cohort.studies(columns=["spec"])["spec"][0].as_py()))
    data_hash = hashlib.sha256("\n".join(sorted(uids)).encode()).hexdigest()[:16]
    with progress_bar("train") as update:
        encoder, card = train_ssl(
            volumes,
            spec=spec,
            batch_size=min(batch_size, len(uids)),
            data_hash=data_hash,
            checkpoint_dir=out_dir / "checkpoint",
            progress=lambda s, t, loss: update(s, t, extra=f"loss {loss:.3f}"),
            **kw,
        )
    save_encoder(encoder, card, out_dir)
    shutil.rmtree(out_dir / "checkpoint", ignore_errors=True)
    return card


# --------------------------------------------------------------------------- index
@index_app.command("build")
@cli_errors
def index_build(
    out_dir: Annotated[Path, typer.Option("--out", help="Index folder (snapshots are published into it).")],
    store: Annotated[Path | None, typer.Option(help="Cohort store to embed (with --model).")] = None,
    model: Annotated[Path | None, typer.Option(help="Encoder folder from cohortsim train.")] = None,
    embeddings: Annotated[
        Path | None,
        typer.Option(help="Precomputed, already de-identified embeddings (Parquet) instead of --store/--model."),
    ] = None,
    kind: Annotated[str, typer.Option(help="FAISS factory string: Flat (exact, default), HNSW32, IVF256,Flat, IVF256,PQ32...")] = "Flat",
    device: Annotated[str, typer.Option(help="Device for embedding: auto, cpu or cuda.")] = "auto",
) -> None:
    """Embed the cohort and publish a new index snapshot atomically."""
    from indexing.build import build_from_embeddings, build_from_store
    from indexing.snapshot import load_snapshot

    if embeddings is not None and (store is not None or model is not None):
        raise CliError("give either --embeddings or --store with --model, not both")
    if embeddings is None and (store is None or model is None):
        raise CliError("give --store and --model (or --embeddings FILE.parquet)")
    if embeddings is not None:
        version = build_from_embeddings(embeddings, out_dir, kind=kind)
    else:
        assert store is not None and model is not None  # for the type checker; checked above
        with progress_bar("embed") as update:
            version = build_from_store(
                store, model, out_dir, kind=kind, device=device, progress=lambda _s, d, t: update(d, t)
            )
    info = load_snapshot(out_dir, version=version, device="cpu").info()
    _say(
        f"published index {version}: {info['num_studies']} studies, dim {info['dimension']}, "
        f"{info['index_kind']}, model {info['model_version']} -> {out_dir}"
    )


@index_app.command("list")
@cli_errors
def index_list(index_dir: Annotated[Path, typer.Argument(metavar="INDEX_DIR")]) -> None:
    """List the snapshots in an index folder (the served one is marked)."""
    from indexing.snapshot import list_versions

    versions = list_versions(index_dir)
    if not versions:
        raise CliError(f"{index_dir} holds no snapshots; run cohortsim index build")
    current = (index_dir / "CURRENT").read_text().strip() if (index_dir / "CURRENT").exists() else ""
    for v in versions:
        out.print(f"{'*' if v == current else ' '} {v}")


# --------------------------------------------------------------------------- serve
@app.command()
@cli_errors
def serve(
    index: Annotated[Path, typer.Option(help="Index folder from cohortsim index build.")],
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="0 picks a free port.")] = 50051,
) -> None:
    """Serve the index over gRPC (health and reflection included) until SIGTERM/Ctrl-C."""
    import asyncio

    from indexing.snapshot import load_snapshot
    from service.server import serve as serve_async

    load_snapshot(index, device="cpu")  # fail fast with a clear reason before binding the port
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    asyncio.run(serve_async(index, host=host, port=port, ready=lambda p: _say(f"serving {index} on {host}:{p}")))


# --------------------------------------------------------------------------- query
def _dicom_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        if not files:
            raise CliError(f"{path} holds no files")
        return files
    raise CliError(f"{path} does not exist")


@app.command()
@cli_errors
def query(
    server: Annotated[str, typer.Option(help="HOST:PORT of a cohortsim server.")] = "127.0.0.1:50051",
    dicom: Annotated[Path | None, typer.Option(help="A DICOM file or a folder holding one study.")] = None,
    study_uid: Annotated[str | None, typer.Option(help="Pseudonymous study id already in the index.")] = None,
    k: Annotated[int, typer.Option(min=1, max=1000, help="Number of neighbours.")] = 10,
    json_out: Annotated[bool, typer.Option("--json", help="Print the answer as JSON on stdout.")] = False,
    timeout: Annotated[float, typer.Option(min=0.1, help="Seconds before giving up.")] = 60.0,
) -> None:
    """Ask a server for the patients most similar to a study, with their outcomes and a prognosis."""
    from service.client import CohortsimClient

    if (dicom is None) == (study_uid is None):
        raise CliError("give exactly one of --dicom PATH or --study-uid UID")
    with CohortsimClient(server, timeout=timeout) as client:
        if dicom is not None:
            result = client.search(dicom_paths=_dicom_files(dicom), k=k)
        else:
            result = client.search(study_uid=study_uid, k=k)
    if json_out:
        out.print_json(json.dumps(result.to_dict()))
    else:
        print_result(result)


def _fmt(v: float | None, spec: str = ".2f") -> str:
    return "–" if v is None else format(v, spec)


def print_result(result: Any, console: Console | None = None) -> None:
    """Print neighbours, prognosis and warnings as a clinician-readable report."""
    c = console or out
    table = Table(title=f"{len(result.neighbors)} most similar patients", title_justify="left")
    for col in ("#", "patient", "similarity", "weight", "site", "scanner", "time", "event", "labels"):
        table.add_column(col, justify="right" if col in ("#", "similarity", "weight", "time") else "left")
    for i, n in enumerate(result.neighbors, start=1):
        acq = n.acquisition
        scanner = " ".join(x for x in (acq.get("manufacturer"), acq.get("model")) if x) or "–"
        if acq.get("kernel"):
            scanner += f" / {acq['kernel']}"
        event = "–" if n.event is None else ("event" if n.event else "censored")
        labels = ", ".join(f"{k}={v}" for k, v in sorted(n.labels.items()))
        table.add_row(
            str(i), n.patient_id, f"{n.similarity:.3f}", f"{n.weight:.3f}", n.site or "–",
            scanner, _fmt(n.time, ".1f"), event, labels,
        )
    c.print(table)
    p = result.prognosis
    unit = getattr(p, "time_unit", "") or "months"
    c.print("[bold]Prognosis from these neighbours[/bold] (similarity-weighted Kaplan–Meier)")
    med = "not reached" if p.median_survival is None else f"{p.median_survival:.1f} {unit}"
    c.print(f"  median survival: {med} (95% CI {_fmt(p.median_lower, '.1f')}–{_fmt(p.median_upper, '.1f')})")
    for h in p.at_horizons:
        c.print(
            f"  survival at {h.time:g} {unit}: {_fmt(h.survival)} (95% CI {_fmt(h.lower)}–{_fmt(h.upper)})"
            + ("  (beyond the neighbours' follow-up)" if h.survival is None else "")
        )
    c.print(
        f"  effective sample size {p.effective_sample_size:.1f} of {p.neighbors_with_outcome} neighbours "
        f"with outcomes, {p.events} events"
    )
    d = result.diagnostics
    c.print(f"[bold]Diagnostics[/bold]: out-of-distribution percentile {d.ood_percentile:.2f}")
    for w in [*p.warnings, *d.warnings]:
        c.print(f"  [yellow]warning:[/yellow] {w}")
    c.print(f"index {result.index_version}, model {result.model_version}", style="dim")


# --------------------------------------------------------------------------- demo
@app.command()
@cli_errors
def demo(
    workdir: Annotated[Path | None, typer.Option(help="Keep the demo's files here (default: a temporary folder, removed).")] = None,
    patients: Annotated[int, typer.Option(min=8, max=2000, help="Synthetic cohort size.")] = 120,
    train_seconds: Annotated[float, typer.Option(min=5, help="Training time budget in seconds.")] = 120.0,
    epochs: Annotated[int, typer.Option(min=1)] = 30,
    backbone: Annotated[str, typer.Option()] = "resnet10t",
    k: Annotated[int, typer.Option(min=1, max=100)] = 10,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Run the whole path on a synthetic cohort: synth, ingest, train, index, serve, query."""
    t0 = time.monotonic()
    tmp = None
    if workdir is None:
        tmp = tempfile.mkdtemp(prefix="cohortsim-demo-")
        root = Path(tmp)
    else:
        root = workdir
        root.mkdir(parents=True, exist_ok=True)
    try:
        _demo(root, patients=patients, train_seconds=train_seconds, epochs=epochs, backbone=backbone, k=k, seed=seed)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    _say(f"demo finished in {time.monotonic() - t0:.0f} s")


def _demo(root: Path, *, patients: int, train_seconds: float, epochs: int, backbone: str, k: int, seed: int) -> None:
    from encoders.deid import Pseudonymizer
    from encoders.synth import synth_cohort
    from indexing.build import build_from_store
    from indexing.ingest import ingest_folder, read_outcomes
    from indexing.store import CohortStore
    from service.background import BackgroundServer
    from service.client import CohortsimClient

    synth_dir, store_dir, model_dir, index_dir = (root / n for n in ("synth", "store", "model", "index"))
    secret = root / "site-secret"
    if not secret.exists():
        secret.write_text(os.urandom(32).hex())
        secret.chmod(0o600)
    os.environ.pop("COHORTSIM_SITE_SECRET", None)  # the demo uses its own secret file
    pseudo = Pseudonymizer.from_env_or_file(secret)

    _say(f"[1/6] synthesising {patients + 1} patients as DICOM in {synth_dir}")
    with progress_bar("synth", patients + 1) as update:
        synth_cohort(synth_dir, patients=patients + 1, seed=seed, progress=lambda d, t: update(d, t))
    # hold the last patient back as the new patient a clinician asks about
    folders = sorted((synth_dir / "dicom").iterdir(), key=lambda p: p.name)
    query_dir = root / "query"
    if query_dir.exists():
        shutil.rmtree(query_dir)
    shutil.move(str(folders[-1]), str(query_dir))

    _say("[2/6] ingesting (pseudonymised; identifying tags are never stored)")
    cohort = CohortStore(store_dir, create=True)
    with progress_bar("ingest") as update:
        report = ingest_folder(synth_dir / "dicom", cohort, pseudonymizer=pseudo, site="demo-site", progress=lambda d, t: update(d, t))
    report.outcomes_rows = cohort.set_outcomes(read_outcomes(synth_dir / "outcomes.csv", pseudo))
    _say(
        f"      {report.studies_ingested} studies ingested, {report.studies_already_present} already present, "
        f"{len(report.studies_rejected) + len(report.files_rejected)} rejected; outcomes for {report.outcomes_rows} patients"
    )

    _say(f"[3/6] training a self-supervised {backbone} encoder on the CPU (≤ {train_seconds:.0f} s)")
    card = _train_on_store(
        cohort, model_dir, backbone=backbone, epochs=epochs, batch_size=16, device="auto",
        seed=seed, time_budget_s=train_seconds,
    )
    _say(f"      encoder {card.version}: {card.epochs} epochs")

    _say("[4/6] building the FAISS index (exact, cosine)")
    version = build_from_store(store_dir, model_dir, index_dir, kind="Flat", device="auto")
    _say(f"      published snapshot {version}")

    _say("[5/6] starting the gRPC server on a free local port")
    with BackgroundServer(index_dir) as server:
        _say(f"      listening on {server.target}")
        _say(f"[6/6] querying with the held-back patient's study ({len(list(query_dir.rglob('*.dcm')))} files)")
        with CohortsimClient(server.target, timeout=120) as client:
            result = client.search(dicom_paths=sorted(query_dir.rglob("*.dcm")), k=k)
    print_result(result)
    _print_demo_truth(result, query_dir, synth_dir, pseudo)


def _print_demo_truth(result: Any, query_dir: Path, synth_dir: Path, pseudo: Any) -> None:
    """Compare the answer with the generator's ground truth (known only for synthetic data)."""
    import csv

    import pydicom

    first = next(iter(sorted(query_dir.rglob("*.dcm"))))
    raw_id = str(pydicom.dcmread(first, stop_before_pixels=True, specific_tags=["PatientID"]).PatientID)
    with open(synth_dir / "truth.csv", newline="") as f:
        truth = {r["patient_id"]: r for r in csv.DictReader(f)}
    with open(synth_dir / "outcomes.csv", newline="") as f:
        outcome = {r["patient_id"]: r for r in csv.DictReader(f)}.get(raw_id, {})
    me = truth.get(raw_id)
    if me is None:
        return
    by_pseudonym = {pseudo.patient(pid): row for pid, row in truth.items() if pid != raw_id}
    cohort = list(by_pseudonym.values())
    ks = len(result.neighbors)
    same_pheno = sum(n.labels.get("phenotype") == me["phenotype"] for n in result.neighbors)
    same_scanner = sum(
        by_pseudonym.get(n.patient_id, {}).get("scanner") == me["scanner"] for n in result.neighbors
    )
    base_pheno = sum(r["phenotype"] == me["phenotype"] for r in cohort) / max(len(cohort), 1)
    base_scanner = sum(r["scanner"] == me["scanner"] for r in cohort) / max(len(cohort), 1)
    out.print("[bold]Ground truth of the held-back patient[/bold] (known only because the cohort is synthetic)")
    event = {"1": "event", "0": "censored"}.get(outcome.get("event", ""), "?")
    out.print(
        f"  phenotype {me['phenotype']}, scanner {me['scanner']}; "
        f"observed outcome {outcome.get('time', '?')} months ({event})"
    )
    out.print(
        f"  neighbours with its phenotype: {same_pheno}/{ks} (cohort share {base_pheno:.2f}); "
        f"from its scanner: {same_scanner}/{ks} (cohort share {base_scanner:.2f})"
    )


def main() -> None:
    """Console-script entry point."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except SystemExit:
        raise
    except Exception as exc:  # last resort: one line, no traceback, non-zero exit
        err.print(f"cohortsim: error: unexpected {type(exc).__name__}: {exc}", markup=False, highlight=False)
        if os.environ.get("COHORTSIM_DEBUG"):
            raise
        sys.exit(1)


if __name__ == "__main__":
    main()
