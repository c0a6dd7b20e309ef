"""Snapshot versions on disk: layout, version ids, ``CURRENT``, publish, rollback, prune,
manifests and their checksums.

Layout of an index folder ``INDEX_DIR/``::

    INDEX_DIR/CURRENT                     the served version id (one line)
    INDEX_DIR/versions/<v>/index.faiss    FAISS index; FAISS id i == row i of metadata
    INDEX_DIR/versions/<v>/metadata.parquet   the cohort table (+ ``row_id``), row i <-> id i
    INDEX_DIR/versions/<v>/embeddings.npy     (n, d) float32, L2-normalised; only for kinds
                                          whose index does not hold the plain vectors
                                          (IVF, PQ...): Flat / SQfp16 / HNSW are read in place
    INDEX_DIR/tombstones.parquet          withdrawn patients, hidden from every version
    INDEX_DIR/versions/<v>/ood_reference.npy  sorted leave-one-out mean-neighbour similarities
    INDEX_DIR/versions/<v>/encoder/...        optional copy of the encoder model folder
    INDEX_DIR/versions/<v>/manifest.json      version, kind, dimension, sha256 of every file...

The metric is cosine similarity, computed as inner product on L2-normalised float32
vectors. A version is built in ``versions/.tmp-<v>/``, fsynced, renamed to
``versions/<v>/`` (the parent fsynced), and only then is ``CURRENT`` replaced (tmp +
``os.replace`` + fsync), so a server reading ``CURRENT`` never sees a half-built version
and a rebuild never disturbs one being served.

Building a version is :mod:`indexing.snapshot_build`; loading and searching one is
:mod:`indexing.snapshot`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from indexing.durable import AtomicWriteFailure, fsync_dir, fsync_file, sha256_file, write_atomic
from indexing.errors import (
    SnapshotError,
    SnapshotWriteError,
    describe_os_error,
)

log = logging.getLogger(__name__)


FORMAT_VERSION = 2  # 2: the manifest carries its own sha256 (manifest_sha256)


INDEX_FILE = "index.faiss"
METADATA_FILE = "metadata.parquet"
EMBEDDINGS_FILE = "embeddings.npy"
OOD_FILE = "ood_reference.npy"
MANIFEST_FILE = "manifest.json"
ENCODER_DIR = "encoder"
CURRENT_FILE = "CURRENT"
VERSIONS_DIR = "versions"


# Manifest keys written by build_snapshot itself (others come from extra_manifest).
BUILD_MANIFEST_KEYS = frozenset(
    {
        "format",
        "version",
        "created_at",
        "model_version",
        "dimension",
        "metric",
        "index_kind",
        "num_studies",
        "search_params",
        "rerank",
        "vectors",
        "deleted_patients_dropped",
        "store_version",
        "faiss_version",
        "k_ood",
        "ood_reference",
        "files",
        "derived_from",
        "manifest_sha256",
    }
)
MANIFEST_CHECKSUM_KEY = "manifest_sha256"


def new_version_id(versions_dir: Path | None = None) -> str:
    """``v<UTC yyyymmddHHMMSS>-<6 hex>``; sorts after every version already in the folder."""
    stamp = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
    version = f"v{stamp}-{secrets.token_hex(3)}"
    if versions_dir is not None:
        same_second = [v for v in _version_names(versions_dir) if v.startswith(f"v{stamp}-")]
        if same_second and max(same_second) >= version:
            bump = int(max(same_second).rsplit("-", 1)[1], 16) + 1 + secrets.randbelow(256)
            version = f"v{stamp}-{min(bump, 0xFFFFFF):06x}"
    return version


def _version_names(versions_dir: Path) -> list[str]:
    if not versions_dir.is_dir():
        return []
    return sorted(
        p.name
        for p in versions_dir.iterdir()
        if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST_FILE).exists()
    )


def list_versions(index_dir: Path | str) -> list[str]:
    """Published version ids under ``index_dir``, oldest first."""
    return _version_names(Path(index_dir) / VERSIONS_DIR)


def current_version(index_dir: Path | str) -> str | None:
    """The version ``CURRENT`` names, or None when nothing was published."""
    path = Path(index_dir) / CURRENT_FILE
    if not path.exists():
        return None
    return path.read_text().strip() or None


def publish(index_dir: Path | str, version: str) -> None:
    """Point ``CURRENT`` at an existing version (atomic replace; also used for rollback).

    A failed write raises :class:`SnapshotWriteError`; ``CURRENT`` then still names the
    version it named before (unless only the final folder fsync failed, which the
    message says).
    """
    index_dir = Path(index_dir)
    if not (index_dir / VERSIONS_DIR / version / MANIFEST_FILE).exists():
        raise SnapshotError(f"version {version} does not exist under {index_dir}")
    try:
        write_atomic(index_dir / CURRENT_FILE, lambda fh: fh.write(version + "\n"), mode="w")
    except AtomicWriteFailure as failure:
        where = {
            "writing": failure.tmp,
            "syncing": failure.tmp,
            "renaming into place": failure.path,
            "syncing the folder": index_dir,
        }[failure.step]
        raise snapshot_write_error(
            failure.error,
            (failure.step, where),
            index_dir,
            published=failure.in_place,
            version=version,
        ) from failure.error


def snapshot_write_error(
    exc: OSError,
    step: tuple[str, Path],
    index_dir: Path,
    *,
    published: bool,
    version: str | None = None,
) -> SnapshotWriteError:
    """The typed error of a failed snapshot write: what failed where, and what is served."""
    served: str | None = version
    if not published:
        try:
            served = current_version(index_dir)
        except OSError:
            served = None
    if published:
        tail = f"; version {version} is published but CURRENT may not survive a power loss"
    else:
        tail = (
            "; nothing was published, "
            + (f"version {served} is still served" if served else "no version is served yet")
            + " (fix the cause and run the command again)"
        )
    return SnapshotWriteError(
        describe_os_error(exc, step[0], step[1]) + tail, path=step[1], errno=exc.errno
    )


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON, without its own checksum entry."""
    body = {k: v for k, v in manifest.items() if k != MANIFEST_CHECKSUM_KEY}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest`` (format 2, with its own sha256) to ``path`` and fsync it."""
    manifest["format"] = FORMAT_VERSION
    manifest[MANIFEST_CHECKSUM_KEY] = manifest_digest(manifest)
    with open(path, "w") as fh:
        fh.write(json.dumps(manifest, indent=1))  # one write (json.dump writes per token)
        fh.flush()
        os.fsync(fh.fileno())


def rollback(index_dir: Path | str, version: str) -> None:
    """Serve an earlier (or any) version again: verify its checksums, then move ``CURRENT``.

    Raises :class:`SnapshotError` when the version is unknown or its files are corrupt, so
    a rollback never points servers at a broken snapshot.
    """
    index_dir = Path(index_dir)
    vdir = index_dir / VERSIONS_DIR / version
    if not (vdir / MANIFEST_FILE).exists():
        known = ", ".join(list_versions(index_dir)) or "none"
        raise SnapshotError(f"snapshot version {version} not found in {index_dir} (known: {known})")
    verify_snapshot(vdir, load_manifest(vdir))
    publish(index_dir, version)
    log.info("index: CURRENT rolled to version %s", version)


def prune_versions(
    index_dir: Path | str, *, keep: int, stale_tmp_s: float = 24 * 3600
) -> list[str]:
    """Delete all but the newest ``keep`` versions; ``CURRENT``'s version always stays.

    Returns the removed version ids, oldest first. A version is renamed to a hidden
    ``versions/.trash-*`` folder before its files go, so no reader ever sees half of one;
    a server still holding a pruned version keeps its open files until it moves on.
    Unfinished ``.tmp-*`` build folders older than ``stale_tmp_s`` are removed too.
    """
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise SnapshotError(f"keep must be a whole number >= 1, got {keep!r}")
    index_dir = Path(index_dir)
    versions_dir = index_dir / VERSIONS_DIR
    versions = list_versions(index_dir)
    current = current_version(index_dir)
    survivors = set(versions[-keep:]) | ({current} if current else set())
    removed = []
    for v in versions:
        if v in survivors:
            continue
        trash = versions_dir / f".trash-{v}-{secrets.token_hex(3)}"
        os.rename(versions_dir / v, trash)
        shutil.rmtree(trash, ignore_errors=True)
        removed.append(v)
    now = datetime.now(UTC).timestamp()
    if versions_dir.is_dir():
        for p in versions_dir.iterdir():
            if p.name.startswith((".tmp-", ".trash-")) and now - p.stat().st_mtime > stale_tmp_s:
                shutil.rmtree(p, ignore_errors=True)
        fsync_dir(versions_dir)
    if removed:
        log.info("index: pruned %d versions (kept %d)", len(removed), len(versions) - len(removed))
    return removed


def republish_metadata(
    index_dir: Path | str,
    metadata: pa.Table,
    *,
    base_version: str | None = None,
    manifest_updates: dict[str, Any] | None = None,
) -> str:
    """Publish a new version that shares ``base_version``'s vectors but has new metadata.

    For outcome updates without re-embedding: the index, vectors and encoder files are
    hard-linked (copied where links are not possible) from the base version, only
    ``metadata.parquet`` and the manifest are new. ``metadata`` must list the same
    ``study_uid`` in the same order as the base. Returns the new version id.
    """
    index_dir = Path(index_dir)
    base_version = base_version or current_version(index_dir)
    if base_version is None:
        raise SnapshotError(
            f"no published snapshot in {index_dir}; run cohortsim index build first"
        )
    bdir = index_dir / VERSIONS_DIR / base_version
    base = load_manifest(bdir)
    old_uids = pq.read_table(bdir / METADATA_FILE, columns=["study_uid"]).column("study_uid")
    if "study_uid" not in metadata.column_names or not metadata.column("study_uid").equals(
        old_uids
    ):
        raise SnapshotError(
            "new metadata must list the base version's studies in the same order "
            "(row i <-> vector i); rebuild the index to change the studies"
        )
    if "row_id" not in metadata.column_names:
        metadata = metadata.add_column(
            0, "row_id", pa.array(np.arange(metadata.num_rows, dtype=np.int64))
        )
    versions = index_dir / VERSIONS_DIR
    version = new_version_id(versions)
    tmp = versions / f".tmp-{version}"
    step: tuple[str, Path] = ("creating", tmp)
    try:
        tmp.mkdir()
        files = dict(base["files"])
        for name in files:
            if name == METADATA_FILE:
                continue
            dst = tmp / name
            step = ("linking", dst)
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(bdir / name, dst)
            except OSError:
                shutil.copy2(bdir / name, dst)
        step = ("writing", tmp / METADATA_FILE)
        with open(tmp / METADATA_FILE, "wb") as fh:
            pq.write_table(metadata, fh, compression="zstd")
        fsync_file(tmp / METADATA_FILE)
        files[METADATA_FILE] = sha256_file(tmp / METADATA_FILE)
        manifest = dict(base)
        manifest.update(manifest_updates or {})
        manifest.update(
            {
                "version": version,
                "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "derived_from": base_version,
                "files": files,
            }
        )
        step = ("writing", tmp / MANIFEST_FILE)
        write_manifest(tmp / MANIFEST_FILE, manifest)
        for sub in sorted({p.parent for p in tmp.rglob("*")} | {tmp}, reverse=True):
            step = ("syncing the folder", sub)
            fsync_dir(sub)
        step = ("renaming into place", versions / version)
        os.rename(tmp, versions / version)
        step = ("syncing the folder", versions)
        fsync_dir(versions)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise snapshot_write_error(exc, step, index_dir, published=False) from exc
        raise
    publish(index_dir, version)
    log.info("index: published version %s (metadata update of %s)", version, base_version)
    return version


def load_manifest(vdir: Path) -> dict[str, Any]:
    path = vdir / MANIFEST_FILE
    if not path.exists():
        raise SnapshotError(f"{path} is missing; the version is incomplete, rebuild the index")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SnapshotError(f"{path} is unreadable ({exc}); rebuild the index") from exc
    if not isinstance(manifest, dict):
        raise SnapshotError(f"{path} is not a JSON object; rebuild the index")
    fmt = manifest.get("format")
    if fmt not in (1, FORMAT_VERSION):
        raise SnapshotError(
            f"{path} has format {fmt!r}, this cohortsim reads 1..{FORMAT_VERSION}; the manifest "
            "is corrupt or from a newer cohortsim"
        )
    if fmt >= 2 and manifest.get(MANIFEST_CHECKSUM_KEY) != manifest_digest(manifest):
        raise SnapshotError(
            f"{path} fails its sha256 checksum (the manifest is corrupt); serve another "
            "version (cohortsim index rollback) or rebuild the index"
        )
    for key in ("version", "dimension", "num_studies", "index_kind", "model_version", "files"):
        if key not in manifest:
            raise SnapshotError(f"{path} lacks {key!r}; rebuild the index")
    if manifest["version"] != vdir.name:
        raise SnapshotError(
            f"{path} describes version {manifest['version']!r}, not {vdir.name!r}; rebuild the index"
        )
    return manifest


def read_manifest(index_dir: Path | str, version: str) -> dict[str, Any]:
    """The manifest of one version (no checksum verification); SnapshotError if unreadable."""
    return load_manifest(Path(index_dir) / VERSIONS_DIR / version)


def verify_snapshot(vdir: Path, manifest: dict[str, Any]) -> None:
    """Check the sha256 of every file the manifest lists; SnapshotError names the first bad one."""
    for name, digest in manifest["files"].items():
        path = vdir / name
        if not path.is_file():
            raise SnapshotError(f"snapshot file {name} is missing from {vdir}; rebuild the index")
        if sha256_file(path) != digest:
            raise SnapshotError(
                f"snapshot file {name} in {vdir} fails its sha256 checksum; "
                "the copy is corrupt, rebuild the index or serve another version"
            )


def check_id_map(metadata: pa.Table, version: str) -> None:
    """Row i of the metadata must be FAISS id i (``row_id`` = 0..n-1), one row per study."""
    n = metadata.num_rows
    if "row_id" in metadata.column_names:
        row_id = metadata.column("row_id").to_numpy()
        if row_id.shape != (n,) or not np.array_equal(row_id, np.arange(n)):
            raise SnapshotError(
                f"snapshot {version}: metadata row_id is not 0..{n - 1}, so rows do not map to "
                "the index's vectors; rebuild the index"
            )
    uids = metadata.column("study_uid") if "study_uid" in metadata.column_names else None
    if uids is None or uids.null_count or len(pc.unique(uids)) != n:
        raise SnapshotError(
            f"snapshot {version}: metadata study_uid values are missing or repeated; "
            "rebuild the index"
        )
