"""Shard mode: one cohort split by patient into four shard indexes, each served on
loopback, behind a coordinator with ``mode = "shards"``. Its answers (neighbours,
prognosis, cohort curve, diagnostics, the researcher view) equal the unsharded index's."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from indexing.evaluation import EVALUATION_KEY, evaluate_prognosis
from indexing.shards import SHARD_KEY, ShardBuildError, publish_shards, shard_of
from indexing.snapshot import build_snapshot, load_snapshot
from service.api import cohortsim_pb2 as pb
from service.api import cohortsim_pb2_grpc
from service.auth import TokenStore
from service.background import BackgroundServer
from service.cli import app
from service.coordinator import DEFAULT_SITE_DEADLINE_S
from service.federation import Site, SitesConfigError, load_topology

from .conftest import MODEL_VERSION, make_cohort
from .test_federation import _InProcessCoordinator

N_SHARDS = 4
K = 10
RESEARCHER, CLINICIAN = "r" * 40, "c" * 40


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The cohort as one index and as four shards of the same build."""
    root = tmp_path_factory.mktemp("shards")
    emb, table = make_cohort(seed=5)
    evaluation = evaluate_prognosis(emb, table)
    build_snapshot(root / "one", emb, table, model_version=MODEL_VERSION, kind="Flat",
                   extra_manifest={EVALUATION_KEY: evaluation})
    published = publish_shards(emb, table, root / "sharded", N_SHARDS, model_version=MODEL_VERSION)
    return {"root": root, "emb": emb, "table": table, "one": root / "one",
            "shards": [folder for folder, _ in published]}


@pytest.fixture(scope="module")
def shard_servers(sharded: dict[str, Any]) -> Iterator[list[Site]]:
    """Each shard served by its own server on loopback (no authentication: the
    coordinator is trusted)."""
    with ExitStack() as stack:
        servers = [stack.enter_context(BackgroundServer(d, device="cpu")) for d in sharded["shards"]]
        yield [Site(f"shard-{i}", s.target, index=d)
               for i, (s, d) in enumerate(zip(servers, sharded["shards"], strict=True))]


def _Coordinator(sites: list[Site], **kw: Any) -> _InProcessCoordinator:
    """A coordinator in shard mode on a thread with its own event loop (the federation
    tests' harness; the coordinator's default site deadline unless one is given)."""
    kw.setdefault("deadline_s", DEFAULT_SITE_DEADLINE_S)
    return _InProcessCoordinator(sites, mode="shards", **kw)


def _stub(port: int) -> tuple[grpc.Channel, Any]:
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    return channel, cohortsim_pb2_grpc.PatientSimilarityServiceStub(channel)


def _search(port: int, vector: np.ndarray, *, k: int = K, where: str = "", token: str | None = None
            ) -> pb.SearchSimilarResponse:
    channel, stub = _stub(port)
    with channel:
        request = pb.SearchSimilarRequest(
            embedding=pb.Vector(values=vector.tolist(), model_version=MODEL_VERSION), k=k,
            filter=pb.Filter(where=where),
        )
        metadata = (("authorization", f"Bearer {token}"),) if token else None
        return stub.SearchSimilar(request, timeout=60, metadata=metadata)


