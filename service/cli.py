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
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
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
from rich.table import Table
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


# --------------------------------------------------------------------------- synth
@app.command()
@cli_errors
def synth(
    out_dir: Annotated[Path, typer.Argument(metavar="OUT", help="Folder to write OUT/dicom/ and OUT/outcomes.csv into.")],
    patients: Annotated[int, typer.Option(min=1, max=100_000, help="Number of synthetic patients.")] = 40,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same cohort).")] = 0,
    background: Annotated[Path | None, typer.Option(help="A real chest CT study folder: each patient is a sub-range of it (flipped, shifted) with an inserted lesion; also writes OUT/regions.csv (two readers' boxes).")] = None,
    avoid_mm: Annotated[list[str] | None, typer.Option(help="With --background: a z range A:B (mm from the study's first slice) to leave out, e.g. where the background has its own lesion; repeatable.")] = None,
) -> None:
    """Generate a synthetic CT cohort as real DICOM files plus an outcomes table."""
    from encoders.synth import synth_cohort

    with progress_bar("synth", patients) as update:
        if background is not None:
            from encoders.synth_real import synth_background

            if not background.is_dir():
                raise CliError(f"--background {background} is not a folder")
            ranges = []
            for text in avoid_mm or []:
                try:
                    a, b = (float(v) for v in text.split(":"))
                except ValueError:
                    raise CliError(f"--avoid-mm takes A:B in mm, not {text!r}") from None
                ranges.append((a, b))
            try:
                info = synth_background(out_dir, background, patients=patients, seed=seed,
                                        avoid_mm=ranges, progress=lambda d, t: update(d, t))
            except ValueError as exc:
                raise CliError(str(exc)) from None
        else:
            info = synth_cohort(out_dir, patients=patients, seed=seed, progress=lambda d, t: update(d, t))
    _say(
        f"wrote {info.n_patients} patients ({info.n_files} DICOM files, scanners: "
        f"{', '.join(info.scanners)}) to {out_dir}/dicom and outcomes to {out_dir}/outcomes.csv"
    )


