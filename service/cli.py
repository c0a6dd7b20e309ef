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
import re
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
audit_app = typer.Typer(help="Check the record of access (audit log).", no_args_is_help=True)
app.add_typer(audit_app, name="audit")
auth_app = typer.Typer(help="Make credentials for cohortsim serve --auth-tokens.", no_args_is_help=True)
app.add_typer(auth_app, name="auth")

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
        from service.auth import AuthConfigError
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
            AuthConfigError,
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
    workers: Annotated[
        int | None, typer.Option(min=1, help="Processes reading and preprocessing (default: all cores; 1 = no pool).")
    ] = None,
    allow_burned_in: Annotated[
        bool,
        typer.Option(help="Accept series flagged BurnedInAnnotation YES (text in the pixels may identify the patient)."),
    ] = False,
) -> None:
    """Read DICOM studies into the cohort store (pseudonymised, preprocessed, with acquisition metadata)."""
    from encoders.deid import Pseudonymizer
    from encoders.dicom import SeriesRule
    from indexing.ingest import ingest_folder, read_outcomes
    from indexing.store import CohortStore

    if not dicom_dir.is_dir():
        raise CliError(f"{dicom_dir} is not a folder")
    pseudo = Pseudonymizer.from_env_or_file(secret_file)
    cohort = CohortStore(store, create=True)
    with progress_bar("ingest") as update:
        report = ingest_folder(
            dicom_dir,
            cohort,
            pseudonymizer=pseudo,
            site=site,
            series_rule=SeriesRule(allow_burned_in=allow_burned_in),
            workers=workers,
            progress=lambda d, t: update(d, t),
        )
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
    epochs: Annotated[
        int | None,
        typer.Option(min=1, max=10_000, help="Default: what cohortsim eval trains and scores (lesion 100, whole 8)."),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=2, max=4096)] = 16,
    method: Annotated[str, typer.Option(help="simclr or vicreg.")] = "simclr",
    embedding_dim: Annotated[int, typer.Option(min=8, max=4096)] = 128,
    lr: Annotated[float, typer.Option(min=1e-7, max=1.0)] = 1e-3,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    seed: Annotated[int, typer.Option()] = 0,
    time_budget: Annotated[float | None, typer.Option(help="Stop training after this many seconds.")] = None,
    region: Annotated[str, typer.Option(help="lesion (embed a box around the lung lesion; see encoders/roi.py) or whole (the whole volume).")] = "lesion",
    pooling: Annotated[str, typer.Option(help="Pooling over slices: attention or mean.")] = "attention",
    calibration: Annotated[str, typer.Option(help="tissue (calibrate each study's HU on its air and soft tissue) or none.")] = "tissue",
    views: Annotated[int | None, typer.Option(min=2, max=16, help="Augmented views of each study per step (default: lesion 4, whole 2; a step costs about views/2 two-view steps; 8 scored higher still, at twice the time of 4).")] = None,
) -> None:
    """Train a self-supervised study encoder on the store's volumes (resumable)."""
    from indexing.store import CohortStore

    if method not in ("simclr", "vicreg"):
        raise CliError(f"--method must be simclr or vicreg, not {method!r}")
    if region not in ("lesion", "whole"):
        raise CliError(f"--region must be lesion or whole, not {region!r}")
    if pooling not in ("attention", "mean"):
        raise CliError(f"--pooling must be attention or mean, not {pooling!r}")
    if calibration not in ("tissue", "none"):
        raise CliError(f"--calibration must be tissue or none, not {calibration!r}")
    if epochs is None:  # the evaluation's protocol: the encoder trained is the one it scores
        from encoders.evaluate import EvalConfig

        epochs = EvalConfig.epochs if region == "lesion" else EvalConfig.whole_epochs
        _say(f"training {epochs} epochs ({region} region; --epochs to change)")
    cohort = CohortStore(store)
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
        region=region,
        pooling=pooling,
        calibration=calibration,
        views=views,
    )
    _say(f"saved encoder {card.version} ({card.backbone}, {card.method}, {card.epochs} epochs, dim {card.embedding_dim}) to {out_dir}")


