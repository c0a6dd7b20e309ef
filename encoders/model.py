"""The study encoder: a 2D timm backbone on 2.5D CT slices, pooled into one study vector.

In the style of timm, the configuration travels with the model: every encoder is described
by an :class:`EncoderCard` (backbone name, input spec, embedding size, pooling, training
provenance) that is written next to the weights, so loading never needs hand-typed
settings.

Pipeline of :class:`StudyEncoder` (callers pass HU, nothing else)::

    volumes (n, D, H, W) HU
      -> calibration (optional, ``calibration="tissue"``): each study's HU mapped so that
         its outside air is -1000 and its soft tissue +40 (encoders.harmonize.calibrate_hu)
      -> region: the whole volume, or (``region="lesion"``) a fixed box of ``roi_size``
         voxels centred on the lesion (given as a box / mask, or proposed by
         :func:`encoders.roi.propose_lesion`), resized in-plane to ``roi_px``  (embed)
      -> each slice becomes a C-channel image, one channel per HU window of the spec
         (centre, width) mapped to [0, 1], then standardised to [-1, 1]
      -> timm backbone (no classifier, no downloaded weights)   (b*D, f)
      -> pool over slices (mean, or gated attention)            (b, f)
      -> linear neck                                            (b, embedding_dim)

``embed`` is the only place where embeddings are L2-normalised.

Why a lesion region: a lesion fills < 1 % of a chest volume, so a whole-volume embedding
is dominated by body size, anatomy and scanner; the retrieval evaluation
(``encoders.evaluate``, ``benchmarks/RESULTS.md``) measures the difference.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from encoders.errors import EncoderError, EncoderOutOfMemoryError
from encoders.roi import DEFAULT_PROPOSAL, FIRST_PROPOSAL, PROPOSALS
from encoders.spec import DEFAULT_SPEC, InputSpec

__all__ = [
    "CALIBRATIONS",
    "CARD_FILE",
    "POOLINGS",
    "REGIONS",
    "WEIGHTS_FILE",
    "CutRegion",
    "EncoderCard",
    "GatedAttentionPool",
    "RegionSpec",
    "StudyEncoder",
    "create_encoder",
    "embed",
    "embedded_regions",
    "lesion_boxes",
    "list_encoders",
    "load_encoder",
    "region_rois",
    "resolve_device",
    "save_encoder",
    "slice_projections",
    "weights_version",
]

_log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "card.json"
POOLINGS = ("mean", "attention")
REGIONS = ("whole", "lesion")
CALIBRATIONS = ("none", "tissue")

# Backbones checked to build and train at 64 x 64 px with 3 input channels on CPU.
# Any other timm model name works too (``timm.list_models()``), as long as it accepts
# 64 px inputs; these are the ones we vouch for.
_CURATED_BACKBONES = (
    "resnet10t",  # default: small, fast on CPU, good at 64 px
    "test_resnet",  # tiny (0.4 M params): unit tests and smoke runs
    "resnet18",
    "convnext_atto",
    "efficientnet_b0",
)

# Windowed intensities in [0, 1] are standardised to [-1, 1]: (x - 0.5) / 0.5.
_NORM_MEAN = 0.5
_NORM_STD = 0.5


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Turn ``"auto" | "cpu" | "cuda" | "cuda:N"`` into a usable :class:`torch.device`.

    ``"auto"`` picks CUDA when available, else CPU. Asking for CUDA on a machine without
    it raises :class:`EncoderError` (instead of failing later inside torch).
    """
    if isinstance(device, torch.device):
        dev = device
    else:
        name = str(device).strip().lower()
        if name == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            dev = torch.device(name)
        except RuntimeError as exc:
            raise EncoderError(f"unknown device {device!r}: use 'auto', 'cpu' or 'cuda'") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EncoderError(
            f"device {str(device)!r} was requested but CUDA is not available on this machine "
            "(torch built without CUDA, or no GPU visible): use device='cpu' or 'auto'"
        )
    if dev.type not in ("cpu", "cuda"):
        raise EncoderError(f"unsupported device {str(device)!r}: use 'auto', 'cpu' or 'cuda'")
    return dev


def list_encoders() -> list[str]:
    """Backbones known to work at 64 px (the first is the default).

    Any name from ``timm.list_models()`` can be passed to :func:`create_encoder`; this list
    is only the curated subset that is tested with the default :class:`InputSpec`.
    """
    return list(_CURATED_BACKBONES)


# --------------------------------------------------------------------------- region


LESION_BOX_MM: tuple[float, float, float] = (24.0, 48.0, 48.0)
#: The lesion box on a detail patch (the whole-study grid): 16 x 32 x 32 mm, 8 x 32 x 32
#: voxels at the patch's 2 x 1 x 1 mm, i.e. the lesion's own scale (lesions 12-44 mm
#: across) rather than its surroundings. On real anatomy the 24 x 48 x 48 mm box is mostly
#: chest wall, vessels and mediastinum, which differ from patient to patient and swamp the
#: lesion: untrained HU histograms of the patch centre tell the phenotypes apart (P@10
#: 0.52) where those of the 24 x 48 x 48 mm box barely do (0.30), and the lesion encoder
#: on the smaller box gains 0.10-0.13 P@10 (benchmarks/RESULTS.md, issue #18, session 9).
#: A large lesion fills the box (size stays visible: the box is the same millimetres for
#: every study). The legacy grid (4 mm) keeps :data:`LESION_BOX_MM`.
LESION_PATCH_BOX_MM: tuple[float, float, float] = (16.0, 32.0, 32.0)


