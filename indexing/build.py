"""Index build jobs: store + encoder -> snapshot, or precomputed embeddings -> snapshot.

Also the jobs that change a published index without re-embedding: outcome updates
(:func:`update_outcomes`, a new version sharing the vectors) and compaction after
deletions (:func:`compact_index`, a rebuild from the snapshot's own vectors).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from encoders.errors import EncoderError
from encoders.model import (
    EncoderCard,
    embed,
    embedded_regions,
    load_encoder,
    region_rois,
    slice_projections,
)
from encoders.spec import InputSpec
from encoders.train import resolve_device
from indexing.durable import opened_for_lock, write_parquet_atomic
from indexing.errors import ModelVersionError, StoreError, StoreWriteError, describe_os_error
from indexing.evaluation import EVALUATION_KEY, evaluate_prognosis
from indexing.slice_match import MATCH_COLUMNS, match_columns
from indexing.snapshot import (
    BUILD_MANIFEST_KEYS,
    build_snapshot,
    load_snapshot,
    republish_metadata,
)
from indexing.store import ACQUISITION_COLUMNS, CohortStore
from indexing.thumbnails import (
    BOX_COLUMN,
    REGION_COLUMNS,
    SLICE_COLUMN,
    SOURCE_COLUMN,
    Region,
    region_thumbnail_png,
)
from indexing.thumbnails import COLUMN as THUMBNAIL_COLUMN

log = logging.getLogger(__name__)

# Columns of an --embeddings file that are not outcomes.
_EMBEDDING_KEY_COLUMNS = {
    "patient_id",
    "study_uid",
    "site",
    "modality",
    "embedding",
    "time",
    "event",
    "model_version",
    *ACQUISITION_COLUMNS,
}


DEFAULT_SHARD_SIZE = 512
BUILD_DIR = ".build"  # INDEX_DIR/.build/embed-<key>/: checkpoints of a running rebuild


def checkpoint_dir_for(index_dir: Path, model_version: str, spec: str) -> Path:
    """Where a rebuild of ``index_dir`` with this encoder keeps its embedded shards."""
    key = hashlib.sha256(f"{model_version}\n{spec}".encode()).hexdigest()[:16]
    return Path(index_dir) / BUILD_DIR / f"embed-{key}"


@contextlib.contextmanager
def _job_lock(folder: Path) -> Iterator[None]:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreWriteError(
            describe_os_error(exc, "creating the checkpoint folder", folder)
            + "; nothing was published",
            path=folder,
            errno=exc.errno,
        ) from exc
    with opened_for_lock(folder / ".lock") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreError(
                f"another index build is embedding into {folder.parent.parent}; wait for it "
                "to finish (or stop it) before starting a second one"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _read_shard(path: Path, uids: list[str]) -> pa.Table | None:
    """A finished shard's table when it exists and holds exactly ``uids``; else None."""
    if not path.exists():
        return None
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException):
        return None  # a damaged checkpoint is simply embedded again
    if table.column("study_uid").to_pylist() != uids:
        return None
    if any(c not in table.column_names for c in (*REGION_COLUMNS, *MATCH_COLUMNS)):
        return None  # written before regions / matching slices were stored: embed again
    return table