def _train_on_store(cohort: Any, out_dir: Path, *, batch_size: int, **kw: Any) -> Any:
    """Train on every volume of a store, save the encoder in ``out_dir``; returns its card.

    A resumable checkpoint lives in ``out_dir/checkpoint`` while training runs and is
    removed once the encoder is saved.
    """
    import hashlib

    from encoders.model import save_encoder
    from encoders.train import resolve_device, train_ssl
    from indexing.ingest import store_spec

    resolve_device(kw.get("device", "auto"))
    spec = store_spec(cohort)
    out_dir.mkdir(parents=True, exist_ok=True)
    # The volumes go to a memory-mapped file beside the model, not into memory: a cohort
    # of 20,000 studies is 20 GiB on the default grid. Removed when training ends.
    with tempfile.TemporaryDirectory(prefix=".volumes-", dir=out_dir) as spool:
        uids, volumes = cohort.spool_volumes(Path(spool) / "volumes.npy")
        if len(uids) < 2:
            raise CliError(f"the store at {cohort.root} holds {len(uids)} studies; at least 2 are needed to train")
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
        del volumes  # the memory map, before its file goes
    save_encoder(encoder, card, out_dir)
    shutil.rmtree(out_dir / "checkpoint", ignore_errors=True)
    return card


# --------------------------------------------------------------------------- eval
@app.command("eval")
@cli_errors
def eval_retrieval(
    store: Annotated[Path, typer.Option(help="Cohort store with outcomes (ingested with --outcomes).")],
    label: Annotated[str, typer.Option(help="Categorical outcome label that neighbours should share (P@k), e.g. phenotype.")],
    model: Annotated[Path | None, typer.Option(help="Also score this trained encoder (it may have seen the queries, unlabelled).")] = None,
    k: Annotated[int, typer.Option(min=1, max=1000)] = 10,
    query_fraction: Annotated[float, typer.Option(min=0.01, max=0.9, help="Share of patients held out as queries.")] = 0.25,
    seed: Annotated[int, typer.Option(help="Seed of the query split and of training.")] = 0,
    backbone: Annotated[str, typer.Option()] = "resnet10t",
    method: Annotated[str, typer.Option(help="simclr or vicreg.")] = "simclr",
    regions: Annotated[str, typer.Option(help="Encoders to train on the reference studies: comma list of lesion, whole; empty for none.")] = "lesion,whole",
    pooling: Annotated[str, typer.Option(help="attention or mean.")] = "attention",
    calibration: Annotated[str, typer.Option(help="tissue or none (HU calibration of the trained encoders).")] = "tissue",
    epochs: Annotated[int, typer.Option(min=1, max=10_000, help="Epochs of the lesion encoder.")] = 100,
    whole_epochs: Annotated[int, typer.Option(min=1, max=10_000, help="Epochs of the whole-volume encoder.")] = 8,
    batch_size: Annotated[int, typer.Option(min=2, max=4096, help="Studies per training step (as cohortsim train).")] = 16,
    train_seconds: Annotated[float | None, typer.Option(min=1, help="Also stop each training after this many seconds.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    json_out: Annotated[bool, typer.Option("--json", help="Print the rows as JSON on stdout.")] = False,
    spool_dir: Annotated[Path | None, typer.Option(help="Folder for the temporary memory-mapped copy of the volumes (default: the system's temporary folder, $TMPDIR).")] = None,
    bootstrap: Annotated[int, typer.Option(min=0, max=100_000, help="Bootstrap resamples of the query patients for the 95 % intervals (0: no intervals).")] = 1000,
    views: Annotated[int | None, typer.Option(min=2, max=16, help="Views per study per training step (as cohortsim train; default: lesion 4, whole 2).")] = None,
) -> None:
    """Score retrieval on held-out patients: P@k of a label, scanner excess, kNN C-index (24 months).

    Holds out a seeded share of the patients as queries, trains the encoder(s) on the
    other studies only (self-supervised, labels unused), and reports cohortsim beside
    baselines from the same run: random vectors, HU-histogram kNN, a randomly
    initialised backbone (each trained row also after ComBat harmonisation). Each figure
    comes with a 95 % bootstrap interval over the query patients: how far it would move
    with another draw of queries (not with another training run or cohort).
    """
    from encoders.evaluate import EvalConfig
    from indexing.store import CohortStore

    if method not in ("simclr", "vicreg"):
        raise CliError(f"--method must be simclr or vicreg, not {method!r}")
    if calibration not in ("tissue", "none"):
        raise CliError(f"--calibration must be tissue or none, not {calibration!r}")
    region_list = tuple(r.strip() for r in regions.split(",") if r.strip())
    bad = [r for r in region_list if r not in ("lesion", "whole")]
    if bad:
        raise CliError(f"--regions takes lesion and/or whole, not {', '.join(bad)}")
    cohort = CohortStore(store)
    if spool_dir is not None and not spool_dir.is_dir():
        raise CliError(f"--spool-dir {spool_dir} is not a folder")
    # The volumes go to a memory-mapped file, not into memory (as cohortsim train); the
    # evaluation reads them a study or a batch at a time. Removed when it ends.
    with tempfile.TemporaryDirectory(prefix="cohortsim-eval-", dir=spool_dir) as spool:
        uids, volumes = cohort.spool_volumes(Path(spool) / "volumes.npy")
        try:
            rows = _eval_rows(cohort, uids, volumes, label=label, model=model, cfg=EvalConfig(
                k=k, query_fraction=query_fraction, seed=seed, backbone=backbone, method=method,
                regions=region_list, pooling=pooling, calibration=calibration, epochs=epochs,
                whole_epochs=whole_epochs, time_budget_s=train_seconds,
                device=device, bootstrap=bootstrap,
                train_kw={"batch_size": batch_size, "views": views},
            ))
        finally:
            del volumes  # the memory map, before its file goes
    if json_out:
        out.print_json(json.dumps([r.to_dict() for r in rows]))
        return
    _print_eval(rows, k=k, label=label)


def _eval_rows(cohort: Any, uids: list[str], volumes: Any, *, label: str, model: Path | None,
               cfg: Any) -> list[Any]:
    """`cohortsim eval`'s protocol on the store's (spooled) volumes."""
    from encoders.evaluate import cohort_columns, run_retrieval_eval
    from encoders.model import load_encoder
    from indexing.ingest import store_spec

    if len(uids) < 2 * cfg.k:
        raise CliError(f"the store at {cohort.root} holds {len(uids)} studies; the evaluation needs at least {2 * cfg.k}")
    table = {r["study_uid"]: r for r in cohort.cohort_table().to_pylist()}
    try:
        cols = cohort_columns([table[u] for u in uids], label=label)
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    spec = store_spec(cohort)
    given = []
    if model is not None:
        enc, card = load_encoder(model, device="cpu")
        given.append((f"given encoder {card.version} ({card.region.mode})", enc))
    try:
        return run_retrieval_eval(
            volumes, patient_ids=cols["patient_ids"], labels=cols["labels"], scanners=cols["scanners"],
            times=cols["times"], events=cols["events"], spec=spec, config=cfg,
            encoders=given, progress=lambda m: _say(f"eval: {m}"),
        )
    except ValueError as exc:  # EvalError / HarmonizeError: bad cohort for this protocol
        raise CliError(str(exc)) from exc


def _print_eval(rows: list[Any], *, k: int, label: str) -> None:
    from encoders.evaluate import check_targets, metric_cells

    m0 = rows[0].metrics
    title = f"retrieval on {m0.n_queries} held-out query studies vs {m0.n_reference} reference studies (k={k}, label {label!r})"
    if m0.n_boot:
        title += f"; [{m0.ci_level:.0%} interval over query patients, {m0.n_boot} bootstrap resamples]"
    table_out = Table(title=title, title_justify="left")
    for col in ("method", f"P@{k}", "scanner excess", "kNN C-index", "s"):
        table_out.add_column(col, justify="left" if col == "method" else "right")
    for r in rows:
        table_out.add_row(r.method, *metric_cells(r.metrics), f"{r.seconds:.0f}")
    out.print(table_out)
    for r in rows:
        if r.method.startswith(("cohortsim", "given")) and not r.method.endswith("ComBat"):
            met = check_targets(rows, r.method)
            out.print(f"{r.method}: " + ", ".join(f"{n} {'met' if ok else 'NOT met'}" for n, ok in met.items()))


# --------------------------------------------------------------------------- index
_DEVICE_HELP = "auto (a GPU when one is visible), cpu or gpu."


def _device(device: str) -> str:
    if device not in ("auto", "cpu", "gpu", "cuda"):
        raise CliError(f"--device must be auto, cpu or gpu, not {device!r}")
    return "cuda" if device == "gpu" else device


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
    kind: Annotated[str, typer.Option(help="FAISS factory string: Flat (exact, default), HNSW32, IVF256,Flat, IVF256,PQ32, SQfp16...")] = "Flat",
    fp16: Annotated[bool, typer.Option("--fp16", help="Store vectors in half precision (Flat -> SQfp16, IVFn,Flat -> IVFn,SQfp16, HNSWm -> HNSWm,SQfp16).")] = False,
    device: Annotated[str, typer.Option(help="Device for embedding: " + _DEVICE_HELP)] = "auto",
    shard_size: Annotated[int, typer.Option(min=1, help="Studies per checkpointed shard; a killed build resumes from the last one.")] = 512,
    keep: Annotated[int | None, typer.Option(min=1, help="After publishing, delete all but the newest N versions (the served one stays).")] = None,
) -> None:
    """Embed the cohort and publish a new index snapshot atomically (safe while a server reads it)."""
    from indexing.build import build_from_embeddings, build_from_store
    from indexing.snapshot import fp16_kind, load_snapshot, prune_versions

    if embeddings is not None and (store is not None or model is not None):
        raise CliError("give either --embeddings or --store with --model, not both")
    if embeddings is None and (store is None or model is None):
        raise CliError("give --store and --model (or --embeddings FILE.parquet)")
    if fp16:
        kind = fp16_kind(kind)
    dev = _device(device)
    if embeddings is not None:
        version = build_from_embeddings(embeddings, out_dir, kind=kind)
    else:
        assert store is not None and model is not None  # for the type checker; checked above
        with progress_bar("build") as update:
            version = build_from_store(
                store,
                model,
                out_dir,
                kind=kind,
                device=dev,
                shard_size=shard_size,
                progress=lambda stage, d, t: update(d, t, extra=stage),
            )
    snap = load_snapshot(out_dir, version=version, device="cpu")
    info = snap.info()
    _say(
        f"published index {version}: {info['num_studies']} studies, dim {info['dimension']}, "
        f"{info['index_kind']}, model {info['model_version']} -> {out_dir}"
    )
    _print_manifest_quality(snap.manifest)
    if keep is not None:
        removed = prune_versions(out_dir, keep=keep)
        if removed:
            _say(f"pruned {len(removed)} old version(s): {', '.join(removed)}")


@index_app.command("list")
@cli_errors
def index_list(
    index_dir: Annotated[Path, typer.Argument(metavar="INDEX_DIR")],
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON list on stdout.")] = False,
) -> None:
    """List the snapshots in an index folder (the served one is marked with *)."""
    from indexing.snapshot import current_version, list_versions, read_manifest

    versions = list_versions(index_dir)
    if not versions:
        raise CliError(f"{index_dir} holds no snapshots; run cohortsim index build")
    current = current_version(index_dir)
    rows = []
    for v in versions:
        try:
            m = read_manifest(index_dir, v)
        except Exception as exc:  # a damaged version is listed, not fatal
            rows.append({"version": v, "current": v == current, "error": str(exc)})
            continue
        rows.append(
            {
                "version": v,
                "current": v == current,
                "created_at": m.get("created_at"),
                "kind": m.get("index_kind"),
                "studies": m.get("num_studies"),
                "dimension": m.get("dimension"),
                "model_version": m.get("model_version"),
                "derived_from": m.get("derived_from"),
            }
        )
    if json_out:
        out.print_json(json.dumps(rows))
        return
    for r in rows:
        mark = "*" if r["current"] else " "
        if "error" in r:
            out.print(f"{mark} {r['version']}  (unreadable: {r['error']})", markup=False)
        else:
            out.print(
                f"{mark} {r['version']}  {r['created_at']}  {r['kind']}  {r['studies']} studies  "
                f"dim {r['dimension']}  model {r['model_version']}",
                markup=False,
            )


@index_app.command("rollback")
@cli_errors
def index_rollback(
    index_dir: Annotated[Path, typer.Argument(metavar="INDEX_DIR")],
    version: Annotated[str, typer.Argument(metavar="VERSION", help="A version id from cohortsim index list.")],
) -> None:
    """Serve an earlier version again (checksums verified first; servers follow within seconds)."""
    from indexing.snapshot import rollback

    rollback(index_dir, version)
    _say(f"{index_dir}: CURRENT -> {version}")


@index_app.command("prune")
@cli_errors
def index_prune(
    index_dir: Annotated[Path, typer.Argument(metavar="INDEX_DIR")],
    keep: Annotated[int, typer.Option(min=1, help="How many of the newest versions to keep (the served one always stays).")] = 3,
) -> None:
    """Delete old snapshot versions."""
    from indexing.snapshot import prune_versions

    removed = prune_versions(index_dir, keep=keep)
    _say(f"removed {len(removed)} version(s)" + (f": {', '.join(removed)}" if removed else ""))


@index_app.command("compact")
@cli_errors
def index_compact(index_dir: Annotated[Path, typer.Argument(metavar="INDEX_DIR")]) -> None:
    """Remove deleted patients' rows physically: rebuild the served version from its own vectors."""
    from indexing.build import compact_index

    with progress_bar("compact") as update:
        version = compact_index(index_dir, progress=lambda stage, d, t: update(d, t, extra=stage))
    _say("nothing to compact: no deleted patient in the served version" if version is None else f"published compacted index {version}")


# --------------------------------------------------------------------------- delete, outcomes, compact
_PSEUDONYM = re.compile(r"^P-[0-9a-f]{16}$")


@app.command()
@cli_errors
def delete(
    patient: Annotated[list[str], typer.Option("--patient", help="Patient to withdraw: its pseudonym (P-...) or raw id (hashed with the site secret). Repeatable.")],
    store: Annotated[Path | None, typer.Option(help="Cohort store: its reads skip the patient at once; rows go at cohortsim compact.")] = None,
    index: Annotated[Path | None, typer.Option(help="Index folder: servers stop returning the patient on their next call; rows go at the next rebuild.")] = None,
    raw: Annotated[bool, typer.Option("--raw", help="Treat every --patient as a raw id, even if it looks like a pseudonym.")] = False,
    secret_file: Annotated[Path | None, typer.Option(help="Site secret for hashing raw ids (default $COHORTSIM_SITE_SECRET or ~/.config/cohortsim/site-secret).")] = None,
) -> None:
    """Withdraw patients (consent revoked): hidden everywhere at once, removed at the next compaction."""
    from indexing.store import CohortStore
    from indexing.tombstones import TOMBSTONE_FILE, add_tombstones

    if store is None and index is None:
        raise CliError("give --store and/or --index to delete from")
    if index is not None and not (index / "versions").is_dir():
        raise CliError(f"{index} is not an index folder (no versions/); check --index")
    ids = [p.strip() for p in patient if p.strip()]
    if not ids:
        raise CliError("--patient is empty")
    pseudonyms = []
    pseudo = None
    for pid in ids:
        if not raw and _PSEUDONYM.match(pid):
            pseudonyms.append(pid)
            continue
        if pseudo is None:
            from encoders.deid import Pseudonymizer

            pseudo = Pseudonymizer.from_env_or_file(secret_file)
        pseudonyms.append(pseudo.patient(pid))
    if store is not None:
        added = CohortStore(store).delete_patients(pseudonyms)
        _say(f"store {store}: {added} patient(s) withdrawn; their rows go at `cohortsim compact --store`")
    if index is not None:
        added = add_tombstones(index / TOMBSTONE_FILE, pseudonyms)
        _say(f"index {index}: {added} patient(s) hidden from answers now; rows go at the next build or `cohortsim index compact`")
    for p in pseudonyms:
        out.print(p)


@app.command()
@cli_errors
def outcomes(
    table: Annotated[Path, typer.Argument(metavar="CSV", help="Outcomes CSV/Parquet: patient_id,time,event,<labels...> (raw ids, hashed with the site secret).")],
    store: Annotated[Path, typer.Option(help="Cohort store to update.")],
    index: Annotated[Path | None, typer.Option(help="Also publish a new index version with these outcomes (no re-embedding).")] = None,
    secret_file: Annotated[Path | None, typer.Option(help="Site secret (default $COHORTSIM_SITE_SECRET or ~/.config/cohortsim/site-secret).")] = None,
) -> None:
    """Update outcomes (follow-up, events, labels) without re-embedding anything."""
    from encoders.deid import Pseudonymizer
    from indexing.build import update_outcomes
    from indexing.ingest import read_outcomes
    from indexing.store import CohortStore

    cohort = CohortStore(store)
    rows = cohort.set_outcomes(read_outcomes(table, Pseudonymizer.from_env_or_file(secret_file)))
    _say(f"store {store}: outcomes of {rows} patient(s) updated")
    if index is not None:
        version = update_outcomes(index, cohort)
        _say(f"published index {version} with the new outcomes (vectors shared with the previous version)")


@app.command()
@cli_errors
def compact(
    store: Annotated[Path | None, typer.Option(help="Cohort store: rewrite part files without withdrawn patients.")] = None,
    index: Annotated[Path | None, typer.Option(help="Index folder: rebuild the served version without withdrawn patients.")] = None,
) -> None:
    """Physically remove withdrawn patients' rows (they are already hidden)."""
    from indexing.build import compact_index
    from indexing.store import CohortStore

    if store is None and index is None:
        raise CliError("give --store and/or --index")
    if store is not None:
        r = CohortStore(store).compact()
        _say(f"store {store}: {r['studies_removed']} studies and {r['outcomes_removed']} outcome rows removed ({r['parts_rewritten']} files rewritten)")
    if index is not None:
        version = compact_index(index)
        _say(f"index {index}: " + ("nothing to compact" if version is None else f"published compacted version {version}"))


# --------------------------------------------------------------------------- serve
@app.command()
@cli_errors
def serve(
    index: Annotated[Path, typer.Option(help="Index folder from cohortsim index build.")],
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
    min_cell: Annotated[
        int, typer.Option(min=2, help="Researchers: smallest group a released count may describe; smaller counts are withheld.")
    ] = 11,
    reid_similarity: Annotated[
        float, typer.Option(min=0.5, max=1.0, help="Researchers: a neighbour this similar to the query counts as the same patient and is left out.")
    ] = 0.95,
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
) -> None:
    """Serve the index over gRPC (health and reflection included) until SIGTERM/Ctrl-C.

    A newer version published into the index folder (or a rollback) is picked up within
    seconds, without a restart and without failing a call."""
    import asyncio

    from indexing.snapshot import load_snapshot
    from service import logs
    from service.audit import AuditLog
    from service.auth import TokenStore
    from service.config import ConfigError, load_config
    from service.governance import DisclosurePolicy
    from service.server import serve as serve_async
    from service.tls import TlsConfig

    if (tls_cert is None) != (tls_key is None):
        raise CliError("give both --tls-cert and --tls-key (or neither)")
    if tls_client_ca is not None and tls_cert is None:
        raise CliError("--tls-client-ca needs --tls-cert and --tls-key")
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
    security: dict[str, Any] = {
        "tls": tls,
        "auth_tokens": TokenStore.load(auth_tokens) if auth_tokens is not None else None,
        "policy": DisclosurePolicy(min_cell=min_cell, reid_similarity=reid_similarity),
        "rate_limit": rate_limit,
        "max_concurrent_per_principal": max_concurrent_per_principal,
    }
    if audit_log is not None:
        security["audit_log"] = AuditLog(audit_log)
    asyncio.run(
        serve_async(
            index, host=host, port=port, device=dev, ready=lambda p: _say(f"serving {index} on {host}:{p}"),
            metrics_port=settings.metrics_port, metrics_host=settings.metrics_host, grace=settings.grace_s,
            stop_delay=settings.stop_delay_s,
            **settings.server_kwargs(), **security,
        )
    )


# --------------------------------------------------------------------------- audit, auth
@audit_app.command("verify")
@cli_errors
def audit_verify(
    path: Annotated[Path, typer.Argument(metavar="PATH", help="An audit log written by cohortsim serve --audit-log.")],
    expect_head: Annotated[
        str | None, typer.Option(help="The hash the log must end with (kept elsewhere), to catch lines cut from its end.")
    ] = None,
) -> None:
    """Check the SHA-256 chain of an audit log; names the first edited, removed or reordered record."""
    from service.audit import verify

    if not path.is_file():
        raise CliError(f"{path} is not a file")
    result = verify(path, expect_head=expect_head)
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
    where: Annotated[
        str, typer.Option(help="Only neighbours matching this SQL condition, e.g. \"site = 'north' AND manufacturer IN ('GE')\".")
    ] = "",
    json_out: Annotated[bool, typer.Option("--json", help="Print the answer as JSON on stdout.")] = False,
    timeout: Annotated[float, typer.Option(min=0.1, help="Seconds before giving up.")] = 60.0,
    plot: Annotated[
        Path | None,
        typer.Option("--plot", help="Write a PNG: the neighbours' weighted Kaplan–Meier with its band vs the whole cohort's, numbers at risk."),
    ] = None,
    thumbnails: Annotated[
        Path | None,
        typer.Option("--thumbnails", help="Write a PNG strip of the query's and the neighbours' central slices."),
    ] = None,
    token: Annotated[
        str | None, typer.Option(envvar="COHORTSIM_TOKEN", help="Bearer token (prefer --token-file or $COHORTSIM_TOKEN).")
    ] = None,
    token_file: Annotated[Path | None, typer.Option(help="File holding the bearer token (owner-only, mode 0600).")] = None,
    tls_ca: Annotated[Path | None, typer.Option(help="CA (PEM) that signed the server's certificate: connect with TLS.")] = None,
    tls_cert: Annotated[Path | None, typer.Option(help="Client certificate (PEM) for mutual TLS.")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="Client private key (PEM, mode 0600) for mutual TLS.")] = None,
    region: Annotated[
        list[str] | None,
        typer.Option(
            "--region",
            help="A region of interest of the --dicom study, OBSERVER:z0,y0,x0,z1,y1,x1 (voxel "
            "indices of its series: slices in ascending position, rows, columns; half-open). "
            "Repeat for several observers: the prognosis of each and their spread are shown.",
        ),
    ] = None,
) -> None:
    """Ask a server for the patients most similar to a study, with their outcomes and a prognosis."""
    from service.client import CohortsimClient, CohortsimClientError

    if (dicom is None) == (study_uid is None):
        raise CliError("give exactly one of --dicom PATH or --study-uid UID")
    if region and dicom is None:
        raise CliError("--region needs --dicom: regions of interest are drawn on a DICOM study")
    credentials, bearer = _client_security(token, token_file, tls_ca, tls_cert, tls_key)
    for target in (plot, thumbnails):
        if target is not None and not target.parent.is_dir():
            raise CliError(f"cannot write {target}: folder {target.parent} does not exist")
    quality = None
    with CohortsimClient(server, timeout=timeout, credentials=credentials, token=bearer) as client:
        want = thumbnails is not None
        if dicom is not None:
            result = client.search(
                dicom_paths=_dicom_files(dicom), k=k, where=where, include_thumbnails=want,
                regions=[_parse_region(r) for r in region or []],
            )
        else:
            result = client.search(study_uid=study_uid, k=k, where=where, include_thumbnails=want)
        if not json_out:
            try:
                quality = client.index_info().prognostic_quality
            except CohortsimClientError:
                quality = None  # the report works without it
    if json_out:
        out.print_json(json.dumps(result.to_dict()))
    else:
        print_result(result)
        if quality is not None:
            print_quality(quality)
    if plot is not None or thumbnails is not None:
        from service.plots import plot_survival, plot_thumbnails

        if plot is not None:
            _say(f"wrote {plot_survival(result, plot)}")
        if thumbnails is not None:
            try:
                _say(f"wrote {plot_thumbnails(result, thumbnails)}")
            except ValueError as exc:
                raise CliError(str(exc)) from None


