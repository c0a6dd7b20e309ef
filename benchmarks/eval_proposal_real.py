"""Label-free lesion proposals on real anatomy: lesions inserted into a real chest CT.

Background: the shared LIDC-IDRI-0001 chest CT (``../shared/data/lidc-idri-0001.tar.xz``).
Each trial takes a z sub-range of it that stays 25 mm away from the nodule the readers
marked (so only the inserted lesion is a marked one), flips it left-right at random,
shifts it in-plane by up to 20 mm, and inserts one lesion of a random phenotype of
``encoders.synth`` at a random point at least its radius + 4 mm inside the lungs
(:func:`encoders.synth_real.insert_lesion`, as ``cohortsim synth --background`` does).
The whole-study input (:func:`encoders.grid.study_input`) is then built as ingest does, and a hit is counted when a proposal lies within 10 mm of the inserted
lesion's centre (top-1, top-3). Also: the real nodule on the untouched study, and the time
of the proposal and of embedding one study (context + patch) on this machine's CPUs.
Nothing is asserted.

    python benchmarks/eval_proposal_real.py --trials 40 --seed 0
"""

from __future__ import annotations

import argparse
import math
import sys
import tarfile
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from encoders.dicom import read_study  # noqa: E402
from encoders.grid import study_input  # noqa: E402
from encoders.spec import DEFAULT_SPEC  # noqa: E402
from encoders.study import Study  # noqa: E402
from encoders.synth import PHENOTYPES  # noqa: E402
from encoders.synth_real import insert_lesion  # noqa: E402

ARCHIVE = ROOT.parent / "shared" / "data" / "lidc-idri-0001.tar.xz"
NODULE_Z_MM = -116.0  # patient z of the marked nodule (../shared/data/README.md)
NODULE_PX = (367, 316)  # (row, column)
FIRST_Z_MM = -340.0  # patient z of the first slice


def _wilson(k: int, n: int) -> str:
    if n == 0:
        return "-"
    p, z = k / n, 1.96
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return f"{p:.2f} [{max(0.0, c - h):.2f}, {min(1.0, c + h):.2f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--embed", action="store_true", help="also time embedding (resnet10t)")
    args = ap.parse_args()
    if not ARCHIVE.is_file():
        sys.exit(f"eval_proposal_real: error: {ARCHIVE} is absent (see ../shared/data/README.md)")
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(ARCHIVE) as tar:
            tar.extractall(tmp, filter="data")
        t0 = time.monotonic()
        study = read_study(sorted(Path(tmp).rglob("*.dcm")))
        t_read = time.monotonic() - t0
    sp = study.spacing
    base = np.asarray(study.volume, dtype=np.float32)
    nod_i = (NODULE_Z_MM - FIRST_Z_MM) / sp[0]
    nodule_mm = ((nod_i + 0.5) * sp[0], (NODULE_PX[0] + 0.5) * sp[1], (NODULE_PX[1] + 0.5) * sp[2])
    t0 = time.monotonic()
    real = study_input(study, DEFAULT_SPEC)
    t_real = time.monotonic() - t0
    d_real = [float(np.linalg.norm(np.subtract(p.centre_mm, nodule_mm)))
              for p in real.patch_info if p.source == "proposal"]
    print(f"real CT: read {t_read:.1f} s, context + {len(real.patch_info)} patches "
          f"{t_real:.1f} s; marked nodule: proposal ranks' distances (mm) "
          f"{[round(d, 1) for d in d_real]}")
    keep = math.ceil(25.0 / sp[0])
    segments = [(0, max(0, int(nod_i) - keep)), (int(nod_i) + keep + 1, base.shape[0])]
    segments = [s for s in segments if s[1] - s[0] >= 16]
    rng = np.random.default_rng(args.seed)
    hits: dict[str, list[tuple[bool, bool]]] = defaultdict(list)
    times = []
    for _ in range(args.trials):
        lens = np.array([b - a for a, b in segments], dtype=float)
        a, b = segments[int(rng.choice(len(segments), p=lens / lens.sum()))]
        length = int(rng.integers(min(40, b - a), b - a + 1))
        z0 = int(rng.integers(a, b - length + 1))
        vol = base[z0 : z0 + length].copy()
        if rng.random() < 0.5:
            vol = vol[:, :, ::-1].copy()
        shift = rng.uniform(-20, 20, 2) / np.asarray(sp[1:])
        vol = ndimage.shift(vol, (0, *shift), order=0, mode="constant", cval=-1024.0)
        phenotype = str(rng.choice(PHENOTYPES))
        placed = insert_lesion(vol, sp, rng, phenotype)
        if placed is None:
            continue
        centre, _radius = placed
        st = Study("1.2", "bench", "1.2.3", "CT", vol, sp, acquisition={"intensity": "HU"},
                   units="HU")
        t0 = time.monotonic()
        si = study_input(st, DEFAULT_SPEC)
        times.append(time.monotonic() - t0)
        d = [float(np.linalg.norm(np.subtract(p.centre_mm, centre)))
             for p in si.patch_info if p.source == "proposal"]
        hits[phenotype].append((bool(d) and d[0] <= 10.0, any(x <= 10.0 for x in d[:3])))
        print(f"# trial {sum(map(len, hits.values()))}: {phenotype}, distances of the "
              f"proposals {[round(x, 1) for x in d]} mm, {times[-1]:.1f} s",
              file=sys.stderr, flush=True)
    print(f"inserted lesions, {sum(map(len, hits.values()))} trials (seed {args.seed}); "
          "within 10 mm of the lesion centre, 95 % Wilson interval")
    print(f"{'phenotype':24s} {'n':>3s}  {'top-1':18s} {'top-3':18s}")
    for ph in sorted(hits):
        h = hits[ph]
        print(f"{ph:24s} {len(h):3d}  {_wilson(sum(a for a, _ in h), len(h)):18s} "
              f"{_wilson(sum(b for _, b in h), len(h)):18s}")
    allh = [x for h in hits.values() for x in h]
    print(f"{'all':24s} {len(allh):3d}  {_wilson(sum(a for a, _ in allh), len(allh)):18s} "
          f"{_wilson(sum(b for _, b in allh), len(allh)):18s}")
    print(f"study input (context + {DEFAULT_SPEC.proposals} proposals + patches) per "
          f"inserted-lesion study: median {np.median(times):.1f} s")
    if args.embed:
        import torch

        from encoders.model import create_encoder, embed

        torch.manual_seed(0)
        lesion = create_encoder("resnet10t", region="lesion", pooling="attention")
        whole = create_encoder("resnet10t")
        embed(lesion, real.patches[:1])  # warm-up
        t0 = time.monotonic()
        for _ in range(3):
            embed(lesion, real.patches[:1])
        t_l = (time.monotonic() - t0) / 3
        t0 = time.monotonic()
        embed(whole, real.context[None])
        t_w = time.monotonic() - t0
        print(f"embedding one study on {torch.get_num_threads()} threads: lesion patch "
              f"{t_l:.2f} s, whole context volume {t_w:.2f} s")


if __name__ == "__main__":
    main()