# --------------------------------------------------------------------------- ingest
@app.command()
@cli_errors
def ingest(
    store: Annotated[Path, typer.Option(help="Cohort store folder (created if missing).")],
    dicom_dir: Annotated[Path | None, typer.Argument(help="Folder of DICOM files (searched recursively; grouped by UIDs); or use --dicomweb.")] = None,
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
    dicomweb: Annotated[str | None, typer.Option(help="Pull from this PACS's DICOMweb service (QIDO-RS / WADO-RS) instead of a folder; resumable.")] = None,
    study: Annotated[list[str] | None, typer.Option(help="--dicomweb: this StudyInstanceUID only (repeat); default every study the PACS lists.")] = None,
    since: Annotated[str | None, typer.Option(help="--dicomweb: studies on or after this date (YYYY-MM-DD).")] = None,
    modality: Annotated[str | None, typer.Option(help="--dicomweb: studies with this modality (e.g. CT).")] = None,
    pacs_user: Annotated[str | None, typer.Option(help="--dicomweb: HTTP basic user (with --pacs-password-file).")] = None,
    pacs_password_file: Annotated[Path | None, typer.Option(help="--dicomweb: file holding the password (mode 0600).")] = None,
    pacs_token_file: Annotated[Path | None, typer.Option(help="--dicomweb: file holding a bearer token (mode 0600).")] = None,
    pacs_ca_file: Annotated[Path | None, typer.Option(help="--dicomweb: CA bundle (PEM) of an https PACS.")] = None,
    pacs_timeout_s: Annotated[float, typer.Option(min=0.1, help="--dicomweb: longest wait for one PACS read.")] = 30.0,
    spool: Annotated[Path | None, typer.Option(help="--dicomweb: private folder for retrieved files until ingested (default STORE.dicomweb-spool).")] = None,
    index: Annotated[Path | None, typer.Option(help="Also publish the new studies into this index (embedded with its encoder; running servers pick them up).")] = None,
    ray: Annotated[str | None, typer.Option("--ray", metavar="[ADDRESS]", help=_RAY_HELP)] = None,
    regions: Annotated[
        Path | None,
        typer.Option(help="Reader regions CSV: patient_id (or study_instance_uid),reader,z0,y0,x0,z1,y1,x1 (half-open voxel boxes of the study's own grid); each becomes a stored detail patch."),
    ] = None,
) -> None:
    """Read DICOM studies into the cohort store (pseudonymised, preprocessed, with acquisition metadata),
    from a folder or from a PACS over DICOMweb (--dicomweb URL)."""
    from encoders.deid import Pseudonymizer
    from encoders.dicom import SeriesRule
    from indexing.ingest import ingest_folder, read_outcomes
    from indexing.store import CohortStore

    if (dicom_dir is None) == (dicomweb is None):
        raise CliError("give a DICOM folder or --dicomweb URL (one of them)")
    pseudo = Pseudonymizer.from_env_or_file(secret_file)
    reader_regions = None
    if regions is not None:
        if dicomweb is not None or ray is not None:
            raise CliError("--regions goes with a folder ingest (not --dicomweb or --ray)")
        from encoders.regions import regions_from_csv

        reader_regions = regions_from_csv(regions)
    if dicomweb is not None:
        from service.pacs.commands import dicomweb_config, ingest_dicomweb

        cfg = dicomweb_config(
            dicomweb, user=pacs_user, password_file=pacs_password_file,
            token_file=pacs_token_file, ca_file=pacs_ca_file, timeout_s=pacs_timeout_s,
        )
        with progress_bar("dicomweb pull") as update:
            pulled = ingest_dicomweb(
                cfg, store=store, pseudonymizer=pseudo, study=list(study or []), since=since,
                modality=modality, spool=spool, index=index, site=site, workers=workers,
                series_rule=SeriesRule(allow_burned_in=allow_burned_in),
                progress=lambda d, t: update(d, t),
            )
        if outcomes is not None:
            pulled["outcomes_rows"] = CohortStore(store).set_outcomes(read_outcomes(outcomes, pseudo))
        if json_out:
            out.print_json(json.dumps(pulled))
        else:
            p = pulled["pacs"]
            _say(
                f"pulled {p['studies_fetched']} studies ({p['instances_fetched']} instances fetched, "
                f"{p['instances_reused']} already spooled) from {p['pacs']}; ingested "
                f"{pulled['studies_ingested']} new studies ({pulled['studies_already_present']} already "
                f"present, {len(pulled['studies_rejected'])} rejected) into {store}"
            )
            if pulled["published"]:
                _say(f"published index version {pulled['published']['version']}")
        return
    if dicom_dir is None or not dicom_dir.is_dir():
        raise CliError(f"{dicom_dir} is not a folder")
    cohort = CohortStore(store, create=True)
    with progress_bar("ingest") as update:
        if ray is not None:
            from indexing.distributed_ingest import ingest_folder_ray

            report = ingest_folder_ray(
                dicom_dir,
                cohort,
                pseudonymizer=pseudo,
                address=ray,
                site=site,
                series_rule=SeriesRule(allow_burned_in=allow_burned_in),
                progress=lambda d, t: update(d, t),
            )
        else:
            report = ingest_folder(
                dicom_dir,
                cohort,
                pseudonymizer=pseudo,
                site=site,
                series_rule=SeriesRule(allow_burned_in=allow_burned_in),
                workers=workers,
                progress=lambda d, t: update(d, t),
                regions=reader_regions,
            )
    if outcomes is not None:
        table = read_outcomes(outcomes, pseudo)
        report.outcomes_rows = cohort.set_outcomes(table)
    published = None
    if index is not None:
        from indexing.incremental import publish_new_studies

        published = publish_new_studies(cohort, index)
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
        if published is not None:
            _say(f"published index version {published.version} (+{published.added} studies)")


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
    method: Annotated[Method, typer.Option(help="Self-supervised objective.")] = Method.simclr,
    embedding_dim: Annotated[int, typer.Option(min=8, max=4096)] = 128,
    lr: Annotated[float, typer.Option(min=1e-7, max=1.0)] = 1e-3,
    device: Annotated[Device, typer.Option(help="auto (a GPU when one is visible), cpu, gpu or cuda.")] = Device.auto,
    seed: Annotated[int, typer.Option()] = 0,
    time_budget: Annotated[float | None, typer.Option(help="Stop training after this many seconds.")] = None,
    region: Annotated[Region, typer.Option(help="lesion (embed a box around the lung lesion; see encoders/roi.py) or whole (the whole volume).")] = Region.lesion,
    pooling: Annotated[Pooling, typer.Option(help="Pooling over slices.")] = Pooling.attention,
    calibration: Annotated[Calibration, typer.Option(help="tissue (calibrate each study's HU on its air and soft tissue) or none.")] = Calibration.tissue,
    views: Annotated[int | None, typer.Option(min=2, max=16, help="Augmented views of each study per step (default: lesion 4, whole 2; a step costs about views/2 two-view steps; 8 scored higher still, at twice the time of 4).")] = None,
) -> None:
    """Train a self-supervised study encoder on the store's volumes (resumable)."""
    from indexing.store import CohortStore

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
        method=method.value,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        device=_device(device),
        seed=seed,
        time_budget_s=time_budget,
        region=region.value,
        pooling=pooling.value,
        calibration=calibration.value,
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
    # a lesion encoder on the whole-study grid trains on each study's detail patch
    on_patches = kw.get("region", "whole") == "lesion" and spec.has_patches
    with tempfile.TemporaryDirectory(prefix=".volumes-", dir=out_dir) as spool:
        uids, volumes = cohort.spool_volumes(Path(spool) / "volumes.npy",
                                             patches=kw.pop("patches", "readers") if on_patches else None)
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
    method: Annotated[Method, typer.Option(help="Self-supervised objective.")] = Method.simclr,
    regions: Annotated[str, typer.Option(help="Encoders to train on the reference studies: comma list of lesion, whole; empty for none.")] = "lesion,whole",
    pooling: Annotated[Pooling, typer.Option(help="Pooling over slices.")] = Pooling.attention,
    calibration: Annotated[Calibration, typer.Option(help="HU calibration of the trained encoders.")] = Calibration.tissue,
    epochs: Annotated[int, typer.Option(min=1, max=10_000, help="Epochs of the lesion encoder.")] = 100,
    whole_epochs: Annotated[int, typer.Option(min=1, max=10_000, help="Epochs of the whole-volume encoder.")] = 8,
    batch_size: Annotated[int, typer.Option(min=2, max=4096, help="Studies per training step (as cohortsim train).")] = 16,
    train_seconds: Annotated[float | None, typer.Option(min=1, help="Also stop each training after this many seconds.")] = None,
    device: Annotated[Device, typer.Option(help="auto (a GPU when one is visible), cpu, gpu or cuda.")] = Device.auto,
    json_out: Annotated[bool, typer.Option("--json", help="Print the rows as JSON on stdout.")] = False,
    spool_dir: Annotated[Path | None, typer.Option(help="Folder for the temporary memory-mapped copy of the volumes (default: the system's temporary folder, $TMPDIR).")] = None,
    bootstrap: Annotated[int, typer.Option(min=0, max=100_000, help="Bootstrap resamples of the query patients for the 95 % intervals (0: no intervals).")] = 1000,
    views: Annotated[int | None, typer.Option(min=2, max=16, help="Views per study per training step (as cohortsim train; default: lesion 4, whole 2).")] = None,
    patches: Annotated[str, typer.Option(help="Which detail patch the lesion encoder embeds: readers (a reader region where one was marked, else the top proposal) or proposals (label-free only).")] = "readers",
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
    from indexing.ingest import store_spec
    from indexing.store import PATCH_USES, CohortStore

    if patches not in PATCH_USES:
        raise CliError(f"--patches must be readers or proposals, not {patches!r}")
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
        patch_vols = None
        if "lesion" in region_list and store_spec(cohort).has_patches:
            p_uids, patch_vols = cohort.spool_volumes(Path(spool) / "patches.npy",
                                                      patches=patches)
            if p_uids != uids:
                raise CliError(f"the store at {store} changed during the evaluation; run it again")
        try:
            rows = _eval_rows(cohort, uids, volumes, patches=patch_vols, label=label, model=model, cfg=EvalConfig(
                k=k, query_fraction=query_fraction, seed=seed, backbone=backbone, method=method.value,
                regions=region_list, pooling=pooling.value, calibration=calibration.value, epochs=epochs,
                whole_epochs=whole_epochs, time_budget_s=train_seconds,
                device=_device(device), bootstrap=bootstrap,
                train_kw={"batch_size": batch_size, "views": views},
            ))
        finally:
            del volumes, patch_vols  # the memory maps, before their files go
    if json_out:
        out.print_json(json.dumps([r.to_dict() for r in rows]))
        return
    _print_eval(rows, k=k, label=label)


