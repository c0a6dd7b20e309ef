"""Index rebuilds on a Ray cluster: the store's studies embedded by Ray Data actor pools.

``build_from_store_ray`` is :func:`indexing.build.build_from_store` spread over a Ray
cluster (``cohortsim index build --ray [ADDRESS]``; the optional extra ``[ray]``):

1. the driver splits the store's part files into *units* of at most ``shard_size``
   studies, in store order (a unit may span several small part files or part of a big
   one);
2. a Ray Data ``map_batches`` stage runs the units on a pool of embedding actors; each
   actor loads the encoder once (one GPU each when the cluster has GPUs, the batch size
   then taken from the GPU's free memory), reads its unit's volumes from the store,
   embeds them with :func:`indexing.build.embed_shard` (the single-process build's
   function) and writes the unit's embedding Parquet file atomically into the job's
   checkpoint folder (``INDEX_DIR/.build/embed-<key>/ray-<unit>.parquet``);
3. the driver alone reads the unit files back in store order, evaluates, builds the
   FAISS index and publishes the version (:func:`indexing.build.publish_embedded`).

A unit whose file exists and holds exactly the unit's studies is not embedded again, so
a job that was killed (or stopped) resumes where it stopped. The store and the index
folder must be on a file system that every node sees at the same path. The published
index is the one the single-process build makes from the same store: same rows in the
same order, vectors equal to float tolerance (``tests/indexing/test_distributed.py``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from indexing.build import (
    DEFAULT_SHARD_SIZE,
    _card_of,
    _job_lock,
    _read_shard,
    check_store_for,
    checkpoint_dir_for,
    cohort_of_shards,
    embed_shard,
    publish_embedded,
)
from indexing.errors import StoreError
from indexing.store import CohortStore, row_volume, verify_part_file, write_parquet_atomic

log = logging.getLogger(__name__)

INSTALL_HINT = "install the Ray extra: pip install 'cohortsim[ray]'"
CPU_BATCH_SIZE = 16
GPU_BATCH_MAX = 256
# GPU batch size: free memory / (voxels per study x this many bytes), a rough bound on
# activations of a small 2.5D backbone per input voxel (float32, with workspace)
GPU_BYTES_PER_VOXEL = 256
UNIT_RETRIES = 2  # a unit whose actor died is tried this many more times


def import_ray() -> Any:
    """The ``ray`` module with Ray Data loaded; :class:`StoreError` naming the extra when
    Ray is not installed."""
    try:
        import ray
        import ray.data  # loads the Data library (ray.data.*)
    except ImportError:
        raise StoreError(f"Ray is not installed; {INSTALL_HINT}") from None
    return ray


def loopback_only() -> None:
    """Make a local Ray (started by this process from now on) bind its node address to
    127.0.0.1 instead of the machine's network address: Ray reads this switch when it is
    first imported, so it has no effect once ``ray`` is loaded with another value."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@contextlib.contextmanager
def ray_session(address: str | None = None, *, num_cpus: int | None = None) -> Iterator[Any]:
    """A connected Ray: the running one when this process already called ``ray.init``,
    else ``ray.init(address)`` (a local single-node cluster when ``address`` is None or
    "local"; ``num_cpus`` only for a local one). Shuts down only what it started."""
    local = address in (None, "", "local")
    if local:
        loopback_only()
    ray = import_ray()
    started = False
    if not ray.is_initialized():
        try:
            ray.init(
                address=None if local else address,
                num_cpus=num_cpus if local else None,
                include_dashboard=False,
                logging_level=logging.WARNING,
                log_to_driver=False,
            )
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise StoreError(f"cannot connect to the Ray cluster at {address}: {exc}") from None
        started = True
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


# ------------------------------------------------------------------------ units of work


def plan_units(store: CohortStore, shard_size: int) -> list[list[tuple[str, int, int]]]:
    """The store's rows split into units of at most ``shard_size`` rows, in store order.

    A unit is a list of ``(part file name, start row, stop row)`` ranges; rows of
    withdrawn patients are skipped when the unit is read, so a unit may embed fewer.
    """
    if shard_size < 1:
        raise StoreError(f"shard_size must be >= 1, got {shard_size}")
    units: list[list[tuple[str, int, int]]] = []
    unit: list[tuple[str, int, int]] = []
    room = shard_size
    for path in store.part_files():
        rows = pq.ParquetFile(path).metadata.num_rows
        start = 0
        while start < rows:
            take = min(room, rows - start)
            unit.append((path.name, start, start + take))
            start += take
            room -= take
            if room == 0:
                units.append(unit)
                unit, room = [], shard_size
    if unit:
        units.append(unit)
    return units


