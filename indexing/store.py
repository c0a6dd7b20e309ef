"""The cohort store: one Parquet dataset of studies plus one outcomes table.

Layout of a store folder ``STORE/``::

    STORE/studies/part-<uuid>.<sha256>.parquet   one row per study (STUDY_SCHEMA),
                                        append-only; the name carries the file's sha256
    STORE/outcomes.<sha256>.parquet     one row per patient (OUTCOME_SCHEMA), rewritten on
                                        upsert (the newest one counts; older ones go)
    STORE/tombstones.parquet            withdrawn patients (pseudonyms): every read skips
                                        them at once; compact() removes their rows
    STORE/.lock                         advisory lock held while writing
    STORE/FORMAT                        the store format number (STORE_FORMAT)

Format 2 (:data:`STORE_FORMAT`) holds each study on the whole-study grid
(:mod:`encoders.grid`): ``volume`` is the context volume, ``grid`` its per-study spacing
and origin (JSON), ``patches`` the detail patches (int16, ``k x patch_shape``) and
``patch_info`` what each one is (JSON list: source, reader, lesion, rank, score,
centre_mm). A store without ``FORMAT`` but with studies is format 1 (the centre-cropped
legacy grid): its volumes are refused with :class:`StoreFormatError` naming the command
that rebuilds it (re-ingest; the cropped anatomy cannot be recovered from the store),
while outcomes, deletions and compaction keep working on it.

Every write goes to a temporary file in the same folder, is flushed and fsynced, then
renamed into place (``os.replace``) and the folder fsynced, so a reader sees either the
old or the new state, never half a file. Study part-file names are time-ordered UUIDs, so
sorting the names gives the order of ingestion. Keys are pseudonyms (``P-...``/``S-...``);
nothing here logs them.

Durability and integrity: a batch of studies is *acknowledged* when
:meth:`CohortStore.add_studies` returns; its part file was renamed into place and the
folder fsynced before that, so it survives a kill -9 or power loss, and a killed writer
leaves at most an invisible ``.part-*.tmp`` (removed by the next writer). Each part file's
sha256 is part of its name (written by the same atomic rename), and every read verifies
it once per process, so a truncated or bit-flipped part is refused with
:class:`StoreError`, never read; the outcomes file is named and checked the same way.
Parquet page checksums are written and verified too. A failed write (disk full, I/O error) raises
:class:`StoreWriteError` naming the path, and leaves the store as it was.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import secrets
import shutil
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from indexing.durable import (
    exclusive_lock,
    fsync_dir,
    sha256_file,
    write_atomic,
    write_parquet_atomic,
)
from indexing.errors import StoreError, StoreFormatError, StoreWriteError, describe_os_error
from indexing.tombstones import TOMBSTONE_FILE, TombstoneWatch, add_tombstones

log = logging.getLogger(__name__)

ACQUISITION_COLUMNS: tuple[str, ...] = (
    "manufacturer",
    "model",
    "kernel",
    "kvp",
    "slice_thickness",
    "pixel_spacing",
    # harmonisation metadata (part files written without these columns read them as null)
    "software",
    "exposure",
    "field_strength",
    "sequence",
    "protocol",
    "recon_diameter",
    "intensity",  # what the stored volume holds: HU, SUVbw_x100 or percentile_norm
)
#: voxel data and where it lies: left out of the cohort table (and so of index metadata)
VOLUME_COLUMNS: tuple[str, ...] = (
    "volume", "volume_shape", "grid", "patches", "patch_shape", "patch_info",
)
#: the store format this version writes and reads volumes of (see the module docstring)
STORE_FORMAT = 2
_FORMAT_FILE = "FORMAT"
#: which detail patch stands for a study: the first reader region, else the top proposal
#: ("readers"), or the top proposal even where readers marked regions ("proposals")
PATCH_USES = ("readers", "proposals")

STUDY_SCHEMA = pa.schema(
    [
        pa.field("patient_id", pa.string(), nullable=False),
        pa.field("study_uid", pa.string(), nullable=False),
        pa.field("site", pa.string()),
        pa.field("modality", pa.string()),
        pa.field("study_day", pa.int32()),
        *[pa.field(name, pa.string()) for name in ACQUISITION_COLUMNS],
        # int16 little-endian, C order; large_binary so a part file may exceed 2 GiB
        pa.field("volume", pa.large_binary(), nullable=False),
        pa.field("volume_shape", pa.list_(pa.int32()), nullable=False),
        pa.field("spec", pa.string()),
        pa.field("ingested_at", pa.timestamp("us", tz="UTC"), nullable=False),
        # format 2: the context grid (JSON), detail patches (int16 LE, k x patch_shape)
        # and what each patch is (JSON list); null for studies stored without patches
        pa.field("grid", pa.string()),
        pa.field("patches", pa.large_binary()),
        pa.field("patch_shape", pa.list_(pa.int32())),
        pa.field("patch_info", pa.string()),
    ]
)

OUTCOME_SCHEMA = pa.schema(
    [
        pa.field("patient_id", pa.string(), nullable=False),
        pa.field("time", pa.float64()),
        pa.field("event", pa.bool_()),
        pa.field("labels", pa.map_(pa.string(), pa.string())),
        pa.field("values", pa.map_(pa.string(), pa.float64())),
    ]
)

_STUDIES_DIR = "studies"
_OUTCOMES_FILE = "outcomes.parquet"
_LOCK_FILE = ".lock"


@dataclass
class StudyRecord:
    """One study as it enters the store.

    ``volume`` is the preprocessed ``(D, H, W) int16`` HU volume (``encoders.preprocess``;
    the context volume of :func:`encoders.grid.study_input`), ``grid`` its
    ``ContextGrid.to_dict()``, ``patches`` ``(k, pd, ph, pw) int16`` detail patches and
    ``patch_info`` one ``PatchInfo.to_dict()`` each (all optional);
    ``spec`` the JSON of the ``InputSpec`` it was resampled with (an object with
    ``to_dict()`` or a dict is accepted too). ``study_day`` is days since the patient's
    first study (never a date).
    """

    patient_id: str
    study_uid: str
    volume: np.ndarray
    spec: Any = ""
    site: str | None = None
    modality: str | None = None
    study_day: int | None = None
    manufacturer: str | None = None
    model: str | None = None
    kernel: str | None = None
    kvp: str | None = None
    slice_thickness: str | None = None
    pixel_spacing: str | None = None
    software: str | None = None
    exposure: str | None = None
    field_strength: str | None = None
    sequence: str | None = None
    protocol: str | None = None
    recon_diameter: str | None = None
    intensity: str | None = None
    ingested_at: datetime | None = field(default=None)
    grid: dict[str, Any] | None = None
    patches: np.ndarray | None = None
    patch_info: list[dict[str, Any]] | None = None

    def spec_json(self) -> str:
        spec = self.spec
        if hasattr(spec, "to_dict"):
            spec = spec.to_dict()
        if isinstance(spec, dict):
            return json.dumps(spec, sort_keys=True)
        return str(spec)


def _time_ordered_uuid() -> uuid.UUID:
    """A UUIDv7-style id: 48-bit Unix milliseconds, then random bits (names sort by time)."""
    ms = time.time_ns() // 1_000_000
    value = (ms & ((1 << 48) - 1)) << 80 | secrets.randbits(80)
    value = (value & ~(0xF << 76)) | (0x7 << 76)  # version 7
    value = (value & ~(0x3 << 62)) | (0x2 << 62)  # RFC 4122 variant
    return uuid.UUID(int=value)


# part-<uuid>.parquet (an older store: no checksum in the name) or part-<uuid>.<sha256>.parquet
_PART_NAME = re.compile(r"^part-([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})"
                        r"(?:\.([0-9a-f]{64}))?\.parquet$")
_CHECKSUM_NAME = re.compile(r"\.([0-9a-f]{64})\.parquet$")
# (real path, inode, size, mtime_ns) of part files whose checksum was verified in this process
_VERIFIED: set[tuple[str, int, int, int]] = set()
_VERIFIED_LOCK = threading.Lock()


def verify_part_file(path: Path) -> None:
    """Check a store file's sha256 against the one in its name (once per process per file
    state); :class:`StoreError` when it differs (truncated, bit-flipped, replaced)."""
    m = _CHECKSUM_NAME.search(path.name)
    if m is None:
        return  # written before checksums were named: nothing to compare with
    try:
        st = path.stat()
        key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
        with _VERIFIED_LOCK:
            if key in _VERIFIED:
                return
        digest = sha256_file(path)
    except OSError as exc:
        raise StoreError(
            describe_os_error(exc, "reading", path) + "; restore it from backup or re-ingest"
        ) from exc
    if digest != m.group(1):
        raise StoreError(
            f"store file {path} fails its sha256 checksum (truncated or corrupt); "
            "restore it from backup, or move it away and ingest (or set outcomes) again"
        )
    with _VERIFIED_LOCK:
        _VERIFIED.add(key)


class CohortStore:
    """A cohort store folder (see the module docstring).

    ``CohortStore(root)`` opens an existing store and raises :class:`StoreError` when there
    is none; ``create=True`` makes the folder. One writer at a time is expected; writes
    take an advisory lock on ``STORE/.lock`` so concurrent writers serialise.
    """

    def __init__(self, root: Path | str, *, create: bool = False) -> None:
        self.root = Path(root)
        self._studies_dir = self.root / _STUDIES_DIR
        if not self._studies_dir.is_dir():
            if not create:
                raise StoreError(
                    f"no cohort store at {self.root}; run cohortsim ingest first "
                    "(or pass create=True)"
                )
            try:
                self._studies_dir.mkdir(parents=True, exist_ok=True)
                fsync_dir(self.root)
            except OSError as exc:
                raise StoreWriteError(
                    describe_os_error(exc, "creating the store at", self.root),
                    path=self.root,
                    errno=exc.errno,
                ) from exc
        self._tombstones = TombstoneWatch(self.root / TOMBSTONE_FILE)
        if create and not (self.root / _FORMAT_FILE).exists() and not self._part_files():
            self._write_format()

    def __repr__(self) -> str:
        return f"CohortStore({str(self.root)!r})"

    # ---------------------------------------------------------------- format
    def _write_format(self) -> None:
        write_atomic(self.root / _FORMAT_FILE, lambda fh: fh.write(f"{STORE_FORMAT}\n"), mode="w")

    def store_format(self) -> int:
        """The format number of this store: ``STORE/FORMAT``; a store without that file is
        format 1 when it holds studies (written before formats were numbered), else the
        current one."""
        path = self.root / _FORMAT_FILE
        try:
            text = path.read_text().strip()
        except FileNotFoundError:
            return 1 if self._part_files() else STORE_FORMAT
        except OSError as exc:
            raise StoreError(describe_os_error(exc, "reading", path)) from exc
        if not text.isdigit():
            raise StoreError(f"{path} does not hold a store format number; restore it")
        return int(text)

    def check_format(self) -> None:
        """Raise :class:`StoreFormatError` unless this store's volumes can be read and added
        to by this version (format :data:`STORE_FORMAT`)."""
        fmt = self.store_format()
        if fmt == STORE_FORMAT:
            return
        if fmt < STORE_FORMAT:
            raise StoreFormatError(
                f"the store at {self.root} is format {fmt} (each study centre-cropped to "
                f"64 mm of z); this version stores whole studies (format {STORE_FORMAT}) and "
                "the cropped anatomy cannot be recovered from the old store: re-ingest the "
                "DICOM into a new store with `cohortsim ingest DICOM_DIR --store NEW_STORE` "
                "(then `cohortsim train` / `cohortsim index build` on it)"
            )
        raise StoreFormatError(
            f"the store at {self.root} is format {fmt}, newer than this cohortsim "
            f"(format {STORE_FORMAT}); upgrade cohortsim"
        )

    # ---------------------------------------------------------------- internals
    def _part_files(self) -> list[Path]:
        """Part files in ingestion order. When a compaction was killed between writing a
        part's new copy and removing the old one, two files share a uuid: the newer is used
        (both hold the same live rows; tombstoned rows are skipped on read anyway)."""
        newest: dict[str, tuple[int, Path]] = {}
        for path in self._studies_dir.glob("part-*.parquet"):
            m = _PART_NAME.match(path.name)
            key = m.group(1) if m else path.name
            try:
                mtime = path.stat().st_mtime_ns
            except FileNotFoundError:  # removed by a concurrent compaction
                continue
            if key not in newest or (mtime, path.name) > (newest[key][0], newest[key][1].name):
                newest[key] = (mtime, path)
        return [newest[k][1] for k in sorted(newest)]

    def _stale_parts(self) -> list[Path]:
        """Older copies of compacted parts and temporary files of killed writers (call
        with the write lock held: no live writer owns them)."""
        live = set(self._part_files())
        stale = [p for p in self._studies_dir.glob("part-*.parquet") if p not in live]
        return stale + list(self._studies_dir.glob(".part-*.tmp"))

    def _remove_stale(self) -> None:
        stale = self._stale_parts()
        for path in stale:
            with contextlib.suppress(OSError):
                path.unlink()
        if stale:
            with contextlib.suppress(OSError):
                fsync_dir(self._studies_dir)
            log.info("store: removed %d leftover file(s) of interrupted writes", len(stale))

    def _outcomes_file(self) -> Path | None:
        """The current outcomes file: the newest ``outcomes.<sha256>.parquet`` (a killed
        upsert may leave the previous one beside it), else a legacy ``outcomes.parquet``."""
        found = []
        for path in [*self.root.glob("outcomes.*.parquet"), self.root / _OUTCOMES_FILE]:
            if path.name != _OUTCOMES_FILE and not _CHECKSUM_NAME.search(path.name):
                continue
            try:
                found.append((path.stat().st_mtime_ns, path.name != _OUTCOMES_FILE, path.name, path))
            except FileNotFoundError:
                continue
        return max(found)[3] if found else None

    def _write_outcomes(self, table: pa.Table) -> None:
        """Commit a new outcomes file (atomic, named by its sha256), then drop older ones."""
        new = write_parquet_atomic(
            table,
            self.root / _OUTCOMES_FILE,
            name_with_checksum=lambda digest: self.root / f"outcomes.{digest}.parquet",
        )
        old = [p for p in [*self.root.glob("outcomes.*.parquet"), self.root / _OUTCOMES_FILE]
               if p != new and p.exists()]  # fmt: skip
        for path in old + list(self.root.glob(".outcomes.parquet.*.tmp")):
            with contextlib.suppress(OSError):
                path.unlink()
        if old:
            with contextlib.suppress(OSError):
                fsync_dir(self.root)

    def _write_part(self, table: pa.Table, part_id: str) -> Path:
        """Commit one part file named ``part-<part_id>.<sha256>.parquet`` (atomic)."""
        return write_parquet_atomic(
            table,
            self._studies_dir / f"part-{part_id}.parquet",
            name_with_checksum=lambda digest: self._studies_dir / f"part-{part_id}.{digest}.parquet",
        )

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with exclusive_lock(self.root / _LOCK_FILE):
            yield

    def _read_part(self, path: Path, names: Sequence[str]) -> pa.Table:
        verify_part_file(path)
        try:
            return pq.read_table(
                path, columns=list(names), schema=STUDY_SCHEMA, page_checksum_verification=True
            )
        except (OSError, pa.ArrowException) as exc:
            raise StoreError(
                f"cannot read store part file {path.name}: {exc}; "
                "restore it from backup or re-ingest"
            ) from exc

    def _read_parts(
        self, columns: Sequence[str] | None, *, include_deleted: bool = False
    ) -> pa.Table:
        schema = STUDY_SCHEMA if columns is None else _select_schema(STUDY_SCHEMA, columns)
        deleted = frozenset() if include_deleted else self.deleted_patients()
        names = list(schema.names)
        if deleted and "patient_id" not in names:
            names.append("patient_id")
        tables = []
        for path in self._part_files():
            part = self._read_part(path, names)
            if deleted:
                part = _drop_deleted(part, deleted).select(schema.names)
            tables.append(part)
        if not tables:
            return schema.empty_table()
        return pa.concat_tables(tables).combine_chunks()

    # ---------------------------------------------------------------- deletions
    def deleted_patients(self) -> frozenset[str]:
        """Pseudonyms of withdrawn patients (``STORE/tombstones.parquet``)."""
        return self._tombstones.current()[1]

    def delete_patients(self, patient_ids: Sequence[str]) -> int:
        """Withdraw patients: from now on every read skips their studies and outcomes, and
        re-ingesting their studies adds nothing. The rows go physically at :meth:`compact`.
        Returns how many pseudonyms were newly tombstoned."""
        added = add_tombstones(self.root / TOMBSTONE_FILE, patient_ids)
        if added:
            log.info("store: %d patients withdrawn (tombstoned)", added)
        return added

    def compact(self) -> dict[str, int]:
        """Rewrite the files that still hold withdrawn patients' rows, without them.

        Each part file is replaced in place (same name, atomic rename), so readers see
        either the old or the new file. Tombstones stay, so a re-ingest cannot bring the
        patients back. Returns ``{"studies_removed", "outcomes_removed", "parts_rewritten"}``.
        """
        deleted = self.deleted_patients()
        report = {"studies_removed": 0, "outcomes_removed": 0, "parts_rewritten": 0}
        if not deleted:
            return report
        with self._locked():
            self._remove_stale()
            for path in self._part_files():
                ids = self._read_part(path, ["patient_id"]).column("patient_id")
                hit = pc.is_in(ids, value_set=pa.array(sorted(deleted), pa.string()))
                gone = int(pc.sum(hit).as_py() or 0)
                if not gone:
                    continue
                part = _drop_deleted(self._read_part(path, STUDY_SCHEMA.names), deleted)
                if part.num_rows == 0:
                    path.unlink()
                    fsync_dir(path.parent)
                else:
                    m = _PART_NAME.match(path.name)
                    new = self._write_part(part, m.group(1) if m else str(_time_ordered_uuid()))
                    if new != path:  # the new copy is in place; the old one goes
                        path.unlink()
                        fsync_dir(path.parent)
                report["studies_removed"] += gone
                report["parts_rewritten"] += 1
            if self._outcomes_file() is not None:
                old = self.outcomes(include_deleted=True)
                kept = _drop_deleted(old, deleted)
                if kept.num_rows != old.num_rows:
                    self._write_outcomes(kept)
                    report["outcomes_removed"] = old.num_rows - kept.num_rows
        log.info(
            "store: compacted (%d studies, %d outcome rows removed)",
            report["studies_removed"],
            report["outcomes_removed"],
        )
        return report

    # ---------------------------------------------------------------- studies
    def add_studies(self, records: Sequence[StudyRecord]) -> int:
        """Append studies as one new part file; returns how many were added.

        Studies whose ``study_uid`` is already stored (or repeated within ``records``) are
        skipped, so re-ingesting a folder is idempotent; so are studies of withdrawn
        patients (:meth:`delete_patients`).
        """
        self.check_format()
        with self._locked():
            self._remove_stale()
            if not (self.root / _FORMAT_FILE).exists():
                self._write_format()
            seen = set(
                self._read_parts(["study_uid"], include_deleted=True).column("study_uid").to_pylist()
            )
            withdrawn = self.deleted_patients()
            now = datetime.now(UTC)
            columns: dict[str, list[Any]] = {name: [] for name in STUDY_SCHEMA.names}
            for i, rec in enumerate(records):
                if not rec.patient_id or not rec.study_uid:
                    raise StoreError(f"record {i} has an empty patient_id or study_uid")
                if rec.study_uid in seen or rec.patient_id in withdrawn:
                    continue
                seen.add(rec.study_uid)
                vol = np.asarray(rec.volume)
                if vol.dtype != np.int16 or vol.ndim != 3:
                    raise StoreError(
                        f"record {i}: volume must be a (D, H, W) int16 array, got "
                        f"{vol.ndim}-D {vol.dtype}; preprocess it with encoders.preprocess"
                    )
                columns["patient_id"].append(rec.patient_id)
                columns["study_uid"].append(rec.study_uid)
                columns["site"].append(rec.site)
                columns["modality"].append(rec.modality)
                columns["study_day"].append(None if rec.study_day is None else int(rec.study_day))
                for name in ACQUISITION_COLUMNS:
                    value = getattr(rec, name)
                    columns[name].append(None if value is None else str(value))
                columns["volume"].append(np.ascontiguousarray(vol, dtype="<i2").tobytes())
                columns["volume_shape"].append([int(s) for s in vol.shape])
                columns["spec"].append(rec.spec_json())
                columns["ingested_at"].append(rec.ingested_at or now)
                _add_patches(columns, rec, i)
            added = len(columns["study_uid"])
            if added == 0:
                return 0
            table = pa.table(columns, schema=STUDY_SCHEMA)
            self._write_part(table, str(_time_ordered_uuid()))
        log.info(
            "store: added %d studies (%d skipped as already present)", added, len(records) - added
        )
        return added

    def part_files(self) -> list[Path]:
        """The study part files in ingestion order (what a distributed rebuild splits into
        units of work; read each with :func:`verify_part_file` first)."""
        return self._part_files()

    def study_uids(self) -> set[str]:
        """The set of stored study pseudonyms."""
        return set(self._read_parts(["study_uid"]).column("study_uid").to_pylist())

    def studies(self, columns: Sequence[str] | None = None) -> pa.Table:
        """All study rows (STUDY_SCHEMA, or the given columns), in ingestion order."""
        return self._read_parts(columns)

    def load_volumes(self, *, patches: str | None = None) -> tuple[list[str], np.ndarray]:
        """``(study_uids, (n, D, H, W) int16)`` in ingestion order, in memory (2 MiB per
        study on the default grid; :meth:`spool_volumes` for a cohort larger than that).
        ``patches`` (:data:`PATCH_USES`) gives each study's primary detail patch instead of
        its context volume (see :meth:`iter_volumes`).

        Raises :class:`StoreError` when the store is empty or volumes differ in shape.
        """
        uids, shape = self._volume_rows(patches)
        out = np.empty((len(uids), *shape), dtype=np.int16)
        self._fill(out, patches)
        return uids, out

    def spool_volumes(self, path: Path | str, *,
                      patches: str | None = None) -> tuple[list[str], np.ndarray]:
        """As :meth:`load_volumes`, but the volumes are written to the ``.npy`` file
        ``path`` and returned as a read-only memory map of it, so a cohort larger than
        memory can be trained on (the caller removes the file). Raises
        :class:`StoreError` when the file system lacks the room."""
        uids, shape = self._volume_rows(patches)
        need = len(uids) * int(np.prod(shape)) * np.dtype(np.int16).itemsize
        path = Path(path)
        free = shutil.disk_usage(path.parent).free
        if need > free:
            raise StoreError(
                f"spooling {len(uids)} volumes needs {need / 2**30:.1f} GiB in {path.parent}, "
                f"which has {free / 2**30:.1f} GiB free"
            )
        out = np.lib.format.open_memmap(path, mode="w+", dtype=np.int16,
                                        shape=(len(uids), *shape))
        try:
            self._fill(out, patches)
            out.flush()
        finally:
            del out
        return uids, np.load(path, mmap_mode="r")

    def _volume_rows(self, patches: str | None = None) -> tuple[list[str], tuple[int, ...]]:
        """The study uids (ingestion order, withdrawn patients skipped) and the one
        volume (or patch) shape they share."""
        self.check_format()
        column = "volume_shape" if patches is None else "patch_shape"
        table = self._read_parts(["study_uid", column])
        if table.num_rows == 0:
            raise StoreError(
                f"the store at {self.root} holds no studies; run cohortsim ingest first"
            )
        if patches is not None and table.column(column).null_count:
            raise StoreError(
                f"{table.column(column).null_count} studies of the store at {self.root} have "
                "no detail patches; re-ingest them with a whole-study InputSpec"
            )
        shapes = Counter(tuple(s) for s in table.column(column).to_pylist())
        if len(shapes) != 1:
            listing = ", ".join(f"{s} x{c}" for s, c in shapes.most_common())
            raise StoreError(
                f"stored volumes have {len(shapes)} different shapes ({listing}); "
                "re-ingest every study with one InputSpec"
            )
        return table.column("study_uid").to_pylist(), next(iter(shapes))

    def _fill(self, out: np.ndarray, patches: str | None = None) -> None:
        """Stream the volumes into ``out`` (one row per study of :meth:`_volume_rows`)."""
        row = 0
        for _uids, vols in self.iter_volumes(batch_size=256, patches=patches):
            if row + len(vols) > out.shape[0]:
                row += len(vols)
                break
            out[row : row + len(vols)] = vols
            row += len(vols)
        if row != out.shape[0]:
            raise StoreError(
                f"the store at {self.root} changed while its {out.shape[0]} volumes were "
                "read (studies added or withdrawn meanwhile); try again"
            )

    def iter_volumes(
        self, batch_size: int = 64, *, patches: str | None = None
    ) -> Iterator[tuple[list[str], np.ndarray]]:
        """Stream ``(study_uids, (b, D, H, W) int16)`` batches in ingestion order: the
        context volumes, or with ``patches`` (:data:`PATCH_USES`) each study's primary
        detail patch (:func:`primary_patch`).

        Only one part file's row group and one batch are in memory at a time, so a
        rebuild over millions of studies needs no more memory than a batch. Withdrawn
        patients are skipped. Raises :class:`StoreError` on mixed volume shapes and
        :class:`StoreFormatError` on a store of an older format.
        """
        if batch_size < 1:
            raise StoreError(f"batch_size must be >= 1, got {batch_size}")
        if patches is not None and patches not in PATCH_USES:
            raise StoreError(f"patches must be one of {PATCH_USES}, got {patches!r}")
        self.check_format()
        deleted = self.deleted_patients()
        uids: list[str] = []
        vols: list[np.ndarray] = []
        shape: tuple[int, ...] | None = None
        cols_wanted = (["patient_id", "study_uid", "volume", "volume_shape"] if patches is None
                       else ["patient_id", "study_uid", "patches", "patch_shape", "patch_info"])
        for path in self._part_files():
            verify_part_file(path)
            try:
                pf = pq.ParquetFile(path, page_checksum_verification=True)
                have = [c for c in cols_wanted if c in pf.schema_arrow.names]
                batches = pf.iter_batches(batch_size=batch_size, columns=have)
                for batch in batches:
                    cols = batch.to_pydict()
                    for j, (pid, uid) in enumerate(zip(cols["patient_id"], cols["study_uid"],
                                                       strict=True)):
                        if pid in deleted:
                            continue
                        vol = row_volume(cols, j, patches)
                        shp = tuple(vol.shape)
                        if shape is None:
                            shape = shp
                        elif shp != shape:
                            raise StoreError(
                                f"stored volumes differ in shape ({shape} and {shp}); "
                                "re-ingest every study with one InputSpec"
                            )
                        uids.append(uid)
                        vols.append(vol)
                        if len(uids) == batch_size:
                            yield uids, np.stack(vols)
                            uids, vols = [], []
            except (OSError, pa.ArrowException) as exc:
                raise StoreError(
                    f"cannot read store part file {path.name}: {exc}; "
                    "restore it from backup or re-ingest"
                ) from exc
        if uids:
            yield uids, np.stack(vols)

    def patch_table(self) -> pa.Table:
        """``study_uid``, ``grid`` and ``patch_info`` (JSON strings) of every study: where
        each detail patch lies and what it is, without the voxels."""
        return self._read_parts(["study_uid", "grid", "patch_info"])

    def patch_sources(self, uids: Sequence[str], use: str) -> list[str | None]:
        """What each study's primary detail patch (:func:`primary_patch` with ``use``) is:
        ``"reader"``, ``"proposal"`` or ``"centre"`` (None for a study without patches),
        in the order of ``uids``; the label its embedded region carries."""
        table = self.patch_table()
        info_of = dict(zip(table.column("study_uid").to_pylist(),
                           table.column("patch_info").to_pylist(), strict=True))
        out: list[str | None] = []
        for uid in uids:
            raw = info_of.get(uid)
            if not raw:
                out.append(None)
                continue
            info = json.loads(raw)
            out.append(str(info[primary_patch(info, use)].get("source") or "") or None)
        return out

    # ---------------------------------------------------------------- outcomes
    def outcomes(self, *, include_deleted: bool = False) -> pa.Table:
        """The outcomes table (OUTCOME_SCHEMA); empty when none were set."""
        path = self._outcomes_file()
        if path is None:
            return OUTCOME_SCHEMA.empty_table()
        verify_part_file(path)
        try:
            table = pq.read_table(path, schema=OUTCOME_SCHEMA, page_checksum_verification=True)
        except (OSError, pa.ArrowException) as exc:
            raise StoreError(f"cannot read {path.name}: {exc}; set the outcomes again") from exc
        deleted = frozenset() if include_deleted else self.deleted_patients()
        return _drop_deleted(table, deleted) if deleted else table

    def set_outcomes(self, table: pa.Table) -> int:
        """Upsert outcomes by ``patient_id``; returns the number of rows written.

        ``table`` needs ``patient_id`` and any of ``time`` (float, >= 0), ``event`` (bool or
        0/1), ``labels`` (map<string,string>), ``values`` (map<string,float64>). Other
        columns are folded in: string/boolean ones into ``labels``, numeric ones into
        ``values``. A given patient's row replaces the stored one as a whole.
        """
        new = normalize_outcomes(table)
        with self._locked():
            old = self.outcomes(include_deleted=True)
            new_ids = set(new.column("patient_id").to_pylist())
            keep = [pid not in new_ids for pid in old.column("patient_id").to_pylist()]
            merged = pa.concat_tables([old.filter(pa.array(keep, pa.bool_())), new])
            self._write_outcomes(merged.combine_chunks())
        log.info(
            "store: upserted outcomes for %d patients (%d in total)", new.num_rows, merged.num_rows
        )
        return new.num_rows

    # ---------------------------------------------------------------- views
    def cohort_table(self) -> pa.Table:
        """Studies without the volume columns, left-joined with outcomes on patient_id.

        Study order is kept; ``time``, ``event``, ``labels``, ``values`` are null for
        patients without an outcome row.
        """
        names = [n for n in STUDY_SCHEMA.names if n not in VOLUME_COLUMNS]
        studies = self._read_parts(names)
        outcomes = self.outcomes()
        position = {pid: i for i, pid in enumerate(outcomes.column("patient_id").to_pylist())}
        idx = pa.array(
            [position.get(pid) for pid in studies.column("patient_id").to_pylist()], pa.int64()
        )
        joined = outcomes.drop_columns(["patient_id"]).take(idx)
        for name in joined.column_names:
            studies = studies.append_column(joined.schema.field(name), joined.column(name))
        return studies

    def store_version(self) -> str:
        """A short content id: hash of the part-file names and the outcomes file stamp."""
        h = hashlib.sha256()
        for path in self._part_files():
            h.update(path.name.encode() + b"\n")
        outcomes = self._outcomes_file()
        for name in (outcomes.name if outcomes else _OUTCOMES_FILE, TOMBSTONE_FILE):
            path = self.root / name
            if path.exists():
                st = path.stat()
                h.update(f"{name}:{st.st_mtime_ns}:{st.st_size}".encode())
        return h.hexdigest()[:12]


def row_volume(cols: dict[str, list[Any]], j: int, patches: str | None) -> np.ndarray:
    """Row ``j`` of a batch of store rows (``cols``: column -> values): its context
    volume, or its primary patch (``patches``: :data:`PATCH_USES`)."""
    if patches is None:
        shp = tuple(int(s) for s in cols["volume_shape"][j])
        return np.frombuffer(cols["volume"][j], dtype="<i2").reshape(shp)
    buf = cols.get("patches", [None] * (j + 1))[j]
    if buf is None:
        raise StoreError("a stored study has no detail patches; re-ingest it with a "
                         "whole-study InputSpec")
    shp = tuple(int(s) for s in cols["patch_shape"][j])
    info = json.loads(cols["patch_info"][j])
    k = primary_patch(info, patches)
    size = int(np.prod(shp))
    return np.frombuffer(buf, dtype="<i2", count=size, offset=2 * size * k).reshape(shp)


def _add_patches(columns: dict[str, list[Any]], rec: StudyRecord, i: int) -> None:
    """Append ``rec``'s context grid and detail patches (format 2 columns) to ``columns``."""
    columns["grid"].append(None if rec.grid is None else json.dumps(rec.grid, sort_keys=True))
    if rec.patches is None:
        columns["patches"].append(None)
        columns["patch_shape"].append(None)
        columns["patch_info"].append(None)
        return
    p = np.asarray(rec.patches)
    info = list(rec.patch_info or [])
    if p.dtype != np.int16 or p.ndim != 4 or p.shape[0] < 1 or len(info) != p.shape[0]:
        raise StoreError(
            f"record {i}: patches must be a (k, d, h, w) int16 array with one patch_info "
            f"entry each, got {p.ndim}-D {p.dtype} and {len(info)} entries"
        )
    columns["patches"].append(np.ascontiguousarray(p, dtype="<i2").tobytes())
    columns["patch_shape"].append([int(v) for v in p.shape[1:]])
    columns["patch_info"].append(json.dumps(info, sort_keys=True))