def _eval_rows(cohort: Any, uids: list[str], volumes: Any, *, label: str, model: Path | None,
               cfg: Any, patches: Any = None) -> list[Any]:
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
            encoders=given, progress=lambda m: _say(f"eval: {m}"), patches=patches,
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
    """A --device value as the libraries name it (gpu -> cuda)."""
    if device not in tuple(Device):
        raise CliError(f"--device must be auto, cpu or gpu, not {device!r}")
    return "cuda" if device == Device.gpu else str(Device(device).value)


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
    device: Annotated[Device, typer.Option(help="Device for embedding: " + _DEVICE_HELP)] = Device.auto,
    shard_size: Annotated[int, typer.Option(min=1, help="Studies per checkpointed shard; a killed build resumes from the last one.")] = 512,
    keep: Annotated[int | None, typer.Option(min=1, help="After publishing, delete all but the newest N versions (the served one stays).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON report on stdout.")] = False,
    ray: Annotated[str | None, typer.Option("--ray", metavar="[ADDRESS]", help=_RAY_HELP)] = None,
    shards: Annotated[
        int | None,
        typer.Option(min=1, help="Split the cohort by patient into N indexes OUT/shard-0 ... OUT/shard-{N-1} (rule: sha256(patient_id) mod N), served by a coordinator in shard mode."),
    ] = None,
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
    if shards is not None:
        if ray is not None or keep is not None:
            raise CliError("--shards builds in this process; leave out --ray and --keep")
        _index_build_shards(out_dir, shards, store, model, embeddings, kind, dev, shard_size, json_out)
        return
    if embeddings is not None:
        version = build_from_embeddings(embeddings, out_dir, kind=kind)
    else:
        assert store is not None and model is not None  # for the type checker; checked above
        with progress_bar("build") as update:
            if ray is not None:
                from indexing.distributed import build_from_store_ray

                version = build_from_store_ray(
                    store,
                    model,
                    out_dir,
                    address=ray,
                    kind=kind,
                    device=dev,
                    shard_size=shard_size,
                    progress=lambda stage, d, t: update(d, t, extra=stage),
                )
            else:
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
    removed: list[str] = []
    if keep is not None:
        removed = prune_versions(out_dir, keep=keep)
        if removed:
            _say(f"pruned {len(removed)} old version(s): {', '.join(removed)}")
    if json_out:
        _print_json(
            {
                "index_dir": str(out_dir),
                "version": version,
                "num_studies": info["num_studies"],
                "dimension": info["dimension"],
                "index_kind": info["index_kind"],
                "model_version": info["model_version"],
                "pruned": removed,
            }
        )