def embed_store(
    store: CohortStore,
    model_dir: Path,
    *,
    device: str = "auto",
    batch_size: int = 16,
    progress: Callable[[int, int], None] | None = None,
    checkpoint_dir: Path | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    patches: str = "readers",
) -> tuple[np.ndarray, pa.Table, str]:
    """Embed every study of ``store`` with the encoder in ``model_dir``.

    A whole-volume encoder embeds each study's context volume; a lesion encoder on the
    whole-study grid embeds each study's primary detail patch (``patches``:
    ``"readers"`` = the first reader region where readers marked one, else the top
    proposal; ``"proposals"`` = always the top proposal; :func:`indexing.store.primary_patch`).

    Returns ``(embeddings (n, d) float32, cohort table (row i = embedding i), model_version)``;
    the table carries a ``thumbnail`` column (PNG of the slice through the region the
    encoder embedded, box drawn) and the region itself (``region_slice``, ``region_box``,
    ``region_source``; :mod:`indexing.thumbnails`). Volumes are streamed ``shard_size`` studies at a time
    (memory stays at one shard); with ``checkpoint_dir`` each finished shard is saved
    there (atomically) and a later run with the same encoder reuses every shard whose
    studies are unchanged, so a killed job resumes where it stopped. The encoder runs
    on the GPU when ``device`` is "auto" and one is visible.
    """
    dev = resolve_device(device)
    encoder, card = load_encoder(model_dir, device=str(dev))
    n = check_store_for(store, card, model_dir)
    if shard_size < 1:
        raise StoreError(f"shard_size must be >= 1, got {shard_size}")
    done = reused = 0
    shards: list[pa.Table] = []
    lock = _job_lock(checkpoint_dir) if checkpoint_dir is not None else contextlib.nullcontext()
    with lock:
        on_patches = card.region.mode == "lesion" and card.input.has_patches
        for i, (uids, volumes) in enumerate(store.iter_volumes(
                batch_size=shard_size, patches=patches if on_patches else None)):
            path = checkpoint_dir / f"shard-{i:06d}.parquet" if checkpoint_dir else None
            table = _read_shard(path, uids) if path is not None else None
            if table is None:
                table = embed_shard(
                    encoder,
                    uids,
                    volumes,
                    batch_size=batch_size,
                    device=str(dev),
                    progress=_offset(progress, done, n),
                    sources=store.patch_sources(uids, patches) if on_patches else None,
                )
                if path is not None:
                    write_parquet_atomic(table, path)
            else:
                reused += len(uids)
            shards.append(table)
            done += len(uids)
            if progress is not None:
                progress(done, n)
    if reused:
        log.info("build: %d of %d studies taken from checkpoints", reused, done)
    vectors, table = cohort_of_shards(store, shards)
    return vectors, table, card.version


def _offset(
    progress: Callable[[int, int], None] | None, base: int, total: int
) -> Callable[[int], None] | None:
    """A shard's ``progress(done)`` as the job's ``progress(base + done, total)``."""
    if progress is None:
        return None
    report = progress
    return lambda done: report(base + done, total)


def check_store_for(store: CohortStore, card: EncoderCard, model_dir: Path) -> int:
    """The number of studies in ``store``; raises when it is empty (:class:`StoreError`)
    or was preprocessed with another input spec than the encoder's (:class:`ModelVersionError`)."""
    specs = store.studies(columns=["spec"])["spec"]
    if len(specs) == 0:
        raise StoreError(f"the store at {store.root} holds no studies; run cohortsim ingest first")
    stored_spec = specs[0].as_py()
    if stored_spec and InputSpec.from_dict(_json(stored_spec)) != card.input:
        raise ModelVersionError(
            f"the encoder in {model_dir} expects input {card.input.to_dict()} but the store was "
            "preprocessed differently; train on this store or re-ingest with the encoder's spec"
        )
    return len(specs)


def embed_shard(
    encoder: Any,
    uids: list[str],
    volumes: np.ndarray,
    *,
    batch_size: int,
    device: str,
    progress: Callable[[int], None] | None = None,
    sources: Sequence[str | None] | None = None,
) -> pa.Table:
    """Embed one shard: ``volumes`` ``(b, D, H, W) int16`` of the studies ``uids``.

    Returns the shard's checkpoint table: ``study_uid``, ``embedding`` (fixed-size list
    of float32, L2-normalised by :func:`encoders.model.embed`), ``thumbnail`` (PNG of the
    slice through the region the encoder embedded, box drawn), that region
    (``region_slice``, ``region_box``, ``region_source``; :mod:`indexing.thumbnails`) and,
    for whole-volume encoders, the kept slices' projections and PNGs that let a query
    show each neighbour's slice of the strongest match (:mod:`indexing.slice_match`).
    ``sources``: what each volume is when it is a detail patch (``"reader"``,
    ``"proposal"`` or ``"centre"``, from the store's patch info), so its region is
    labelled by where the patch came from rather than as the patch's centre.
    The single-process build, the incremental add (:mod:`indexing.incremental`) and the
    Ray actors (:mod:`indexing.distributed`) all embed through this function.
    ``progress(done)`` counts studies of this shard.
    """
    if sources is not None and len(sources) != len(uids):
        raise StoreError(f"sources must give one entry per study ({len(uids)}), got {len(sources)}")
    chunks = []
    rois = region_rois(encoder, volumes)  # lesion proposals, once per study
    for start in range(0, len(uids), batch_size):
        part = None if rois is None else rois[start : start + batch_size]
        chunks.append(
            embed(encoder, volumes[start : start + batch_size], batch_size=batch_size,
                  device=device, rois=part)
        )
        if progress is not None:
            progress(min(start + batch_size, len(uids)))
    vecs = np.concatenate(chunks, axis=0).astype(np.float32)
    d = vecs.shape[1]
    # where the encoder cut each study (shown in thumbnails; no re-proposal later)
    projections = None
    if rois is None:  # whole volumes: one forward gives the best slice and every slice's projection
        raw, projections = slice_projections(encoder, volumes, device=device)
    else:
        raw = embedded_regions(encoder, volumes, rois, device=device)
    cuts = [Region.of(c) for c in raw]
    if sources is not None:
        cuts = [c if s is None or c.source != "centre" else Region(c.slice_index, c.box, s)
                for c, s in zip(cuts, sources, strict=True)]
    return pa.table(
        {
            "study_uid": pa.array(uids, pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vecs.ravel()), d),
            THUMBNAIL_COLUMN: pa.array(
                [region_thumbnail_png(v, c) for v, c in zip(volumes, cuts, strict=True)],
                pa.binary(),
            ),
            SLICE_COLUMN: pa.array([c.slice_index for c in cuts], pa.int32()),
            BOX_COLUMN: pa.array([list(c.box) for c in cuts], pa.list_(pa.int32())),
            SOURCE_COLUMN: pa.array([c.source for c in cuts], pa.string()),
            **match_columns(volumes, projections),
        }
    )


