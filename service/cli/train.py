"""``cohortsim train`` (self-supervised encoder) and ``cohortsim eval`` (retrieval figures)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from service.cli.app import (
    Calibration,
    CliError,
    Device,
    Method,
    Pooling,
    Region,
    _device,
    _say,
    app,
    cli_errors,
    out,
    progress_bar,
)


@app.command()
@cli_errors
def train(
    store: Annotated[Path, typer.Option(help="Cohort store to train on (self-supervised: no labels used).")],
    out_dir: Annotated[Path, typer.Option("--out", help="Model folder: model.safetensors + card.json.")],
    backbone: Annotated[str, typer.Option(help="Any timm model name, e.g. resnet10t, resnet18, test_resnet.")] = "resnet10t",
    epochs: Annotated[
        int | None,
        typer.Option(min=1, max=10_000, help="Default: what cohortsim eval trains and scores (lesion 100, whole 8)."),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=2, max=4096)] = 16,
    method: Annotated[Method, typer.Option(help="Self-supervised objective.")] = Method.simclr,
    embedding_dim: Annotated[int, typer.Option(min=8, max=4096)] = 128,
    lr: Annotated[float, typer.Option(min=1e-7, max=1.0)] = 1e-3,
    device: Annotated[Device, typer.Option(help="auto (a GPU when one is visible), cpu, gpu or cuda.")] = Device.auto,
    seed: Annotated[int, typer.Option()] = 0,
    time_budget: Annotated[float | None, typer.Option(help="Stop training after this many seconds.")] = None,
    region: Annotated[Region, typer.Option(help="lesion (embed a box around the lung lesion; see encoders/roi.py) or whole (the whole volume).")] = Region.lesion,
    pooling: Annotated[Pooling, typer.Option(help="Pooling over slices.")] = Pooling.attention,
    calibration: Annotated[Calibration, typer.Option(help="tissue (calibrate each study's HU on its air and soft tissue) or none.")] = Calibration.tissue,
    views: Annotated[int | None, typer.Option(min=2, max=16, help="Augmented views of each study per step (default: lesion 4, whole 2; a step costs about views/2 two-view steps; 8 scored higher still, at twice the time of 4).")] = None,
) -> None:
    """Train a self-supervised study encoder on the store's volumes (resumable)."""
    from indexing.store import CohortStore

    if epochs is None:  # the evaluation's protocol: the encoder trained is the one it scores
        from encoders.evaluate import EvalConfig

        epochs = EvalConfig.epochs if region == "lesion" else EvalConfig.whole_epochs
        _say(f"training {epochs} epochs ({region} region; --epochs to change)")
    cohort = CohortStore(store)
    card = _train_on_store(
        cohort,
        out_dir,
        backbone=backbone,
        embedding_dim=embedding_dim,
        method=method.value,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        device=_device(device),
        seed=seed,
        time_budget_s=time_budget,
        region=region.value,
        pooling=pooling.value,
        calibration=calibration.value,
        views=views,
    )
    _say(f"saved encoder {card.version} ({card.backbone}, {card.method}, {card.epochs} epochs, dim {card.embedding_dim}) to {out_dir}")


def _train_on_store(cohort: Any, out_dir: Path, *, batch_size: int, **kw: Any) -> Any:
    """Train on every volume of a store, save the encoder in ``out_dir``; returns its card.

    A resumable checkpoint lives in ``out_dir/checkpoint`` while training runs and is
    removed once the encoder is saved.
    """
    import hashlib

    from encoders.model import save_encoder
    from encoders.train import resolve_device, train_ssl
    from indexing.ingest import store_spec

    resolve_device(kw.get("device", "auto"))
    spec = store_spec(cohort)
    out_dir.mkdir(parents=True, exist_ok=True)
    # The volumes go to a memory-mapped file beside the model, not into memory: a cohort
    # of 20,000 studies is 20 GiB on the default grid. Removed when training ends.
    # a lesion encoder on the whole-study grid trains on each study's detail patch
    on_patches = kw.get("region", "whole") == "lesion" and spec.has_patches
    with tempfile.TemporaryDirectory(prefix=".volumes-", dir=out_dir) as spool:
        uids, volumes = cohort.spool_volumes(Path(spool) / "volumes.npy",
                                             patches=kw.pop("patches", "readers") if on_patches else None)
        if len(uids) < 2:
            raise CliError(f"the store at {cohort.root} holds {len(uids)} studies; at least 2 are needed to train")
        data_hash = hashlib.sha256("\n".join(sorted(uids)).encode()).hexdigest()[:16]
        with progress_bar("train") as update:
            encoder, card = train_ssl(
                volumes,
                spec=spec,
                batch_size=min(batch_size, len(uids)),
                data_hash=data_hash,
                checkpoint_dir=out_dir / "checkpoint",
                progress=lambda s, t, loss: update(s, t, extra=f"loss {loss:.3f}"),
                **kw,
            )
        del volumes  # the memory map, before its file goes
    save_encoder(encoder, card, out_dir)
    shutil.rmtree(out_dir / "checkpoint", ignore_errors=True)
    return card