def _queries(emb: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(3)
    near = emb[[1, 44, 90, 170]] + np.array([[0.01], [0.03], [0.06], [0.2]]) * rng.normal(size=(4, emb.shape[1]))
    return np.concatenate([near, 0.3 * rng.normal(size=(2, emb.shape[1]))]).astype(np.float32)


def _curve(points: Any) -> list[tuple[float, float, float, float, int]]:
    return [(p.time, p.survival, p.lower, p.upper, p.at_risk) for p in points]


def _assert_same_prognosis(got: pb.Prognosis, want: pb.Prognosis) -> None:
    np.testing.assert_allclose(_curve(got.survival), _curve(want.survival), atol=1e-6)
    np.testing.assert_allclose(_curve(got.cohort_survival), _curve(want.cohort_survival), atol=1e-9)
    assert got.events == want.events and got.neighbors_with_outcome == want.neighbors_with_outcome
    for f in ("median_survival", "cohort_median_survival"):
        assert got.HasField(f) == want.HasField(f)
        if want.HasField(f):
            assert getattr(got, f) == pytest.approx(getattr(want, f), abs=1e-6)
    np.testing.assert_allclose(got.effective_sample_size, want.effective_sample_size, atol=1e-6)
    assert [(d.name, [(s.label, s.count) for s in d.shares]) for d in got.label_distributions] == [
        (d.name, [(s.label, s.count) for s in d.shares]) for d in want.label_distributions
    ]
    np.testing.assert_allclose(
        [s.share for d in got.label_distributions for s in d.shares],
        [s.share for d in want.label_distributions for s in d.shares], atol=1e-6,
    )
    assert [w.code for w in got.warning_details] == [w.code for w in want.warning_details]
    assert got.temperature == pytest.approx(want.temperature)


def test_split_keeps_each_patient_in_one_shard(sharded: dict[str, Any]) -> None:
    table = sharded["table"]
    pids = table.column("patient_id").to_pylist()
    shard = shard_of(pids, N_SHARDS)
    # the documented rule, recomputed here from its description
    assert shard.tolist() == [int.from_bytes(hashlib.sha256(p.encode()).digest()[:8], "big") % N_SHARDS
                              for p in pids]
    seen: dict[str, set[str]] = {}
    models, evaluations = set(), set()
    total = 0
    for i, folder in enumerate(sharded["shards"]):
        snap = load_snapshot(folder, device="cpu")
        total += snap.num_studies
        models.add(snap.model_version)
        evaluations.add(json.dumps(snap.manifest[EVALUATION_KEY], sort_keys=True))
        assert snap.manifest[SHARD_KEY]["index"] == i and snap.manifest[SHARD_KEY]["count"] == N_SHARDS
        for p in snap.metadata.column("patient_id").to_pylist():
            seen.setdefault(p, set()).add(folder.name)
    assert total == table.num_rows and len(seen) == len(set(pids))
    assert all(len(folders) == 1 for folders in seen.values())  # a patient's studies stay together
    assert models == {MODEL_VERSION} and len(evaluations) == 1  # one encoder, one whole-cohort kernel
    with pytest.raises(ShardBuildError, match="empty"):
        publish_shards(sharded["emb"][:3], table.slice(0, 3), sharded["root"] / "tiny", 8,
                       model_version=MODEL_VERSION)


def test_clinician_answers_equal_the_unsharded_index(
    sharded: dict[str, Any], shard_servers: list[Site]
) -> None:
    with BackgroundServer(sharded["one"], device="cpu") as one, _Coordinator(shard_servers) as coord:
        for where in ("", "site = 'north'"):
            for q in _queries(sharded["emb"]):
                got, want = _search(coord.port, q, where=where), _search(one.port, q, where=where)
                assert [n.study_uid for n in got.neighbors] == [n.study_uid for n in want.neighbors]
                np.testing.assert_allclose([n.similarity for n in got.neighbors],
                                           [n.similarity for n in want.neighbors], atol=1e-5)
                np.testing.assert_allclose([n.weight for n in got.neighbors],
                                           [n.weight for n in want.neighbors], atol=1e-5)
                _assert_same_prognosis(got.prognosis, want.prognosis)
                assert got.diagnostics.ood_percentile == pytest.approx(want.diagnostics.ood_percentile, abs=1e-9)
                assert got.diagnostics.mean_similarity == pytest.approx(want.diagnostics.mean_similarity, abs=1e-5)
                assert [w.code for w in got.diagnostics.warning_details] == [
                    w.code for w in want.diagnostics.warning_details
                ]
                assert {pb.SiteState.Name(s.state) for s in got.federation.sites} == {"SITE_STATE_ANSWERED"}
                assert got.federation.cohort_studies == sharded["table"].num_rows


def test_researchers_get_the_single_server_view_of_the_merged_answer(
    sharded: dict[str, Any], shard_servers: list[Site]
) -> None:
    tokens = TokenStore.from_mapping({RESEARCHER: "researcher", CLINICIAN: "clinician"})
    qs = _queries(sharded["emb"])
    rng = np.random.default_rng(9)
    # answers, then near-repeats and other k: the release record decides the same way
    asks = [(qs[0], 22), (qs[1], 33), (qs[4], 22), (qs[0] + 0.05 * rng.normal(size=qs.shape[1]), 22),
            (qs[0], 23), (qs[2], 11), (qs[2] + 0.1 * rng.normal(size=qs.shape[1]), 11)]
    outcomes: dict[str, list[Any]] = {"sharded": [], "one": []}
    with BackgroundServer(sharded["one"], device="cpu", auth_tokens=tokens) as one, \
            _Coordinator(shard_servers, auth_tokens=tokens) as coord:
        for q, k in asks:
            answers = {}
            for name, port in (("sharded", coord.port), ("one", one.port)):
                try:
                    answers[name] = _search(port, q.astype(np.float32), k=k, token=RESEARCHER)
                    outcomes[name].append(("answered", answers[name].disclosure_control.aggregated_patients))
                except grpc.RpcError as exc:
                    outcomes[name].append((exc.code(), exc.details()))
            if len(answers) == 2:
                got, want = answers["sharded"], answers["one"]
                assert not got.neighbors and not got.HasField("federation")
                assert list(got.disclosure_control.withheld_fields) == list(want.disclosure_control.withheld_fields)
                _assert_same_prognosis(got.prognosis, want.prognosis)
                assert got.diagnostics.ood_percentile == pytest.approx(want.diagnostics.ood_percentile, abs=1e-9)
        clinician = _search(coord.port, qs[0], k=K, token=CLINICIAN)
    assert outcomes["sharded"] == outcomes["one"]
    assert sum(1 for o in outcomes["one"] if o[0] == "answered") >= 3
    assert len(clinician.neighbors) == K


def test_a_missing_shard_fails_the_call(sharded: dict[str, Any], shard_servers: list[Site]) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = int(s.getsockname()[1])
    sites = [*shard_servers[:-1], Site("shard-3", f"127.0.0.1:{free}", index=shard_servers[-1].index)]
    with _Coordinator(sites, deadline_s=2.0) as coord, pytest.raises(grpc.RpcError) as info:
        _search(coord.port, _queries(sharded["emb"])[0])
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "shard-3" in (info.value.details() or "")


def test_index_info_through_the_coordinator(sharded: dict[str, Any], shard_servers: list[Site]) -> None:
    with _Coordinator(shard_servers) as coord:
        channel, stub = _stub(coord.port)
        with channel:
            info = stub.GetIndexInfo(pb.GetIndexInfoRequest(), timeout=30)
    assert info.num_studies == sharded["table"].num_rows
    assert info.model_version == MODEL_VERSION and info.dimension == sharded["emb"].shape[1]
    assert [s.name for s in info.federation.sites] == [f"shard-{i}" for i in range(N_SHARDS)]
    assert sum(s.num_studies for s in info.federation.sites) == info.num_studies
    assert all(s.index_version and s.state == pb.SITE_STATE_ANSWERED for s in info.federation.sites)
    assert info.HasField("prognostic_quality")  # the whole cohort's, carried by every shard


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('mode = "mesh"\n[[site]]\nname = "a"\naddress = "h:1"\n', "mode must be"),
        ('mode = "shards"\n[[site]]\nname = "a"\naddress = "h:1"\n', "needs 'index'"),
        ('[[site]]\nname = "a"\naddress = "h:1"\nindex = "x"\n', "shards\" only"),
        ('colour = 1\n[[site]]\nname = "a"\naddress = "h:1"\n', "unknown top-level"),
    ],
)
def test_bad_shard_files_are_refused(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "shards.toml"
    path.write_text(text)
    with pytest.raises(SitesConfigError, match=re.escape(fragment)):
        load_topology(path)


def test_cli_builds_shards(tmp_path: Path) -> None:
    n, d = 60, 8
    x = np.random.default_rng(3).normal(size=(n, d)).astype(np.float32)
    pq.write_table(
        pa.table({
            "patient_id": [f"P-{i // 2:016x}" for i in range(n)],
            "study_uid": [f"S-{i:024x}" for i in range(n)],
            "embedding": pa.array(x.tolist(), pa.list_(pa.float32())),
        }),
        tmp_path / "emb.parquet",
    )
    runner = CliRunner()
    res = runner.invoke(app, ["index", "build", "--embeddings", str(tmp_path / "emb.parquet"),
                              "--out", str(tmp_path / "idx"), "--shards", "3", "--json"])
    assert res.exit_code == 0, res.stderr
    report = json.loads(res.stdout)
    assert [Path(r["index_dir"]).name for r in report["shards"]] == ["shard-0", "shard-1", "shard-2"]
    assert sum(r["num_studies"] for r in report["shards"]) == n
    res = runner.invoke(app, ["index", "build", "--embeddings", str(tmp_path / "emb.parquet"),
                              "--out", str(tmp_path / "idx2"), "--shards", "200"])
    assert res.exit_code != 0 and "empty" in " ".join(res.stderr.split())


def test_cohort_stats_equal_the_unsharded_index(sharded: dict[str, Any], shard_servers: list[Site]) -> None:
    tokens = TokenStore.from_mapping({RESEARCHER: "researcher", CLINICIAN: "clinician"})

    def stats(port: int, where: str, token: str) -> Any:
        channel, stub = _stub(port)
        with channel:
            try:
                return stub.GetCohortStats(
                    pb.GetCohortStatsRequest(filter=pb.Filter(where=where)), timeout=60,
                    metadata=(("authorization", f"Bearer {token}"),),
                )
            except grpc.RpcError as exc:
                return (exc.code(), exc.details())

    with BackgroundServer(sharded["one"], device="cpu", auth_tokens=tokens) as one, \
            _Coordinator(shard_servers, auth_tokens=tokens) as coord:
        for token in (CLINICIAN, RESEARCHER):
            for where in ("", "site = 'north'", "manufacturer = 'GE'", "site = 'south'"):
                got, want = stats(coord.port, where, token), stats(one.port, where, token)
                if isinstance(want, tuple):  # refused (e.g. a researcher's small filter): refused alike
                    assert got == want
                    continue
                got.index_version = want.index_version = ""
                assert got == want, (token, where)
        clinician = stats(coord.port, "", CLINICIAN)
    assert clinician.study_count == sharded["table"].num_rows


def test_serve_refuses_a_shard_without_an_index(tmp_path: Path) -> None:
    (tmp_path / "shards.toml").write_text(
        'mode = "shards"\n[[site]]\nname = "shard-0"\naddress = "127.0.0.1:1"\nindex = "missing"\n'
    )
    res = CliRunner().invoke(app, ["serve", "--federate", str(tmp_path / "shards.toml"), "--port", "0"])
    assert res.exit_code == 2
    assert "shard shard-0: no published index" in " ".join(res.stderr.split())