def _index_build_shards(
    out_dir: Path, n: int, store: Path | None, model: Path | None, embeddings: Path | None,
    kind: str, device: str, shard_size: int, json_out: bool,
) -> None:
    """``index build --shards N``: one embedding pass, N shard indexes (indexing.shards)."""
    from indexing.shards import build_shards_from_embeddings, build_shards_from_store
    from indexing.snapshot import read_manifest

    if embeddings is not None:
        published = build_shards_from_embeddings(embeddings, out_dir, n, kind=kind)
    else:
        assert store is not None and model is not None  # checked by the caller
        with progress_bar("build") as update:
            published = build_shards_from_store(
                store, model, out_dir, n, kind=kind, device=device, shard_size=shard_size,
                progress=lambda stage, d, t: update(d, t, extra=stage),
            )
    rows = []
    for folder, version in published:
        m = read_manifest(folder, version)
        rows.append({"index_dir": str(folder), "version": version, "num_studies": m["num_studies"],
                     "model_version": m["model_version"]})
        _say(f"published shard {folder.name} {version}: {m['num_studies']} studies, "
             f"model {m['model_version']} -> {folder}")
    if json_out:
        _print_json({"shards": rows, "rule": "sha256(patient_id)[:8] mod N"})


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
def index_compact(
    index_dir: Annotated[Path, typer.Argument(metavar="INDEX_DIR")],
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON report on stdout.")] = False,
) -> None:
    """Remove deleted patients' rows physically: rebuild the served version from its own vectors."""
    from indexing.build import compact_index

    with progress_bar("compact") as update:
        version = compact_index(index_dir, progress=lambda stage, d, t: update(d, t, extra=stage))
    _say("nothing to compact: no deleted patient in the served version" if version is None else f"published compacted index {version}")
    if json_out:
        _print_json({"index_dir": str(index_dir), "version": version, "compacted": version is not None})


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
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON report on stdout.")] = False,
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
    report: dict[str, Any] = {"patients": pseudonyms, "store_withdrawn": None, "index_hidden": None}
    if store is not None:
        added = CohortStore(store).delete_patients(pseudonyms)
        report["store_withdrawn"] = added
        _say(f"store {store}: {added} patient(s) withdrawn; their rows go at `cohortsim compact --store`")
    if index is not None:
        added = add_tombstones(index / TOMBSTONE_FILE, pseudonyms)
        report["index_hidden"] = added
        _say(f"index {index}: {added} patient(s) hidden from answers now; rows go at the next build or `cohortsim index compact`")
    if json_out:
        _print_json(report)
        return
    for p in pseudonyms:
        out.print(p)


