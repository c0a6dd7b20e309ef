"""``cohortsim index build | list | rollback | prune | compact`` (``--shards``: one index
per shard) and the cohort edits ``delete``, ``outcomes``, ``compact``."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any

import typer

from service.cli.app import (
    _DEVICE_HELP,
    _RAY_HELP,
    CliError,
    Device,
    _device,
    _print_json,
    _say,
    app,
    cli_errors,
    index_app,
    out,
    progress_bar,
)
from service.cli.query import _print_manifest_quality


@index_app.command("build")
@cli_errors
def index_build(
    out_dir: Annotated[Path, typer.Option("--out", help="Index folder (snapshots are published into it).")],
    store: Annotated[Path | None, typer.Option(help="Cohort store to embed (with --model).")] = None,
    model: Annotated[Path | None, typer.Option(help="Encoder folder from cohortsim train.")] = None,
    embeddings: Annotated[
        Path | None,
        typer.Option(help="Precomputed, already de-identified embeddings (Parquet) instead of --store/--model."),
    ] = None,
    kind: Annotated[str, typer.Option(help="FAISS factory string: Flat (exact, default), HNSW32, IVF256,Flat, IVF256,PQ32, SQfp16...")] = "Flat",
    fp16: Annotated[bool, typer.Option("--fp16", help="Store vectors in half precision (Flat -> SQfp16, IVFn,Flat -> IVFn,SQfp16, HNSWm -> HNSWm,SQfp16).")] = False,
    device: Annotated[Device, typer.Option(help="Device for embedding: " + _DEVICE_HELP)] = Device.auto,
    shard_size: Annotated[int, typer.Option(min=1, help="Studies per checkpointed shard; a killed build resumes from the last one.")] = 512,
    keep: Annotated[int | None, typer.Option(min=1, help="After publishing, delete all but the newest N versions (the served one stays).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON report on stdout.")] = False,
    ray: Annotated[str | None, typer.Option("--ray", metavar="[ADDRESS]", help=_RAY_HELP)] = None,
    shards: Annotated[
        int | None,
        typer.Option(min=1, help="Split the cohort by patient into N indexes OUT/shard-0 ... OUT/shard-{N-1} (rule: sha256(patient_id) mod N), served by a coordinator in shard mode."),
    ] = None,
) -> None:
    """Embed the cohort and publish a new index snapshot atomically (safe while a server reads it)."""
    from indexing.build import build_from_embeddings, build_from_store
    from indexing.snapshot import fp16_kind, load_snapshot, prune_versions

    if embeddings is not None and (store is not None or model is not None):
        raise CliError("give either --embeddings or --store with --model, not both")
    if embeddings is None and (store is None or model is None):
        raise CliError("give --store and --model (or --embeddings FILE.parquet)")
    if fp16:
        kind = fp16_kind(kind)
    dev = _device(device)
    if shards is not None:
        if ray is not None or keep is not None:
            raise CliError("--shards builds in this process; leave out --ray and --keep")
        _index_build_shards(out_dir, shards, store, model, embeddings, kind, dev, shard_size, json_out)
        return
    if embeddings is not None:
        version = build_from_embeddings(embeddings, out_dir, kind=kind)
    else:
        assert store is not None and model is not None  # for the type checker; checked above
        with progress_bar("build") as update:
            if ray is not None:
                from indexing.distributed import build_from_store_ray

                version = build_from_store_ray(
                    store,
                    model,
                    out_dir,
                    address=ray,
                    kind=kind,
                    device=dev,
                    shard_size=shard_size,
                    progress=lambda stage, d, t: update(d, t, extra=stage),
                )
            else:
                version = build_from_store(
                    store,
                    model,
                    out_dir,
                    kind=kind,
                    device=dev,
                    shard_size=shard_size,
                    progress=lambda stage, d, t: update(d, t, extra=stage),
                )
    snap = load_snapshot(out_dir, version=version, device="cpu")
    info = snap.info()
    _say(
        f"published index {version}: {info['num_studies']} studies, dim {info['dimension']}, "
        f"{info['index_kind']}, model {info['model_version']} -> {out_dir}"
    )
    _print_manifest_quality(snap.manifest)
    removed: list[str] = []
    if keep is not None:
        removed = prune_versions(out_dir, keep=keep)
        if removed:
            _say(f"pruned {len(removed)} old version(s): {', '.join(removed)}")
    if json_out:
        _print_json(
            {
                "index_dir": str(out_dir),
                "version": version,
                "num_studies": info["num_studies"],
                "dimension": info["dimension"],
                "index_kind": info["index_kind"],
                "model_version": info["model_version"],
                "pruned": removed,
            }
        )


def _index_build_shards(
    out_dir: Path, n: int, store: Path | None, model: Path | None, embeddings: Path | None,
    kind: str, device: str, shard_size: int, json_out: bool,
) -> None:
    """``index build --shards N``: one embedding pass, N shard indexes (indexing.shards)."""
    from indexing.shards import build_shards_from_embeddings, build_shards_from_store
    from indexing.snapshot import read_manifest

    if embeddings is not None:
        published = build_shards_from_embeddings(embeddings, out_dir, n, kind=kind)
    else:
        assert store is not None and model is not None  # checked by the caller
        with progress_bar("build") as update:
            published = build_shards_from_store(
                store, model, out_dir, n, kind=kind, device=device, shard_size=shard_size,
                progress=lambda stage, d, t: update(d, t, extra=stage),
            )
    rows = []
    for folder, version in published:
        m = read_manifest(folder, version)
        rows.append({"index_dir": str(folder), "version": version, "num_studies": m["num_studies"],
                     "model_version": m["model_version"]})
        _say(f"published shard {folder.name} {version}: {m['num_studies']} studies, "
             f"model {m['model_version']} -> {folder}")
    if json_out:
        _print_json({"shards": rows, "rule": "sha256(patient_id)[:8] mod N"})


@index_app.command("list")
@cli_errors
def index_list(
    index_dir: Annotated[Path, typer.Argument(metavar="INDEX_DIR")],
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON list on stdout.")] = False,
) -> None:
    """List the snapshots in an index folder (the served one is marked with *)."""
    from indexing.snapshot import current_version, list_versions, read_manifest

    versions = list_versions(index_dir)
    if not versions:
        raise CliError(f"{index_dir} holds no snapshots; run cohortsim index build")
    current = current_version(index_dir)
    rows = []
    for v in versions:
        try:
            m = read_manifest(index_dir, v)
        except Exception as exc:  # a damaged version is listed, not fatal
            rows.append({"version": v, "current": v == current, "error": str(exc)})
            continue
        rows.append(
            {
                "version": v,
                "current": v == current,
                "created_at": m.get("created_at"),
                "kind": m.get("index_kind"),
                "studies": m.get("num_studies"),
                "dimension": m.get("dimension"),
                "model_version": m.get("model_version"),
                "derived_from": m.get("derived_from"),
            }
        )
    if json_out:
        out.print_json(json.dumps(rows))
        return
    for r in rows:
        mark = "*" if r["current"] else " "
        if "error" in r:
            out.print(f"{mark} {r['version']}  (unreadable: {r['error']})", markup=False)
        else:
            out.print(
                f"{mark} {r['version']}  {r['created_at']}  {r['kind']}  {r['studies']} studies  "
                f"dim {r['dimension']}  model {r['model_version']}",
                markup=False,
            )


@index_app.command("rollback")
@cli_errors
def index_rollback(
    index_dir: Annotated[Path, typer.Argument(metavar="INDEX_DIR")],
    version: Annotated[str, typer.Argument(metavar="VERSION", help="A version id from cohortsim index list.")],
) -> None:
    """Serve an earlier version again (checksums verified first; servers follow within seconds)."""
    from indexing.snapshot import rollback

    rollback(index_dir, version)
    _say(f"{index_dir}: CURRENT -> {version}")


@index_app.command("prune")
@cli_errors
def index_prune(
    index_dir: Annotated[Path, typer.Argument(metavar="INDEX_DIR")],
    keep: Annotated[int, typer.Option(min=1, help="How many of the newest versions to keep (the served one always stays).")] = 3,
) -> None:
    """Delete old snapshot versions."""
    from indexing.snapshot import prune_versions

    removed = prune_versions(index_dir, keep=keep)
    _say(f"removed {len(removed)} version(s)" + (f": {', '.join(removed)}" if removed else ""))


@index_app.command("compact")
@cli_errors
def index_compact(
    index_dir: Annotated[Path, typer.Argument(metavar="INDEX_DIR")],
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON report on stdout.")] = False,
) -> None:
    """Remove deleted patients' rows physically: rebuild the served version from its own vectors."""
    from indexing.build import compact_index

    with progress_bar("compact") as update:
        version = compact_index(index_dir, progress=lambda stage, d, t: update(d, t, extra=stage))
    _say("nothing to compact: no deleted patient in the served version" if version is None else f"published compacted index {version}")
    if json_out:
        _print_json({"index_dir": str(index_dir), "version": version, "compacted": version is not None})


