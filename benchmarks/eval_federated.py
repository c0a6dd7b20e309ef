"""Federated vs centralised vs site-alone encoders, scored on every site's held-out queries.

A phantom cohort (`encoders.synth`, real CT DICOM, five simulated scanners) is ingested
and dealt out to three sites by scanner (non-IID: each site sees only its own scanners;
`service.federate.split_store_by_scanner`). At each site a seeded quarter of the patients
are queries (`encoders.evaluate.split_queries`, as `cohortsim eval`); every encoder trains
on reference studies only (self-supervised, no labels), with the lesion encoder of
`cohortsim train` (region lesion, attention pooling, tissue calibration):

- centralised: one `train_ssl` on all sites' reference studies pooled, E epochs;
- site alone: `train_ssl` on that site's reference studies, E epochs;
- federated: R rounds x L local epochs (R * L = E) of FedAvg (optionally FedProx / FedBN),
  run in this process with the functions the Flower apps use (`encoders.federated`,
  `train_ssl(init_state=, prox_mu=, state_out=)`, `weighted_average`; the transport is
  left out: `tests/e2e/test_federate.py` runs the same rounds through a SuperLink).

Each site's queries are searched against that site's own reference studies (each site
indexes its own store): P@k of the phenotype label, scanner excess and kNN C-index with
95 % bootstrap intervals over the query patients (`evaluate_retrieval`, as `cohortsim
eval`), then the mean over sites. Bytes per round: the weight arrays each site receives
and sends. Figures print as ratios to the centralised encoder of the same run.

    nice -n 15 python benchmarks/eval_federated.py --patients 60 --epochs 12 --rounds 6
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


def _sites(root: Path, patients: int, seed: int) -> list[dict[str, Any]]:
    from encoders.deid import Pseudonymizer
    from encoders.evaluate import cohort_columns
    from encoders.synth import synth_cohort
    from indexing.ingest import ingest_folder, read_outcomes
    from indexing.store import CohortStore
    from service.federate import split_store_by_scanner

    synth_cohort(root / "synth", patients=patients, seed=seed)
    pseudo = Pseudonymizer(b"eval-federated-secret-0123456789")
    allst = CohortStore(root / "all", create=True)
    ingest_folder(root / "synth" / "dicom", allst, pseudonymizer=pseudo, site="all", workers=1)
    allst.set_outcomes(read_outcomes(root / "synth" / "outcomes.csv", pseudo))
    sites = []
    for path in split_store_by_scanner(root / "all", [root / f"site{i}" for i in range(3)]):
        st = CohortStore(path)
        uids, vols = st.load_volumes()
        table = {r["study_uid"]: r for r in st.cohort_table().to_pylist()}
        cols = cohort_columns([table[u] for u in uids], label="phenotype")
        sites.append({"volumes": vols, **cols})
    return sites


def _train(vols: np.ndarray, idx: np.ndarray, rois: list[Any], spec: Any, kw: dict[str, Any],
           **more: Any) -> Any:
    """``train_ssl`` on rows ``idx`` with their lesion regions found once (``rois``)."""
    from encoders.train import train_ssl

    return train_ssl(vols, indices=idx, rois=[rois[i] for i in idx], spec=spec, **kw, **more)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--patients", type=int, default=60)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=12, help="E: centralised and site-alone epochs")
    ap.add_argument("--rounds", type=int, default=6, help="R (local epochs L = E / R)")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--backbone", default="resnet10t")
    ap.add_argument("--variants", default="fedavg,fedbn", help="fedavg, fedprox, fedbn (comma list)")
    ap.add_argument("--mu", type=float, default=0.01)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from encoders import federated as fed
    from encoders.evaluate import evaluate_retrieval, metric_cells, split_queries
    from encoders.model import embed
    from encoders.spec import DEFAULT_SPEC

    torch.set_num_threads(2)
    t_all = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="eval-federated-") as tmp:
        sites = _sites(Path(tmp), args.patients, args.seed)
    spec = DEFAULT_SPEC
    kw: dict[str, Any] = dict(backbone=args.backbone, method="simclr", region="lesion",
                              pooling="attention", calibration="tissue", device="cpu",
                              batch_size=16, seed=args.seed)
    espec = fed.encoder_spec(backbone=args.backbone, spec=spec, pooling="attention",
                             region="lesion", calibration="tissue")
    from encoders.roi import rois_for

    for s in sites:
        s["is_q"] = split_queries(s["patient_ids"], 0.25, seed=args.seed)
        s["ref"] = np.nonzero(~s["is_q"])[0]
        s["rois"] = rois_for(s["volumes"], spacing_mm=spec.spacing_mm)
    local_epochs = max(1, args.epochs // args.rounds)

    def score(enc: Any) -> list[Any]:
        out = []
        for s in sites:
            x = embed(enc, s["volumes"], batch_size=16, device="cpu")
            q, r = s["is_q"], ~s["is_q"]
            out.append(evaluate_retrieval(
                x[q], x[r], query_labels=s["labels"][q], reference_labels=s["labels"][r],
                query_scanners=s["scanners"][q], reference_scanners=s["scanners"][r],
                query_times=s["times"][q], query_events=s["events"][q],
                reference_times=s["times"][r], reference_events=s["events"][r],
                k=args.k, query_groups=s["patient_ids"][q], n_boot=args.bootstrap, seed=args.seed))
        return out

    rows: list[dict[str, Any]] = []

    def add(name: str, enc: Any, seconds: float, extra: dict[str, Any] | None = None) -> None:
        ms = score(enc)
        rows.append({"method": name, "seconds": round(seconds, 1), "per_site": ms,
                     "mean_p": float(np.mean([m.precision_at_k for m in ms])), **(extra or {})})
        print(f"  {name}: mean P@{args.k} {rows[-1]['mean_p']:.3f} ({seconds:.0f} s)", flush=True)

    # centralised: all sites' reference studies in one place
    allv = np.concatenate([s["volumes"] for s in sites])
    offs = np.cumsum([0] + [len(s["volumes"]) for s in sites])
    allref = np.concatenate([s["ref"] + o for s, o in zip(sites, offs[:-1], strict=True)])
    t0 = time.monotonic()
    allrois = [r for s in sites for r in s["rois"]]
    enc, _ = _train(allv, allref, allrois, spec, kw, epochs=args.epochs)
    add("centralised", enc, time.monotonic() - t0)
    alone = []
    for i, s in enumerate(sites):
        t0 = time.monotonic()
        enc, _ = _train(s["volumes"], s["ref"], s["rois"], spec, kw, epochs=args.epochs)
        add(f"site {i + 1}'s encoder at every site", enc, time.monotonic() - t0)
        alone.append(rows[-1])
    # each site alone: every site's queries scored with its own site-alone encoder
    diag = [alone[i]["per_site"][i] for i in range(len(sites))]
    rows.append({"method": "each site alone (own encoder)", "per_site": diag,
                 "seconds": round(sum(r["seconds"] for r in alone), 1),
                 "mean_p": float(np.mean([m.precision_at_k for m in diag]))})

    for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
        fedbn, mu = variant == "fedbn", (args.mu if variant == "fedprox" else 0.0)
        enc0, head0 = fed.initial_model(espec, seed=args.seed)
        like = {"encoder": enc0.state_dict(), "head": head0.state_dict()}
        norm = fed.norm_keys(enc0, head0)
        glob = fed.model_arrays(like)
        local_norm: list[dict[str, np.ndarray]] = [{} for _ in sites]
        per_round_bytes = []
        t0 = time.monotonic()
        for rnd in range(1, args.rounds + 1):
            final = rnd == args.rounds
            updates, weights, sent = [], [], 0
            for i, s in enumerate(sites):  # what train_at_site does at each site
                start = fed.state_from_arrays({**glob, **local_norm[i]}, like)
                out: dict[str, Any] = {}
                _train(s["volumes"], s["ref"], s["rois"], spec, {**kw, "seed": args.seed * 1000 + rnd},
                       epochs=local_epochs, init_state=start, prox_mu=mu, state_out=out)
                arrays = fed.model_arrays(out)
                if fedbn:
                    local_norm[i] = {k: v for k, v in arrays.items() if k in norm}
                keys = fed.sent_keys(list(arrays), norm, fedbn=fedbn, final=final)
                updates.append({k: arrays[k] for k in keys})
                weights.append(float(len(s["ref"])))
                sent += sum(arrays[k].nbytes for k in keys)
            received = len(sites) * sum(a.nbytes for a in glob.values())
            avg = fed.weighted_average(updates, weights)
            glob = {k: (avg[k].astype(glob[k].dtype) if k in avg else glob[k]) for k in glob}
            per_round_bytes.append({"to_sites": int(received), "from_sites": int(sent)})
        state = fed.state_from_arrays(glob, like)
        enc0.load_state_dict(state["encoder"])
        enc0.eval()
        name = {"fedavg": "federated FedAvg", "fedprox": f"federated FedProx mu={mu:g}",
                "fedbn": "federated FedAvg + FedBN"}[variant]
        add(f"{name} ({args.rounds} x {local_epochs} ep)", enc0, time.monotonic() - t0,
            {"bytes_per_round": per_round_bytes[0]})

    ref = rows[0]["mean_p"]
    print(f"\nphantom cohort: {args.patients} patients, 3 sites by scanner, seed {args.seed}; "
          f"{args.backbone} lesion encoder, E={args.epochs} epochs; k={args.k}; "
          f"[95 % bootstrap interval over query patients, {args.bootstrap} resamples]")
    n_q = [int(s["is_q"].sum()) for s in sites]
    n_r = [len(s["ref"]) for s in sites]
    print(f"queries per site {n_q}, reference per site {n_r}")
    print(f"{'method':<40} " + " ".join(f"{'site ' + str(i + 1) + ' P@k':>22}" for i in range(3))
          + f" {'mean P@k':>9} {'vs central':>10} {'s':>6}")
    for r in rows:
        cells = [metric_cells(m)[0] for m in r["per_site"]]
        print(f"{r['method']:<40} " + " ".join(f"{c:>22}" for c in cells)
              + f" {r['mean_p']:9.3f} {r['mean_p'] / ref if ref else float('nan'):10.2f} {r['seconds']:6.0f}")
        if "bytes_per_round" in r:
            b = r["bytes_per_round"]
            print(f"{'':<40} bytes per round: {b['to_sites'] / 1e6:.1f} MB to sites, "
                  f"{b['from_sites'] / 1e6:.1f} MB from sites")
    print(f"wall time {time.monotonic() - t_all:.0f} s")
    if args.json is not None:
        args.json.write_text(json.dumps([{**r, "per_site": [m.to_dict() for m in r["per_site"]]}
                                         for r in rows], indent=2, default=str))


if __name__ == "__main__":
    main()
