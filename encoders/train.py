"""Self-supervised training of a :class:`StudyEncoder` (SimCLR or VICReg).

Reads like the lightly examples: encoder + projection head, scanner-like views of each
study (``views``: four per lesion box, two per whole volume), a contrastive (NT-Xent) or
non-contrastive (VICReg) loss over every pair of views, AdamW with a cosine schedule.
The projection head is discarded after training; the encoder's neck output is the study
embedding.

Speed: each view encodes a random subset of ``train_slices`` slices (the mean over
slices is defined for any subset): 8 of a 12-slice lesion box, 8 of 32 whole-volume slices.
``torch.set_num_threads`` is left to the caller.

Lesion region (``region="lesion"``): on the whole-study grid each training study is its
detail patch (``(n,) + spec.patch_shape``, centred on a reader region or a proposal at
ingest, :mod:`encoders.grid`); on the legacy grid the lesion centre of every study is found
once (:func:`encoders.roi.propose_lesion`, or given ``rois``). The views of a study
are boxes around the centre, each shifted by up to ``roi_jitter`` voxels per axis (8 mm by
default, capped by the patch's margin, which also teaches tolerance to an imprecise
centre), randomly rotated /
reflected, then passed through the scanner augmentations of
:meth:`AugmentConfig.for_lesion`.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from encoders.augment import AugmentConfig
from encoders.augment import augment as augment_fn
from encoders.errors import EncoderError
from encoders.harmonize import SOFT_TISSUE_HU
from encoders.heads import ProjectionHead
from encoders.losses import NTXentLoss, VICRegLoss
from encoders.model import (
    EncoderCard,
    RegionSpec,
    StudyEncoder,
    create_encoder,
    lesion_boxes,
    resolve_device,
)
from encoders.spec import DEFAULT_SPEC, InputSpec

__all__ = ["CHECKPOINT_FILE", "LESION_VIEWS", "METHODS", "resolve_device", "train_ssl"]

METHODS = ("simclr", "vicreg")
CHECKPOINT_FILE = "checkpoint.pt"
ROI_JITTER_MM = 8.0  # default box jitter: 2 voxels at 4 mm, 4 at 2 mm
# Views of each lesion box per step. Four raised held-out P@10 on all four benchmark
# cohorts over two views (mean 0.740 -> 0.774) at 1.7x the training time
# (benchmarks/RESULTS.md).
LESION_VIEWS = 4
MAX_VIEWS = 16

ProgressFn = Callable[[int, int, float], None]


def _make_head(method: str, embedding_dim: int) -> ProjectionHead:
    if method == "simclr":
        return ProjectionHead(embedding_dim, 256, 64, num_layers=2)
    return ProjectionHead(embedding_dim, 256, 256, num_layers=3)


def _make_loss(method: str) -> nn.Module:
    return NTXentLoss(temperature=0.1) if method == "simclr" else VICRegLoss()


def _lr_at(
    step: int, total: int, base_lr: float, warmup: int, time_fraction: float = 0.0
) -> float:
    """Linear warm-up for ``warmup`` steps, then cosine decay to 1% of ``base_lr``.

    ``time_fraction`` (elapsed / time budget) advances the decay when a time budget will
    end the run before ``total`` steps, so a budget-limited run still anneals.
    """
    if step < warmup:
        return base_lr * (step + 1) / warmup
    t = max((step - warmup) / max(1, total - warmup), time_fraction)
    return base_lr * (0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t))))


def _validate(
    volumes: np.ndarray,
    spec: InputSpec,
    method: str,
    epochs: int,
    batch_size: int,
    lr: float,
    train_slices: int | None,
    expected: tuple[int, ...] | None = None,
) -> None:
    """Argument checks; ``expected`` is one study's shape (default ``spec.shape``)."""
    shape = tuple(spec.shape) if expected is None else expected
    if not isinstance(volumes, np.ndarray):
        raise EncoderError(f"volumes must be a numpy array, got {type(volumes).__name__}")
    if volumes.ndim != 4 or tuple(volumes.shape[1:]) != shape:
        raise EncoderError(
            f"training volumes must have shape (n, {', '.join(map(str, shape))}) as set "
            f"by the input spec (detail patches for a lesion encoder on the whole-study "
            f"grid), got {tuple(volumes.shape)}"
        )
    if volumes.dtype == np.bool_ or volumes.dtype.kind not in "iuf":
        raise EncoderError(f"volumes must be int16 or float HU values, got {volumes.dtype}")
    if volumes.shape[0] < 2:
        raise EncoderError(
            f"self-supervised training needs at least 2 studies, got {volumes.shape[0]}"
        )
    if volumes.dtype.kind == "f" and not bool(np.isfinite(volumes).all()):
        raise EncoderError("volumes contain NaN or infinite values; fix the preprocessing")
    if method not in METHODS:
        raise EncoderError(f"method must be one of {METHODS}, got {method!r}")
    if epochs < 0:
        raise EncoderError(f"epochs must be >= 0, got {epochs}")
    if batch_size < 2:
        raise EncoderError(f"batch_size must be >= 2 (contrastive pairs), got {batch_size}")
    if train_slices is not None and train_slices < 1:
        raise EncoderError(f"train_slices must be >= 1 or None (all), got {train_slices}")
    if not (math.isfinite(lr) and lr > 0):
        raise EncoderError(f"lr must be a finite number > 0, got {lr}")


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _load_checkpoint(path: Path, run: dict[str, Any]) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise EncoderError(
            f"cannot read training checkpoint {path} ({type(exc).__name__}); delete it to "
            "start training from scratch"
        ) from exc
    if not isinstance(state, dict) or state.get("run") != run:
        raise EncoderError(
            f"training checkpoint {path} belongs to a different run (backbone, spec, method, "
            "seed, batch size or data differ); delete it or use another checkpoint_dir"
        )
    return state


