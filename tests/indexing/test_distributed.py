"""Rebuilds on Ray (indexing.distributed, indexing.distributed_ingest): a local two-CPU Ray
gives the same store and the same published index as the single-process path, and a
job stopped mid-way resumes from what it had finished.

One Ray is started for the module (start-up costs seconds); the slow two-node test is in
test_distributed_cluster.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'cohortsim[ray]')")

from encoders.deid import Pseudonymizer  # noqa: E402
from encoders.model import EncoderCard, create_encoder, save_encoder  # noqa: E402
from encoders.spec import InputSpec  # noqa: E402
from encoders.synth import synth_cohort  # noqa: E402
from indexing.build import build_from_store  # noqa: E402
from indexing.distributed import build_from_store_ray, plan_units  # noqa: E402
from indexing.distributed_ingest import ingest_folder_ray, run_isolating_failures  # noqa: E402
from indexing.ingest import ingest_folder  # noqa: E402
from indexing.snapshot import Snapshot, load_snapshot  # noqa: E402
from indexing.store import CohortStore, StudyRecord  # noqa: E402
from service.cli import ray_address_argv  # noqa: E402

SECRET = b"0123456789abcdef-ray-tests"
SPEC = InputSpec(shape=(4, 32, 32))


class Stop(Exception):
    """Raised from a progress callback: the driver stops the job there (as Ctrl-C would)."""


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def dicom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 synthetic patients and one file that is not DICOM."""
    out = tmp_path_factory.mktemp("ray-cohort")
    synth_cohort(out, patients=4, seed=5)
    (out / "dicom" / "junk.dcm").write_bytes(b"not a DICOM file")
    return out / "dicom"


def _rows(root: Path) -> list[dict]:
    table = CohortStore(root).studies().drop_columns(["ingested_at"])
    return table.sort_by("study_uid").to_pylist()


def _stop_after(first: int):  # type: ignore[no-untyped-def]
    def progress(done: int, total: int) -> None:
        if done >= first and done < total:
            raise Stop

    return progress


def test_ray_ingest_matches_single_process_and_resumes(
    local_ray: None, dicom: Path, tmp_path: Path
) -> None:
    pseudo = Pseudonymizer(SECRET)
    single = CohortStore(tmp_path / "single", create=True)
    want = ingest_folder(dicom, single, pseudonymizer=pseudo, workers=1)
    assert want.studies_ingested == 4 and len(want.files_rejected) == 1

    store = CohortStore(tmp_path / "ray", create=True)
    with pytest.raises(Stop):  # stopped after its first batch of one study came back
        ingest_folder_ray(dicom, store, pseudonymizer=pseudo, batch_size=1, progress=_stop_after(1))
    kept = len(store.study_uids())
    # at least the batch that came back is kept; on idle cores the batches still in flight
    # may all finish before the driver stops (Ray's scheduling, not ours, decides)
    assert 1 <= kept <= 4
    got = ingest_folder_ray(dicom, store, pseudonymizer=pseudo, batch_size=1)
    # a task still running when the job stopped may have finished since
    assert got.studies_already_present >= kept
    assert got.studies_already_present + got.studies_ingested == 4
    assert got.files_rejected == want.files_rejected  # the bad file is reported, not fatal
    assert _rows(tmp_path / "ray") == _rows(tmp_path / "single")  # same rows, same volumes

    fresh = CohortStore(tmp_path / "fresh", create=True)
    report = ingest_folder_ray(dicom, fresh, pseudonymizer=pseudo, batch_size=3)
    mine, theirs = report.to_dict(), want.to_dict()
    assert mine.pop("workers") == 2 and theirs.pop("workers") == 1
    assert mine == theirs  # same report, in the same order
    raw_ids = [f"SYN-{i:05d}".encode() for i in range(4)]
    for part in (tmp_path / "fresh").rglob("*.parquet"):  # nothing identifying was written
        data = part.read_bytes()
        assert not any(raw in data for raw in raw_ids)


def _crashing_stage(batch: dict, *, poison: str) -> dict[str, list[str]]:
    """A stage whose worker process dies on the task ``poison`` (as on a segfault in a
    native decoder) and answers every other task."""
    import json
    import os

    keys = [json.loads(str(t))["study"] for t in batch["task"]]
    if poison in keys:
        os._exit(7)
    studies = [{"study": k} for k in keys]
    return {"result": [json.dumps({"studies": studies, "rejected": [], "n": len(keys)})]}