@app.command()
@cli_errors
def outcomes(
    table: Annotated[Path, typer.Argument(metavar="CSV", help="Outcomes CSV/Parquet: patient_id,time,event,<labels...> (raw ids, hashed with the site secret).")],
    store: Annotated[Path, typer.Option(help="Cohort store to update.")],
    index: Annotated[Path | None, typer.Option(help="Also publish a new index version with these outcomes (no re-embedding).")] = None,
    secret_file: Annotated[Path | None, typer.Option(help="Site secret (default $COHORTSIM_SITE_SECRET or ~/.config/cohortsim/site-secret).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON report on stdout.")] = False,
) -> None:
    """Update outcomes (follow-up, events, labels) without re-embedding anything."""
    from encoders.deid import Pseudonymizer
    from indexing.build import update_outcomes
    from indexing.ingest import read_outcomes
    from indexing.store import CohortStore

    cohort = CohortStore(store)
    rows = cohort.set_outcomes(read_outcomes(table, Pseudonymizer.from_env_or_file(secret_file)))
    _say(f"store {store}: outcomes of {rows} patient(s) updated")
    version = None
    if index is not None:
        version = update_outcomes(index, cohort)
        _say(f"published index {version} with the new outcomes (vectors shared with the previous version)")
    if json_out:
        _print_json({"store": str(store), "patients_updated": rows, "index_version": version})


@app.command()
@cli_errors
def compact(
    store: Annotated[Path | None, typer.Option(help="Cohort store: rewrite part files without withdrawn patients.")] = None,
    index: Annotated[Path | None, typer.Option(help="Index folder: rebuild the served version without withdrawn patients.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON report on stdout.")] = False,
) -> None:
    """Physically remove withdrawn patients' rows (they are already hidden)."""
    from indexing.build import compact_index
    from indexing.store import CohortStore

    if store is None and index is None:
        raise CliError("give --store and/or --index")
    report: dict[str, Any] = {"store": None, "index_version": None}
    if store is not None:
        r = CohortStore(store).compact()
        report["store"] = dict(r)
        _say(f"store {store}: {r['studies_removed']} studies and {r['outcomes_removed']} outcome rows removed ({r['parts_rewritten']} files rewritten)")
    if index is not None:
        version = compact_index(index)
        report["index_version"] = version
        _say(f"index {index}: " + ("nothing to compact" if version is None else f"published compacted version {version}"))
    if json_out:
        _print_json(report)


# --------------------------------------------------------------------------- serve
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


