"""What keeping each study's matching slices costs (whole-volume encoders), as ratios to
references measured in the same run.

Build side: per study, ``embed`` (the study vector, reference) vs the extra work
:func:`indexing.build.embed_shard` does for the slices (``slice_projections``, one forward
that also gives the representative slice, and ``match_columns``: PNG per kept slice).
Size: bytes per study of the kept slices (projections + PNGs) vs the study's one
``thumbnail`` PNG. Query side: ``matched_slices`` for k neighbours vs embedding one study
(what a DICOM query costs anyway).

Volumes: the real LIDC-IDRI-0001 chest CT preprocessed to the default grid when
``/work/shared/data/lidc-idri-0001.tar.xz`` exists (repeated with noise), else synthetic
chests. Run: ``nice -n 10 python benchmarks/bench_slice_match.py [--studies 8 --dim 128]``.
"""

from __future__ import annotations

import argparse
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from encoders.model import create_encoder, embed, slice_projections
from encoders.spec import DEFAULT_SPEC
from indexing.build import embed_shard
from indexing.slice_match import matched_slices

LIDC = Path(__file__).resolve().parents[2] / "shared" / "data" / "lidc-idri-0001.tar.xz"


def volumes(n: int) -> tuple[np.ndarray, str]:
    """``(n, 64, 128, 128) int16`` on the default grid and where they come from."""
    rng = np.random.default_rng(0)
    if LIDC.exists():
        from encoders.dicom import read_study
        from encoders.preprocess import preprocess

        with tempfile.TemporaryDirectory() as tmp, tarfile.open(LIDC, "r:xz") as tar:
            tar.extractall(tmp, filter="data")
            files = sorted(p for p in Path(tmp).rglob("*") if p.is_file() and p.suffix != ".xml")
            base = preprocess(read_study(files), DEFAULT_SPEC).astype(np.float32)
        src = "real CT (LIDC-IDRI-0001) + noise"
    else:  # a soft-tissue ellipse with two lungs, every slice alike
        d, h, w = DEFAULT_SPEC.shape
        _, y, x = np.mgrid[:d, :h, :w].astype(np.float32)
        base = np.full((d, h, w), -1000.0, np.float32)
        body = ((y - h / 2) / (0.4 * h)) ** 2 + ((x - w / 2) / (0.45 * w)) ** 2 < 1
        base[body] = 40.0
        for cx in (0.32 * w, 0.68 * w):
            base[body & (((y - h / 2) / (0.25 * h)) ** 2 + ((x - cx) / (0.14 * w)) ** 2 < 1)] = -850.0
        src = "synthetic"
    out = np.stack([base + rng.normal(0, 15, base.shape) for _ in range(n)])
    return np.clip(out, -1024, 3071).astype(np.int16), src


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=8)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--backbone", default="resnet10t")
    ap.add_argument("--k", type=int, default=10)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    vols, src = volumes(args.studies)
    enc = create_encoder(args.backbone, embedding_dim=args.dim).eval()
    print(f"{args.studies} studies {vols.shape[1:]} ({src}), {args.backbone}, d={args.dim}")

    t0 = time.perf_counter()
    embed(enc, vols, batch_size=2, device="cpu")
    t_embed = time.perf_counter() - t0
    t0 = time.perf_counter()
    slice_projections(enc, vols, device="cpu")
    t_proj = time.perf_counter() - t0
    t0 = time.perf_counter()
    table = embed_shard(enc, [f"S-{i}" for i in range(len(vols))], vols, batch_size=2, device="cpu")
    t_shard = time.perf_counter() - t0
    print(f"build: embed {t_embed / len(vols):.2f} s/study (reference 1.00); slice projections "
          f"(the forward the region needed anyway) {t_proj / t_embed:.2f}x; whole embed_shard "
          f"{t_shard / t_embed:.2f}x")

    proj = sum(len(b) for b in table.column("match_projections").to_pylist()) / len(vols)
    pngs = sum(sum(len(p) for p in ps) for ps in table.column("match_thumbnails").to_pylist()) / len(vols)
    thumb = sum(len(b) for b in table.column("thumbnail").to_pylist()) / len(vols)
    kept = len(table.column("match_slices")[0].as_py())
    print(f"size per study: thumbnail {thumb / 1024:.1f} KiB (reference 1.00); kept slices ({kept}): "
          f"projections {proj / 1024:.1f} KiB + PNGs {pngs / 1024:.1f} KiB = "
          f"{(proj + pngs) / 1024:.1f} KiB ({(proj + pngs) / thumb:.1f}x)")

    vecs = np.stack([np.asarray(v, np.float32) for v in table.column("embedding").to_pylist()])
    rows = [i % len(vols) for i in range(args.k)]
    boxes = [tuple(b) for b in table.column("region_box").to_pylist()]
    reps = 50
    t0 = time.perf_counter()
    for _ in range(reps):
        matched_slices(table, rows, vecs[0], [boxes[r] for r in rows])
    t_match = (time.perf_counter() - t0) / reps
    per_study = t_embed / len(vols)
    print(f"query: matched_slices for k={args.k}: {t_match * 1e3:.2f} ms = {t_match / per_study:.4f}x "
          f"embedding one study ({per_study:.2f} s, reference 1.00)")

if __name__ == "__main__":
    main()
