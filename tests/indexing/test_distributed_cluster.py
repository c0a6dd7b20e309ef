"""A rebuild on a two-node Ray cluster (``ray.cluster_utils.Cluster``: a head and a worker
node, one CPU each, in this machine): ingest and embedding spread over both nodes, the
build stopped mid-way and resumed, and the same index as the single-process path."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'cohortsim[ray]')")

from ray.cluster_utils import Cluster  # noqa: E402

from encoders.deid import Pseudonymizer  # noqa: E402
from encoders.model import EncoderCard, create_encoder, save_encoder  # noqa: E402
from encoders.spec import InputSpec  # noqa: E402
from encoders.synth import synth_cohort  # noqa: E402
from indexing.build import build_from_store  # noqa: E402
from indexing.distributed import build_from_store_ray  # noqa: E402
from indexing.distributed_ingest import ingest_folder_ray  # noqa: E402
from indexing.ingest import ingest_folder  # noqa: E402
from indexing.snapshot import load_snapshot  # noqa: E402
from indexing.store import CohortStore  # noqa: E402

pytestmark = pytest.mark.slow
SECRET = b"0123456789abcdef-ray-cluster"
SPEC = InputSpec(spacing_mm=(8.0, 8.0, 8.0), shape=(8, 32, 32))


class Stop(Exception):
    pass


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[Cluster]:
    if ray.is_initialized():
        pytest.skip("another Ray is running in this process")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_two_node_rebuild_resumes_and_matches(two_nodes: Cluster, tmp_path: Path) -> None:
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    synth_cohort(tmp_path / "cohort", patients=6, seed=2)
    dicom = tmp_path / "cohort" / "dicom"
    pseudo = Pseudonymizer(SECRET)
    single = CohortStore(tmp_path / "single", create=True)
    ingest_folder(dicom, single, pseudonymizer=pseudo, workers=1, spec=SPEC)
    store = CohortStore(tmp_path / "ray", create=True)
    report = ingest_folder_ray(dicom, store, pseudonymizer=pseudo, spec=SPEC, batch_size=2)
    assert report.studies_ingested == 6 and report.workers == 2

    encoder = create_encoder("test_resnet", spec=SPEC, embedding_dim=8)
    save_encoder(encoder, EncoderCard.for_encoder(encoder, seed=0), tmp_path / "model")
    want = load_snapshot(
        tmp_path / "i1", version=build_from_store(single.root, tmp_path / "model", tmp_path / "i1"),
        device="cpu",
    )

    def stop(stage: str, done: int, total: int) -> None:
        if stage == "embed" and 0 < done < total:
            raise Stop

    with pytest.raises(Stop):
        build_from_store_ray(store.root, tmp_path / "model", tmp_path / "i2", shard_size=1,
                             progress=stop)  # fmt: skip
    stats: dict = {}
    version = build_from_store_ray(store.root, tmp_path / "model", tmp_path / "i2", shard_size=1,
                                   stats=stats)  # fmt: skip
    assert stats["reused_units"] >= 1 and stats["studies"] == 6
    got = load_snapshot(tmp_path / "i2", version=version, device="cpu")
    # the two stores hold the same studies, in their own ingestion orders
    mine = dict(zip(got.metadata["study_uid"].to_pylist(), np.asarray(got.vectors), strict=True))
    theirs = dict(zip(want.metadata["study_uid"].to_pylist(), np.asarray(want.vectors), strict=True))
    assert sorted(mine) == sorted(theirs)
    for uid, vec in theirs.items():
        np.testing.assert_allclose(mine[uid], vec, atol=1e-5)