def _slice_subset(depth: int, k: int | None, gen: torch.Generator) -> Tensor | None:
    if k is None or k >= depth:
        return None
    return torch.randperm(depth, generator=gen)[:k].sort().values


def _lesion_boxes(
    volumes: np.ndarray, spec: InputSpec, region: RegionSpec, rois: Sequence[Any] | None,
    margin: tuple[int, int, int], *, calibrate: bool = False,
) -> tuple[np.ndarray, str]:
    """``(n, D+2m, H+2m, W+2m)`` boxes (``m`` per axis) around each study's lesion centre
    (:func:`encoders.model.lesion_boxes`, one study at a time), and a digest of the
    centres (part of the checkpoint's run identity)."""
    size = tuple(int(v) + 2 * m for v, m in zip(region.size, margin, strict=True))
    boxes, centres = lesion_boxes(volumes, rois, size, spec=spec, proposal=region.proposal,
                                  calibrate=calibrate)
    digest = hashlib.sha256(repr(centres).encode()).hexdigest()[:16]
    return boxes, digest


class _Rows:
    """Rows ``indices`` of ``volumes`` ``(n, D, H, W)``, each read when asked for: what
    ``volumes[indices]`` would be, without the copy (on a memory map, fancy indexing
    would read all those rows into memory at once)."""

    def __init__(self, volumes: np.ndarray, indices: np.ndarray) -> None:
        self._volumes = volumes
        self._indices = indices
        self.shape = (len(indices), *volumes.shape[1:])
        self.dtype = volumes.dtype
        self.ndim = volumes.ndim

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, k: Any) -> np.ndarray:
        return np.asarray(self._volumes[self._indices[k]])

    def __iter__(self) -> Any:
        return (self._volumes[i] for i in self._indices)


def _rows(volumes: np.ndarray, indices: Sequence[int] | np.ndarray | None) -> Any:
    """``volumes`` itself, or a :class:`_Rows` view of the checked ``indices``."""
    if indices is None:
        return volumes
    idx = np.asarray(indices)
    if idx.ndim != 1 or (idx.size and idx.dtype.kind not in "iu"):
        raise EncoderError(f"indices must be a 1-D sequence of row numbers, got {idx!r:.80}")
    if idx.size < 2:
        raise EncoderError(f"self-supervised training needs at least 2 studies, got {idx.size}")
    n = volumes.shape[0]
    if int(idx.min()) < 0 or int(idx.max()) >= n:
        raise EncoderError(f"indices must lie in [0, {n}) (rows of volumes), got "
                           f"{int(idx.min())}..{int(idx.max())}")
    return _Rows(volumes, idx.astype(np.int64))


