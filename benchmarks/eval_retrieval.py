"""Retrieval quality: do a held-out patient's nearest studies share its disease, not its scanner?

Self-contained: synthesises a cohort as real DICOM (``encoders.synth``: 5 simulated
scanners, 6 lesion phenotypes, survival from the phenotype only), ingests it through the
real path (``indexing.ingest``: read, pseudonymise, resample), holds out a seeded share
of the patients as queries, trains cohortsim on the other studies only, and prints P@k of
the phenotype, scanner excess and the kNN C-index for cohortsim and for the baselines
computed in the same run (random vectors, HU-histogram kNN, randomly initialised
backbone), each also after ComBat harmonisation where it applies. Nothing is asserted.

    python benchmarks/eval_retrieval.py                      # 240 patients, ~10 min on cpu2
    python benchmarks/eval_retrieval.py --preset small       # 120 patients, fast look
    python benchmarks/eval_retrieval.py --workdir /tmp/ev    # keep (and reuse) cohort + store
    python benchmarks/eval_retrieval.py --json out.json

``cohortsim eval --store STORE --label phenotype`` runs the same protocol on any store.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from encoders.evaluate import (  # noqa: E402
    EvalConfig,
    EvalRow,
    check_targets,
    cohort_columns,
    metric_cells,
    run_retrieval_eval,
)

PRESETS = {
    "small": {"patients": 120, "epochs": 40},
    "default": {"patients": 240, "epochs": 100},
    "large": {"patients": 400, "epochs": 100},
}


def build_cohort(
    workdir: Path, patients: int, seed: int, *, spool: Path | None = None
) -> tuple[np.ndarray, dict, Any, np.ndarray | None]:
    """Synth + ingest into ``workdir`` (reused when already there); returns volumes,
    per-study columns, the input spec and each study's top-proposal patch (None on the
    legacy grid). With ``spool`` (a ``.npy`` path), the volumes
    are a memory map of that file (the caller removes it), not an array in memory."""
    from encoders.deid import Pseudonymizer
    from encoders.synth import synth_cohort
    from indexing.ingest import ingest_folder, read_outcomes, store_spec
    from indexing.store import CohortStore

    synth_dir, store_dir = workdir / "synth", workdir / "store"
    marker = workdir / "cohort.json"
    want = {"patients": patients, "seed": seed}
    if not (marker.exists() and json.loads(marker.read_text()) == want):
        shutil.rmtree(synth_dir, ignore_errors=True)
        shutil.rmtree(store_dir, ignore_errors=True)
        t0 = time.monotonic()
        synth_cohort(synth_dir, patients=patients, seed=seed)
        pseudo = Pseudonymizer(b"eval-retrieval-benchmark-secret!")
        store = CohortStore(store_dir, create=True)
        report = ingest_folder(synth_dir / "dicom", store, pseudonymizer=pseudo, site="eval")
        store.set_outcomes(read_outcomes(synth_dir / "outcomes.csv", pseudo))
        marker.write_text(json.dumps(want))
        print(
            f"# cohort: {patients} patients synthesised and {report.studies_ingested} studies "
            f"ingested in {time.monotonic() - t0:.0f} s",
            file=sys.stderr,
        )
    store = CohortStore(store_dir)
    uids, volumes = store.load_volumes() if spool is None else store.spool_volumes(spool)
    table = {r["study_uid"]: r for r in store.cohort_table().to_pylist()}
    cols = cohort_columns([table[u] for u in uids], label="phenotype")
    spec = store_spec(store)
    # on the whole-study grid the lesion encoder embeds each study's detail patch (the top
    # proposal: synthetic cohorts carry no reader regions)
    patches = None
    if spec.has_patches:
        p_uids, patches = store.load_volumes(patches="proposals")
        assert p_uids == uids  # one store, read twice in one process
    return volumes, cols, spec, patches


def print_rows(rows: list[EvalRow], k: int) -> None:
    m0 = rows[0].metrics
    if m0.n_boot:
        print(f"# [a, b]: {m0.ci_level:.0%} interval over the query patients "
              f"({m0.n_boot} bootstrap resamples)")
    print(f"| method | P@{k} | scanner excess | kNN C-index (NA 24 mo) | s |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r.method} | {' | '.join(metric_cells(r.metrics))} | {r.seconds:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = ap.add_argument_group("cohort")
    g.add_argument("--preset", choices=sorted(PRESETS), default="default")
    g.add_argument("--patients", type=int, help="cohort size (overrides the preset)")
    g.add_argument("--seed", type=int, default=7, help="cohort seed")
    g.add_argument("--workdir", type=Path, help="keep the cohort and store here (reused)")
    g = ap.add_argument_group("protocol")
    g.add_argument("--k", type=int, default=10)
    g.add_argument("--query-fraction", type=float, default=0.25)
    g.add_argument("--split-seed", type=int, default=0)
    g.add_argument("--bootstrap", type=int, default=1000,
                   help="resamples of the query patients for the 95%% intervals (0: none)")
    g = ap.add_argument_group("encoder")
    g.add_argument("--backbone", default="resnet10t")
    g.add_argument("--method", default="simclr", choices=("simclr", "vicreg"))
    g.add_argument("--regions", default="lesion,whole", help="comma list: lesion, whole")
    g.add_argument("--pooling", default="attention", choices=("mean", "attention"))
    g.add_argument("--epochs", type=int, help="lesion encoder epochs (overrides the preset)")
    g.add_argument("--whole-epochs", type=int, default=8, help="whole-volume encoder epochs")
    g.add_argument("--batch-size", type=int, default=16, help="as cohortsim train")
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--views", type=int, help="views per study per step (default: lesion 4, whole 2)")
    g.add_argument("--train-seconds", type=float,
                   help="also stop training after this many seconds (figures then depend on load)")
    g.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    g.add_argument("--device", default="auto")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = ap.parse_args()

    preset = PRESETS[args.preset]
    patients = args.patients or int(preset["patients"])
    epochs = args.epochs or int(preset["epochs"])
    budget = args.train_seconds
    torch.set_num_threads(args.threads)
    tmp = None
    if args.workdir is None:
        tmp = tempfile.mkdtemp(prefix="cohortsim-eval-")
        workdir = Path(tmp)
    else:
        workdir = args.workdir
        workdir.mkdir(parents=True, exist_ok=True)
    spool = workdir / f".volumes-{os.getpid()}.npy"
    try:
        volumes, cols, spec, patches = build_cohort(workdir, patients, args.seed, spool=spool)
        cfg = EvalConfig(
            k=args.k,
            query_fraction=args.query_fraction,
            seed=args.split_seed,
            backbone=args.backbone,
            method=args.method,
            regions=tuple(r.strip() for r in args.regions.split(",") if r.strip()),
            pooling=args.pooling,
            epochs=epochs,
            whole_epochs=args.whole_epochs,
            time_budget_s=budget,
            device=args.device,
            train_kw={"batch_size": args.batch_size, "lr": args.lr, "views": args.views},
            bootstrap=args.bootstrap,
        )
        t0 = time.monotonic()
        rows = run_retrieval_eval(
            volumes,
            patient_ids=cols["patient_ids"],
            labels=cols["labels"],
            scanners=cols["scanners"],
            times=cols["times"],
            events=cols["events"],
            spec=spec,
            config=cfg,
            progress=lambda m: print(f"# {m}", file=sys.stderr, flush=True),
            patches=patches,
        )
        m0 = rows[0].metrics
        print(
            f"# {patients} patients (seed {args.seed}): {m0.n_reference} reference, "
            f"{m0.n_queries} held-out queries; k={args.k}; {args.backbone} {args.method}, "
            f"{epochs} lesion / {args.whole_epochs} whole-volume epochs"
            f"{f', budget {budget:g} s' if budget else ''}, {torch.get_num_threads()} threads; "
            f"eval {time.monotonic() - t0:.0f} s"
        )
        print_rows(rows, args.k)
        for r in rows:
            if r.method.startswith("cohortsim") and r.notes:
                print(f"# {r.method}: {r.notes}")
        for r in rows:
            if r.method.startswith("cohortsim"):
                met = check_targets(rows, r.method)
                print(f"# targets for {r.method}: " + ", ".join(
                    f"{name} {'met' if ok else 'NOT met'}" for name, ok in met.items()))
        if args.json:
            args.json.write_text(json.dumps([r.to_dict() for r in rows], indent=2))
    finally:
        spool.unlink(missing_ok=True)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":  # ingest may start worker processes (spawn re-imports this file)
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