def cohort_of_shards(store: CohortStore, shards: list[pa.Table]) -> tuple[np.ndarray, pa.Table]:
    """``(vectors (n, d) float32, cohort table)`` from embedded shards (in store order):
    the store's cohort rows, reordered to the shards' studies, with their thumbnails and
    embedded regions."""
    embedded = pa.concat_tables(shards).combine_chunks()
    uids_all = embedded.column("study_uid").to_pylist()
    emb = embedded.column("embedding").combine_chunks()
    vectors = np.asarray(emb.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(
        len(uids_all), -1
    )
    table = store.cohort_table()
    order = {u: i for i, u in enumerate(table["study_uid"].to_pylist())}
    missing = [u for u in uids_all if u not in order]
    if missing:
        raise StoreError(f"{len(missing)} stored volumes have no study row; the store is inconsistent")
    table = table.take(pa.array([order[u] for u in uids_all], pa.int64()))
    for col in (THUMBNAIL_COLUMN, *REGION_COLUMNS, *MATCH_COLUMNS):
        if col in table.column_names:
            table = table.drop_columns([col])
        table = table.append_column(col, embedded.column(col))
    return vectors, table


def _json(s: str) -> dict:
    import json

    return json.loads(s)


def build_from_store(
    store_dir: Path,
    model_dir: Path,
    index_dir: Path,
    *,
    kind: str = "Flat",
    device: str = "auto",
    batch_size: int = 16,
    shard_size: int = DEFAULT_SHARD_SIZE,
    search_params: dict[str, float] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    patches: str = "readers",
) -> str:
    """Embed the store with the model and publish a snapshot; returns the version id.
    ``patches`` picks each study's detail patch for a lesion encoder (:func:`embed_store`).

    Embedding is checkpointed per shard under ``INDEX_DIR/.build/`` (removed once the
    version is published), so re-running a killed build resumes it. Safe while a server
    reads ``index_dir``: nothing is visible to it before the atomic publish.
    ``progress(stage, done, total)``: stages ``embed``, then the snapshot's ``train``,
    ``add``, ``ood``, ``checksum``, ``publish``.
    """
    store = CohortStore(store_dir)
    _enc, card = _card_of(model_dir)
    spec = store.studies(columns=["spec"])["spec"]
    ckpt = checkpoint_dir_for(index_dir, card.version,
                              (spec[0].as_py() if len(spec) else "") + f"/{patches}")
    vectors, table, model_version = embed_store(
        store,
        model_dir,
        device=device,
        batch_size=batch_size,
        progress=(lambda d, t: progress("embed", d, t)) if progress else None,
        checkpoint_dir=ckpt,
        shard_size=shard_size,
        patches=patches,
    )
    return publish_embedded(
        store,
        vectors,
        table,
        model_version=model_version,
        model_dir=model_dir,
        index_dir=index_dir,
        checkpoint_dir=ckpt,
        kind=kind,
        search_params=search_params,
        progress=progress,
    )


def publish_embedded(
    store: CohortStore,
    vectors: np.ndarray,
    table: pa.Table,
    *,
    model_version: str,
    model_dir: Path,
    index_dir: Path,
    checkpoint_dir: Path,
    kind: str = "Flat",
    search_params: dict[str, float] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> str:
    """Evaluate, build and publish the snapshot of an embedded store, then remove the
    job's checkpoints; returns the version id. ``vectors`` ``(n, d)`` float32, row i of
    ``table`` (the cohort table) is vector i. The last step of both the single-process
    and the Ray build: only the driver publishes."""
    evaluation = evaluate_prognosis(vectors, table)
    version = build_snapshot(
        index_dir,
        vectors,
        table,
        model_version=model_version,
        kind=kind,
        encoder_dir=Path(model_dir),
        store_version=store.store_version(),
        search_params=search_params,
        progress=progress,
        extra_manifest={EVALUATION_KEY: evaluation},
    )
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    with contextlib.suppress(OSError):
        (Path(index_dir) / BUILD_DIR).rmdir()  # only when no other job's checkpoints remain
    return version


def _card_of(model_dir: Path) -> tuple[None, EncoderCard]:
    """The encoder card alone (no weights loaded)."""
    path = Path(model_dir) / "card.json"
    if not path.is_file():
        raise EncoderError(f"{model_dir} holds no card.json; pass a folder made by cohortsim train")
    return None, EncoderCard.from_json(path.read_text())


def read_embeddings(path: Path) -> tuple[np.ndarray, pa.Table, str]:
    """Read a precomputed-embeddings Parquet file into (vectors, cohort table, model version).

    Required columns: ``patient_id``, ``study_uid``, ``embedding`` (list of float). Optional:
    ``site``, acquisition columns, ``time``, ``event``, ``model_version``; any other text
    column becomes an outcome label, any other numeric column an outcome value. Ids are
    kept as given: the file must already be de-identified.
    """
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"embeddings file {path} does not exist")
    try:
        t = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise StoreError(f"cannot read embeddings file {path}: {exc}") from None
    missing = [c for c in ("patient_id", "study_uid", "embedding") if c not in t.column_names]
    if missing:
        raise StoreError(f"embeddings file {path} lacks column(s) {', '.join(missing)}")
    if t.num_rows == 0:
        raise StoreError(f"embeddings file {path} has no rows")
    emb = t["embedding"].combine_chunks()
    if not (pa.types.is_list(emb.type) or pa.types.is_fixed_size_list(emb.type) or pa.types.is_large_list(emb.type)):
        raise StoreError(f"embeddings file {path}: column embedding must be a list of floats")
    lengths = set(pc_list_lengths(emb))
    if len(lengths) != 1 or 0 in lengths:
        raise StoreError(
            f"embeddings file {path}: all embeddings must have the same non-zero length (found {sorted(lengths)[:5]})"
        )
    d = lengths.pop()
    vectors = np.asarray(emb.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, d)
    model_version = "external"
    if "model_version" in t.column_names:
        versions = set(t["model_version"].to_pylist())
        if len(versions) != 1:
            raise ModelVersionError(
                f"embeddings file {path} mixes model versions {sorted(map(str, versions))}; one index holds one"
            )
        model_version = str(versions.pop())
    n = t.num_rows

    def col(name: str, typ: pa.DataType) -> pa.Array:
        if name in t.column_names:
            return t[name].combine_chunks().cast(typ)
        return pa.nulls(n, typ)

    others = [c for c in t.column_names if c not in _EMBEDDING_KEY_COLUMNS]
    label_cols = [c for c in others if pa.types.is_string(t[c].type) or pa.types.is_large_string(t[c].type)]
    value_cols = [c for c in others if pa.types.is_integer(t[c].type) or pa.types.is_floating(t[c].type)]
    lab = {c: t[c].to_pylist() for c in label_cols}
    val = {c: t[c].to_pylist() for c in value_cols}
    labels = [[(c, str(lab[c][i])) for c in label_cols if lab[c][i] is not None] for i in range(n)]
    values = [[(c, float(val[c][i])) for c in value_cols if val[c][i] is not None] for i in range(n)]
    table = pa.table(
        {
            "patient_id": col("patient_id", pa.string()),
            "study_uid": col("study_uid", pa.string()),
            "site": col("site", pa.string()),
            "modality": col("modality", pa.string()),
            **{c: col(c, pa.string()) for c in ACQUISITION_COLUMNS},
            "time": col("time", pa.float64()),
            "event": col("event", pa.bool_()),
            "labels": pa.array(labels, pa.map_(pa.string(), pa.string())),
            "values": pa.array(values, pa.map_(pa.string(), pa.float64())),
        }
    )
    return vectors, table, model_version


def pc_list_lengths(arr: pa.Array) -> list[int]:
    import pyarrow.compute as pc

    return [int(x) for x in pc.unique(pc.list_value_length(arr)).to_pylist() if x is not None]


def build_from_embeddings(path: Path, index_dir: Path, *, kind: str = "Flat") -> str:
    """Publish a snapshot from a precomputed-embeddings Parquet file; returns the version id."""
    vectors, table, model_version = read_embeddings(path)
    evaluation = evaluate_prognosis(vectors, table)
    return build_snapshot(
        index_dir,
        vectors,
        table,
        model_version=model_version,
        kind=kind,
        extra_manifest={EVALUATION_KEY: evaluation},
    )


def _outcome_columns(metadata: pa.Table, outcomes: pa.Table) -> pa.Table:
    """``metadata`` with its outcome columns replaced by ``outcomes`` joined on patient_id."""
    position = {pid: i for i, pid in enumerate(outcomes.column("patient_id").to_pylist())}
    idx = pa.array(
        [position.get(pid) for pid in metadata.column("patient_id").to_pylist()], pa.int64()
    )
    joined = outcomes.drop_columns(["patient_id"]).take(idx)
    for name in joined.column_names:
        field = joined.schema.field(name)
        if name in metadata.column_names:
            metadata = metadata.set_column(metadata.column_names.index(name), field, joined.column(name))
        else:
            metadata = metadata.append_column(field, joined.column(name))
    return metadata


def update_outcomes(index_dir: Path, store: CohortStore) -> str:
    """Publish a version of the current index with the store's outcomes, without re-embedding.

    The index and vectors are shared with the current version (hard links); only the
    metadata's ``time``, ``event``, ``labels`` and ``values`` (and the prognostic
    evaluation that depends on them) change. Returns the new version id.
    """
    snap = load_snapshot(index_dir, device="cpu")
    metadata = _outcome_columns(snap.metadata, store.outcomes())
    updates: dict[str, Any] = {"store_version": store.store_version()}
    if EVALUATION_KEY in snap.manifest:
        updates[EVALUATION_KEY] = evaluate_prognosis(np.asarray(snap.vectors, np.float32), metadata)
    return republish_metadata(index_dir, metadata, base_version=snap.version, manifest_updates=updates)


def compact_index(index_dir: Path, *, progress: Callable[[str, int, int], None] | None = None) -> str | None:
    """Rebuild the current version from its own vectors without withdrawn patients.

    Tombstoned rows are hidden from answers at once; this removes them physically (no
    re-embedding: the vectors come from the snapshot). Returns the new version id, or
    None when no row of the current version is tombstoned.
    """
    snap = load_snapshot(index_dir, device="cpu")
    deleted = snap.deleted_rows()
    if not deleted:
        return None
    # build_snapshot itself leaves out the tombstoned rows (and counts them)
    vectors = np.asarray(snap.vectors, dtype=np.float32)
    metadata = snap.metadata.drop_columns(["row_id"])
    m = snap.manifest
    extra = {k: v for k, v in m.items() if k not in BUILD_MANIFEST_KEYS}
    if EVALUATION_KEY in extra:
        keep = np.ones(snap.num_studies, dtype=bool)
        keep[list(deleted)] = False
        extra[EVALUATION_KEY] = evaluate_prognosis(vectors[keep], metadata.filter(pa.array(keep)))
    return build_snapshot(
        index_dir,
        vectors,
        metadata,
        model_version=snap.model_version,
        kind=str(m["index_kind"]),
        encoder_dir=snap.encoder_dir,
        store_version=m.get("store_version"),
        search_params=m.get("search_params") or None,
        k_ood=snap.k_ood,
        progress=progress,
        extra_manifest=extra,
    )
