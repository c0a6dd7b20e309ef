"""Federated training pieces that need no federation framework (:mod:`service.flower_apps`
wires them into Flower).

A site and the coordinator exchange one thing: the weights of the encoder and its
projection head as a flat mapping ``"encoder.<param>" / "head.<param>" -> np.ndarray``
(:func:`model_arrays`, :func:`state_from_arrays`). With FedBN the normalisation layers'
weights and running statistics (:func:`norm_keys`) stay at each site during training,
since sites differ by scanner and those layers absorb scanner-level intensity
statistics; in the last round every site sends them too, and the one shared encoder
gets their weighted average (one encoder version for every site's index).

A site checks the coordinator's encoder spec against its store before it trains
(:func:`check_site_spec`), and names itself by a keyed pseudonym
(:meth:`encoders.deid.Pseudonymizer.site`). :func:`federated_card` records the sites,
rounds and strategy in the encoder card's ``provenance``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from encoders.errors import EncoderError
from encoders.model import EncoderCard, RegionSpec, StudyEncoder, create_encoder
from encoders.spec import InputSpec

__all__ = [
    "STRATEGIES",
    "FederationError",
    "check_site_spec",
    "encoder_spec",
    "federated_card",
    "initial_model",
    "model_arrays",
    "norm_keys",
    "sent_keys",
    "site_number",
    "state_from_arrays",
    "weighted_average",
]

STRATEGIES = ("fedavg", "fedprox")
# Module types whose parameters and buffers FedBN keeps local: every torch normalisation
# layer (timm's BatchNormAct2d / LayerNorm2d subclass these).
_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
)


class FederationError(EncoderError):
    """A federated round cannot go on at this site; ``reason`` is a snake_case code
    (``spec_mismatch``, ``bad_update``, ``bad_config``)."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


# --------------------------------------------------------------------------- the spec


def encoder_spec(
    *,
    backbone: str,
    spec: InputSpec,
    embedding_dim: int = 128,
    pooling: str = "mean",
    region: str = "whole",
    calibration: str = "none",
    method: str = "simclr",
) -> dict[str, Any]:
    """What every site must train and embed alike, as a JSON-able dict (sent each round)."""
    reg = RegionSpec.for_spec(region, spec)
    return {
        "backbone": backbone,
        "input": spec.to_dict(),
        "embedding_dim": int(embedding_dim),
        "pooling": pooling,
        "region": reg.to_dict(),
        "calibration": calibration,
        "method": method,
    }


def parse_encoder_spec(text: str) -> dict[str, Any]:
    """The dict of :func:`encoder_spec` from its JSON; :class:`FederationError` if bad."""
    try:
        d = json.loads(text)
        InputSpec.from_dict(d["input"])
        RegionSpec.from_dict(d["region"])
        missing = [k for k in ("backbone", "embedding_dim", "pooling", "calibration", "method")
                   if k not in d]
        if missing:
            raise KeyError(", ".join(missing))
    except (TypeError, ValueError, KeyError) as exc:
        raise FederationError(f"the round's encoder spec is not valid ({exc})",
                              reason="bad_config") from exc
    return dict(d)


def check_site_spec(held: InputSpec, wanted: Mapping[str, Any]) -> None:
    """Refuse (``spec_mismatch``) a round whose input spec differs from the store's
    ``held`` one: the site's volumes would not be what the encoder is trained for."""
    want = InputSpec.from_dict(dict(wanted["input"]))
    if want != held:
        raise FederationError(
            f"this site's store holds volumes of {held.spacing_mm} mm, shape {held.shape}, "
            f"windows {held.windows}; the round asks for {want.spacing_mm} mm, shape "
            f"{want.shape}, windows {want.windows}; refusing to train (re-ingest the site "
            "with the federation's spec, or start the federation with this site's spec)",
            reason="spec_mismatch",
        )


# --------------------------------------------------------------------------- weights


def initial_model(spec: Mapping[str, Any], *, seed: int = 0) -> tuple[StudyEncoder, nn.Module]:
    """The seeded encoder and projection head a federation starts from (as
    :func:`encoders.train.train_ssl` initialises them for one store)."""
    from encoders.train import _make_head

    inp = InputSpec.from_dict(dict(spec["input"]))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        encoder = create_encoder(
            str(spec["backbone"]),
            spec=inp,
            embedding_dim=int(spec["embedding_dim"]),
            pooling=str(spec["pooling"]),
            region=RegionSpec.from_dict(dict(spec["region"])),
            calibration=str(spec["calibration"]),
        )
        head = _make_head(str(spec["method"]), int(spec["embedding_dim"]))
    return encoder, head


def model_arrays(state: Mapping[str, Mapping[str, Tensor]]) -> dict[str, np.ndarray]:
    """``{"encoder": sd, "head": sd}`` -> flat ``{"encoder.<k>": array, "head.<k>": ...}``
    (CPU, C-contiguous copies; dtypes kept)."""
    out: dict[str, np.ndarray] = {}
    for part in ("encoder", "head"):
        for k, v in state[part].items():
            out[f"{part}.{k}"] = np.array(v.detach().cpu().numpy(), order="C", copy=True)
    return out