def _client_security(
    token: str | None, token_file: Path | None, ca: Path | None, cert: Path | None, key: Path | None
) -> tuple[Any, str | None]:
    """``(channel credentials or None, bearer token or None)`` from the query options."""
    from service.auth import read_secret_file
    from service.tls import channel_credentials

    if token is not None and token_file is not None:
        raise CliError("give --token or --token-file, not both")
    if token_file is not None:
        token = read_secret_file(token_file, "token file").decode("utf-8").strip()
        if not token:
            raise CliError(f"the token file {token_file} is empty")
    if (cert is None) != (key is None):
        raise CliError("give both --tls-cert and --tls-key for mutual TLS (or neither)")
    if ca is None and cert is None:
        return None, token
    return channel_credentials(ca, cert, key), token


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
    med_hi = "not reached" if p.median_upper is None else f"{p.median_upper:.1f}"
    c.print(f"  median survival: {med} (95% CI {_fmt(p.median_lower, '.1f')} to {med_hi})")
    for h in p.at_horizons:
        c.print(
            f"  survival at {h.time:g} {unit}: {_fmt(h.survival)} (95% CI {_fmt(h.lower)}–{_fmt(h.upper)})"
            + ("  (beyond the neighbours' follow-up)" if h.survival is None else "")
        )
    c.print(
        f"  effective sample size {p.effective_sample_size:.1f} of {p.neighbors_with_outcome} neighbours "
        f"with outcomes, {p.events} events"
    )
    if getattr(p, "temperature", None):
        c.print(f"  weights: softmax of similarity / {p.temperature:g} (temperature chosen on the cohort)")
    if getattr(p, "cohort_survival", None):
        cmed = "not reached" if p.cohort_median_survival is None else f"{p.cohort_median_survival:.1f} {unit}"
        at = ", ".join(f"{h.time:g}: {_fmt(h.survival)}" for h in p.cohort_at_horizons)
        c.print(f"  whole cohort, for comparison: median {cmed}; survival at {at}")
    for dist in getattr(p, "label_distributions", []):
        shares = ", ".join(f"{s.label} {s.share:.2f} ({s.lower:.2f}–{s.upper:.2f})" for s in dist.shares[:5])
        more = f", +{len(dist.shares) - 5} more" if len(dist.shares) > 5 else ""
        c.print(f"  {dist.name}: {shares}{more}", highlight=False)
        if dist.readers:
            agree = "–" if dist.reader_agreement is None else f"{dist.reader_agreement:.0%}"
            kappa = "–" if dist.reader_kappa is None else f"{dist.reader_kappa:.2f}"
            c.print(
                f"    readers {', '.join(dist.readers)}: agreement {agree}, Fleiss' kappa {kappa} "
                f"over {dist.multi_reader_neighbor_count} neighbours read twice or more",
                highlight=False,
            )
    for v in getattr(p, "value_summaries", []):
        c.print(
            f"  {v.name}: mean {v.mean:.3g} (95% CI {_fmt(v.lower, '.3g')}–{_fmt(v.upper, '.3g')}), "
            f"{v.count} neighbours",
            highlight=False,
        )
    d = result.diagnostics
    c.print(f"[bold]Diagnostics[/bold]: out-of-distribution percentile {d.ood_percentile:.2f}")
    for chk in getattr(d, "acquisition_checks", []):
        seen = "" if chk.seen_in_cohort else " (not in the cohort)"
        c.print(
            f"  {chk.attribute.replace('_', ' ')} {chk.query_value}{seen}: {chk.neighbor_share:.0%} of "
            f"neighbours vs {chk.cohort_share:.0%} of the cohort",
            highlight=False,
        )
    st = getattr(d, "stability", None)
    if st is not None:
        med = (
            "median not reached in any"
            if st.median_survival_min is None
            else f"median {st.median_survival_min:.1f}–{st.median_survival_max:.1f} {unit} "
            f"({st.median_reached_count} of {st.view_count} reach one)"
        )
        c.print(
            f"  stability under {st.view_count} scanner-like perturbations: "
            f"{st.mean_neighbor_overlap:.0%} of neighbours kept on average "
            f"(min {st.min_neighbor_overlap:.0%}); {med}",
            highlight=False,
        )
    for r in getattr(d, "regions", []):
        med = "median not reached" if r.median_survival is None else (
            f"median {r.median_survival:.1f} {unit} (95% CI {_fmt(r.median_lower, '.1f')}–"
            f"{_fmt(r.median_upper, '.1f')})"
        )
        c.print(
            f"  region of {r.observer}: {med}; {r.neighbor_overlap:.0%} of the first region's "
            f"neighbours; effective n {r.effective_sample_size:.1f}",
            highlight=False,
        )
    for w in [*p.warnings, *d.warnings]:
        c.print(f"  [yellow]warning:[/yellow] {w}")
    dc = getattr(result, "disclosure", None)
    if dc is not None:
        c.print(
            f"aggregates only, over {dc.aggregated_patients} patients with equal weights; counts "
            f"below {dc.min_cell_count} withheld ({len(dc.withheld_fields)} values)",
            highlight=False,
        )
    c.print(f"index {result.index_version}, model {result.model_version}", style="dim")