def unit_file(unit: list[tuple[str, int, int]]) -> str:
    """The checkpoint file name of a unit (a digest of its part files and row ranges)."""
    key = hashlib.sha256(json.dumps(unit).encode()).hexdigest()[:20]
    return f"ray-{key}.parquet"


def read_unit(
    store_root: Path,
    unit: list[tuple[str, int, int]],
    *,
    volumes: bool = True,
    patches: str | None = None,
) -> tuple[list[str], np.ndarray | None]:
    """``(study_uids, (b, D, H, W) int16 volumes or None)`` of a unit, withdrawn patients
    skipped, part files checked against their checksums first: the context volumes, or
    with ``patches`` each study's primary detail patch (as ``CohortStore.iter_volumes``)."""
    store = CohortStore(store_root)
    deleted = store.deleted_patients()
    wanted = (["volume", "volume_shape"] if patches is None
              else ["patches", "patch_shape", "patch_info"])
    columns = ["patient_id", "study_uid"] + (wanted if volumes else [])
    uids: list[str] = []
    vols: list[np.ndarray] = []
    for name, start, stop in unit:
        path = store.root / "studies" / name
        verify_part_file(path)
        try:
            table = pq.read_table(path, columns=columns, page_checksum_verification=True)
        except (OSError, pa.ArrowException) as exc:
            raise StoreError(f"cannot read store part file {name}: {exc}") from exc
        cols = table.slice(start, stop - start).to_pydict()
        for i, (pid, uid) in enumerate(zip(cols["patient_id"], cols["study_uid"], strict=True)):
            if pid in deleted:
                continue
            uids.append(uid)
            if volumes:
                vols.append(row_volume(cols, i, patches))
    if not volumes:
        return uids, None
    if len({v.shape for v in vols}) > 1:
        raise StoreError("stored volumes differ in shape; re-ingest every study with one InputSpec")
    return uids, (np.stack(vols) if vols else None)


# ------------------------------------------------------------------------ the actors


