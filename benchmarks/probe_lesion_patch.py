"""How separable are the phenotypes from a study's detail patch at all, and what does the
lesion encoder's preprocessing do to them?

Runs on a store made by ``benchmarks/eval_real_anatomy.py --prepare-only`` (a real-anatomy
cohort with reader patches) and prints, on the held-out split of ``cohortsim eval``
(same seed), the P@10 of label-free, untrained features next to each other:

* the whole-context HU histogram (the eval's baseline) and random vectors (chance);
* HU histograms of the detail patch: all of it, the central box the lesion encoder embeds
  (24 x 48 x 48 mm) and a lesion-scale centre (16 x 24 x 24 mm);
* a radial HU profile around the patch centre (mean HU in 2 mm shells out to 24 mm);

each on the raw HU, on HU calibrated on the patch itself (what the lesion encoder did) and
on HU calibrated with the references of the whole study (its context volume). P@10 is also
split into the size class and the texture class of the phenotype (``small_solid`` ->
``small``, ``solid``), so it shows which half of the label a feature carries.

Then the stored label-free proposals against the readers: top-1 and top-3 hits (a
proposal centre within 10 mm of the mean of the readers' box centres, which lies within
about 1 mm of the inserted lesion's centre) per phenotype, with 95 % Wilson intervals.
Nothing is asserted.

    python benchmarks/probe_lesion_patch.py --workdir /work/notes/realct-work/c96s1 --seed 1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from encoders.evaluate import (  # noqa: E402
    cohort_columns,
    hu_histogram_features,
    nearest_neighbours,
    random_vectors,
    split_queries,
)
from encoders.harmonize import calibrate_hu, calibrate_with, calibration_params  # noqa: E402
from indexing.ingest import store_spec  # noqa: E402
from indexing.store import CohortStore  # noqa: E402


def _centre(p: np.ndarray, size: tuple[int, int, int]) -> np.ndarray:
    """``(n, D, H, W)`` -> the central ``size`` box of each."""
    lo = [(n - s) // 2 for n, s in zip(p.shape[1:], size, strict=True)]
    return p[:, lo[0]:lo[0] + size[0], lo[1]:lo[1] + size[1], lo[2]:lo[2] + size[2]]


def radial_profile(p: np.ndarray, spacing: tuple[float, float, float],
                   shell_mm: float = 2.0, reach_mm: float = 24.0) -> np.ndarray:
    """``(n, D, H, W)`` HU -> ``(n, shells)``: mean HU in shells around the patch centre,
    scaled to about unit range and centred per feature over the cohort."""
    d, h, w = p.shape[1:]
    zz, yy, xx = np.meshgrid(*[(np.arange(k) - (k - 1) / 2) * s
                               for k, s in zip((d, h, w), spacing, strict=True)], indexing="ij")
    r = np.sqrt(zz**2 + yy**2 + xx**2)
    edges = np.arange(0.0, reach_mm + shell_mm, shell_mm)
    out = np.empty((p.shape[0], len(edges) - 1), np.float32)
    for j in range(len(edges) - 1):
        sel = (r >= edges[j]) & (r < edges[j + 1])
        out[:, j] = p[:, sel].astype(np.float32).mean(axis=1) / 500.0
    return out - out.mean(axis=0, keepdims=True)


def p_at_k(x: np.ndarray, qi: np.ndarray, ri: np.ndarray, labels: np.ndarray, k: int) -> float:
    nb = nearest_neighbours(x[qi], x[ri], k)
    return float((labels[ri][nb] == labels[qi][:, None]).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--patches", default="readers", choices=("readers", "proposals"))
    args = ap.parse_args()
    store = CohortStore(args.workdir / "store")
    spec = store_spec(store)
    uids, ctx = store.load_volumes()
    p_uids, patches = store.load_volumes(patches=args.patches)
    assert p_uids == uids
    table = {r["study_uid"]: r for r in store.cohort_table().to_pylist()}
    cols = cohort_columns([table[u] for u in uids], label="phenotype")
    lab = cols["labels"]
    size = np.asarray([s.split("_", 1)[0] for s in lab], dtype=object)
    tex = np.asarray([s.split("_", 1)[1] for s in lab], dtype=object)
    is_q = split_queries(cols["patient_ids"], 0.25, seed=args.seed)
    qi, ri = np.nonzero(is_q)[0], np.nonzero(~is_q)[0]
    pad = spec.pad_value_hu
    own = calibrate_hu(patches, pad_value=pad)
    params = [calibration_params(c, pad_value=pad) for c in ctx]
    study = np.stack([calibrate_with(p, pr, pad_value=pad) for p, pr in zip(patches, params,
                                                                              strict=True)])
    sp = tuple(float(s) for s in spec.patch_spacing_mm)
    box = tuple(max(1, round(m / s)) for m, s in zip((24.0, 48.0, 48.0), sp, strict=True))
    core = tuple(max(1, round(m / s)) for m, s in zip((16.0, 24.0, 24.0), sp, strict=True))

    rows: list[tuple[str, np.ndarray]] = [
        ("random vectors", random_vectors(len(uids), seed=args.seed)),
        ("HU histogram, whole context", hu_histogram_features(ctx)),
    ]
    for name, p in (("raw HU", patches), ("calibrated on the patch", own),
                    ("calibrated on the study", study)):
        rows += [
            (f"HU histogram, whole patch ({name})", hu_histogram_features(p)),
            (f"HU histogram, encoder box 24x48x48 mm ({name})",
             hu_histogram_features(_centre(p, box))),
            (f"HU histogram, centre 16x24x24 mm ({name})", hu_histogram_features(_centre(p, core))),
            (f"radial HU profile to 24 mm ({name})", radial_profile(p, sp)),
        ]
    print(f"\n{len(ri)} reference, {len(qi)} query studies, split seed {args.seed}, "
          f"{args.patches} patches, k = {args.k}\n")
    print("| features | P@10 phenotype | P@10 size class | P@10 texture class |")
    print("|---|---:|---:|---:|")
    for name, x in rows:
        cells = [p_at_k(x, qi, ri, y, args.k) for y in (lab, size, tex)]
        print(f"| {name} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")

    # what the calibration does to the lesion itself: its centre's HU per texture
    c = _centre
    print("\nlesion centre (central 4 x 4 x 4 mm), mean HU per texture class: raw / "
          "calibrated on the patch / calibrated on the study")
    for t in sorted(set(tex.tolist())):
        sel = tex == t
        vals = [float(c(p[sel], (2, 4, 4)).astype(np.float32).mean()) for p in (patches, own, study)]
        spread = [float(c(p[sel], (2, 4, 4)).astype(np.float32).mean(axis=(1, 2, 3)).std())
                  for p in (patches, own, study)]
        print(f"  {t}: " + " / ".join(f"{v:+.0f} (sd {s:.0f})" for v, s in zip(vals, spread,
                                                                          strict=True)))
    proposal_hits(store, dict(zip(uids, lab.tolist(), strict=True)))


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of ``k`` successes in ``n`` trials."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (float(c - h), float(c + h))


def proposal_hits(store: CohortStore, phenotype_of: dict[str, str], radius_mm: float = 10.0) -> None:
    """Print top-1 / top-3 proposal hits against the readers' mean centre per phenotype."""
    import json

    per: dict[str, list[tuple[bool, bool, float]]] = {}
    for row in store.patch_table().to_pylist():
        info = json.loads(row["patch_info"])
        readers = [np.asarray(p["centre_mm"]) for p in info if p["source"] == "reader"]
        props = sorted((p for p in info if p["source"] == "proposal"), key=lambda p: p["rank"])
        if not readers or not props:
            continue
        truth = np.mean(readers, axis=0)
        d = [float(np.linalg.norm(np.asarray(p["centre_mm"]) - truth)) for p in props]
        per.setdefault(phenotype_of[row["study_uid"]], []).append(
            (d[0] <= radius_mm, min(d[:3]) <= radius_mm, d[0]))
    print(f"\nproposals vs the readers' centre (hit: within {radius_mm:g} mm)\n")
    print("| phenotype | n | top-1 | top-3 | median distance of top-1, mm |")
    print("|---|---:|---|---|---:|")
    every = [h for hs in per.values() for h in hs]
    for name, hs in [*sorted(per.items()), ("**all**", every)]:
        n = len(hs)
        k1, k3 = sum(h[0] for h in hs), sum(h[1] for h in hs)
        i1, i3 = wilson(k1, n), wilson(k3, n)
        print(f"| {name} | {n} | {k1 / n:.2f} [{i1[0]:.2f}, {i1[1]:.2f}] | {k3 / n:.2f} "
              f"[{i3[0]:.2f}, {i3[1]:.2f}] | {np.median([h[2] for h in hs]):.1f} |")


if __name__ == "__main__":
    main()
