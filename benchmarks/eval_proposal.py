"""How often the label-free lesion proposal lands on the lesion, per phenotype.

Synthesises a cohort (``encoders.synth``; its ``truth.csv`` holds each lesion's centre in
voxels of the series), reads and preprocesses every study as ingest does, calibrates HU
as the lesion encoder does, runs :func:`encoders.roi.propose_lesion`, and counts a hit
when the proposed centre is within the lesion radius (at least 6 mm) of the true one.
Prints the hit rate and the HU at the true centre per phenotype. Nothing is asserted.

    python benchmarks/eval_proposal.py --seed 11 --patients 240
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from encoders.dicom import read_study, scan_folder  # noqa: E402
from encoders.harmonize import calibrate_hu  # noqa: E402
from encoders.preprocess import box_to_input_grid, preprocess  # noqa: E402
from encoders.roi import propose_lesion  # noqa: E402
from encoders.spec import DEFAULT_SPEC  # noqa: E402
from encoders.synth import synth_cohort  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--patients", type=int, default=240)
    args = ap.parse_args()
    spec = DEFAULT_SPEC
    hits: dict[str, list[bool]] = defaultdict(list)
    hu: dict[str, list[float]] = defaultdict(list)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        info = synth_cohort(Path(tmp), patients=args.patients, seed=args.seed)
        with open(info.truth_csv, newline="") as fh:
            truth = {r["patient_id"]: r for r in csv.DictReader(fh)}
        groups, _ = scan_folder(info.dicom_dir)
        for files in groups.values():
            study = read_study(files)
            t = truth[study.patient_id]
            c = [float(t["lesion_slice"]), float(t["lesion_row"]), float(t["lesion_col"])]
            box = box_to_input_grid([*c, c[0] + 1, c[1] + 1, c[2] + 1], study.volume.shape,
                                    study.spacing, spec)
            want = np.array([(box[i] + box[i + 3]) / 2 - 0.5 for i in range(3)])
            vol = preprocess(study, spec)
            calibrated = calibrate_hu(vol[None], pad_value=spec.pad_value_hu)[0]
            roi = propose_lesion(calibrated, spacing_mm=spec.spacing_mm)
            miss_mm = float(np.linalg.norm((np.array(roi.centre) - want) * np.array(spec.spacing_mm)))
            hits[t["phenotype"]].append(miss_mm <= max(float(t["lesion_radius_mm"]), 6.0))
            hu[t["phenotype"]].append(float(vol[tuple(int(np.rint(x)) for x in want)]))
    print(f"# seed {args.seed}, {args.patients} patients, grid {spec.spacing_mm} mm, "
          f"{time.monotonic() - t0:.0f} s")
    print("| phenotype | proposals on the lesion | HU at the true centre (median) |")
    print("|---|---:|---:|")
    for k in sorted(hits):
        print(f"| {k} | {np.mean(hits[k]):.2f} ({sum(hits[k])}/{len(hits[k])}) | {np.median(hu[k]):.0f} |")
    every = [x for v in hits.values() for x in v]
    print(f"| all | {np.mean(every):.2f} ({sum(every)}/{len(every)}) | |")


if __name__ == "__main__":
    main()
