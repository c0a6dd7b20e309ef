"""Cost of a per-neighbour explanation (occlusion, encoders/explain.py) against one embedding.

For a lesion encoder (the default resnet10t on the default input grid, a reader box) and a
whole-volume encoder, on one synthetic preprocessed volume:

* reference: ``embed(encoder, volume[None], rois=...)`` — one embedding of the query as the
  server computes it (crop + one forward);
* explanation: ``occlusion_maps`` of that query against k = 10 neighbour vectors with the
  default 3 x 3 grid (1 + 9 inputs in one batched forward, shared by all neighbours), and
  with a 2 x 2 grid.

Printed as ratios to the reference measured in the same run (median of ``--reps``); CPU
threads as torch sets them. Nothing is asserted.

    python benchmarks/bench_explain.py --reps 7
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
import torch

from encoders.explain import occlusion_maps
from encoders.model import create_encoder, embed
from encoders.spec import DEFAULT_SPEC


def _median_time(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--backbone", default="resnet10t")
    ap.add_argument("--k", type=int, default=10)
    args = ap.parse_args()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    d, h, w = DEFAULT_SPEC.shape
    volume = (-850 + 30 * rng.standard_normal((d, h, w))).astype(np.int16)
    box = (d // 2 - 6, h // 2 - 12, w // 2 - 12, d // 2 + 6, h // 2 + 12, w // 2 + 12)
    print(f"# explanation cost; {platform.processor() or platform.machine()}, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; input {DEFAULT_SPEC.shape}, "
          f"k = {args.k}, median of {args.reps}")
    print(f"{'encoder':>14} {'grid':>5} | {'embed (ms)':>10} {'explain (ms)':>12} {'ratio':>6}")
    for mode in ("lesion", "whole"):
        enc = create_encoder(args.backbone, region=mode).eval()
        roi = box if mode == "lesion" else None
        rois = [roi] if roi is not None else None
        nb = rng.standard_normal((args.k, enc.embedding_dim)).astype(np.float32)
        ref = _median_time(lambda enc=enc, rois=rois: embed(enc, volume[None], rois=rois, device="cpu"), args.reps)
        for grid in ((3, 3), (2, 2)):
            cost = _median_time(
                lambda enc=enc, roi=roi, nb=nb, grid=grid: occlusion_maps(enc, volume, nb, roi=roi, grid=grid),
                args.reps,
            )
            print(f"{args.backbone + '/' + mode:>14} {grid[0]}x{grid[1]:<3} | {ref * 1e3:>10.1f} "
                  f"{cost * 1e3:>12.1f} {cost / ref:>6.2f}")


if __name__ == "__main__":
    main()
