"""``cohortsim query`` and how an answer is printed (neighbours, prognosis, quality)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from service.cli.app import CliError, _say, app, cli_errors, err, out


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
        typer.Option("--thumbnails", help="Write a PNG strip of the query's and the neighbours' embedded regions (the slice through each region, its box drawn; for whole-volume encoders each side's slice of the strongest match)."),
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