def gpu_batch_size(voxels: int, free_bytes: int) -> int:
    """A GPU batch size for volumes of ``voxels`` voxels given ``free_bytes`` of memory."""
    return int(max(1, min(GPU_BATCH_MAX, free_bytes // max(1, voxels * GPU_BYTES_PER_VOXEL))))


class EmbedActor:
    """A Ray Data actor: loads the encoder once, then embeds one unit per call and writes
    its checkpoint file. ``batch_size`` None: 16 on the CPU, from free memory on a GPU."""

    def __init__(
        self,
        model_dir: str,
        store_root: str,
        checkpoint_dir: str,
        device: str,
        batch_size: int | None,
        threads: int,
    ) -> None:
        import torch

        from encoders.model import load_encoder, resolve_device

        if threads > 0:
            torch.set_num_threads(threads)
        self.device = resolve_device(device)
        self.encoder, self.card = load_encoder(model_dir, device=str(self.device))
        # a lesion encoder on the whole-study grid embeds each study's primary detail
        # patch, as the single-process build does (indexing.build.embed_store's default)
        on_patches = self.card.region.mode == "lesion" and self.card.input.has_patches
        self.patches = "readers" if on_patches else None
        self.store_root = Path(store_root)
        self.checkpoint_dir = Path(checkpoint_dir)
        if batch_size is not None:
            self.batch_size = int(batch_size)
        elif self.device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(self.device)
            self.batch_size = gpu_batch_size(int(np.prod(self.card.input.shape)), int(free))
        else:
            self.batch_size = CPU_BATCH_SIZE
        self.actor = f"{os.uname().nodename}:{os.getpid()}"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {
            "unit": [], "studies": [], "reused": [], "seconds": [], "actor": []
        }
        for index, spec in zip(batch["unit"], batch["spec"], strict=True):
            unit = [(str(n), int(a), int(b)) for n, a, b in json.loads(str(spec))]
            path = self.checkpoint_dir / unit_file(unit)
            uids, _ = read_unit(self.store_root, unit, volumes=False)
            t0 = time.perf_counter()
            reused = bool(uids) and _read_shard(path, uids) is not None
            if uids and not reused:
                uids, volumes = read_unit(self.store_root, unit, patches=self.patches)
                assert volumes is not None  # uids non-empty: at least one volume
                sources = (CohortStore(self.store_root).patch_sources(uids, self.patches)
                           if self.patches is not None else None)
                table = embed_shard(
                    self.encoder, uids, volumes, batch_size=self.batch_size,
                    device=str(self.device), sources=sources,
                )
                write_parquet_atomic(table, path)
            out["unit"].append(int(index))
            out["studies"].append(len(uids))
            out["reused"].append(reused)
            out["seconds"].append(time.perf_counter() - t0)
            out["actor"].append(self.actor)
        return out


# ------------------------------------------------------------------------ the driver


def build_from_store_ray(
    store_dir: Path,
    model_dir: Path,
    index_dir: Path,
    *,
    address: str | None = None,
    kind: str = "Flat",
    device: str = "auto",
    batch_size: int | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    actors: int | None = None,
    search_params: dict[str, float] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    stats: dict[str, Any] | None = None,
) -> str:
    """Embed the store on Ray and publish a snapshot from the driver; returns the version.

    ``address``: a Ray cluster ("auto", "ray://host:10001", "host:6379"), or None / "local"
    for a local one (or the Ray this process already started). ``actors``: the size of
    the embedding pool (default: one per GPU when the cluster has GPUs and ``device`` is
    not "cpu", else one per CPU). ``progress(stage, done, total)``: stage ``embed`` counts
    studies, then the snapshot's stages as in :func:`indexing.build.build_from_store`.
    ``stats``, when given, is filled with what the job did: ``units``, ``reused_units``,
    ``studies``, ``actors`` and ``per_actor`` (``{actor: [studies, seconds]}``).
    """
    store = CohortStore(store_dir)
    _enc, card = _card_of(model_dir)
    n = check_store_for(store, card, model_dir)
    spec = store.studies(columns=["spec"])["spec"][0].as_py()
    ckpt = checkpoint_dir_for(index_dir, card.version, spec)
    units = plan_units(store, shard_size)
    with _job_lock(ckpt), ray_session(address) as ray:
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0)) if device != "cpu" else 0
        cpus = max(1, int(resources.get("CPU", 1)))
        if device.startswith("cuda") and gpus == 0:
            raise StoreError(
                "device cuda was asked for but the Ray cluster has no GPU; use --device auto or cpu"
            )
        pool = actors or (gpus if gpus else cpus)
        threads = 1 if gpus == 0 else max(1, cpus // max(1, pool))
        ds = ray.data.from_items(
            [{"unit": i, "spec": json.dumps(u)} for i, u in enumerate(units)],
            override_num_blocks=max(1, len(units)),
        )
        with warnings.catch_warnings():  # max_task_retries has no named parameter (Ray 2.60)
            warnings.simplefilter("ignore", DeprecationWarning)
            ds = ds.map_batches(
                EmbedActor,
                batch_size=1,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=pool),
                num_gpus=1 if gpus else 0,
                num_cpus=0 if gpus else threads,
                fn_constructor_kwargs={
                    "model_dir": str(Path(model_dir).resolve()),
                    "store_root": str(store.root.resolve()),
                    "checkpoint_dir": str(ckpt.resolve()),
                    "device": "cuda" if gpus else ("cpu" if device == "auto" else device),
                    "batch_size": batch_size,
                    "threads": threads,
                },
                # an actor that dies is restarted (a lost node), but a unit that kills
                # its actor again and again fails the job instead of looping for ever
                max_task_retries=UNIT_RETRIES,
            )
        done = reused = 0
        per_actor: dict[str, list[float]] = {}
        finished: set[int] = set()
        for row in ds.iter_rows():
            finished.add(int(row["unit"]))
            done += int(row["studies"])
            if row["reused"]:
                reused += 1
            else:
                acc = per_actor.setdefault(str(row["actor"]), [0, 0.0])
                acc[0] += int(row["studies"])
                acc[1] += float(row["seconds"])
            if progress is not None:
                progress("embed", done, n)
        if len(finished) != len(units):
            raise StoreError(f"{len(units) - len(finished)} units of work did not finish; run again")
    if stats is not None:
        stats.update(
            units=len(units), reused_units=reused, studies=done, actors=pool, per_actor=per_actor
        )
    tables = []
    for unit in units:
        uids, _ = read_unit(store.root, unit, volumes=False)
        if not uids:
            continue
        table = _read_shard(ckpt / unit_file(unit), uids)
        if table is None:
            raise StoreError(
                "the store changed while it was embedded (studies added or withdrawn); run again"
            )
        tables.append(table)
    vectors, cohort = cohort_of_shards(store, tables)
    return publish_embedded(
        store,
        vectors,
        cohort,
        model_version=card.version,
        model_dir=model_dir,
        index_dir=index_dir,
        checkpoint_dir=ckpt,
        kind=kind,
        search_params=search_params,
        progress=progress,
    )
