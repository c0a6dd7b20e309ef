"""Flower ServerApp and ClientApp of federated encoder training (``cohortsim federate``).

Deployment mode: ``cohortsim federate server`` starts a SuperLink and submits a Flower App
whose components are :data:`server_app` and :data:`client_app`; each site runs
``cohortsim federate site --store STORE`` (a SuperNode whose node config names the
store). Every round the ServerApp sends the global weights (:mod:`encoders.federated`)
and the encoder spec; each site checks the spec against its store, trains the existing
self-supervised objective (:func:`encoders.train.train_ssl`, FedProx's proximal term
when asked) for the round's local epochs on its own volumes, and replies with weight
arrays and scalar metrics only (studies trained on, loss, its pseudonymous site id).

The server keeps a round's average only when at least ``min-replies`` sites answered
within ``round-timeout`` seconds (a site that drops out mid-round costs its update, not
the run), and at the end saves one encoder with its card (``provenance``: the sites,
rounds, strategy) and ``federation.json`` (per-round replies, bytes and seconds).

Imports ``flwr`` (the optional extra ``cohortsim[federated]``).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, FedProx

from encoders import federated as fed

log = logging.getLogger("cohortsim.federate")

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
LOCAL_NORM = "cohortsim-local-norm"  # context.state key of a site's FedBN layers
SUMMARY_FILE = "federation.json"


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """A Flower ArrayRecord of named numpy arrays (order kept)."""
    # np.array, not np.ascontiguousarray: that would turn 0-d counters into shape (1,)
    return ArrayRecord({k: Array(np.array(v, order="C")) for k, v in arrays.items()})


def _numpy(record: Any) -> dict[str, np.ndarray]:
    """The named arrays of an ArrayRecord."""
    return {k: v.numpy() for k, v in record.items()}


# --------------------------------------------------------------------------- site


client_app = ClientApp()


def _site_pseudonym(node_config: dict[str, Any], fallback: str) -> str:
    """The site's keyed pseudonym of its name (its own secret: $COHORTSIM_SITE_SECRET
    or the secret file, as for patients)."""
    from encoders.deid import Pseudonymizer

    secret_file = str(node_config.get("secret-file", "") or "")
    pseudo = Pseudonymizer.from_env_or_file(Path(secret_file) if secret_file else None)
    name = str(node_config.get("site-name", "") or "") or fallback
    return pseudo.site(name)


def train_at_site(msg: Message, context: Context) -> Message:
    """One round at a site: check the spec, train from the global weights, reply with
    weights and scalar metrics only (see the module docstring)."""
    from encoders.train import train_ssl
    from indexing.ingest import store_spec
    from indexing.store import CohortStore

    cfg: Any = msg.content[CONFIG]
    spec = fed.parse_encoder_spec(str(cfg["encoder-spec"]))
    store_path = str(context.node_config.get("store", ""))
    if not store_path:
        raise fed.FederationError("this SuperNode has no store (node config 'store')",
                                  reason="bad_config")
    cohort = CohortStore(Path(store_path))
    held = store_spec(cohort)
    fed.check_site_spec(held, spec)  # before anything is trained or sent

    rnd = int(cfg["server-round"])
    fedbn, final = bool(cfg["fedbn"]), rnd >= int(cfg["rounds"])
    encoder, head = fed.initial_model(spec, seed=int(cfg["seed"]))
    like = {"encoder": encoder.state_dict(), "head": head.state_dict()}
    incoming = _numpy(msg.content[ARRAYS])
    if fedbn and LOCAL_NORM in context.state:  # this site's own normalisation layers
        incoming.update(_numpy(context.state[LOCAL_NORM]))
    start = fed.state_from_arrays(incoming, like)

    site_names = sorted({str(s) for s in cohort.studies(columns=["site"])["site"].to_pylist()})
    site_id = _site_pseudonym(dict(context.node_config), ",".join(site_names) or store_path)
    losses: list[float] = []
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix=".federate-", dir=cohort.root) as spool:
        _uids, volumes = cohort.spool_volumes(Path(spool) / "volumes.npy")
        n = int(volumes.shape[0])
        train_ssl(
            volumes,
            backbone=str(spec["backbone"]),
            spec=held,
            embedding_dim=int(spec["embedding_dim"]),
            method=str(spec["method"]),
            pooling=str(spec["pooling"]),
            region=fed.RegionSpec.from_dict(dict(spec["region"])),
            calibration=str(spec["calibration"]),
            epochs=int(cfg["local-epochs"]),
            batch_size=min(int(cfg["batch-size"]), n),
            lr=float(cfg["lr"]),
            views=int(cfg["views"]) or None,
            seed=int(cfg["seed"]) * 1000 + rnd,
            device=str(context.node_config.get("device", "cpu") or "cpu"),
            init_state=start,
            prox_mu=float(cfg.get("proximal-mu", 0.0)),
            state_out=out,
            progress=lambda _s, _t, loss: losses.append(loss),
        )
        del volumes  # the memory map, before its file goes
    arrays = fed.model_arrays(out)
    norm = fed.norm_keys(encoder, head)
    if fedbn:
        context.state[LOCAL_NORM] = _record({k: v for k, v in arrays.items() if k in norm})
    keys = fed.sent_keys(list(arrays), norm, fedbn=fedbn, final=final)
    reply = RecordDict({
        ARRAYS: _record({k: arrays[k] for k in keys}),
        METRICS: MetricRecord({
            "num-examples": n,
            "train-loss": float(losses[-1]) if losses else float("nan"),
            "site-id": fed.site_number(site_id),
        }),
    })
    return Message(content=reply, reply_to=msg)


client_app.train()(train_at_site)


# --------------------------------------------------------------------------- server


class _Rounds:
    """What the strategy saw each round (for the card and federation.json)."""

    def __init__(self) -> None:
        self.sites: dict[str, int] = {}
        self.rounds: list[dict[str, Any]] = []
        self.completed = 0


def _make_strategy(kind: str, *, min_sites: int, min_replies: int, mu: float,
                   seen: _Rounds) -> FedAvg:
    base: type[FedAvg] = FedProx if kind == "fedprox" else FedAvg

    class SiteAware(base):  # type: ignore[valid-type, misc]
        """FedAvg / FedProx that keeps the whole model across rounds (FedBN sites send
        only part of it), averages only rounds with ``min_replies`` answers, and notes
        the sites and bytes of each round."""

        def __init__(self, **kw: Any) -> None:
            super().__init__(**kw)
            self.current: dict[str, np.ndarray] = {}
            self.sent_bytes = 0
            self.t0 = time.monotonic()

        def configure_train(self, server_round: int, arrays: ArrayRecord,
                            config: ConfigRecord, grid: Grid) -> Iterable[Message]:
            self.current = _numpy(arrays)
            msgs = list(super().configure_train(server_round, arrays, config, grid))
            self.sent_bytes = len(msgs) * sum(a.nbytes for a in self.current.values())
            self.t0 = time.monotonic()
            return msgs

        def aggregate_train(self, server_round: int, replies: Iterable[Message]
                            ) -> tuple[ArrayRecord | None, MetricRecord | None]:
            replies = list(replies)
            ok = [m for m in replies if not m.has_error()]
            failed = [(m.error.reason or "")[:200] for m in replies if m.has_error()]
            entry: dict[str, Any] = {
                "round": server_round, "replies": len(ok), "failures": failed,
                "bytes_sent": int(self.sent_bytes), "seconds": round(time.monotonic() - self.t0, 1),
            }
            updates, weights, metrics = [], [], []
            for m in ok:
                arr = _numpy(m.content[ARRAYS])
                met: Any = m.content[METRICS]
                updates.append(arr)
                weights.append(float(met["num-examples"]))
                metrics.append(met)
            entry["bytes_received"] = int(sum(a.nbytes for u in updates for a in u.values()))
            seen.rounds.append(entry)
            if len(ok) < min_replies:
                log.warning("round %d: %d replies (< %d); keeping the previous weights",
                            server_round, len(ok), min_replies)
                entry["kept_previous"] = True
                return _record(self.current), None
            avg = fed.weighted_average(updates, weights)
            merged = dict(self.current)
            for k, v in avg.items():  # back to each weight's own dtype
                merged[k] = v.astype(self.current[k].dtype) if k in self.current else v
            seen.completed += 1
            for met in metrics:
                sid = fed.site_pseudonym(int(met["site-id"]))
                seen.sites[sid] = seen.sites.get(sid, 0) + 1
            total = sum(weights)
            loss = sum(w * float(mr["train-loss"]) for w, mr in zip(weights, metrics, strict=True))
            agg = MetricRecord({"num-examples": int(total), "train-loss": loss / total})
            entry["train_loss"] = round(loss / total, 4)
            return _record(merged), agg

    kw: dict[str, Any] = dict(fraction_train=1.0, fraction_evaluate=0.0,
                              min_train_nodes=min_sites, min_available_nodes=min_sites)
    if kind == "fedprox":
        kw["proximal_mu"] = mu
    return SiteAware(**kw)


server_app = ServerApp()


def run_federation(grid: Grid, context: Context) -> None:
    """The ServerApp: rounds of the chosen strategy, then the encoder and its card in
    ``out-dir`` (run config keys as written by :mod:`service.federate`)."""
    import flwr

    from encoders.model import save_encoder

    rc: Any = context.run_config
    spec = fed.parse_encoder_spec(str(rc["encoder-spec"]))
    strategy_name = str(rc["strategy"])
    if strategy_name not in fed.STRATEGIES:
        raise fed.FederationError(f"strategy must be one of {fed.STRATEGIES}",
                                  reason="bad_config")
    rounds, fedbn = int(rc["rounds"]), bool(rc["fedbn"])
    mu = float(rc["proximal-mu"]) if strategy_name == "fedprox" else 0.0
    seed = int(rc["seed"])
    encoder, head = fed.initial_model(spec, seed=seed)
    like = {"encoder": encoder.state_dict(), "head": head.state_dict()}
    seen = _Rounds()
    strategy = _make_strategy(strategy_name, min_sites=int(rc["min-sites"]),
                              min_replies=int(rc["min-replies"]), mu=mu, seen=seen)
    train_config = ConfigRecord({
        "encoder-spec": json.dumps(spec), "rounds": rounds, "fedbn": fedbn, "seed": seed,
        "local-epochs": int(rc["local-epochs"]), "batch-size": int(rc["batch-size"]),
        "lr": float(rc["lr"]), "views": int(rc["views"]),
    })
    started = time.monotonic()
    result = strategy.start(
        grid=grid,
        initial_arrays=_record(fed.model_arrays(like)),
        num_rounds=rounds,
        timeout=float(rc["round-timeout"]),
        train_config=train_config,
    )
    arrays = _numpy(result.arrays)
    state = fed.state_from_arrays(arrays, like)
    encoder.load_state_dict(state["encoder"])
    encoder.eval()
    card = fed.federated_card(
        encoder, method=str(spec["method"]), sites=seen.sites, rounds=rounds,
        rounds_completed=seen.completed, strategy=strategy_name,
        local_epochs=int(rc["local-epochs"]), fedbn=fedbn, proximal_mu=mu, seed=seed,
        framework=f"flwr {flwr.__version__}",
    )
    out_dir = Path(str(rc["out-dir"]))
    card = save_encoder(encoder, card, out_dir) or card
    summary = {
        "encoder_version": _saved_version(out_dir),
        "strategy": strategy_name, "fedbn": fedbn, "proximal_mu": mu,
        "rounds": rounds, "rounds_completed": seen.completed,
        "sites": sorted(seen.sites), "per_round": seen.rounds,
        "seconds": round(time.monotonic() - started, 1),
    }
    (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")


def _saved_version(out_dir: Path) -> str:
    return str(json.loads((out_dir / "card.json").read_text()).get("version", ""))


server_app.main()(run_federation)
