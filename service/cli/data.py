"""``cohortsim synth`` and ``cohortsim ingest`` (a folder, a DICOMweb pull, or a Ray cluster)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from service.cli.app import _RAY_HELP, CliError, _say, app, cli_errors, out, progress_bar


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
        typer.Option(help="Reader regions CSV: patient_id (or study_instance_uid),reader,z0,y0,x0,z1,y1,x1 (half-open voxel boxes of the study's own grid); each becomes a stored detail patch. With a folder or --dicomweb (not --ray)."),
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
        if ray is not None:
            raise CliError(
                "--regions is not taken with --ray: the Ray ingest reads studies on worker "
                "tasks that do not carry reader regions; ingest the annotated studies without "
                "--ray (a folder or --dicomweb)")
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
                progress=lambda d, t: update(d, t), regions=reader_regions,
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