@pytest.mark.slow  # each death costs a worker start (seconds), six of them
def test_a_dying_worker_costs_only_its_study(local_ray: None) -> None:
    import json

    tasks = {f"s{i}": json.dumps({"study": f"s{i}"}) for i in range(6)}
    seen: list[str] = []
    failed = run_isolating_failures(
        ray, tasks, 3, _crashing_stage, {"poison": "s4"},
        lambda result: seen.extend(s["study"] for s in result["studies"]),
    )  # fmt: skip
    assert failed == ["s4"]  # its batch (s3, s4, s5) failed, then s4 alone failed again
    assert sorted(seen) == ["s0", "s1", "s2", "s3", "s5"]


@pytest.fixture(scope="module")
def embedded_store(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """19 studies in 3 part files (one patient withdrawn) and a test_resnet encoder."""
    root = tmp_path_factory.mktemp("ray-build")
    store = CohortStore(root / "store", create=True)
    rng = np.random.default_rng(1)
    for first, count in ((0, 7), (7, 9), (16, 4)):
        store.add_studies([
            StudyRecord(
                patient_id=f"P-{i:016x}", study_uid=f"S-{i:024x}", spec=SPEC, site="north",
                volume=rng.integers(-1000, 400, size=SPEC.shape, dtype=np.int16),
            )
            for i in range(first, first + count)
        ])  # fmt: skip
    store.set_outcomes(pa.table({"patient_id": [f"P-{i:016x}" for i in range(20)],
                                 "time": [float(i) for i in range(20)]}))  # fmt: skip
    store.delete_patients([f"P-{3:016x}"])
    encoder = create_encoder("test_resnet", spec=SPEC, embedding_dim=8)
    save_encoder(encoder, EncoderCard.for_encoder(encoder, seed=0), root / "model")
    return {"root": root, "store": root / "store", "model": root / "model"}


def test_units_follow_store_order(embedded_store: dict[str, Path]) -> None:
    units = plan_units(CohortStore(embedded_store["store"]), 5)
    assert [sum(b - a for _, a, b in u) for u in units] == [5, 5, 5, 5]
    assert units[1] == [(units[0][0][0], 5, 7), (units[1][1][0], 0, 3)]  # spans two parts


def test_ray_build_matches_single_process_and_resumes(
    local_ray: None, embedded_store: dict[str, Path]
) -> None:
    root, store, model = embedded_store["root"], embedded_store["store"], embedded_store["model"]
    single = load_snapshot(root / "single", version=build_from_store(store, model, root / "single"),
                           device="cpu")  # fmt: skip

    def stop(stage: str, done: int, total: int) -> None:
        if stage == "embed" and 0 < done < total:
            raise Stop

    # units of one study, so that the actors cannot finish them all before the driver
    # sees the first one come back (units of three all finished first on idle cores)
    with pytest.raises(Stop):  # stopped when its first unit came back
        build_from_store_ray(store, model, root / "ray", shard_size=1, progress=stop)
    finished = list((root / "ray" / ".build").rglob("ray-*.parquet"))
    assert 1 <= len(finished) < 20  # 20 stored studies (one withdrawn) in units of 1
    kept = sum(pq.read_metadata(p).num_rows for p in finished)
    stats: dict = {}
    version = build_from_store_ray(store, model, root / "ray", shard_size=1, stats=stats)
    assert stats["units"] == 20 and stats["reused_units"] >= len(finished)
    assert stats["studies"] == 19 and sum(s for s, _ in stats["per_actor"].values()) <= (
        19 - kept
    )  # only what was not kept was embedded again
    assert not (root / "ray" / ".build").exists()  # checkpoints go once published
    snap = load_snapshot(root / "ray", version=version, device="cpu")
    assert snap.metadata["study_uid"].to_pylist() == single.metadata["study_uid"].to_pylist()
    assert f"S-{3:024x}" not in snap.metadata["study_uid"].to_pylist()  # withdrawn
    np.testing.assert_allclose(np.asarray(snap.vectors), np.asarray(single.vectors), atol=1e-5)
    assert snap.model_version == single.model_version
    # slice projections are floats from other processes: compared with a tolerance
    same = [c for c in single.metadata.column_names if c not in ("ingested_at", "match_projections")]
    assert snap.metadata.select(same).equals(single.metadata.select(same))  # thumbnails too

    def projections(s: Snapshot) -> np.ndarray:
        return np.concatenate([np.frombuffer(b, "<f4") for b in s.metadata["match_projections"].to_pylist()])

    np.testing.assert_allclose(projections(snap), projections(single), atol=1e-5)


@pytest.mark.slow
def test_ray_build_killed_with_sigkill_resumes(
    local_ray: None, embedded_store: dict[str, Path], tmp_path: Path
) -> None:
    """A driver (with the local Ray it started) killed with SIGKILL after its first unit:
    the finished units are kept and the next run embeds only the rest."""
    import os
    import signal
    import subprocess
    import sys

    store, model, out = embedded_store["store"], embedded_store["model"], tmp_path / "index"
    code = (
        "from indexing.distributed import build_from_store_ray\n"
        f"build_from_store_ray({str(store)!r}, {str(model)!r}, {str(out)!r}, shard_size=1,\n"
        "    progress=lambda stage, done, total: print(stage, done, flush=True))\n"
    )
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env,
                            start_new_session=True)  # fmt: skip
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("embed"):
                break
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started
        proc.wait()
    finished = list(out.rglob("ray-*.parquet"))
    assert 1 <= len(finished) < 19  # 19 units of one study
    assert not list(out.glob("versions/*"))  # nothing was published
    stats: dict = {}
    version = build_from_store_ray(store, model, out, shard_size=1, stats=stats)
    assert stats["reused_units"] >= len(finished) and stats["studies"] == 19
    assert load_snapshot(out, version=version, device="cpu").num_studies == 19


