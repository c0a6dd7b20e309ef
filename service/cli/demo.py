"""``cohortsim demo``: the whole path on a small synthetic cohort."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from service.cli.app import _say, app, cli_errors, out, progress_bar
from service.cli.query import _print_manifest_quality, print_result
from service.cli.train import _train_on_store


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