_PSEUDONYM = re.compile(r"^P-[0-9a-f]{16}$")


@app.command()
@cli_errors
def delete(
    patient: Annotated[list[str], typer.Option("--patient", help="Patient to withdraw: its pseudonym (P-...) or raw id (hashed with the site secret). Repeatable.")],
    store: Annotated[Path | None, typer.Option(help="Cohort store: its reads skip the patient at once; rows go at cohortsim compact.")] = None,
    index: Annotated[Path | None, typer.Option(help="Index folder: servers stop returning the patient on their next call; rows go at the next rebuild.")] = None,
    raw: Annotated[bool, typer.Option("--raw", help="Treat every --patient as a raw id, even if it looks like a pseudonym.")] = False,
    secret_file: Annotated[Path | None, typer.Option(help="Site secret for hashing raw ids (default $COHORTSIM_SITE_SECRET or ~/.config/cohortsim/site-secret).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON report on stdout.")] = False,
) -> None:
    """Withdraw patients (consent revoked): hidden everywhere at once, removed at the next compaction."""
    from indexing.store import CohortStore
    from indexing.tombstones import TOMBSTONE_FILE, add_tombstones

    if store is None and index is None:
        raise CliError("give --store and/or --index to delete from")
    if index is not None and not (index / "versions").is_dir():
        raise CliError(f"{index} is not an index folder (no versions/); check --index")
    ids = [p.strip() for p in patient if p.strip()]
    if not ids:
        raise CliError("--patient is empty")
    pseudonyms = []
    pseudo = None
    for pid in ids:
        if not raw and _PSEUDONYM.match(pid):
            pseudonyms.append(pid)
            continue
        if pseudo is None:
            from encoders.deid import Pseudonymizer

            pseudo = Pseudonymizer.from_env_or_file(secret_file)
        pseudonyms.append(pseudo.patient(pid))
    report: dict[str, Any] = {"patients": pseudonyms, "store_withdrawn": None, "index_hidden": None}
    if store is not None:
        added = CohortStore(store).delete_patients(pseudonyms)
        report["store_withdrawn"] = added
        _say(f"store {store}: {added} patient(s) withdrawn; their rows go at `cohortsim compact --store`")
    if index is not None:
        added = add_tombstones(index / TOMBSTONE_FILE, pseudonyms)
        report["index_hidden"] = added
        _say(f"index {index}: {added} patient(s) hidden from answers now; rows go at the next build or `cohortsim index compact`")
    if json_out:
        _print_json(report)
        return
    for p in pseudonyms:
        out.print(p)