def print_quality(q: Any, console: Console | None = None, *, unit: str = "months") -> None:
    """Print the leave-one-out prognostic quality of an index (``PrognosticQuality``)."""
    c = console or out
    if not q.evaluated_study_count:
        c.print(f"[bold]Prognostic quality[/bold]: not evaluated ({q.temperature_source})", highlight=False, soft_wrap=True)
        return
    c.print(
        f"[bold]How good such prognoses have been on this cohort[/bold] (leave-one-out, k={q.k}, "
        f"{q.evaluated_study_count} studies, {q.evaluated_event_count} events)",
        highlight=False,
        soft_wrap=True,
    )
    c_txt = "–" if q.c_index is None else f"{q.c_index:.2f}"
    c.print(
        f"  C-index {c_txt} (0.5 = chance, 1 = perfect ranking; restricted mean survival to "
        f"{q.restricted_mean_time:g} {unit})",
        highlight=False,
        soft_wrap=True,
    )
    cal = ", ".join(
        f"{h.time:g} {unit} {_fmt(h.mean_absolute_error)}" for h in q.calibration
    )
    if cal:
        c.print(f"  calibration, mean |predicted − observed survival| over deciles: {cal}", highlight=False, soft_wrap=True)
    c.print(f"  kernel temperature {q.temperature:g} ({q.temperature_source})", highlight=False, soft_wrap=True)


