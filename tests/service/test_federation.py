"""Federation: three ``cohortsim serve`` site processes on loopback, each holding a
disjoint part of one cohort, behind a coordinator (``cohortsim serve --federate`` and
in process). The merged answer equals one index over every site's vectors; a site that
is down, slow past the deadline or on another encoder is left out and named."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from indexing.aggregates import aggregate, binned_km, pool, suppress
from indexing.query import search_similar, snapshot_temperature
from indexing.snapshot import build_snapshot, load_snapshot
from service.api import cohortsim_pb2 as pb
from service.api import cohortsim_pb2_grpc
from service.auth import TokenStore
from service.background import BackgroundServer
from service.coordinator import create_coordinator
from service.federation import Site, SitesConfigError, load_sites

from .conftest import MODEL_VERSION, make_cohort

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX processes")

REPO = Path(__file__).resolve().parents[2]
SITES = ("north", "south", "east")
K = 10
EDGES = (0.0, 24.0, 60.0, 120.0)  # the sites' configured bins of researchers' counts


def _cli() -> list[str]:
    exe = Path(sys.executable).parent / "cohortsim"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "service.cli"]


def _start(args: list[str], log_path: Path, pattern: str) -> tuple[subprocess.Popen[bytes], int]:
    """Start ``cohortsim ARGS``; wait for its log to say it listens; (process, port)."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [*_cli(), *args], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
            env=dict(os.environ, COLUMNS="400"),
        )
    end = time.monotonic() + 120
    while True:
        text = log_path.read_text()
        if m := re.search(pattern + r" on [^\s:]+:(\d+)", text):
            return proc, int(m.group(1))
        if proc.poll() is not None or time.monotonic() > end:
            proc.kill()
            raise AssertionError(f"cohortsim {' '.join(args[:1])} did not start:\n{text}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def cohort_parts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One cohort split by row into three disjoint site indexes, plus the union index and
    a site index made by another encoder version."""
    root = tmp_path_factory.mktemp("federation")
    emb, table = make_cohort(seed=7)
    part = np.arange(table.num_rows) % len(SITES)
    dirs: dict[str, Path] = {}
    for s, name in enumerate(SITES):
        rows = np.flatnonzero(part == s)
        dirs[name] = root / name
        build_snapshot(dirs[name], emb[rows], table.take(rows), model_version=MODEL_VERSION, kind="Flat")
    build_snapshot(root / "union", emb, table, model_version=MODEL_VERSION, kind="Flat")
    other = np.flatnonzero(part == 0)
    build_snapshot(root / "other", emb[other], table.take(other), model_version="enc-0123456789ab", kind="Flat")
    uids = table.column("study_uid").to_pylist()
    east_uids = [uids[i] for i in np.flatnonzero(part == SITES.index("east"))]
    return {"root": root, "emb": emb, "dirs": dirs, "union": root / "union", "other": root / "other",
            "east_uids": east_uids}


@pytest.fixture(scope="module")
def site_processes(cohort_parts: dict[str, Any]) -> Iterator[dict[str, int]]:
    """The three sites as ``cohortsim serve`` processes; name -> port."""
    procs: list[subprocess.Popen[bytes]] = []
    ports: dict[str, int] = {}
    try:
        for name in SITES:
            proc, port = _start(
                ["serve", "--index", str(cohort_parts["dirs"][name]), "--port", "0", "--device", "cpu",
                 "--time-bins", ",".join(str(e) for e in EDGES)],
                cohort_parts["root"] / f"{name}.log",
                r"serving .*",
            )
            procs.append(proc)
            ports[name] = port
        yield ports
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


class _InProcessCoordinator:
    """A coordinator over ``sites`` on a thread with its own event loop."""

    def __init__(self, sites: list[Site], deadline_s: float = 5.0, **kw: Any) -> None:
        self.sites, self.deadline_s, self.kw = sites, deadline_s, kw
        self.port = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None

    def _run(self) -> None:
        async def main() -> None:
            server, self.port, fanout = await create_coordinator(
                self.sites, port=0, deadline_s=self.deadline_s, **self.kw
            )
            self._stop = asyncio.Event()
            await server.start()
            self._ready.set()
            await self._stop.wait()
            await server.stop(0)
            await fanout.close()

        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(main())
        self._loop.close()

    def __enter__(self) -> _InProcessCoordinator:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(30)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


def _search(port: int, vector: np.ndarray, *, k: int = K, model: str = MODEL_VERSION,
            timeout: float = 30, token: str | None = None) -> pb.SearchSimilarResponse:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = cohortsim_pb2_grpc.PatientSimilarityServiceStub(channel)
        request = pb.SearchSimilarRequest(
            embedding=pb.Vector(values=vector.tolist(), model_version=model), k=k
        )
        metadata = (("authorization", f"Bearer {token}"),) if token else None
        return stub.SearchSimilar(request, timeout=timeout, metadata=metadata)


def _sites(ports: dict[str, int]) -> list[Site]:
    return [Site(name, f"127.0.0.1:{port}") for name, port in ports.items()]


def _queries(emb: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(11)
    near = emb[[3, 50, 101, 152]] + 0.2 * rng.normal(size=(4, emb.shape[1]))
    return np.concatenate([near, rng.normal(size=(2, emb.shape[1]))]).astype(np.float32)


def _states(response: pb.SearchSimilarResponse) -> dict[str, tuple[str, str]]:
    return {
        s.name: (pb.SiteState.Name(s.state), s.reason) for s in response.federation.sites
    }


def test_merged_top_k_equals_one_index_over_all_sites(
    cohort_parts: dict[str, Any], site_processes: dict[str, int], tmp_path: Path
) -> None:
    toml = "".join(
        f'[[site]]\nname = "{n}"\naddress = "127.0.0.1:{p}"\n\n' for n, p in site_processes.items()
    )
    (tmp_path / "sites.toml").write_text(toml)
    coordinator, port = _start(
        ["serve", "--federate", str(tmp_path / "sites.toml"), "--port", "0"],
        tmp_path / "coordinator.log",
        r"coordinating 3 sites .*",
    )
    try:
        with BackgroundServer(cohort_parts["union"], device="cpu") as union:
            for q in _queries(cohort_parts["emb"]):
                got = _search(port, q)
                want = _search(union.port, q)
                assert [n.study_uid for n in got.neighbors] == [n.study_uid for n in want.neighbors]
                np.testing.assert_allclose(
                    [n.similarity for n in got.neighbors], [n.similarity for n in want.neighbors],
                    atol=1e-5,
                )
                np.testing.assert_allclose(
                    [n.weight for n in got.neighbors], [n.weight for n in want.neighbors], atol=1e-5
                )
                assert got.prognosis.events == want.prognosis.events
                assert got.prognosis.HasField("median_survival") == want.prognosis.HasField("median_survival")
                np.testing.assert_allclose(
                    [(p.time, p.survival, p.lower, p.upper) for p in got.prognosis.survival],
                    [(p.time, p.survival, p.lower, p.upper) for p in want.prognosis.survival],
                    atol=1e-6,
                )
                assert {s: st for s, (st, _) in _states(got).items()} == {
                    s: "SITE_STATE_ANSWERED" for s in SITES
                }
                assert sum(s.neighbors for s in got.federation.sites) == K
                assert got.federation.cohort_studies == len(cohort_parts["emb"])
                assert not [w for w in got.diagnostics.warnings if "missing" in w]
    finally:
        coordinator.terminate()
        coordinator.wait(timeout=20)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _SlowSite(cohortsim_pb2_grpc.PatientSimilarityServiceServicer):
    def SearchSite(self, request: Any, context: Any) -> Any:
        time.sleep(3.0)
        return pb.SearchSiteResponse()


def test_site_down_and_slow_site_are_left_out_and_named(
    cohort_parts: dict[str, Any], site_processes: dict[str, int]
) -> None:
    slow = grpc.server(futures.ThreadPoolExecutor(2))
    cohortsim_pb2_grpc.add_PatientSimilarityServiceServicer_to_server(_SlowSite(), slow)
    slow_port = slow.add_insecure_port("127.0.0.1:0")
    slow.start()
    sites = [
        *_sites(site_processes),
        Site("down", f"127.0.0.1:{_free_port()}"),
        Site("slow", f"127.0.0.1:{slow_port}"),
    ]
    try:
        with _InProcessCoordinator(sites, deadline_s=1.0) as coord:
            q = _queries(cohort_parts["emb"])[0]
            started = time.monotonic()
            got = _search(coord.port, q)
            elapsed = time.monotonic() - started
            full = _search(coord.port, q)  # the same query again: same answer
    finally:
        slow.stop(0)
    states = _states(got)
    assert states["down"][0] == "SITE_STATE_UNAVAILABLE"
    assert states["slow"] == ("SITE_STATE_TIMED_OUT", "DEADLINE_EXCEEDED")
    assert all(states[s][0] == "SITE_STATE_ANSWERED" for s in SITES)
    assert elapsed < 3.0  # the slow site's 3 s were not waited for
    missing = [w for w in got.diagnostics.warning_details if w.code == pb.WARNING_CODE_FEDERATION_SITE_MISSING]
    assert len(missing) == 1 and "down" in missing[0].message and "slow" in missing[0].message
    assert [n.study_uid for n in got.neighbors] == [n.study_uid for n in full.neighbors]
    assert len(got.neighbors) == K


def test_encoder_mismatch_is_left_out_or_refused(
    cohort_parts: dict[str, Any], site_processes: dict[str, int]
) -> None:
    with BackgroundServer(cohort_parts["other"], device="cpu") as other:
        sites = [*_sites(site_processes), Site("other", other.target)]
        with _InProcessCoordinator(sites) as coord:
            q = _queries(cohort_parts["emb"])[1]
            got = _search(coord.port, q)
            assert _states(got)["other"] == ("SITE_STATE_REFUSED", "MODEL_VERSION_MISMATCH")
            assert {n.site for n in got.neighbors} <= {"north", "south"}  # the cohort's sites
            with pytest.raises(grpc.RpcError) as info:  # no site holds this encoder's vectors
                _search(coord.port, q, model="enc-ffffffffffff")
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "no site holds" in (info.value.details() or "")
            with (  # unversioned vectors are not sent
                pytest.raises(grpc.RpcError) as info,
                grpc.insecure_channel(f"127.0.0.1:{coord.port}") as channel,
            ):
                cohortsim_pb2_grpc.PatientSimilarityServiceStub(channel).SearchSimilar(
                    pb.SearchSimilarRequest(embedding=pb.Vector(values=q.tolist()), k=3), timeout=30
                )
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_site_rpc_needs_the_encoder_version(cohort_parts: dict[str, Any], site_processes: dict[str, int]) -> None:
    q = _queries(cohort_parts["emb"])[2]
    with grpc.insecure_channel(f"127.0.0.1:{site_processes['north']}") as channel:
        stub = cohortsim_pb2_grpc.PatientSimilarityServiceStub(channel)
        ok = stub.SearchSite(
            pb.SearchSiteRequest(embedding=pb.Vector(values=q.tolist(), model_version=MODEL_VERSION), k=4),
            timeout=30,
        )
        assert len(ok.neighbors) == 4 and ok.model_version == MODEL_VERSION
        assert ok.num_studies == (cohort_parts["emb"].shape[0] + 2) // 3
        assert all(n.weight == 0 for n in ok.neighbors)
        sims = [n.similarity for n in ok.neighbors]
        assert sims == sorted(sims, reverse=True)
        with pytest.raises(grpc.RpcError) as info:
            stub.SearchSite(pb.SearchSiteRequest(embedding=pb.Vector(values=q.tolist()), k=4), timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "no [[site]]"),
        ('[[site]]\nname = "a"\n', "'address'"),
        ('[[site]]\nname = "a"\naddress = "h:1"\ncolour = "red"\n', "unknown key"),
        ('[[site]]\nname = "a"\naddress = "h:1"\n[[site]]\nname = "a"\naddress = "h:2"\n', "unique"),
        ('[[site]]\nname = "a"\naddress = "h:1"\ntls_cert = "c.pem"\n', "tls_key"),
        ("[[site]\n", "not valid TOML"),
    ],
)
def test_bad_sites_file_is_refused(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "sites.toml"
    path.write_text(text)
    with pytest.raises(SitesConfigError, match=re.escape(fragment)):
        load_sites(path)


def test_sites_file_paths_are_relative_to_it(tmp_path: Path) -> None:
    path = tmp_path / "sites.toml"
    path.write_text('[[site]]\nname = "a"\naddress = "h:1"\ntls_ca = "ca.pem"\n')
    (site,) = load_sites(path)
    assert site.tls_ca == tmp_path / "ca.pem" and site.secure


RESEARCHER, CLINICIAN = "r" * 40, "c" * 40


def _expected_counts(cohort_parts: dict[str, Any], q: np.ndarray, k: int) -> list[tuple[float, float, int]]:
    """The pooled binned curve computed here from each site's own index (site-suppressed
    counts, pooled, suppressed again)."""
    parts = []
    for name in SITES:
        snap = load_snapshot(cohort_parts["dirs"][name], device="cpu")
        (res,) = search_similar(snap, q, k)
        nbs = res.neighbors
        parts.append(suppress(aggregate(
            [n.time for n in nbs], [n.event for n in nbs], [n.similarity for n in nbs],
            [n.labels for n in nbs], edges=EDGES, temperature=snapshot_temperature(snap),
        ), 11))
    return binned_km(suppress(pool(parts), 11))


def test_researchers_get_pooled_counts_from_at_least_three_sites(
    cohort_parts: dict[str, Any], site_processes: dict[str, int]
) -> None:
    tokens = TokenStore.from_mapping({RESEARCHER: "researcher", CLINICIAN: "clinician"})
    q = _queries(cohort_parts["emb"])[0]
    with _InProcessCoordinator(_sites(site_processes), auth_tokens=tokens) as coord:
        got = _search(coord.port, q, k=60, token=RESEARCHER)
        clinician = _search(coord.port, q, k=60, token=CLINICIAN)
    assert not got.neighbors and len(clinician.neighbors) == 60
    want = _expected_counts(cohort_parts, q, 60)
    assert want, "the test cohort must give at least one releasable bin"
    assert [(p.time, p.at_risk) for p in got.prognosis.survival] == [(t, n) for t, _, n in want]
    np.testing.assert_allclose([p.survival for p in got.prognosis.survival], [s for _, s, _ in want], atol=1e-12)
    assert got.disclosure_control.min_cell_count == 11
    assert all(c == 0 or c >= 11 for d in got.prognosis.label_distributions for c in (s.count for s in d.shares))
    assert {s.name: pb.SiteState.Name(s.state) for s in got.federation.sites} == {
        s: "SITE_STATE_ANSWERED" for s in SITES
    }


def test_researchers_need_three_sites(cohort_parts: dict[str, Any], site_processes: dict[str, int]) -> None:
    tokens = TokenStore.from_mapping({RESEARCHER: "researcher"})
    sites = [*_sites(site_processes)[:2], Site("down", f"127.0.0.1:{_free_port()}")]
    with _InProcessCoordinator(sites, auth_tokens=tokens) as coord, pytest.raises(grpc.RpcError) as info:
        _search(coord.port, _queries(cohort_parts["emb"])[0], k=60, token=RESEARCHER)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "at least 3 sites" in (info.value.details() or "")


def test_a_site_decides_what_leaves_per_role(cohort_parts: dict[str, Any]) -> None:
    tokens = TokenStore.from_mapping({RESEARCHER: "researcher", CLINICIAN: "clinician"})
    q = _queries(cohort_parts["emb"])[0]
    request = pb.SearchSiteRequest(embedding=pb.Vector(values=q.tolist(), model_version=MODEL_VERSION), k=60)
    aggregate = pb.AggregateSiteRequest(embedding=request.embedding, k=request.k)
    with BackgroundServer(cohort_parts["dirs"]["north"], device="cpu", auth_tokens=tokens) as site, \
            grpc.insecure_channel(site.target) as channel:
        stub = cohortsim_pb2_grpc.PatientSimilarityServiceStub(channel)
        as_researcher = (("authorization", f"Bearer {RESEARCHER}"),)
        with pytest.raises(grpc.RpcError) as info:  # neighbour rows: clinicians only
            stub.SearchSite(request, timeout=30, metadata=as_researcher)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        counts = stub.AggregateSite(aggregate, timeout=30, metadata=as_researcher)
        rows = stub.SearchSite(request, timeout=30, metadata=(("authorization", f"Bearer {CLINICIAN}"),))
    assert len(rows.neighbors) == 60
    released = [*counts.at_risk, *counts.events, *(c.patient_count for c in counts.label_counts)]
    assert all(c == 0 or c >= 11 for c in released) and counts.min_cell == 11
    assert counts.withheld  # the default bins split this site's 60 neighbours into small cells


def test_serve_needs_index_or_federate(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from service.cli import app

    result = CliRunner().invoke(app, ["serve", "--port", "0"])
    assert result.exit_code != 0 and "--index" in result.output and "--federate" in result.output
    (tmp_path / "sites.toml").write_text('[[site]]\nname = "a"\n')
    result = CliRunner().invoke(app, ["serve", "--federate", str(tmp_path / "sites.toml")])
    assert result.exit_code != 0 and "'address'" in result.output
    (tmp_path / "ok.toml").write_text('[[site]]\nname = "a"\naddress = "127.0.0.1:1"\n')
    result = CliRunner().invoke(app, ["serve", "--federate", str(tmp_path / "ok.toml"), "--encoder", str(tmp_path)])
    assert result.exit_code != 0 and "card.json" in result.output
    result = CliRunner().invoke(app, ["serve", "--index", str(tmp_path), "--time-bins", "5,1"])
    assert result.exit_code != 0 and "--time-bins" in result.output


def test_coordinator_embeds_a_dicom_query_once_with_the_sites_encoder(tmp_path: Path) -> None:
    from encoders.model import EncoderCard, create_encoder, save_encoder
    from encoders.synth import synth_cohort

    synth_cohort(tmp_path / "synth", patients=1, seed=4)
    files = [p.read_bytes() for p in sorted((tmp_path / "synth" / "dicom").rglob("*.dcm"))]
    encoder = create_encoder("test_resnet", embedding_dim=16)
    card = save_encoder(encoder, EncoderCard.for_encoder(encoder, seed=0), tmp_path / "model")
    _, table = make_cohort(seed=5)
    emb = np.random.default_rng(5).normal(size=(table.num_rows, 16)).astype(np.float32)
    rows = np.arange(table.num_rows) % 3
    for s in range(3):
        build_snapshot(tmp_path / f"s{s}", emb[rows == s], table.take(np.flatnonzero(rows == s)),
                       model_version=card.version, encoder_dir=tmp_path / "model" if s == 0 else None)
    with BackgroundServer(tmp_path / "s0", device="cpu") as s0, \
            BackgroundServer(tmp_path / "s1", device="cpu") as s1, \
            BackgroundServer(tmp_path / "s2", device="cpu") as s2:
        sites = [Site(f"s{i}", srv.target) for i, srv in enumerate((s0, s1, s2))]
        with grpc.insecure_channel(s0.target) as channel:
            embedded = cohortsim_pb2_grpc.PatientSimilarityServiceStub(channel).EmbedStudy(
                pb.EmbedStudyRequest(dicom=pb.DicomStudy(files=files)), timeout=120
            )
        vector = np.asarray(embedded.embedding.values, dtype=np.float32)
        with _InProcessCoordinator(sites, encoder_dir=tmp_path / "model") as coord:
            want = _search(coord.port, vector, model=card.version)
            with grpc.insecure_channel(f"127.0.0.1:{coord.port}") as channel:
                got = cohortsim_pb2_grpc.PatientSimilarityServiceStub(channel).SearchSimilar(
                    pb.SearchSimilarRequest(dicom=pb.DicomStudy(files=files), k=K), timeout=120
                )
    assert [n.study_uid for n in got.neighbors] == [n.study_uid for n in want.neighbors]
    np.testing.assert_allclose(
        [n.similarity for n in got.neighbors], [n.similarity for n in want.neighbors], atol=1e-5
    )
    assert got.model_version == card.version
    assert {s.name for s in got.federation.sites} == {"s0", "s1", "s2"}


def test_mutual_tls_between_coordinator_and_sites_each_site_decides(
    cohort_parts: dict[str, Any], tmp_path: Path
) -> None:
    from service.tls import TlsConfig

    from .pki import TestCA

    ca = TestCA(tmp_path / "ca")
    server = ca.issue("localhost", server=True)
    coordinator_cert = ca.issue("coordinator", server=False)
    lab_cert = ca.issue("lab", server=False)
    tokens = TokenStore.from_mapping(
        {"cert:coordinator": {"role": "clinician", "id": "coord"}, "cert:lab": {"role": "researcher", "id": "lab"}}
    )
    tls = TlsConfig(server.cert, server.key, client_ca=ca.cert_path)
    q = _queries(cohort_parts["emb"])[3]
    with BackgroundServer(cohort_parts["dirs"]["north"], device="cpu", tls=tls, auth_tokens=tokens) as north, \
            BackgroundServer(cohort_parts["dirs"]["south"], device="cpu", tls=tls, auth_tokens=tokens) as south, \
            BackgroundServer(cohort_parts["dirs"]["east"], device="cpu", tls=tls, auth_tokens=tokens) as east:
        sites = [
            Site("north", f"localhost:{north.port}", ca.cert_path, coordinator_cert.cert, coordinator_cert.key),
            Site("south", f"localhost:{south.port}", ca.cert_path, coordinator_cert.cert, coordinator_cert.key),
            # east knows this certificate as a researcher's: no neighbour rows leave east
            Site("east", f"localhost:{east.port}", ca.cert_path, lab_cert.cert, lab_cert.key),
        ]
        with _InProcessCoordinator(sites) as coord:
            got = _search(coord.port, q)
    states = _states(got)
    assert states["north"][0] == states["south"][0] == "SITE_STATE_ANSWERED"
    assert states["east"] == ("SITE_STATE_REFUSED", "ROLE_NOT_ALLOWED")
    assert len(got.neighbors) == K and not {n.study_uid for n in got.neighbors} & set(
        cohort_parts["east_uids"]
    )
