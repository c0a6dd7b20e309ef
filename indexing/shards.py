"""Shards of one institution's index: a cohort split by patient into N servable indexes.

``cohortsim index build --shards N --out DIR`` embeds the cohort once and publishes
``DIR/shard-0`` ... ``DIR/shard-{N-1}``, each a normal index folder (``cohortsim serve
--index DIR/shard-i``) with the same encoder version. A coordinator in shard mode
(:mod:`service.shards`, ``mode = "shards"`` in its sites file) takes every shard's top-k
and answers as the unsharded index would.

The split rule (:func:`shard_of`): a study goes to shard
``int.from_bytes(sha256(patient_id)[:8], "big") % N``, where ``patient_id`` is the
store's keyed pseudonym. Every study of a patient is in one shard (so excluding a
patient's own studies, withdrawing a patient and counting distinct patients stay
per-shard operations), the rule needs no table of assignments, and the same cohort
always splits the same way. Rows keep their cohort order inside a shard.

What every shard shares with the unsharded index, so that a merged answer equals its
answer: the prognostic evaluation (the kernel temperature chosen at build and the skill
notices) is computed once over the whole cohort and written into every shard's manifest,
with ``shard = {index, count, rule, cohort_studies, cohort_ood_reference}``: the last is
the whole cohort's out-of-distribution reference (an exact search over every vector at
build), which the coordinator ranks queries against; each shard's own reference is only
its own.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa

from indexing.build import BUILD_DIR, _card_of, checkpoint_dir_for, embed_store, read_embeddings
from indexing.errors import SnapshotError
from indexing.evaluation import EVALUATION_KEY, evaluate_prognosis
from indexing.snapshot_build import K_OOD, OOD_SAMPLE, build_snapshot, normalize_rows, ood_reference
from indexing.store import CohortStore

#: The manifest key describing a shard (absent in an unsharded index).
SHARD_KEY = "shard"
#: The rule's name as written into every shard's manifest.
SHARD_RULE = "sha256(patient_id)[:8] mod N"
#: Folder of shard i inside the ``--out`` folder.
SHARD_DIR = "shard-{}"
#: Most shards one build makes (a guard against a typo, not a limit of the design).
MAX_SHARDS = 256


class ShardBuildError(SnapshotError):
    """A sharded build that cannot be made (too many shards for the patients, bad N)."""

    status = "INVALID_ARGUMENT"
    reason = "shard_build"


def shard_of(patient_ids: Sequence[str], n: int) -> np.ndarray:
    """``(len(patient_ids),) int64``: each study's shard under :data:`SHARD_RULE`."""
    if not 1 <= n <= MAX_SHARDS:
        raise ShardBuildError(f"the number of shards must be between 1 and {MAX_SHARDS}, got {n}")
    return np.fromiter(
        (int.from_bytes(hashlib.sha256(str(p).encode()).digest()[:8], "big") % n for p in patient_ids),
        dtype=np.int64,
        count=len(patient_ids),
    )


def cohort_ood_reference(vectors: np.ndarray, *, k_ood: int = K_OOD, seed: int = 0) -> np.ndarray:
    """The whole cohort's out-of-distribution reference, as an unsharded exact index
    computes it (sorted leave-one-out mean similarity of a sample of members to their
    ``k_ood`` nearest others; ``vectors`` ``(n, d)``): a coordinator ranks a query's
    merged nearest studies against it."""
    unit = normalize_rows(vectors)
    index = faiss.IndexFlatIP(unit.shape[1])
    index.add(unit)
    return ood_reference(index, unit, k_ood=k_ood, sample=OOD_SAMPLE, seed=seed)


def shard_dirs(out_dir: Path | str, n: int) -> list[Path]:
    """The ``n`` shard folders of a sharded build's ``out_dir``."""
    return [Path(out_dir) / SHARD_DIR.format(i) for i in range(n)]