def _print_manifest_quality(manifest: dict[str, Any]) -> None:
    from service.client import prognostic_quality_from_proto
    from service.convert import prognostic_quality_to_proto

    ev = manifest.get("prognosis_evaluation")
    if ev:
        quality = prognostic_quality_from_proto(prognostic_quality_to_proto(ev))
        print_quality(quality, err, unit=str(manifest.get("time_unit") or "months"))


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
        seed=seed, time_budget_s=train_seconds, region="lesion", pooling="attention",
        calibration="tissue",
    )
    _say(f"      encoder {card.version}: {card.epochs} epochs")

    _say("[4/6] building the FAISS index (exact, cosine)")
    version = build_from_store(store_dir, model_dir, index_dir, kind="Flat", device="auto")
    _say(f"      published snapshot {version}")
    from indexing.snapshot import load_snapshot

    _print_manifest_quality(load_snapshot(index_dir, version=version, device="cpu").manifest)

    _say("[5/6] starting the gRPC server on a free local port")
    with BackgroundServer(index_dir) as server:
        _say(f"      listening on {server.target}")
        _say(f"[6/6] querying with the held-back patient's study ({len(list(query_dir.rglob('*.dcm')))} files)")
        with CohortsimClient(server.target, timeout=120) as client:
            result = client.search(dicom_paths=sorted(query_dir.rglob("*.dcm")), k=k)
    print_result(result)
    _print_demo_truth(result, query_dir, synth_dir, pseudo)


def _parse_region(text: str) -> tuple[str, tuple[float, ...]]:
    """``OBSERVER:z0,y0,x0,z1,y1,x1`` -> ``(observer, box)``; CliError when malformed."""
    observer, sep, numbers = text.rpartition(":")
    try:
        box = tuple(float(v) for v in numbers.split(","))
    except ValueError:
        box = ()
    if not sep or not observer.strip() or len(box) != 6:
        raise CliError(f"--region {text!r}: expected OBSERVER:z0,y0,x0,z1,y1,x1 (six numbers)")
    return observer.strip(), box


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