@app.command("eval")
@cli_errors
def eval_retrieval(
    store: Annotated[Path, typer.Option(help="Cohort store with outcomes (ingested with --outcomes).")],
    label: Annotated[str, typer.Option(help="Categorical outcome label that neighbours should share (P@k), e.g. phenotype.")],
    model: Annotated[Path | None, typer.Option(help="Also score this trained encoder (it may have seen the queries, unlabelled).")] = None,
    k: Annotated[int, typer.Option(min=1, max=1000)] = 10,
    query_fraction: Annotated[float, typer.Option(min=0.01, max=0.9, help="Share of patients held out as queries.")] = 0.25,
    seed: Annotated[int, typer.Option(help="Seed of the query split and of training.")] = 0,
    backbone: Annotated[str, typer.Option()] = "resnet10t",
    method: Annotated[Method, typer.Option(help="Self-supervised objective.")] = Method.simclr,
    regions: Annotated[str, typer.Option(help="Encoders to train on the reference studies: comma list of lesion, whole; empty for none.")] = "lesion,whole",
    pooling: Annotated[Pooling, typer.Option(help="Pooling over slices.")] = Pooling.attention,
    calibration: Annotated[Calibration, typer.Option(help="HU calibration of the trained encoders.")] = Calibration.tissue,
    epochs: Annotated[int, typer.Option(min=1, max=10_000, help="Epochs of the lesion encoder.")] = 100,
    whole_epochs: Annotated[int, typer.Option(min=1, max=10_000, help="Epochs of the whole-volume encoder.")] = 8,
    batch_size: Annotated[int, typer.Option(min=2, max=4096, help="Studies per training step (as cohortsim train).")] = 16,
    train_seconds: Annotated[float | None, typer.Option(min=1, help="Also stop each training after this many seconds.")] = None,
    device: Annotated[Device, typer.Option(help="auto (a GPU when one is visible), cpu, gpu or cuda.")] = Device.auto,
    json_out: Annotated[bool, typer.Option("--json", help="Print the rows as JSON on stdout.")] = False,
    spool_dir: Annotated[Path | None, typer.Option(help="Folder for the temporary memory-mapped copy of the volumes (default: the system's temporary folder, $TMPDIR).")] = None,
    bootstrap: Annotated[int, typer.Option(min=0, max=100_000, help="Bootstrap resamples of the query patients for the 95 % intervals (0: no intervals).")] = 1000,
    views: Annotated[int | None, typer.Option(min=2, max=16, help="Views per study per training step (as cohortsim train; default: lesion 4, whole 2).")] = None,
    patches: Annotated[str, typer.Option(help="Which detail patch the lesion encoder embeds: readers (a reader region where one was marked, else the top proposal) or proposals (label-free only).")] = "readers",
) -> None:
    """Score retrieval on held-out patients: P@k of a label, scanner excess, kNN C-index (24 months).

    Holds out a seeded share of the patients as queries, trains the encoder(s) on the
    other studies only (self-supervised, labels unused), and reports cohortsim beside
    baselines from the same run: random vectors, HU-histogram kNN, a randomly
    initialised backbone (each trained row also after ComBat harmonisation). Each figure
    comes with a 95 % bootstrap interval over the query patients: how far it would move
    with another draw of queries (not with another training run or cohort).
    """
    from encoders.evaluate import EvalConfig
    from indexing.ingest import store_spec
    from indexing.store import PATCH_USES, CohortStore

    if patches not in PATCH_USES:
        raise CliError(f"--patches must be readers or proposals, not {patches!r}")
    region_list = tuple(r.strip() for r in regions.split(",") if r.strip())
    bad = [r for r in region_list if r not in ("lesion", "whole")]
    if bad:
        raise CliError(f"--regions takes lesion and/or whole, not {', '.join(bad)}")
    cohort = CohortStore(store)
    if spool_dir is not None and not spool_dir.is_dir():
        raise CliError(f"--spool-dir {spool_dir} is not a folder")
    # The volumes go to a memory-mapped file, not into memory (as cohortsim train); the
    # evaluation reads them a study or a batch at a time. Removed when it ends.
    with tempfile.TemporaryDirectory(prefix="cohortsim-eval-", dir=spool_dir) as spool:
        uids, volumes = cohort.spool_volumes(Path(spool) / "volumes.npy")
        patch_vols = None
        if "lesion" in region_list and store_spec(cohort).has_patches:
            p_uids, patch_vols = cohort.spool_volumes(Path(spool) / "patches.npy",
                                                      patches=patches)
            if p_uids != uids:
                raise CliError(f"the store at {store} changed during the evaluation; run it again")
        try:
            rows = _eval_rows(cohort, uids, volumes, patches=patch_vols, label=label, model=model, cfg=EvalConfig(
                k=k, query_fraction=query_fraction, seed=seed, backbone=backbone, method=method.value,
                regions=region_list, pooling=pooling.value, calibration=calibration.value, epochs=epochs,
                whole_epochs=whole_epochs, time_budget_s=train_seconds,
                device=_device(device), bootstrap=bootstrap,
                train_kw={"batch_size": batch_size, "views": views},
            ))
        finally:
            del volumes, patch_vols  # the memory maps, before their files go
    if json_out:
        out.print_json(json.dumps([r.to_dict() for r in rows]))
        return
    _print_eval(rows, k=k, label=label)


