"""Rebuild on Ray vs the single-process path, same cohort, same machine, same run.

Synthesises a DICOM cohort, then times the single-process path (``ingest_folder`` with
``--workers`` processes, then ``build_from_store``: the reference) and the Ray path
(``ingest_folder_ray``, ``build_from_store_ray`` on ``ray.init(num_cpus=--cpus)``), and
prints each stage's throughput as a ratio to the reference, the Ray start-up cost, and
the embedding throughput of each actor (studies per second of actor time). It also
checks that both paths published the same index (ids exact, vectors within 1e-5).

    nice -n 10 python benchmarks/bench_ray.py --patients 24
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from encoders.deid import Pseudonymizer
from encoders.model import EncoderCard, create_encoder, save_encoder
from encoders.spec import DEFAULT_SPEC
from encoders.synth import synth_cohort
from indexing.build import build_from_store
from indexing.ingest import ingest_folder
from indexing.snapshot import load_snapshot
from indexing.store import CohortStore


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=24)
    ap.add_argument("--backbone", default="resnet10t")
    ap.add_argument("--cpus", type=int, default=2, help="Ray CPUs and single-process workers")
    ap.add_argument("--shard-size", type=int, default=4, help="studies per Ray unit / shard")
    ap.add_argument("--workdir", type=Path, default=None)
    a = ap.parse_args()

    import ray

    from indexing.distributed import build_from_store_ray
    from indexing.distributed_ingest import ingest_folder_ray

    work = Path(tempfile.mkdtemp(dir=a.workdir, prefix="bench-ray-"))
    try:
        synth_cohort(work / "cohort", patients=a.patients, seed=0)
        encoder = create_encoder(a.backbone, spec=DEFAULT_SPEC)
        save_encoder(encoder, EncoderCard.for_encoder(encoder, seed=0), work / "model")
        pseudo = Pseudonymizer(b"bench-ray-secret-0123456789")
        dicom = work / "cohort" / "dicom"

        t = time.perf_counter()
        ingest_folder(dicom, CohortStore(work / "s1", create=True), pseudonymizer=pseudo, workers=a.cpus)
        ingest1 = time.perf_counter() - t
        t = time.perf_counter()
        build_from_store(work / "s1", work / "model", work / "i1", device="cpu", shard_size=a.shard_size)
        build1 = time.perf_counter() - t

        t = time.perf_counter()
        ray.init(num_cpus=a.cpus, include_dashboard=False, log_to_driver=False)
        startup = time.perf_counter() - t
        t = time.perf_counter()
        ingest_folder_ray(dicom, CohortStore(work / "s2", create=True), pseudonymizer=pseudo)
        ingest2 = time.perf_counter() - t
        stats: dict = {}
        t = time.perf_counter()
        build_from_store_ray(work / "s2", work / "model", work / "i2", device="cpu",
                             shard_size=a.shard_size, stats=stats)  # fmt: skip
        build2 = time.perf_counter() - t
        ray.shutdown()

        n = a.patients
        print(f"{n} studies of {DEFAULT_SPEC.shape}, {a.backbone}, {a.cpus} CPUs; "
              "ratio = throughput of Ray / single process (>1: Ray faster)")  # fmt: skip
        print(f"{'stage':<26}{'single s':>10}{'ray s':>10}{'ratio':>8}")
        for name, one, two in (("ingest", ingest1, ingest2), ("index build (embed+publish)", build1, build2),
                               ("both", ingest1 + build1, ingest2 + build2),
                               ("both + Ray start-up", ingest1 + build1, ingest2 + build2 + startup)):
            print(f"{name:<26}{one:>10.1f}{two:>10.1f}{one / two:>8.2f}")
        print(f"Ray start-up (ray.init, local): {startup:.1f} s")
        print(f"single process: {n / ingest1:.2f} studies/s ingest, {n / build1:.2f} studies/s build")
        for actor, (studies, seconds) in sorted(stats["per_actor"].items()):
            print(f"actor {actor}: {studies} studies in {seconds:.1f} s = {studies / seconds:.2f} studies/s "
                  "(read + embed + thumbnail + write)")
        a1, a2 = load_snapshot(work / "i1", device="cpu"), load_snapshot(work / "i2", device="cpu")
        same = sorted(a1.metadata["study_uid"].to_pylist()) == sorted(a2.metadata["study_uid"].to_pylist())
        v1 = dict(zip(a1.metadata["study_uid"].to_pylist(), np.asarray(a1.vectors), strict=True))
        err = max(float(np.abs(v1[u] - v).max()) for u, v in
                  zip(a2.metadata["study_uid"].to_pylist(), np.asarray(a2.vectors), strict=True))  # fmt: skip
        print(f"same studies: {same}; largest vector difference {err:.2e}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