# --------------------------------------------------------------------------- audit, auth
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
    pacs_study: Annotated[str | None, typer.Option(help="StudyInstanceUID of a study the server retrieves from its PACS (serve --dicomweb).")] = None,
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
        typer.Option("--thumbnails", help="Write a PNG strip of the query's and the neighbours' embedded regions (the slice through each region, its box drawn)."),
    ] = None,
    explanations: Annotated[
        Path | None,
        typer.Option("--explanations", help="Write a PNG of what in the query's region drove the similarity to each neighbour (occlusion; --dicom queries only)."),
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

    if sum(x is not None for x in (dicom, study_uid, pacs_study)) != 1:
        raise CliError("give exactly one of --dicom PATH, --study-uid UID or --pacs-study UID")
    if region and dicom is None and pacs_study is None:
        raise CliError("--region needs --dicom or --pacs-study: regions of interest are drawn on a DICOM study")
    if explanations is not None and dicom is None:
        raise CliError("--explanations needs --dicom: the server blanks parts of the query's image")
    credentials, bearer = _client_security(token, token_file, tls_ca, tls_cert, tls_key)
    for target in (plot, thumbnails, explanations):
        if target is not None and not target.parent.is_dir():
            raise CliError(f"cannot write {target}: folder {target.parent} does not exist")
    quality = None
    with CohortsimClient(server, timeout=timeout, credentials=credentials, token=bearer) as client:
        want = thumbnails is not None
        if dicom is not None:
            result = client.search(
                dicom_paths=_dicom_files(dicom), k=k, where=where, include_thumbnails=want,
                regions=[_parse_region(r) for r in region or []],
                include_explanations=explanations is not None,
            )
        elif pacs_study is not None:
            result = client.search(
                pacs_study_uid=pacs_study, k=k, where=where, include_thumbnails=want,
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
    if plot is not None or thumbnails is not None or explanations is not None:
        from service.plots import plot_explanations, plot_survival, plot_thumbnails

        if explanations is not None:
            try:
                _say(f"wrote {plot_explanations(result, explanations)}")
            except ValueError as exc:
                raise CliError(str(exc)) from None

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
    """Print neighbours, prognosis and warnings as a clinician-readable report; warnings
    about the index's skill (NO_PROGNOSTIC_SKILL, FEW_OUTCOMES) come first, before any number."""
    c = console or out
    skill = list(getattr(result.prognosis, "skill_warnings", []))
    for w in skill:
        c.print(f"[bold red]{w.code}:[/bold red] {w.message or '(details withheld)'}", highlight=False, soft_wrap=True)
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
    shown = {w.message for w in skill}
    for w in [*p.warnings, *d.warnings]:
        if w not in shown:
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
    if getattr(q, "c_index_lower", None) is not None and q.c_index_upper is not None:
        c_txt += f" (95% CI {q.c_index_lower:.2f}–{q.c_index_upper:.2f}, bootstrap over patients)"
    c.print(
        f"  C-index {c_txt} (0.5 = chance, 1 = perfect ranking; restricted mean survival to "
        f"{q.restricted_mean_time:g} {unit})",
        highlight=False,
        soft_wrap=True,
    )
    cal = ", ".join(
        f"{h.time:g} {unit} {_fmt(h.mean_absolute_error)}"
        + (
            f" ({h.mean_absolute_error_lower:.2f}–{h.mean_absolute_error_upper:.2f})"
            if getattr(h, "mean_absolute_error_lower", None) is not None
            and h.mean_absolute_error_upper is not None
            else ""
        )
        for h in q.calibration
    )
    if cal:
        c.print(f"  calibration, mean |predicted − observed survival| over deciles: {cal}", highlight=False, soft_wrap=True)
    c.print(f"  kernel temperature {q.temperature:g} ({q.temperature_source})", highlight=False, soft_wrap=True)


def _print_manifest_quality(manifest: dict[str, Any]) -> None:
    from indexing.notices import skill_notices
    from service.client import prognostic_quality_from_proto
    from service.convert import prognostic_quality_to_proto

    ev = manifest.get("prognosis_evaluation")
    for note in skill_notices(ev):  # what every answer of this index will lead with
        err.print(f"[bold red]{note.code.value}:[/bold red] {note}", highlight=False, soft_wrap=True)
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


if __name__ == "__main__":
    main()