def _volumes_sha256(volumes: np.ndarray) -> str:
    """SHA-256 of the volumes' C-order bytes, fed one study at a time from its buffer (the
    digest of ``volumes.tobytes()``, without a copy of the cohort)."""
    h = hashlib.sha256()
    for v in volumes:
        h.update(np.ascontiguousarray(v).data)
    return h.hexdigest()


def _calibrate_batch(
    x: Tensor, params: Tensor, pad_value: float, int_range: tuple[int, int] | None
) -> Tensor:
    """:func:`encoders.harmonize.calibrate_hu` of a batch ``x`` ``(b, D, H, W)`` (float
    HU, on its device) with each study's ``(soft, gain)`` row of ``params`` (NaN: the
    study is left as it is); ``int_range``: round and clip as the stored integer type."""
    soft = params[:, 0].view(-1, 1, 1, 1)
    gain = params[:, 1].view(-1, 1, 1, 1)
    y = (x - soft) / gain + SOFT_TISSUE_HU
    if int_range is not None:
        y = torch.round(y).clamp_(*int_range)
    y = torch.where(x == pad_value, x, y)
    return torch.where(torch.isnan(soft), x, y)


def _margins(spec: InputSpec, region: RegionSpec, roi_jitter: int | None) -> tuple[int, int, int]:
    """Box jitter in voxels per axis: ``roi_jitter`` or :data:`ROI_JITTER_MM`; on detail
    patches the default is also at most a quarter of the box (16 x 32 x 32 mm: 4 x 8 x 8
    mm), and each axis is capped by the room the patch leaves around the box, so a
    jittered box never reaches past the stored patch."""
    if not spec.has_patches:  # legacy grid: one margin, 8 mm on the in-plane grid
        m = roi_jitter if roi_jitter is not None else max(
            1, round(ROI_JITTER_MM / float(spec.spacing_mm[1])))
        return (m, m, m)
    out = []
    for ps, n, size in zip(spec.patch_spacing_mm, spec.patch_shape, region.size, strict=True):
        # at most a quarter of the box along each axis, so that the lesion's centre stays
        # in the box's central half in every view: a view without the lesion, paired with
        # one with it, would teach the encoder to ignore the lesion
        want = roi_jitter if roi_jitter is not None else min(
            round(ROI_JITTER_MM / float(ps)), int(size) // 4)
        out.append(max(0, min(int(want), (int(n) - int(size)) // 2)))
    return (out[0], out[1], out[2])


def _jittered(boxes: Tensor, size: tuple[int, ...], margin: tuple[int, int, int],
              gen: torch.Generator) -> Tensor:
    """One box of ``size`` per sample of ``boxes`` ``(b, D+2m, H+2m, W+2m)``, shifted by a
    random offset in ``[-m, m]`` voxels along each axis (``m`` per axis)."""
    b = boxes.shape[0]
    off = torch.stack([torch.randint(0, 2 * m + 1, (b,), generator=gen) for m in margin],
                      dim=1).tolist()
    d, h, w = size
    return torch.stack(
        [boxes[i, o[0] : o[0] + d, o[1] : o[1] + h, o[2] : o[2] + w] for i, o in enumerate(off)]
    )


def train_ssl(
    volumes: np.ndarray,
    *,
    backbone: str = "resnet10t",
    spec: InputSpec = DEFAULT_SPEC,
    embedding_dim: int = 128,
    method: str = "simclr",
    epochs: int = 10,
    batch_size: int = 16,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    device: str | torch.device = "auto",
    seed: int = 0,
    data_hash: str = "",
    progress: ProgressFn | None = None,
    time_budget_s: float | None = None,
    checkpoint_dir: Path | str | None = None,
    pooling: str = "mean",
    train_slices: int | None = 8,
    augment: AugmentConfig | None = None,
    region: str | RegionSpec | None = None,
    rois: Sequence[Any] | None = None,
    roi_jitter: int | None = None,
    calibration: str = "none",
    indices: Sequence[int] | np.ndarray | None = None,
    views: int | None = None,
    init_state: Mapping[str, Mapping[str, Tensor]] | None = None,
    prox_mu: float = 0.0,
    state_out: dict[str, dict[str, Tensor]] | None = None,
) -> tuple[StudyEncoder, EncoderCard]:
    """Train an encoder on ``volumes`` ``(n, D, H, W)`` int16 HU without labels.

    ``method`` is ``"simclr"`` (NT-Xent) or ``"vicreg"``. ``progress(step, total_steps,
    loss)`` is called after every optimiser step (``step`` counts from 1 over the whole
    run). ``time_budget_s`` stops early after the step that exceeds it (noted in
    ``card.notes``; ``card.epochs`` counts whole epochs only). With ``checkpoint_dir``, a
    resumable checkpoint is written after each epoch and training resumes from it. Each
    view encodes ``train_slices`` random slices (``None``: all).

    ``region`` ``"whole"`` (default) or ``"lesion"`` (or a :class:`RegionSpec`): what the
    encoder embeds; with ``"lesion"``, ``rois`` optionally gives one region per study
    (box, mask, :class:`encoders.roi.Roi` or ``None`` = propose), and views are boxes
    shifted by up to ``roi_jitter`` voxels (default: :data:`ROI_JITTER_MM` on the grid;
    ``augment`` defaults to
    :meth:`AugmentConfig.for_lesion`). ``calibration="tissue"`` calibrates each study's HU
    on its air and soft tissue first (:func:`encoders.harmonize.calibrate_hu`), so the HU
    augmentation only has to cover the residual (lesion views use narrow HU ranges then).

    ``indices``: train on these rows of ``volumes`` only, each read when needed (as
    ``volumes[indices]``, without copying them; ``volumes`` may be a memory map); ``rois``
    then gives one entry per selected row.

    ``views``: augmented views of each study per step (default :data:`LESION_VIEWS` for
    lesion boxes, 2 for whole volumes); every view is a positive of the others (see
    :mod:`encoders.losses`). A step costs about ``views / 2`` times a two-view step.

    Federated rounds (:mod:`encoders.federated`): ``init_state`` ``{"encoder": state_dict,
    "head": state_dict}`` starts from those weights instead of the seeded initialisation;
    ``prox_mu`` > 0 adds the FedProx term ``mu / 2 * ||w - w0||^2`` over every trainable
    weight, ``w0`` being ``init_state``'s; ``state_out`` (a dict) receives the trained
    ``{"encoder": ..., "head": ...}`` state dicts on the CPU.

    Returns the encoder (eval mode, on the training device) and its card (``version`` is
    set when the encoder is saved).
    """
    reg = region if isinstance(region, RegionSpec) else RegionSpec.for_spec(region, spec)
    expected = (tuple(int(v) for v in spec.patch_shape)
                if reg.mode == "lesion" and spec.has_patches else tuple(spec.shape))
    _validate(volumes, spec, method, epochs, batch_size, lr, train_slices, expected)
    volumes = _rows(volumes, indices)
    if roi_jitter is not None and roi_jitter < 0:
        raise EncoderError(f"roi_jitter must be >= 0 voxels, got {roi_jitter}")
    if views is None:
        views = LESION_VIEWS if reg.mode == "lesion" else 2
    if isinstance(views, bool) or not isinstance(views, int) or not 2 <= views <= MAX_VIEWS:
        raise EncoderError(f"views must be a whole number from 2 to {MAX_VIEWS}, got {views!r}")
    margin = _margins(spec, reg, roi_jitter)
    lesion = reg.mode == "lesion"
    if lesion and augment is None:
        augment = AugmentConfig.for_lesion(calibrated=calibration == "tissue")
    dev = resolve_device(device)
    use_cuda = dev.type == "cuda"
    n = volumes.shape[0]
    bs = min(batch_size, n)
    steps_per_epoch = n // bs + (1 if n % bs >= 2 else 0)  # a last batch of 1 is dropped
    total_steps = epochs * steps_per_epoch
    warmup = min(steps_per_epoch, max(1, total_steps // 20))

    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = create_encoder(
            backbone,
            spec=spec,
            embedding_dim=embedding_dim,
            pooling=pooling,
            region=reg,
            calibration=calibration,
        )
        head = _make_head(method, embedding_dim)
    criterion = _make_loss(method)
    if init_state is not None:
        _load_init_state(encoder, head, init_state)
    encoder.to(dev)
    head.to(dev)
    prox_ref = _prox_reference(encoder, head, prox_mu, init_state is not None)
    if use_cuda:
        encoder.to(memory_format=torch.channels_last)
    params = list(encoder.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    run = {
        "backbone": backbone,
        "spec": spec.to_dict(),
        "embedding_dim": int(embedding_dim),
        "pooling": pooling,
        "region": reg.to_dict(),
        "calibration": calibration,
        "method": method,
        "seed": int(seed),
        "batch_size": int(bs),
        "views": int(views),
        "n": int(n),
        "data_hash": data_hash,
    }
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir is not None else None
    if ckpt_path is not None:  # resume only on the very same volumes
        run["volumes_sha256"] = _volumes_sha256(volumes)
    start_epoch = 0
    # Neither path copies the whole cohort: ``volumes`` may be a memory map (cohortsim
    # train spools a store to one). Lesion boxes are cut (and calibrated) one study at a
    # time; whole volumes are read batch by batch and calibrated on the device with each
    # study's levels, measured once here.
    calib: Tensor | None = None
    int_range: tuple[int, int] | None = None
    if lesion:
        boxes, centres_digest = _lesion_boxes(
            volumes, spec, reg, rois, margin, calibrate=calibration == "tissue"
        )
        run["roi_centres"] = centres_digest
        data = torch.from_numpy(boxes)
    elif calibration == "tissue":
        from encoders.harmonize import calibration_params

        nan = (math.nan, math.nan)
        calib = torch.tensor(
            [calibration_params(np.asarray(v), pad_value=spec.pad_value_hu) or nan
             for v in volumes],
            dtype=torch.float32,
        )
        if volumes.dtype.kind in "iu":
            info = np.iinfo(volumes.dtype)
            int_range = (int(info.min), int(info.max))
    if ckpt_path is not None and (state := _load_checkpoint(ckpt_path, run)) is not None:
        try:
            encoder.load_state_dict(state["encoder"])
            head.load_state_dict(state["head"])
            optimizer.load_state_dict(state["optimizer"])
            gen.set_state(state["generator"])
            start_epoch = int(state["epoch"])
        except (KeyError, RuntimeError, ValueError) as exc:
            raise EncoderError(
                f"training checkpoint {ckpt_path} does not fit this model ({exc}); delete it "
                "to start from scratch"
            ) from exc
    amp = (
        torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        if use_cuda
        else contextlib.nullcontext()
    )
    started = time.monotonic()
    step = start_epoch * steps_per_epoch
    epochs_done = start_epoch
    stopped_note = ""
    out_of_time = False
    last_loss = float("nan")
    encoder.train()
    head.train()
    for epoch in range(start_epoch, epochs):
        perm = torch.randperm(n, generator=gen)
        batches = [perm[i : i + bs] for i in range(0, n, bs)]
        if len(batches[-1]) < 2:
            batches.pop()
        done_in_epoch = 0
        for idx in batches:
            if lesion:
                x = data[idx]
                vs = [augment_fn(_jittered(x, reg.size, margin, gen).to(dev).float(), gen,
                                 augment) for _ in range(views)]
            else:
                x = torch.from_numpy(volumes[idx.numpy()]).to(dev).float()
                if calib is not None:
                    x = _calibrate_batch(x, calib[idx].to(dev), spec.pad_value_hu, int_range)
                vs = [augment_fn(x, gen, augment) for _ in range(views)]
            subsets = [_slice_subset(v.shape[1], train_slices, gen) for v in vs]
            vs = [v if s is None else v[:, s.to(dev)] for v, s in zip(vs, subsets, strict=True)]
            time_fraction = (
                (time.monotonic() - started) / time_budget_s if time_budget_s else 0.0
            )
            for g in optimizer.param_groups:
                g["lr"] = _lr_at(step, total_steps, lr, warmup, time_fraction)
            with amp:
                zs = [head(encoder(v)) for v in vs]
            loss = criterion(*(z.float() for z in zs))
            if prox_ref is not None:
                loss = loss + _prox_term(encoder, head, prox_ref, prox_mu)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            last_loss = float(loss.detach())
            if not math.isfinite(last_loss):
                raise EncoderError(
                    f"training diverged (loss {last_loss} at step {step}); lower lr or check "
                    "the input volumes"
                )
            if progress is not None:
                progress(step, total_steps, last_loss)
            done_in_epoch += 1
            if time_budget_s is not None and time.monotonic() - started > time_budget_s:
                out_of_time = True
                break
        if done_in_epoch < len(batches):  # cut short by the time budget
            stopped_note = (
                f"stopped by time budget ({time_budget_s:g} s) after step {step} of "
                f"{total_steps} ({epochs_done} full epochs of {epochs})"
            )
            break
        epochs_done = epoch + 1
        if ckpt_path is not None:
            _save_checkpoint(
                ckpt_path,
                {
                    "run": run,
                    "epoch": epochs_done,
                    "encoder": encoder.state_dict(),
                    "head": head.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "generator": gen.get_state(),
                },
            )
        if out_of_time:
            if epochs_done < epochs:
                stopped_note = (
                    f"stopped by time budget ({time_budget_s:g} s) after {epochs_done} of "
                    f"{epochs} epochs"
                )
            break

    encoder.eval()
    if use_cuda:
        encoder.to(memory_format=torch.contiguous_format)
    if state_out is not None:
        state_out["encoder"] = {k: v.detach().cpu() for k, v in encoder.state_dict().items()}
        state_out["head"] = {k: v.detach().cpu() for k, v in head.state_dict().items()}
    notes = [f"{method}, {steps_per_epoch} steps/epoch, batch {bs}, {views} views, lr {lr:g}"]
    if calibration != "none":
        notes.append(f"HU calibration {calibration}")
    if lesion:
        notes.append(f"lesion boxes {'x'.join(map(str, reg.size))} voxels, jitter {'x'.join(map(str, margin))}")
    if train_slices is not None and train_slices < encoder.input_shape[0]:
        notes.append(f"{train_slices} of {encoder.input_shape[0]} slices per view")
    if start_epoch:
        notes.append(f"resumed at epoch {start_epoch}")
    if stopped_note:
        notes.append(stopped_note)
    if math.isfinite(last_loss):
        notes.append(f"final loss {last_loss:.4f}")
    card = EncoderCard.for_encoder(
        encoder,
        method=method,
        data_hash=data_hash,
        epochs=epochs_done,
        seed=int(seed),
        notes="; ".join(notes),
    )
    return encoder, card


# --------------------------------------------------------------------------- federated rounds


def _load_init_state(
    encoder: nn.Module, head: nn.Module, init_state: Mapping[str, Mapping[str, Tensor]]
) -> None:
    """Load ``init_state`` (``{"encoder": ..., "head": ...}``, each a full state dict)."""
    try:
        encoder.load_state_dict(dict(init_state["encoder"]))
        head.load_state_dict(dict(init_state["head"]))
    except (KeyError, RuntimeError, TypeError) as exc:
        raise EncoderError(
            f"init_state does not fit this encoder and head ({str(exc)[:200]}); it must be "
            "the state of the same backbone, spec, embedding size, pooling and method"
        ) from exc


def _prox_reference(
    encoder: nn.Module, head: nn.Module, mu: float, have_init: bool
) -> list[Tensor] | None:
    """Frozen copies of the starting weights (FedProx's ``w0``), or None when ``mu`` is 0."""
    if not (math.isfinite(mu) and mu >= 0):
        raise EncoderError(f"prox_mu must be a finite number >= 0, got {mu}")
    if mu == 0:
        return None
    if not have_init:
        raise EncoderError("prox_mu needs init_state (the global weights of the round)")
    return [p.detach().clone() for p in (*encoder.parameters(), *head.parameters())]


def _prox_term(encoder: nn.Module, head: nn.Module, ref: list[Tensor], mu: float) -> Tensor:
    """FedProx's proximal term ``mu / 2 * sum ||w - w0||^2`` (a scalar tensor)."""
    params = (*encoder.parameters(), *head.parameters())
    sq = sum(((p.float() - r.float()) ** 2).sum() for p, r in zip(params, ref, strict=True))
    return (mu / 2.0) * sq  # type: ignore[return-value]
