"""Index build jobs: store + encoder -> snapshot, or precomputed embeddings -> snapshot."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from encoders.model import embed, load_encoder
from encoders.spec import InputSpec
from encoders.train import resolve_device
from indexing.errors import ModelVersionError, StoreError
from indexing.snapshot import build_snapshot
from indexing.store import ACQUISITION_COLUMNS, CohortStore

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


def embed_store(
    store: CohortStore,
    model_dir: Path,
    *,
    device: str = "auto",
    batch_size: int = 16,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, pa.Table, str]:
    """Embed every study of ``store`` with the encoder in ``model_dir``.

    Returns ``(embeddings (n, d) float32, cohort table (row i = embedding i), model_version)``.
    """
    dev = resolve_device(device)
    encoder, card = load_encoder(model_dir, device=str(dev))
    uids, volumes = store.load_volumes()
    if not uids:
        raise StoreError(f"the store at {store.root} holds no studies; run cohortsim ingest first")
    stored_spec = store.studies(columns=["spec"])["spec"][0].as_py()
    if stored_spec and InputSpec.from_dict(_json(stored_spec)) != card.input:
        raise ModelVersionError(
            f"the encoder in {model_dir} expects input {card.input.to_dict()} but the store was "
            "preprocessed differently; train on this store or re-ingest with the encoder's spec"
        )
    chunks = []
    n = len(uids)
    for start in range(0, n, batch_size):
        chunks.append(
            embed(encoder, volumes[start : start + batch_size], batch_size=batch_size, device=str(dev))
        )
        if progress is not None:
            progress(min(start + batch_size, n), n)
    vectors = np.concatenate(chunks, axis=0).astype(np.float32)
    table = store.cohort_table()
    order = {u: i for i, u in enumerate(table["study_uid"].to_pylist())}
    missing = [u for u in uids if u not in order]
    if missing:
        raise StoreError(f"{len(missing)} stored volumes have no study row; the store is inconsistent")
    table = table.take(pa.array([order[u] for u in uids], pa.int64()))
    return vectors, table, card.version


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
    progress: Callable[[str, int, int], None] | None = None,
) -> str:
    """Embed the store with the model and publish a snapshot; returns the version id."""
    store = CohortStore(store_dir)
    vectors, table, model_version = embed_store(
        store,
        model_dir,
        device=device,
        batch_size=batch_size,
        progress=(lambda d, t: progress("embed", d, t)) if progress else None,
    )
    return build_snapshot(
        index_dir,
        vectors,
        table,
        model_version=model_version,
        kind=kind,
        encoder_dir=Path(model_dir),
        store_version=store.store_version(),
    )


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
    return build_snapshot(index_dir, vectors, table, model_version=model_version, kind=kind)
