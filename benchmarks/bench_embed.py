"""Embedding and SSL-training throughput, as ratios to plain timm on the same input.

For each encoder region (``whole``: all slices of the volume; ``lesion``: a box around the
proposed lesion, resized in-plane) this prints

* ``embed``: studies/s and slices/s of :func:`encoders.model.embed` on int16 HU volumes,
  everything included (lesion proposal, cropping, HU windows, backbone, pooling, neck, L2);
* ``embed (given boxes)``: the same without the lesion proposal (regions passed in);
* the reference: plain ``timm`` forward of the same backbone on the same number of
  already-windowed ``(slices, C, H, W)`` float tensors (what the backbone sees);
* ``SSL train step``: images/s of one ``train_ssl``-like SimCLR step (two augmented views,
  forward + backward + AdamW) against plain timm forward + backward + AdamW on the same
  number of images.

On CUDA both sides run in bfloat16 autocast with channels-last (the encoder's GPU path);
on the CPU in float32. Ratios < 1 mean cohortsim is slower than the bare backbone.

    python benchmarks/bench_embed.py                       # CPU, 2 threads
    python benchmarks/bench_embed.py --device cuda         # GPU path (bf16, channels-last)
    python benchmarks/bench_embed.py --studies 256 --regions lesion
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import timm
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from encoders.augment import AugmentConfig, augment  # noqa: E402
from encoders.heads import ProjectionHead  # noqa: E402
from encoders.losses import NTXentLoss  # noqa: E402
from encoders.model import create_encoder, embed, resolve_device  # noqa: E402
from encoders.roi import crop_around, rois_for  # noqa: E402
from encoders.spec import DEFAULT_SPEC  # noqa: E402


def synthetic_chests(n: int, seed: int = 0) -> np.ndarray:
    """``(n, 16, 64, 64)`` int16: body, lungs, vessels-like noise and one nodule each."""
    rng = np.random.default_rng(seed)
    d, h, w = DEFAULT_SPEC.shape
    z, y, x = np.mgrid[:d, :h, :w].astype(np.float32)
    out = np.full((n, d, h, w), -1000.0, np.float32)
    for i in range(n):
        body = ((y - 32) / rng.uniform(24, 28)) ** 2 + ((x - 32) / rng.uniform(28, 31)) ** 2 < 1
        out[i][body] = 40.0
        for cx in (20, 44):
            out[i][body & (((y - 30) / 15) ** 2 + ((x - cx) / 9) ** 2 < 1)] = -850.0
        c = rng.uniform((4, 24, 14), (12, 36, 50))
        r = rng.uniform(1.5, 5.0)
        out[i][(z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 < r**2] = rng.uniform(-500, 60)
    return (out + rng.normal(0, 20, out.shape)).astype(np.int16)


def timed(fn: Callable[[], object], dev: torch.device, repeats: int) -> float:
    """Best-of-``repeats`` seconds of ``fn`` after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backbone", default="resnet10t")
    ap.add_argument("--studies", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16, help="studies per embed batch")
    ap.add_argument("--train-batch", type=int, default=32, help="studies per SSL step")
    ap.add_argument("--regions", default="whole,lesion")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    cuda = dev.type == "cuda"
    amp = (
        (lambda: torch.autocast(device_type="cuda", dtype=torch.bfloat16))
        if cuda
        else contextlib.nullcontext
    )
    fmt = torch.channels_last if cuda else torch.contiguous_format
    vols = synthetic_chests(args.studies)
    name = torch.cuda.get_device_name(dev) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"# {args.backbone}, {args.studies} studies of {DEFAULT_SPEC.shape} int16, {name}, "
          f"{'bf16 autocast + channels-last' if cuda else 'float32'}, best of {args.repeats}")
    print("| region | path | studies/s | slices/s | ratio to plain timm |")
    print("|---|---|---:|---:|---:|")
    for region in [r.strip() for r in args.regions.split(",") if r.strip()]:
        torch.manual_seed(0)
        enc = create_encoder(args.backbone, region=region, pooling="attention").to(dev).eval()
        d, h, _w = enc.input_shape
        px = enc.region.px if region == "lesion" else h
        n_slices = args.studies * d

        ref = timm.create_model(args.backbone, pretrained=False, in_chans=3, num_classes=0)
        ref = ref.to(dev).eval().to(memory_format=fmt)
        imgs = torch.rand(n_slices, 3, px, px, device=dev).contiguous(memory_format=fmt)
        bs = args.batch_size * d

        def plain() -> None:
            with torch.inference_mode(), amp():
                for i in range(0, n_slices, bs):
                    ref(imgs[i : i + bs])

        on_patches = region == "lesion" and DEFAULT_SPEC.has_patches
        boxes = rois_for(vols) if region == "lesion" and not on_patches else None
        data = vols
        if on_patches:
            # the lesion encoder embeds detail patches: here each chest's centre region,
            # cut at the patch's voxel size (the timing does not depend on the content)
            data = np.stack([crop_around(v, [n // 2 for n in v.shape], enc.stored_shape)
                             for v in vols])
        t_ref = timed(plain, dev, args.repeats)
        t_all = timed(lambda: embed(enc, data, batch_size=args.batch_size, device=dev), dev,
                      args.repeats)
        rows = [("embed (everything)", t_all)]
        if boxes is not None:
            t_box = timed(lambda: embed(enc, vols, batch_size=args.batch_size, device=dev,
                                        rois=boxes), dev, args.repeats)
            rows.append(("embed (given boxes)", t_box))
        rows.append(("plain timm forward (reference)", t_ref))
        for label, t in rows:
            print(f"| {region} | {label} | {args.studies / t:.1f} | {n_slices / t:.0f} | "
                  f"{t_ref / t:.2f} |")

        # SSL training step vs plain forward+backward on the same image count
        tb = min(args.train_batch, args.studies)
        enc.train()
        head = ProjectionHead(enc.embedding_dim, 256, 64).to(dev)
        loss_fn = NTXentLoss(0.1)
        opt = torch.optim.AdamW(list(enc.parameters()) + list(head.parameters()), lr=1e-4)
        gen = torch.Generator().manual_seed(0)
        cfg = AugmentConfig.for_lesion() if region == "lesion" else AugmentConfig()
        x = torch.from_numpy(enc.regions(data[:tb], boxes[:tb] if boxes else None)).float()
        x = x.to(dev)
        if cuda:
            enc.to(memory_format=torch.channels_last)

        def ssl_step() -> None:
            v1, v2 = augment(x, gen, cfg), augment(x, gen, cfg)
            with amp():
                z1, z2 = head(enc(v1)), head(enc(v2))
            loss = loss_fn(z1.float(), z2.float())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        ref.train()
        ropt = torch.optim.AdamW(ref.parameters(), lr=1e-4)
        timgs = torch.rand(2 * tb * d, 3, px, px, device=dev).contiguous(memory_format=fmt)

        def plain_train() -> None:
            with amp():
                out = ref(timgs)
            loss = out.float().pow(2).mean()
            ropt.zero_grad(set_to_none=True)
            loss.backward()
            ropt.step()

        t_ssl = timed(ssl_step, dev, args.repeats)
        t_pt = timed(plain_train, dev, args.repeats)
        n_img = 2 * tb * d
        print(f"| {region} | SSL train step ({tb} studies x 2 views) | {2 * tb / t_ssl:.1f} views/s "
              f"| {n_img / t_ssl:.0f} img/s | {t_pt / t_ssl:.2f} |")
        print(f"| {region} | plain timm fwd+bwd+AdamW (reference) | – | {n_img / t_pt:.0f} img/s "
              f"| 1.00 |")


if __name__ == "__main__":
    main()
