"""Retrieval evaluation on a synthetic DICOM cohort (slow: the benchmark protocol, one cohort).

``pytest -m slow tests/encoders/test_eval_retrieval.py`` — synthesises 240 patients as DICOM
(5 scanners, 6 phenotypes; seed 11, the weakest of the six cohorts in ``benchmarks/RESULTS.md``),
reads and resamples them with ``encoders.dicom``, holds out a quarter of the patients,
trains the lesion encoder on the rest for 100 epochs (the benchmark's protocol) and checks
what every cohort tried so far reaches. P@10 >= 0.70 is not asserted: with four views per
lesion this cohort gave 0.737 [0.663, 0.805] here (2 threads) and 0.675 with 1 thread;
with two views 0.64-0.675 (RESULTS.md lists the figures of every cohort). The trained
encoder must beat the randomly initialised one of the same run (0.577 here).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from encoders.dicom import read_study, scan_folder
from encoders.evaluate import EvalConfig, metric_cells, run_retrieval_eval
from encoders.grid import study_input
from encoders.spec import DEFAULT_SPEC
from encoders.synth import synth_cohort


@pytest.mark.slow
@pytest.mark.timeout(3600)  # 5 min on 2 quiet cores, far more on busy ones; the default 600 s is too short
def test_lesion_encoder_retrieves_phenotype_not_scanner(tmp_path: Path) -> None:
    torch.set_num_threads(2)
    info = synth_cohort(tmp_path, patients=240, seed=11)
    groups, rejected = scan_folder(info.dicom_dir)
    assert not rejected
    vols, patches, pids = [], [], []
    for files in groups.values():
        study = read_study(files)
        si = study_input(study, DEFAULT_SPEC)  # context + the top proposal's detail patch
        vols.append(si.context)
        patches.append(si.patches[si.primary("proposals")])
        pids.append(study.patient_id)
    with open(info.truth_csv, newline="") as f:
        truth = {r["patient_id"]: r for r in csv.DictReader(f)}
    with open(info.outcomes_csv, newline="") as f:
        outcome = {r["patient_id"]: r for r in csv.DictReader(f)}
    rows = run_retrieval_eval(
        np.stack(vols),
        patient_ids=pids,
        labels=[truth[p]["phenotype"] for p in pids],
        scanners=[truth[p]["scanner"] for p in pids],
        times=[float(outcome[p]["time"]) for p in pids],
        events=[outcome[p]["event"] == "1" for p in pids],
        spec=DEFAULT_SPEC,
        config=EvalConfig(regions=("lesion",), epochs=100, device="cpu"),
        patches=np.stack(patches),
    )
    by = {r.method: r.metrics for r in rows}
    ours = by["cohortsim simclr (lesion)"]
    hu = by["HU histogram"]
    chance = by["random vectors"]
    untrained = by["random-init resnet10t (lesion)"]
    figures = {name: metric_cells(m) for name, m in by.items()}  # with 95 % intervals
    print(f"P@10, scanner excess, C-index: {figures}")  # shown with -s, and on failure
    # the naive baseline is scanner-driven; ours is not
    assert hu.scanner_excess > 0.5, figures
    assert ours.scanner_excess <= 0.10, figures
    # ours beats HU histogram by the margin and chance (1/6) by far
    assert ours.precision_at_k >= hu.precision_at_k + 0.15, figures
    assert ours.precision_at_k >= 0.55 > chance.precision_at_k + 0.2, figures
    # training adds to what the architecture and the lesion box give for free
    assert ours.precision_at_k >= untrained.precision_at_k + 0.05, figures
    assert ours.c_index >= 0.60, figures