def state_from_arrays(
    arrays: Mapping[str, np.ndarray], like: Mapping[str, Mapping[str, Tensor]]
) -> dict[str, dict[str, Tensor]]:
    """The inverse of :func:`model_arrays`: every key of ``like`` (a full
    ``{"encoder": sd, "head": sd}``) taken from ``arrays`` where present, else from ``like``,
    cast to ``like``'s dtype. Raises ``bad_update`` for an unknown key, a wrong shape or a
    non-finite value."""
    known = {f"{p}.{k}" for p in ("encoder", "head") for k in like[p]}
    unknown = sorted(set(arrays) - known)
    if unknown:
        raise FederationError(f"update holds unknown weights {unknown[:3]}", reason="bad_update")
    out: dict[str, dict[str, Tensor]] = {"encoder": {}, "head": {}}
    for part in ("encoder", "head"):
        for k, ref in like[part].items():
            a = arrays.get(f"{part}.{k}")
            if a is None:
                out[part][k] = ref.detach().cpu().clone()
                continue
            arr = np.asarray(a)
            if tuple(arr.shape) != tuple(ref.shape):
                raise FederationError(
                    f"update weight {part}.{k} has shape {arr.shape}, expected {tuple(ref.shape)}",
                    reason="bad_update",
                )
            if arr.dtype.kind == "f" and not bool(np.isfinite(arr).all()):
                raise FederationError(f"update weight {part}.{k} is not finite",
                                      reason="bad_update")
            t = torch.from_numpy(np.array(arr, copy=True))
            if not ref.dtype.is_floating_point:  # counters (num_batches_tracked)
                t = torch.round(t.double())
            out[part][k] = t.to(ref.dtype)
    return out


def norm_keys(encoder: nn.Module, head: nn.Module) -> set[str]:
    """Flat keys (``"encoder.<k>"``, ``"head.<k>"``) of every normalisation layer's
    parameters and buffers: what FedBN keeps at the site."""
    keys: set[str] = set()
    for part, module in (("encoder", encoder), ("head", head)):
        for name, mod in module.named_modules():
            if isinstance(mod, _NORM_TYPES):
                prefix = f"{part}.{name}." if name else f"{part}."
                keys.update(prefix + k for k in mod.state_dict())
    return keys


def sent_keys(all_keys: Sequence[str], norm: set[str], *, fedbn: bool, final: bool) -> list[str]:
    """The keys a site sends: all of them, except the normalisation layers' under FedBN
    before the last round."""
    if not fedbn or final:
        return list(all_keys)
    return [k for k in all_keys if k not in norm]


def weighted_average(
    updates: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]
) -> dict[str, np.ndarray]:
    """FedAvg of ``updates`` (each the same keys and shapes) with ``weights`` (e.g. the
    studies each site trained on), in float64; ``bad_update`` if the key sets differ."""
    if not updates or len(updates) != len(weights):
        raise FederationError("need one weight per update and at least one update",
                              reason="bad_update")
    w = np.asarray(weights, dtype=np.float64)
    if not (np.isfinite(w).all() and (w >= 0).all() and w.sum() > 0):
        raise FederationError(f"update weights must be >= 0 with a positive sum, got {w}",
                              reason="bad_update")
    keys = set(updates[0])
    if any(set(u) != keys for u in updates[1:]):
        raise FederationError("sites sent different sets of weights in one round",
                              reason="bad_update")
    w = w / w.sum()
    return {k: sum(wi * np.asarray(u[k], dtype=np.float64) for wi, u in zip(w, updates, strict=True))
            for k in updates[0]}


# --------------------------------------------------------------------------- card


def site_number(pseudonym: str) -> int:
    """The integer of a ``site-<15 hex>`` pseudonym (a scalar metric can carry it)."""
    if not pseudonym.startswith("site-") or len(pseudonym) != 20:
        raise FederationError(f"not a site pseudonym: {pseudonym!r}", reason="bad_config")
    return int(pseudonym[5:], 16)


def site_pseudonym(number: int) -> str:
    """The inverse of :func:`site_number`."""
    return f"site-{int(number):015x}"


def federated_card(
    encoder: StudyEncoder,
    *,
    method: str,
    sites: Mapping[str, int],
    rounds: int,
    rounds_completed: int,
    strategy: str,
    local_epochs: int,
    fedbn: bool,
    proximal_mu: float = 0.0,
    seed: int = 0,
    framework: str = "",
    extra: Mapping[str, Any] | None = None,
) -> EncoderCard:
    """The card of a federated encoder: ``provenance`` lists the pseudonymous ``sites``
    (``{site id: rounds it contributed to}``), rounds and strategy; ``data_hash`` is a
    digest of the sorted site ids (no study of any site is named)."""
    if strategy not in STRATEGIES:
        raise FederationError(f"strategy must be one of {STRATEGIES}, got {strategy!r}",
                              reason="bad_config")
    ids = sorted(sites)
    provenance: dict[str, Any] = {
        "federated": True,
        "framework": framework,
        "strategy": strategy,
        "proximal_mu": float(proximal_mu),
        "fedbn": bool(fedbn),
        "rounds": int(rounds),
        "rounds_completed": int(rounds_completed),
        "local_epochs": int(local_epochs),
        "sites": [{"id": s, "rounds": int(sites[s])} for s in ids],
        **dict(extra or {}),
    }
    digest = hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]
    card = EncoderCard.for_encoder(
        encoder,
        method=method,
        data_hash=f"federated-{digest}",
        epochs=int(rounds_completed) * int(local_epochs),
        seed=int(seed),
        notes=(f"federated {strategy}{' + FedBN' if fedbn else ''}, {rounds_completed} of "
               f"{rounds} rounds x {local_epochs} local epochs, {len(ids)} sites"),
    )
    card.provenance = provenance
    return card