@pytest.mark.slow
def test_cli_index_build_on_ray(local_ray: None, embedded_store: dict[str, Path]) -> None:
    from typer.testing import CliRunner

    from service.cli import app

    out = embedded_store["root"] / "cli"
    res = CliRunner().invoke(app, ["index", "build", "--store", str(embedded_store["store"]),
                                   "--model", str(embedded_store["model"]), "--out", str(out),
                                   "--ray", "local"])  # fmt: skip
    assert res.exit_code == 0, res.stderr
    assert "published index" in res.stderr and load_snapshot(out, device="cpu").num_studies == 19


@pytest.mark.slow
def test_cli_ingest_on_ray(
    local_ray: None, dicom: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from typer.testing import CliRunner

    from service.cli import app

    monkeypatch.setenv("COHORTSIM_SITE_SECRET", SECRET.decode())
    res = CliRunner().invoke(app, ["ingest", str(dicom), "--store", str(tmp_path / "s"),
                                   "--json", "--ray", "local"])  # fmt: skip
    assert res.exit_code == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["studies_ingested"] == 4 and len(report["files_rejected"]) == 1
    assert len(CohortStore(tmp_path / "s").study_uids()) == 4


def test_cuda_on_a_cluster_without_gpu_is_refused(
    local_ray: None, embedded_store: dict[str, Path], tmp_path: Path
) -> None:
    from indexing.errors import StoreError

    if ray.cluster_resources().get("GPU", 0):
        pytest.skip("this Ray has a GPU")
    with pytest.raises(StoreError, match="no GPU"):
        build_from_store_ray(embedded_store["store"], embedded_store["model"], tmp_path / "i",
                             device="cuda")  # fmt: skip
    assert not list(tmp_path.glob("i/versions/*"))


def test_bare_ray_flag_means_a_local_ray() -> None:
    assert ray_address_argv(["cohortsim", "ingest", "--ray"]) == ["cohortsim", "ingest", "--ray", "local"]
    assert ray_address_argv(["x", "--ray", "dicom/", "--store", "s"]) == [
        "x", "--ray", "local", "dicom/", "--store", "s"]  # fmt: skip
    assert ray_address_argv(["x", "--ray", "--store", "s"])[2:4] == ["local", "--store"]
    for address in ("auto", "ray://head:10001", "10.0.0.5:6379"):
        assert ray_address_argv(["x", "--ray", address]) == ["x", "--ray", address]
