"""Cost of test-time augmentation (stability diagnostics) on a DICOM query.

Times the server's DICOM path (decode, preprocess, embed) without and with the
``TTA_VIEWS`` scanner-augmented copies, in the same run on the same study, with the
encoder of an index built by ``cohortsim demo --workdir DIR`` (or any index with an
encoder). Nothing is asserted.

    python benchmarks/bench_tta.py --index DIR/index --study DIR/query
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

from service.servicer import TTA_VIEWS, ServiceState


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", type=Path, required=True)
    ap.add_argument("--study", type=Path, required=True, help="folder of one study's DICOM files")
    ap.add_argument("--views", type=int, default=TTA_VIEWS)
    ap.add_argument("--repeat", type=int, default=15)
    args = ap.parse_args()
    files = [p.read_bytes() for p in sorted(args.study.rglob("*")) if p.is_file()]
    state = ServiceState.load(args.index, device="cpu")
    _, card = state.encoder()
    state.embed_dicom(files, views=args.views)  # warm-up
    print(f"# {card.backbone}, input {card.input.shape}, {platform.processor() or platform.machine()}")
    best = {0: float("inf"), args.views: float("inf")}
    for _ in range(args.repeat):  # interleaved, best of each (shared cores are noisy)
        for views in best:
            t0 = time.perf_counter()
            state.embed_dicom(files, views=views)
            best[views] = min(best[views], time.perf_counter() - t0)
    base = best[0]
    print(f"DICOM decode + preprocess + embed (reference): {1000 * base:.0f} ms")
    print(
        f"  + {args.views} scanner-augmented copies:          {1000 * best[args.views]:.0f} ms "
        f"({best[args.views] / base:.2f} x)"
    )


if __name__ == "__main__":
    main()