def primary_patch(info: list[dict[str, Any]], use: str) -> int:
    """Index of the patch that stands for a study (``use``: :data:`PATCH_USES`): the first
    reader region with ``"readers"``, else (or with ``"proposals"``) the best-ranked
    non-reader patch (a proposal, or the centre when no lung was found)."""
    if use not in PATCH_USES:
        raise StoreError(f"patches must be one of {PATCH_USES}, got {use!r}")
    if use == "readers":
        for k, p in enumerate(info):
            if p.get("source") == "reader":
                return k
    others = [(int(p.get("rank", 0)), k) for k, p in enumerate(info) if p.get("source") != "reader"]
    if not others:
        raise StoreError("a study holds reader patches only; use patches='readers'")
    return min(others)[1]


def _drop_deleted(table: pa.Table, deleted: frozenset[str]) -> pa.Table:
    """``table`` without the rows whose ``patient_id`` is in ``deleted``."""
    if not deleted or table.num_rows == 0:
        return table
    hit = pc.is_in(table.column("patient_id"), value_set=pa.array(sorted(deleted), pa.string()))
    return table.filter(pc.invert(hit))


def _select_schema(schema: pa.Schema, columns: Sequence[str]) -> pa.Schema:
    unknown = [c for c in columns if c not in schema.names]
    if unknown:
        raise StoreError(f"unknown study columns {unknown}; known: {schema.names}")
    return pa.schema([schema.field(c) for c in columns])