@dataclass(frozen=True)
class RegionSpec:
    """What part of a study the encoder looks at (stored in the card).

    ``mode="whole"``: the whole preprocessed volume. ``mode="lesion"``: a box of
    ``size`` (depth, height, width) voxels of the input grid centred on the lesion,
    resized in-plane to ``px`` x ``px`` pixels before the backbone (the default 6 x 12 x 12
    voxels is 24 x 48 x 48 mm at 4 mm spacing; :meth:`for_spec` gives the same millimetres
    on any grid, 16 x 32 x 32 mm on detail patches). ``proposal`` names the centre proposal
    used when the caller gives no box or mask (:data:`encoders.roi.PROPOSALS`; an encoder
    keeps the one it was trained with).
    """

    mode: str = "whole"
    size: tuple[int, int, int] = (6, 12, 12)
    px: int = 32
    proposal: str = DEFAULT_PROPOSAL

    def __post_init__(self) -> None:
        if self.mode not in REGIONS:
            raise EncoderError(f"region must be one of {REGIONS}, got {self.mode!r}")
        if self.proposal not in PROPOSALS:
            raise EncoderError(
                f"unknown lesion proposal {self.proposal!r} (this version knows "
                f"{sorted(PROPOSALS)}); the encoder was saved by a newer cohortsim"
            )
        if len(self.size) != 3 or any(int(v) < 1 for v in self.size):
            raise EncoderError(f"region size must be 3 positive voxel counts, got {self.size}")
        if int(self.px) < 8:
            raise EncoderError(f"region px must be >= 8, got {self.px}")

    def to_dict(self) -> dict[str, Any]:
        if self.mode == "whole":
            return {"mode": "whole"}
        return {"mode": self.mode, "size": [int(v) for v in self.size], "px": int(self.px),
                "proposal": self.proposal}

    @classmethod
    def for_spec(cls, mode: str | None, spec: InputSpec) -> RegionSpec:
        """The default region of ``mode`` on ``spec``'s grid: a lesion box of
        :data:`LESION_BOX_MM` (24 x 48 x 48 mm) on the legacy grid and of
        :data:`LESION_PATCH_BOX_MM` (16 x 32 x 32 mm) on detail patches, whatever the
        spacing, so a finer grid sees the same anatomy in more voxels."""
        if (mode or "whole") != "lesion":
            return cls(mode=mode or "whole")
        grid = spec.patch_spacing_mm if spec.has_patches else spec.spacing_mm
        box_mm = LESION_PATCH_BOX_MM if spec.has_patches else LESION_BOX_MM
        size = tuple(max(1, round(b / float(s))) for b, s in zip(box_mm, grid, strict=True))
        if spec.has_patches:  # never larger than the stored patch
            size = tuple(min(a, int(p)) for a, p in zip(size, spec.patch_shape, strict=True))
        return cls(mode="lesion", size=size)  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls, d: dict[str, Any] | str | None) -> RegionSpec:
        if d is None:
            return cls()
        if isinstance(d, str):
            return cls(mode=d)
        if not isinstance(d, dict):
            raise EncoderError(f"region must be a JSON object or a mode name, got {d!r}")
        default = cls()
        mode = str(d.get("mode", "whole"))
        # a lesion card written before the proposal was named used the first one
        legacy = FIRST_PROPOSAL if mode == "lesion" else default.proposal
        return cls(
            mode=mode,
            size=tuple(int(v) for v in d.get("size", default.size)),  # type: ignore[arg-type]
            px=int(d.get("px", default.px)),
            proposal=str(d.get("proposal", legacy)),
        )


