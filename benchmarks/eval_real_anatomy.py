"""Retrieval on real anatomy: the held-out protocol of ``cohortsim eval`` on a cohort made
by ``cohortsim synth --background`` from the shared LIDC-IDRI-0001 chest CT.

Synthesises the cohort (lesions of the six phenotypes inserted into sub-ranges of the real
chest, five simulated scanners, outcomes from the phenotype, two readers' boxes in
``regions.csv``), ingests it with the readers' boxes as reader regions (each a stored
detail patch), then runs :func:`encoders.evaluate.run_retrieval_eval` twice on the same
split: the lesion encoder on the first reader's patch (``readers``) and on the top
label-free proposal (``proposals``), each beside the random-vector, HU-histogram and
random-init baselines of the same run. Prints markdown tables; nothing is asserted.

    python benchmarks/eval_real_anatomy.py --patients 96 --seed 1 --workdir /tmp/real96
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from encoders.deid import Pseudonymizer  # noqa: E402
from encoders.evaluate import EvalConfig, cohort_columns, metric_cells, run_retrieval_eval  # noqa: E402
from encoders.regions import ReaderRegion  # noqa: E402
from encoders.synth_real import synth_background  # noqa: E402
from indexing.ingest import ingest_folder, read_outcomes, store_spec  # noqa: E402
from indexing.store import CohortStore  # noqa: E402

ARCHIVE = ROOT.parent / "shared" / "data" / "lidc-idri-0001.tar.xz"
NODULE_AVOID_MM = (200.0, 252.0)  # the real nodule, ~226 mm from the first slice, +-25 mm


def _regions(path: Path) -> dict[str, list[ReaderRegion]]:
    out: dict[str, list[ReaderRegion]] = {}
    with open(path, newline="") as fh:
        for r in csv.DictReader(fh):
            box = tuple(int(r[k]) for k in ("z0", "y0", "x0", "z1", "y1", "x1"))
            out.setdefault(r["patient_id"], []).append(ReaderRegion(r["reader"], box))  # type: ignore[arg-type]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--patients", type=int, default=96)
    ap.add_argument("--seed", type=int, default=1,
                    help="cohort seed (when the workdir has no store yet), split and training seed")
    ap.add_argument("--workdir", type=Path, required=True, help="cohort and store (reused)")
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--train-seconds", type=float, default=None)
    ap.add_argument("--calibration", default="tissue")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=None, help="ingest processes")
    ap.add_argument("--prepare-only", action="store_true",
                    help="synthesise and ingest the cohort into --workdir, then stop")
    args = ap.parse_args()
    work = args.workdir
    store_dir = work / "store"
    if not (store_dir / "FORMAT").exists():
        import tarfile
        import tempfile

        t0 = time.monotonic()
        with tempfile.TemporaryDirectory() as tmp:
            with tarfile.open(ARCHIVE) as tar:
                tar.extractall(tmp, filter="data")
            info = synth_background(work / "synth", Path(tmp), patients=args.patients,
                                    seed=args.seed, avoid_mm=[NODULE_AVOID_MM])
        pseudo = Pseudonymizer(b"eval-real-anatomy-benchmark-key!")
        store = CohortStore(store_dir, create=True)
        report = ingest_folder(info.dicom_dir, store, pseudonymizer=pseudo, site="eval",
                               regions=_regions(info.root / "regions.csv"),
                               workers=args.workers)
        store.set_outcomes(read_outcomes(info.outcomes_csv, pseudo))
        print(f"# {args.patients} patients (seed {args.seed}) synthesised and "
              f"{report.studies_ingested} ingested with {report.regions_stored} reader "
              f"patches in {time.monotonic() - t0:.0f} s", file=sys.stderr)
    if args.prepare_only:
        return
    store = CohortStore(store_dir)
    uids, volumes = store.load_volumes()
    table = {r["study_uid"]: r for r in store.cohort_table().to_pylist()}
    cols = cohort_columns([table[u] for u in uids], label="phenotype")
    spec = store_spec(store)
    for use in ("readers", "proposals"):
        p_uids, patches = store.load_volumes(patches=use)
        assert p_uids == uids
        cfg = EvalConfig(regions=("lesion",), epochs=args.epochs, device="cpu",
                         time_budget_s=args.train_seconds, bootstrap=args.bootstrap,
                         seed=args.seed, calibration=args.calibration)
        t0 = time.monotonic()
        rows = run_retrieval_eval(
            volumes, patient_ids=cols["patient_ids"], labels=cols["labels"],
            scanners=cols["scanners"], times=cols["times"], events=cols["events"], spec=spec,
            config=cfg, patches=patches,
            progress=lambda m: print(f"# {m}", file=sys.stderr, flush=True),
        )
        m0 = rows[0].metrics
        print(f"\n### lesion patch: {use} ({m0.n_reference} reference, {m0.n_queries} held-out "
              f"queries, seed {args.seed}, eval {time.monotonic() - t0:.0f} s, load average "
              f"{os.getloadavg()[0]:.1f})\n")
        print("| method | P@10 | scanner excess | kNN C-index (NA 24 mo) | s |")
        print("|---|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r.method} | {' | '.join(metric_cells(r.metrics))} | {r.seconds:.0f} |")
        for r in rows:  # the training runs: epochs reached in the budget, recipe
            if r.notes and not r.method.endswith("ComBat"):
                print(f"\n{r.method}: {r.notes}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