def _eval_rows(cohort: Any, uids: list[str], volumes: Any, *, label: str, model: Path | None,
               cfg: Any, patches: Any = None) -> list[Any]:
    """`cohortsim eval`'s protocol on the store's (spooled) volumes."""
    from encoders.evaluate import cohort_columns, run_retrieval_eval
    from encoders.model import load_encoder
    from indexing.ingest import store_spec

    if len(uids) < 2 * cfg.k:
        raise CliError(f"the store at {cohort.root} holds {len(uids)} studies; the evaluation needs at least {2 * cfg.k}")
    table = {r["study_uid"]: r for r in cohort.cohort_table().to_pylist()}
    try:
        cols = cohort_columns([table[u] for u in uids], label=label)
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    spec = store_spec(cohort)
    given = []
    if model is not None:
        enc, card = load_encoder(model, device="cpu")
        given.append((f"given encoder {card.version} ({card.region.mode})", enc))
    try:
        return run_retrieval_eval(
            volumes, patient_ids=cols["patient_ids"], labels=cols["labels"], scanners=cols["scanners"],
            times=cols["times"], events=cols["events"], spec=spec, config=cfg,
            encoders=given, progress=lambda m: _say(f"eval: {m}"), patches=patches,
        )
    except ValueError as exc:  # EvalError / HarmonizeError: bad cohort for this protocol
        raise CliError(str(exc)) from exc


def _print_eval(rows: list[Any], *, k: int, label: str) -> None:
    from encoders.evaluate import check_targets, metric_cells

    m0 = rows[0].metrics
    title = f"retrieval on {m0.n_queries} held-out query studies vs {m0.n_reference} reference studies (k={k}, label {label!r})"
    if m0.n_boot:
        title += f"; [{m0.ci_level:.0%} interval over query patients, {m0.n_boot} bootstrap resamples]"
    table_out = Table(title=title, title_justify="left")
    for col in ("method", f"P@{k}", "scanner excess", "kNN C-index", "s"):
        table_out.add_column(col, justify="left" if col == "method" else "right")
    for r in rows:
        table_out.add_row(r.method, *metric_cells(r.metrics), f"{r.seconds:.0f}")
    out.print(table_out)
    for r in rows:
        if r.method.startswith(("cohortsim", "given")) and not r.method.endswith("ComBat"):
            met = check_targets(rows, r.method)
            out.print(f"{r.method}: " + ", ".join(f"{n} {'met' if ok else 'NOT met'}" for n, ok in met.items()))