def publish_shards(
    vectors: np.ndarray,
    table: pa.Table,
    out_dir: Path | str,
    n: int,
    *,
    model_version: str,
    kind: str = "Flat",
    encoder_dir: Path | None = None,
    store_version: str | None = None,
    search_params: dict[str, float] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> list[tuple[Path, str]]:
    """Split an embedded cohort by patient and publish one snapshot per shard.

    ``vectors`` ``(n_studies, d)`` float32, row i of ``table`` (the cohort table) is
    vector i. Returns ``[(shard folder, published version)]`` in shard order. Refuses a
    split that leaves a shard empty (fewer patients than shards, or an unlucky hash on a
    tiny cohort): every shard must be a servable index.
    """
    shard = shard_of(table.column("patient_id").to_pylist(), n)
    sizes = np.bincount(shard, minlength=n)
    if (sizes == 0).any():
        empty = ", ".join(str(i) for i in np.flatnonzero(sizes == 0))
        raise ShardBuildError(
            f"{n} shards of {table.num_rows} studies leave shard(s) {empty} empty; "
            "use fewer shards (every shard must hold at least one patient)"
        )
    # one evaluation of the whole cohort: every shard carries the unsharded kernel and skill
    evaluation = evaluate_prognosis(vectors, table)
    reference = cohort_ood_reference(vectors)
    published: list[tuple[Path, str]] = []
    for i, folder in enumerate(shard_dirs(out_dir, n)):
        rows = np.flatnonzero(shard == i)
        info: dict[str, Any] = {
            "index": i,
            "count": n,
            "rule": SHARD_RULE,
            "cohort_studies": int(table.num_rows),
            "cohort_ood_reference": [float(v) for v in reference],
        }
        version = build_snapshot(
            folder,
            vectors[rows],
            table.take(pa.array(rows, pa.int64())),
            model_version=model_version,
            kind=kind,
            encoder_dir=encoder_dir,
            store_version=store_version,
            search_params=search_params,
            progress=_prefixed(progress, f"shard {i}: "),
            extra_manifest={EVALUATION_KEY: evaluation, SHARD_KEY: info},
        )
        published.append((folder, version))
    return published


def _prefixed(
    progress: Callable[[str, int, int], None] | None, prefix: str
) -> Callable[[str, int, int], None] | None:
    if progress is None:
        return None
    report = progress

    def call(stage: str, done: int, total: int) -> None:
        report(prefix + stage, done, total)

    return call


def build_shards_from_store(
    store_dir: Path,
    model_dir: Path,
    out_dir: Path,
    n: int,
    *,
    kind: str = "Flat",
    device: str = "auto",
    batch_size: int = 16,
    shard_size: int = 512,
    search_params: dict[str, float] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> list[tuple[Path, str]]:
    """Embed the store once (checkpointed under ``out_dir/.build``, as an unsharded build)
    and publish ``n`` shards (:func:`publish_shards`)."""
    shard_of([], n)  # a bad n fails before any embedding
    store = CohortStore(store_dir)
    _enc, card = _card_of(model_dir)
    spec = store.studies(columns=["spec"])["spec"]
    ckpt = checkpoint_dir_for(out_dir, card.version, (spec[0].as_py() if len(spec) else "") + "/readers")
    vectors, table, model_version = embed_store(
        store,
        model_dir,
        device=device,
        batch_size=batch_size,
        progress=(lambda d, t: progress("embed", d, t)) if progress else None,
        checkpoint_dir=ckpt,
        shard_size=shard_size,
    )
    published = publish_shards(
        vectors,
        table,
        out_dir,
        n,
        model_version=model_version,
        kind=kind,
        encoder_dir=Path(model_dir),
        store_version=store.store_version(),
        search_params=search_params,
        progress=progress,
    )
    shutil.rmtree(ckpt, ignore_errors=True)
    shutil.rmtree(Path(out_dir) / BUILD_DIR, ignore_errors=True)
    return published


def build_shards_from_embeddings(
    path: Path, out_dir: Path, n: int, *, kind: str = "Flat"
) -> list[tuple[Path, str]]:
    """``n`` shards of a precomputed-embeddings Parquet file (:func:`publish_shards`)."""
    vectors, table, model_version = read_embeddings(path)
    return publish_shards(vectors, table, out_dir, n, model_version=model_version, kind=kind)


__all__ = [
    "MAX_SHARDS",
    "SHARD_KEY",
    "SHARD_RULE",
    "ShardBuildError",
    "build_shards_from_embeddings",
    "build_shards_from_store",
    "cohort_ood_reference",
    "publish_shards",
    "shard_dirs",
    "shard_of",
]