@app.command()
@cli_errors
def outcomes(
    table: Annotated[Path, typer.Argument(metavar="CSV", help="Outcomes CSV/Parquet: patient_id,time,event,<labels...> (raw ids, hashed with the site secret).")],
    store: Annotated[Path, typer.Option(help="Cohort store to update.")],
    index: Annotated[Path | None, typer.Option(help="Also publish a new index version with these outcomes (no re-embedding).")] = None,
    secret_file: Annotated[Path | None, typer.Option(help="Site secret (default $COHORTSIM_SITE_SECRET or ~/.config/cohortsim/site-secret).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON report on stdout.")] = False,
) -> None:
    """Update outcomes (follow-up, events, labels) without re-embedding anything."""
    from encoders.deid import Pseudonymizer
    from indexing.build import update_outcomes
    from indexing.ingest import read_outcomes
    from indexing.store import CohortStore

    cohort = CohortStore(store)
    rows = cohort.set_outcomes(read_outcomes(table, Pseudonymizer.from_env_or_file(secret_file)))
    _say(f"store {store}: outcomes of {rows} patient(s) updated")
    version = None
    if index is not None:
        version = update_outcomes(index, cohort)
        _say(f"published index {version} with the new outcomes (vectors shared with the previous version)")
    if json_out:
        _print_json({"store": str(store), "patients_updated": rows, "index_version": version})


@app.command()
@cli_errors
def compact(
    store: Annotated[Path | None, typer.Option(help="Cohort store: rewrite part files without withdrawn patients.")] = None,
    index: Annotated[Path | None, typer.Option(help="Index folder: rebuild the served version without withdrawn patients.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON report on stdout.")] = False,
) -> None:
    """Physically remove withdrawn patients' rows (they are already hidden)."""
    from indexing.build import compact_index
    from indexing.store import CohortStore

    if store is None and index is None:
        raise CliError("give --store and/or --index")
    report: dict[str, Any] = {"store": None, "index_version": None}
    if store is not None:
        r = CohortStore(store).compact()
        report["store"] = dict(r)
        _say(f"store {store}: {r['studies_removed']} studies and {r['outcomes_removed']} outcome rows removed ({r['parts_rewritten']} files rewritten)")
    if index is not None:
        version = compact_index(index)
        report["index_version"] = version
        _say(f"index {index}: " + ("nothing to compact" if version is None else f"published compacted version {version}"))
    if json_out:
        _print_json(report)