def normalize_outcomes(table: pa.Table) -> pa.Table:
    """Cast an outcomes table to OUTCOME_SCHEMA (see :meth:`CohortStore.set_outcomes`)."""
    if "patient_id" not in table.column_names:
        raise StoreError("outcomes table has no patient_id column")
    ids = table.column("patient_id").cast(pa.string()).to_pylist()
    if any(not pid for pid in ids):
        raise StoreError("outcomes table has empty patient_id values")
    dupes = [pid for pid, c in Counter(ids).items() if c > 1]
    if dupes:
        raise StoreError(f"outcomes table repeats {len(dupes)} patient_id(s); give one row each")
    n = table.num_rows

    def column(name: str, typ: pa.DataType) -> pa.Array:
        if name not in table.column_names:
            return pa.nulls(n, typ)
        try:
            return table.column(name).cast(typ).combine_chunks()
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise StoreError(f"outcomes column {name!r} cannot be read as {typ}: {exc}") from exc

    times = [None if v is None or v != v else v for v in column("time", pa.float64()).to_pylist()]
    if any(v is not None and not (np.isfinite(v) and v >= 0) for v in times):
        raise StoreError("outcomes column 'time' must hold finite values >= 0 (or nulls)")
    event_src = table.column("event") if "event" in table.column_names else None
    if event_src is not None and pa.types.is_floating(event_src.type):
        event_src = event_src.cast(pa.int64())
    events = pa.nulls(n, pa.bool_()) if event_src is None else event_src.cast(pa.bool_())

    labels = [
        dict(m) if m else {}
        for m in column("labels", OUTCOME_SCHEMA.field("labels").type).to_pylist()
    ]
    values = [
        dict(m) if m else {}
        for m in column("values", OUTCOME_SCHEMA.field("values").type).to_pylist()
    ]
    extra = [c for c in table.column_names if c not in OUTCOME_SCHEMA.names]
    for name in extra:
        col = table.column(name)
        typ = col.type
        if pa.types.is_integer(typ) or pa.types.is_floating(typ) or pa.types.is_decimal(typ):
            for i, v in enumerate(col.cast(pa.float64()).to_pylist()):
                if v is not None and np.isfinite(v):
                    values[i][name] = float(v)
        else:
            try:
                strings = col.cast(pa.string()).to_pylist()
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise StoreError(
                    f"outcomes column {name!r} of type {typ} is not supported"
                ) from exc
            for i, v in enumerate(strings):
                if v is not None and v != "":
                    labels[i][name] = v
    return pa.table(
        {
            "patient_id": pa.array(ids, pa.string()),
            "time": pa.array(times, pa.float64()),
            "event": events,
            "labels": pa.array(
                [list(d.items()) for d in labels], OUTCOME_SCHEMA.field("labels").type
            ),
            "values": pa.array(
                [list(d.items()) for d in values], OUTCOME_SCHEMA.field("values").type
            ),
        },
        schema=OUTCOME_SCHEMA,
    )