def lesion_boxes(
    volumes: np.ndarray,
    rois: Sequence[Any] | None,
    size: Sequence[int],
    *,
    spec: InputSpec,
    proposal: str = DEFAULT_PROPOSAL,
    calibrate: bool = False,
) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """``(n,) + size`` boxes of ``volumes`` ``(n, D, H, W)`` centred on each study's lesion,
    and the centres (voxels). ``rois`` gives one region per study (box, mask,
    :class:`encoders.roi.Roi` or ``None`` = proposed by ``proposal``); with ``calibrate``
    each study is HU-calibrated (:func:`encoders.harmonize.calibrate_hu`) before the
    proposal. One study is read at a time, so ``volumes`` may be a memory map."""
    from encoders.harmonize import calibrate_hu
    from encoders.roi import Roi, crop_around, rois_for

    n = volumes.shape[0]
    given = [None] * n if rois is None else list(rois)
    if len(given) != n:
        raise EncoderError(f"rois must have one entry per volume ({n}), got {len(given)}")
    boxes = np.empty((n, *(int(v) for v in size)), dtype=volumes.dtype)
    centres = []
    for i in range(n):
        vol = np.asarray(volumes[i])
        if calibrate:
            vol = calibrate_hu(vol, pad_value=spec.pad_value_hu)
        if spec.has_patches and given[i] is None:  # a detail patch is centred on its region
            r = Roi(centre=tuple(int(s) // 2 for s in vol.shape), source="centre")  # type: ignore[arg-type]
        else:
            sp = spec.patch_spacing_mm if spec.has_patches else spec.spacing_mm
            r = rois_for(vol[None], [given[i]], spacing_mm=sp, proposal=proposal)[0]
        boxes[i] = crop_around(vol, r.centre, tuple(boxes.shape[1:]),
                               pad_value=spec.pad_value_hu)
        centres.append(r.centre)
    return boxes, centres


#: Where an encoder cut its input from one volume: ``(slice_index, (row0, col0, row1,
#: col1), source)``: the axial slice through the region's centre and the region's box on
#: it (half-open voxels, clipped to the volume); ``source`` "reader" (a given box or mask),
#: "proposal" / "centre" (the label-free proposal, or its fallback), "best_slice" (a
#: whole-volume encoder's most representative slice) or "matched_slice" (its slice that
#: matches another study's vector best).
CutRegion = tuple[int, tuple[int, int, int, int], str]


def region_rois(
    encoder: StudyEncoder, volumes: np.ndarray, rois: Sequence[Any] | None = None
) -> list[Any] | None:
    """Lesion encoders: one :class:`encoders.roi.Roi` per volume of ``(n, D, H, W)`` (given
    ones converted, ``None`` entries proposed, HU-calibrated first as :func:`lesion_boxes`
    does). Pass them to :func:`embed` and :func:`embedded_regions` so that the proposal
    runs once per study. Whole-volume encoders: None."""
    if encoder.region.mode != "lesion":
        return None
    from encoders.harmonize import calibrate_hu
    from encoders.roi import Roi, rois_for

    n = volumes.shape[0]
    given = [None] * n if rois is None else list(rois)
    if len(given) != n:
        raise EncoderError(f"rois must have one entry per volume ({n}), got {len(given)}")
    spec = encoder.spec
    out = []
    for i in range(n):
        vol = np.asarray(volumes[i])
        if spec.has_patches and given[i] is None:  # a detail patch is centred on its region
            out.append(Roi(centre=tuple(int(s) // 2 for s in vol.shape), source="centre"))  # type: ignore[arg-type]
            continue
        if encoder.calibration == "tissue":
            vol = calibrate_hu(vol, pad_value=spec.pad_value_hu)
        sp = spec.patch_spacing_mm if spec.has_patches else spec.spacing_mm
        out.append(rois_for(vol[None], [given[i]], spacing_mm=sp,
                            proposal=encoder.region.proposal)[0])
    return out


def embedded_regions(
    encoder: StudyEncoder,
    volumes: np.ndarray,
    rois: Sequence[Any] | None = None,
    *,
    device: str | torch.device = "cpu",
    match: np.ndarray | None = None,
) -> list[CutRegion]:
    """Where ``encoder`` cut its input from each of ``volumes`` ``(n, D, H, W)``, as
    :data:`CutRegion`, for showing the matched region (thumbnails, explanations).

    Lesion encoders: the box :func:`lesion_boxes` crops (same centres: the given ``rois``,
    else the encoder's proposal), on the slice through its centre. Whole-volume encoders
    (one extra forward): the whole slice whose features agree best (cosine) with the
    study's pooled feature, i.e. the slice that weighs most in its embedding; with
    ``match`` ``(n, d)`` (e.g. the best neighbour's vector), the slice whose projection
    through the neck agrees best with it (:func:`slice_projections`): the slice of the
    strongest match, source "matched_slice".
    """
    n, _, h, w = volumes.shape
    found = region_rois(encoder, volumes, rois)
    if found is not None:
        size = encoder.input_shape
        out: list[CutRegion] = []
        for r in found:
            z, y, x = (int(c) for c in r.centre)
            y0, x0 = y - size[1] // 2, x - size[2] // 2
            box = (max(y0, 0), max(x0, 0), min(y0 + size[1], h), min(x0 + size[2], w))
            source = "reader" if r.source in ("box", "mask") else r.source
            out.append((z, box, source))
        return out
    cuts, projections = slice_projections(encoder, volumes, device=device)
    if match is None:
        return cuts
    target = np.asarray(match, np.float32).reshape(n, -1)
    target = target / np.maximum(np.linalg.norm(target, axis=1, keepdims=True), 1e-12)
    agree = np.einsum("nkd,nd->nk", projections, target)  # cosine: both sides unit length
    return [(int(a.argmax()), (0, 0, h, w), "matched_slice") for a in agree]


def slice_projections(
    encoder: StudyEncoder, volumes: np.ndarray, *, device: str | torch.device = "cpu"
) -> tuple[list[CutRegion], np.ndarray]:
    """Whole-volume encoders, one forward per volume of ``(n, D, H, W)``: each volume's
    most representative slice (:data:`CutRegion` "best_slice": the slice whose features
    agree best, cosine, with the pooled feature) and every slice's own embedding direction,
    its features through the neck, L2-normalised: ``(n, D, d)`` float32. A slice's
    projection against another study's vector says how much that slice alone matches it
    (the neck is affine, so with mean pooling the study's vector is the normalised mean
    of these projections before normalisation). Raises for lesion encoders."""
    if encoder.region.mode == "lesion":
        raise EncoderError("slice projections are for whole-volume encoders; lesion encoders cut a box")
    n, depth, h, w = volumes.shape
    dev = torch.device(device)
    cuts: list[CutRegion] = []
    out = np.empty((n, depth, encoder.embedding_dim), np.float32)
    with torch.no_grad():
        for i in range(n):
            inp = torch.as_tensor(np.asarray(encoder.regions(volumes[i : i + 1]), np.float32), device=dev)
            feats = encoder.slice_features(inp)  # (1, D, f)
            pooled = feats.mean(dim=1) if encoder.pool is None else encoder.pool(feats)
            agree = torch.nn.functional.cosine_similarity(feats, pooled[:, None, :], dim=-1)[0]
            cuts.append((int(agree.argmax()), (0, 0, h, w), "best_slice"))
            proj = torch.nn.functional.normalize(encoder.neck(feats)[0].float(), dim=-1)
            out[i] = proj.cpu().numpy()
    return cuts, out


def _region(region: str | RegionSpec | None, spec: InputSpec) -> RegionSpec:
    if isinstance(region, RegionSpec):
        return region
    return RegionSpec.for_spec(region, spec)


# --------------------------------------------------------------------------- card


def _utc_now() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat()


@dataclass
class EncoderCard:
    """Everything needed to rebuild, trust and describe an encoder (stored as card.json).

    ``version`` is a content id ``enc-<12 hex>`` of the weights file; it is filled in by
    :func:`save_encoder` and checked by :func:`load_encoder`. ``epochs`` counts the
    training epochs actually run; ``data_hash`` is an opaque id of the training cohort
    (never patient data).
    """

    backbone: str
    method: str = "none"
    embedding_dim: int = 128
    input: InputSpec = field(default_factory=lambda: DEFAULT_SPEC)
    data_hash: str = ""
    version: str = ""
    created_at: str = field(default_factory=_utc_now)
    epochs: int = 0
    seed: int = 0
    notes: str = ""
    pooling: str = "mean"
    region: RegionSpec = field(default_factory=RegionSpec)
    calibration: str = "none"
    torch_version: str = field(default_factory=lambda: torch.__version__)
    timm_version: str = field(default_factory=lambda: timm.__version__)
    # Where the weights came from beyond one store: a federated run's pseudonymous site
    # ids, rounds and strategy (encoders.federated.federated_card); empty otherwise.
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = self._fields_dict()
        if self.provenance:  # cards of single-store training keep their old form
            d["provenance"] = self.provenance
        return d

    def _fields_dict(self) -> dict[str, Any]:
        return {
            "backbone": self.backbone,
            "method": self.method,
            "embedding_dim": int(self.embedding_dim),
            "input": self.input.to_dict(),
            "pooling": self.pooling,
            "region": self.region.to_dict(),
            "calibration": self.calibration,
            "data_hash": self.data_hash,
            "version": self.version,
            "created_at": self.created_at,
            "epochs": int(self.epochs),
            "seed": int(self.seed),
            "notes": self.notes,
            "torch_version": self.torch_version,
            "timm_version": self.timm_version,
        }

    def to_json(self) -> str:
        """The card as an indented JSON string."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EncoderCard:
        if not isinstance(d, dict):
            raise EncoderError("encoder card must be a JSON object; re-save the encoder")
        missing = [k for k in ("backbone", "embedding_dim", "input") if k not in d]
        if missing:
            raise EncoderError(
                f"encoder card lacks required field(s) {', '.join(missing)}; "
                "re-save the encoder with save_encoder"
            )
        try:
            return cls(
                backbone=str(d["backbone"]),
                method=str(d.get("method", "none")),
                embedding_dim=int(d["embedding_dim"]),
                input=InputSpec.from_dict(d["input"]),
                pooling=str(d.get("pooling", "mean")),
                region=RegionSpec.from_dict(d.get("region")),
                calibration=str(d.get("calibration", "none")),
                data_hash=str(d.get("data_hash", "")),
                version=str(d.get("version", "")),
                created_at=str(d.get("created_at", "")),
                epochs=int(d.get("epochs", 0)),
                seed=int(d.get("seed", 0)),
                notes=str(d.get("notes", "")),
                torch_version=str(d.get("torch_version", "")),
                timm_version=str(d.get("timm_version", "")),
                provenance=dict(d.get("provenance") or {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise EncoderError(
                f"encoder card has an invalid field ({exc}); re-save the encoder"
            ) from exc

    @classmethod
    def from_json(cls, text: str) -> EncoderCard:
        """Parse a card from a JSON string; raises :class:`EncoderError` if it is not one."""
        try:
            d = json.loads(text)
        except (json.JSONDecodeError, TypeError) as exc:
            raise EncoderError(
                f"encoder card is not valid JSON ({exc}); re-save the encoder with "
                "save_encoder or re-train it"
            ) from exc
        return cls.from_dict(d)

    @classmethod
    def for_encoder(cls, encoder: StudyEncoder, **fields: Any) -> EncoderCard:
        """A card describing ``encoder``'s architecture; ``fields`` fill the rest."""
        return cls(
            backbone=encoder.backbone_name,
            embedding_dim=encoder.embedding_dim,
            input=encoder.spec,
            pooling=encoder.pooling,
            region=encoder.region,
            calibration=encoder.calibration,
            **fields,
        )


# --------------------------------------------------------------------------- module


class GatedAttentionPool(nn.Module):
    """Gated attention pooling over slices (Ilse et al., 2018).

    ``forward(x: (b, D, f)) -> (b, f)``: weights ``softmax_D(w^T (tanh(V x) * sigmoid(U x)))``.
    """

    def __init__(self, in_dim: int, hidden: int = 64) -> None:
        super().__init__()
        self.v = nn.Linear(in_dim, hidden)
        self.u = nn.Linear(in_dim, hidden)
        self.w = nn.Linear(hidden, 1)

    def forward(self, x: Tensor) -> Tensor:
        scores = self.w(torch.tanh(self.v(x)) * torch.sigmoid(self.u(x)))  # (b, D, 1)
        attn = torch.softmax(scores.float(), dim=1).to(x.dtype)
        return (attn * x).sum(dim=1)


class StudyEncoder(nn.Module):
    """2.5D study encoder: ``forward(x (b, D, H, W) HU float) -> (b, embedding_dim)``.

    ``x`` is what :meth:`regions` returns: whole volumes (``region.mode == "whole"``) or
    lesion boxes (``"lesion"``; resized in-plane to ``region.px`` here). The output is *not*
    normalised (see :func:`embed`). ``D`` may differ from the spec's depth (training
    encodes random slice subsets); H and W must suit the backbone.
    """

    def __init__(
        self,
        backbone: str = "resnet10t",
        *,
        spec: InputSpec = DEFAULT_SPEC,
        embedding_dim: int = 128,
        pooling: str = "mean",
        region: str | RegionSpec | None = None,
        calibration: str = "none",
    ) -> None:
        super().__init__()
        if calibration not in CALIBRATIONS:
            raise EncoderError(f"calibration must be one of {CALIBRATIONS}, got {calibration!r}")
        if int(embedding_dim) < 1:
            raise EncoderError(f"embedding_dim must be >= 1, got {embedding_dim}")
        if pooling not in POOLINGS:
            raise EncoderError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if spec.in_chans < 1:
            raise EncoderError("the input spec has no HU windows; give at least one")
        try:
            self.backbone = timm.create_model(
                backbone, pretrained=False, in_chans=spec.in_chans, num_classes=0
            )
        except RuntimeError as exc:  # timm: "Unknown model (...)"
            raise EncoderError(
                f"cannot build backbone {backbone!r} ({exc}); pick one of {list_encoders()} "
                "or another name from timm.list_models()"
            ) from exc
        self.backbone_name = backbone
        self.spec = spec
        self.embedding_dim = int(embedding_dim)
        self.pooling = pooling
        self.region = _region(region, spec)
        self.calibration = calibration
        self.num_features: int = int(self.backbone.num_features)  # type: ignore[arg-type]
        self.pool = GatedAttentionPool(self.num_features) if pooling == "attention" else None
        self.neck = nn.Linear(self.num_features, self.embedding_dim)
        centres = torch.tensor([c for c, _ in spec.windows], dtype=torch.float32)
        widths = torch.tensor([w for _, w in spec.windows], dtype=torch.float32)
        if bool((widths <= 0).any()):
            raise EncoderError(f"HU window widths must be > 0, got {spec.windows}")
        # Derived from the spec (stored in the card), so not part of the weights file.
        self.window_lo: Tensor
        self.window_width: Tensor
        self.register_buffer("window_lo", (centres - widths / 2).view(1, 1, -1, 1, 1), False)
        self.register_buffer("window_width", widths.view(1, 1, -1, 1, 1), False)

    @property
    def config(self) -> dict[str, Any]:
        """The architecture description (what a card must agree with)."""
        return {
            "backbone": self.backbone_name,
            "embedding_dim": self.embedding_dim,
            "pooling": self.pooling,
            "region": self.region.to_dict(),
            "calibration": self.calibration,
            "input": self.spec.to_dict(),
        }

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(D, H, W)`` of what :meth:`regions` returns (the spec's shape or the box)."""
        if self.region.mode == "lesion":
            return tuple(int(v) for v in self.region.size)  # type: ignore[return-value]
        return tuple(int(v) for v in self.spec.shape)  # type: ignore[return-value]

    @property
    def stored_shape(self) -> tuple[int, int, int]:
        """``(D, H, W)`` of one study as :func:`embed` takes it: a detail patch
        (``spec.patch_shape``) for a lesion encoder on the whole-study grid, else the
        context volume (``spec.shape``)."""
        if self.region.mode == "lesion" and self.spec.has_patches:
            return tuple(int(v) for v in self.spec.patch_shape)  # type: ignore[return-value]
        return tuple(int(v) for v in self.spec.shape)  # type: ignore[return-value]

    @property
    def input_hint(self) -> str:
        """How to make what :meth:`stored_shape` describes."""
        if self.region.mode == "lesion" and self.spec.has_patches:
            return ("give detail patches: encoders.grid.study_input(study, card.input).patches "
                    "(one per study, e.g. the primary one)")
        return "preprocess studies with encoders.preprocess.preprocess(study, card.input)"

    def regions(
        self, volumes: np.ndarray, rois: Sequence[Any] | None = None
    ) -> np.ndarray:
        """``(n, D, H, W)`` preprocessed volumes -> the encoder's input, ``(n,) +
        input_shape`` (same dtype), HU-calibrated if ``calibration == "tissue"``: the
        volumes themselves, or lesion boxes centred on the
        given ``rois`` (boxes, masks or :class:`encoders.roi.Roi`; ``None`` entries are
        proposed by :func:`encoders.roi.propose_lesion`)."""
        if self.region.mode == "lesion":
            boxes, _ = lesion_boxes(volumes, rois, self.input_shape, spec=self.spec,
                                    proposal=self.region.proposal,
                                    calibrate=self.calibration == "tissue")
            return boxes
        if self.calibration == "tissue":
            from encoders.harmonize import calibrate_hu

            volumes = calibrate_hu(volumes, pad_value=self.spec.pad_value_hu)
        if rois is not None and any(r is not None for r in rois):
            raise EncoderError(
                "this encoder embeds whole volumes (region 'whole'); regions of interest "
                "need an encoder trained with region='lesion'"
            )
        return volumes

    def to_channels(self, volumes: Tensor) -> Tensor:
        """``(b, D, H, W)`` HU -> ``(b, D, C, H, W)`` windowed and standardised."""
        x = volumes.float().unsqueeze(2)
        x = ((x - self.window_lo) / self.window_width).clamp_(0.0, 1.0)
        return (x - _NORM_MEAN) / _NORM_STD

    def slice_features(self, volumes: Tensor) -> Tensor:
        """``(b, D, H, W)`` HU -> backbone features per slice ``(b, D, f)``."""
        if volumes.ndim != 4:
            raise EncoderError(
                f"encoder input must be (batch, depth, height, width), got shape "
                f"{tuple(volumes.shape)}"
            )
        b, d, h, w = volumes.shape
        x = self.to_channels(volumes).reshape(b * d, self.spec.in_chans, h, w)
        if x.is_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.backbone(x).reshape(b, d, -1)

    def forward(self, volumes: Tensor) -> Tensor:
        if self.region.mode == "lesion" and tuple(volumes.shape[-2:]) != (self.region.px,) * 2:
            if volumes.ndim != 4:
                raise EncoderError(
                    f"encoder input must be (batch, depth, height, width), got shape "
                    f"{tuple(volumes.shape)}"
                )
            volumes = torch.nn.functional.interpolate(
                volumes.float(), size=(self.region.px, self.region.px), mode="bilinear",
                align_corners=False,
            )
        feats = self.slice_features(volumes)
        pooled = feats.mean(dim=1) if self.pool is None else self.pool(feats)
        return self.neck(pooled)


def create_encoder(
    backbone: str = "resnet10t",
    *,
    spec: InputSpec = DEFAULT_SPEC,
    embedding_dim: int = 128,
    pooling: str = "mean",
    region: str | RegionSpec | None = None,
    calibration: str = "none",
) -> StudyEncoder:
    """Build a randomly initialised :class:`StudyEncoder` (never downloads weights).

    ``backbone`` is any timm model name (see :func:`list_encoders` for tested ones);
    the number of input channels is ``spec.in_chans`` (one per HU window). ``region`` is
    ``"whole"`` (default), ``"lesion"`` or a :class:`RegionSpec`; ``calibration``
    ``"none"`` (default) or ``"tissue"`` (HU calibrated on air and soft tissue per study).
    """
    return StudyEncoder(
        backbone,
        spec=spec,
        embedding_dim=embedding_dim,
        pooling=pooling,
        region=region,
        calibration=calibration,
    )


# --------------------------------------------------------------------------- embed


def embed(
    encoder: StudyEncoder,
    volumes: np.ndarray,
    *,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    rois: Sequence[Any] | None = None,
    amp: bool = True,
) -> np.ndarray:
    """Embed studies: ``(n, D, H, W)`` int16/float HU -> ``(n, d)`` float32, L2-normalised.

    The shape must match the encoder's ``InputSpec.shape``. For a ``region="lesion"``
    encoder, ``rois`` may give one region per study (a ``(z0, y0, x0, z1, y1, x1)`` voxel
    box, a ``(D, H, W)`` mask, an :class:`encoders.roi.Roi` or ``None`` = propose one);
    the box of ``card.region.size`` voxels around its centre is embedded. Runs in eval
    mode under ``torch.inference_mode`` (the encoder is moved to ``device``; its
    train/eval mode is restored afterwards); on CUDA with ``amp``, in bfloat16 autocast
    and channels-last.

    GPU out of memory never fails the call: the batch is halved and retried (down to one
    study), then the remaining studies are embedded on the CPU (float32, so they differ
    from the GPU's bfloat16 ones by rounding), each step logged as a warning. Only out of
    memory with one study on the CPU raises :class:`EncoderOutOfMemoryError`.
    """
    if not isinstance(volumes, np.ndarray):
        raise EncoderError(f"volumes must be a numpy array, got {type(volumes).__name__}")
    expected = encoder.stored_shape
    if volumes.ndim == 3 and tuple(volumes.shape) == expected:
        hint = "; for a single study use volumes[None]"
    else:
        hint = ""
    if volumes.ndim != 4 or tuple(volumes.shape[1:]) != expected:
        raise EncoderError(
            f"volumes must have shape (n, {', '.join(map(str, expected))}) as set by the "
            f"encoder's input spec, got {tuple(volumes.shape)}: {encoder.input_hint}{hint}"
        )
    if volumes.dtype == np.bool_ or volumes.dtype.kind not in "iuf":
        raise EncoderError(f"volumes must be int16 or float HU values, got dtype {volumes.dtype}")
    if batch_size < 1:
        raise EncoderError(f"batch_size must be >= 1, got {batch_size}")
    if volumes.dtype.kind == "f" and not bool(np.isfinite(volumes).all()):
        raise EncoderError("volumes contain NaN or infinite values; fix the preprocessing")
    dev = resolve_device(device)
    n = volumes.shape[0]
    out = np.empty((n, encoder.embedding_dim), dtype=np.float32)
    if n == 0:
        return out
    given = None if rois is None else list(rois)
    if given is not None and len(given) != n:
        raise EncoderError(f"rois must have one entry per volume ({n}), got {len(given)}")
    was_training = encoder.training
    encoder.eval()
    try:
        dev = _place(encoder, dev)
        start = 0
        # regions are cut (and calibrated) a batch at a time, so embedding a memory-mapped
        # cohort never holds more than one batch of it in memory; ``inputs`` holds those of
        # the studies from ``at`` on (kept when a batch is retried smaller after OOM)
        inputs: np.ndarray | None = None
        at = 0
        while start < n:
            if inputs is None or start >= at + len(inputs):
                at = start
                stop = min(n, start + batch_size)
                inputs = np.ascontiguousarray(encoder.regions(
                    volumes[start:stop], None if given is None else given[start:stop]))
            chunk = inputs[start - at : start - at + batch_size]
            try:
                z = _embed_batch(encoder, chunk, dev, amp=amp)
            except torch.OutOfMemoryError as exc:
                batch_size, dev = _back_off(encoder, batch_size, dev, exc)
                continue  # the same studies again, in smaller batches or on the CPU
            out[start : start + len(chunk)] = z
            start += len(chunk)
    finally:
        encoder.train(was_training)
        if dev.type == "cuda":
            encoder.to(memory_format=torch.contiguous_format)
    return out


def _embed_batch(encoder: StudyEncoder, chunk: np.ndarray, dev: torch.device, *, amp: bool) -> np.ndarray:
    """One batch ``(b, D, H, W)`` -> ``(b, d)`` float32 L2-normalised embeddings."""
    autocast = (
        torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        if dev.type == "cuda" and amp
        else contextlib.nullcontext()
    )
    with torch.inference_mode(), autocast:
        x = torch.from_numpy(chunk).to(dev, dtype=torch.float32)
        z = encoder(x).float()
        z = torch.nn.functional.normalize(z, dim=1, eps=1e-12)
        return z.cpu().numpy()


def _place(encoder: StudyEncoder, dev: torch.device) -> torch.device:
    """Move ``encoder`` to ``dev`` (channels-last on CUDA); the device it ended up on.

    If the weights do not fit on the GPU, the encoder stays on (or returns to) the CPU,
    with a warning, instead of failing."""
    if dev.type != "cuda":
        encoder.to(dev)
        return dev
    try:
        encoder.to(dev)
        encoder.to(memory_format=torch.channels_last)
        return dev
    except torch.OutOfMemoryError:
        _release_cuda()
        _log.warning("CUDA out of memory moving the encoder to %s; embedding on the CPU", dev)
        encoder.to(torch.device("cpu")).to(memory_format=torch.contiguous_format)
        return torch.device("cpu")


def _release_cuda() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _back_off(
    encoder: StudyEncoder, batch_size: int, dev: torch.device, exc: torch.OutOfMemoryError
) -> tuple[int, torch.device]:
    """After an out-of-memory error: half the batch, then (at one study) the CPU.

    Returns the ``(batch_size, device)`` to retry with; out of memory with one study on
    the CPU raises :class:`EncoderOutOfMemoryError`."""
    _release_cuda()
    if batch_size > 1:
        smaller = max(1, batch_size // 2)
        _log.warning(
            "out of memory embedding %d studies at once on %s; retrying in batches of %d",
            batch_size,
            dev,
            smaller,
        )
        return smaller, dev
    if dev.type != "cpu":
        _log.warning("out of memory embedding one study on %s; embedding on the CPU instead", dev)
        return 1, _place(encoder, torch.device("cpu"))
    raise EncoderOutOfMemoryError(
        "out of memory embedding one study on the CPU; free memory or use a smaller encoder "
        "input (InputSpec.shape)"
    ) from exc


# --------------------------------------------------------------------------- save / load


def weights_version(weights_path: Path) -> str:
    """Content id of a weights file: ``enc-`` + first 12 hex of its sha256."""
    h = hashlib.sha256()
    with open(weights_path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "enc-" + h.hexdigest()[:12]


def _check_card_matches(encoder: StudyEncoder, card: EncoderCard) -> None:
    mismatches = [
        f"{name}: card {a!r} vs encoder {b!r}"
        for name, a, b in (
            ("backbone", card.backbone, encoder.backbone_name),
            ("embedding_dim", card.embedding_dim, encoder.embedding_dim),
            ("pooling", card.pooling, encoder.pooling),
            ("region", card.region, encoder.region),
            ("calibration", card.calibration, encoder.calibration),
            ("input", card.input, encoder.spec),
        )
        if a != b
    ]
    if mismatches:
        raise EncoderError(
            "the card does not describe this encoder (" + "; ".join(mismatches) + "); "
            "build the card with EncoderCard.for_encoder(encoder, ...)"
        )


def _write_atomic(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def save_encoder(encoder: StudyEncoder, card: EncoderCard, out_dir: Path | str) -> EncoderCard:
    """Write ``out_dir/model.safetensors`` and ``out_dir/card.json``; returns the card.

    ``card.version`` is set (in place) to the weights' content id if it is empty; a
    non-empty version that does not match the weights raises :class:`EncoderError`.
    """
    _check_card_matches(encoder, card)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in encoder.state_dict().items()}
    weights = out / WEIGHTS_FILE
    # the architecture (region and input spec included) is stored inside the weights file,
    # so it is covered by the content id and a card edited afterwards is caught on load
    # (one key only: safetensors does not keep the order of metadata keys, and the file
    # must be byte-identical for identical weights)
    meta = {"cohortsim_config": json.dumps(encoder.config, sort_keys=True)}
    _write_atomic(weights, lambda p: save_file(tensors, str(p), metadata=meta))
    version = weights_version(weights)
    if not card.version:
        card.version = version
    elif card.version != version:
        raise EncoderError(
            f"card.version {card.version!r} does not match the weights ({version}); the "
            "weights changed since the card was made: clear card.version to re-derive it"
        )
    _write_atomic(out / CARD_FILE, lambda p: p.write_text(card.to_json(), encoding="utf-8"))
    return card


def load_encoder(
    model_dir: Path | str, *, device: str | torch.device = "cpu"
) -> tuple[StudyEncoder, EncoderCard]:
    """Load an encoder written by :func:`save_encoder`, in eval mode on ``device``.

    Raises :class:`EncoderError` when files are missing or corrupt, when the weights'
    content id differs from ``card.version``, or when the weights do not fit the
    architecture the card describes.
    """
    root = Path(model_dir)
    card_path, weights_path = root / CARD_FILE, root / WEIGHTS_FILE
    if not root.is_dir():
        raise EncoderError(
            f"encoder folder {root} does not exist: pass the folder written by "
            "save_encoder (or `cohortsim train`)"
        )
    if not card_path.is_file():
        raise EncoderError(
            f"{card_path} is missing: the folder is not a saved encoder, or was copied "
            "incompletely; re-copy it or re-save the encoder"
        )
    if not weights_path.is_file():
        raise EncoderError(
            f"{weights_path} is missing: the encoder folder was copied incompletely; "
            "re-copy it or re-train the encoder"
        )
    try:
        text = card_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise EncoderError(f"cannot read {card_path} ({exc}); re-save the encoder") from exc
    try:
        card = EncoderCard.from_json(text)
    except EncoderError as exc:
        raise EncoderError(f"{card_path}: {exc}") from exc
    actual = weights_version(weights_path)
    if card.version != actual:
        raise EncoderError(
            f"{weights_path} has content id {actual} but the card says "
            f"{card.version or '(none)'}: the weights were modified or belong to another "
            "encoder; restore the original folder or re-save the encoder"
        )
    try:
        encoder = create_encoder(
            card.backbone,
            spec=card.input,
            embedding_dim=card.embedding_dim,
            pooling=card.pooling,
            region=card.region,
            calibration=card.calibration,
        )
    except EncoderError as exc:
        raise EncoderError(f"{card_path}: {exc}") from exc
    try:
        state = load_file(str(weights_path))
        with safe_open(str(weights_path), framework="pt") as f:
            stored = (f.metadata() or {}).get("cohortsim_config")
    except (SafetensorError, OSError, ValueError) as exc:
        raise EncoderError(
            f"{weights_path} is not a readable safetensors file ({exc}); re-copy or "
            "re-save the encoder"
        ) from exc
    if stored is not None and json.loads(stored) != json.loads(
        json.dumps(encoder.config, sort_keys=True)
    ):
        raise EncoderError(
            f"{card_path} does not fit the architecture stored with the weights ({stored}); "
            "the card was edited or belongs to other weights: re-save the encoder"
        )
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0:3]
        raise EncoderError(
            f"{weights_path} does not fit the architecture in the card (backbone "
            f"{card.backbone!r}, embedding_dim {card.embedding_dim}, pooling "
            f"{card.pooling!r}): {' '.join(first)}; the card was edited or belongs to "
            "other weights: re-save the encoder"
        ) from exc
    encoder.to(resolve_device(device)).eval()
    return encoder, card
