"""An index without prognostic skill says so first: gRPC codes, CLI, plot, GetIndexInfo, logs."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from rich.console import Console

from indexing.evaluation import EVALUATION_KEY, evaluate_prognosis
from indexing.notices import Notice, WarningCode
from indexing.snapshot import build_snapshot
from service import convert
from service.api import cohortsim_pb2 as pb
from service.background import BackgroundServer
from service.cli import print_result
from service.client import CohortsimClient, search_result_from_proto
from service.governance import Governance
from service.plots import plot_survival, skill_banner
from service.servicer import ServiceState

from .conftest import MODEL_VERSION, make_cohort


def _index(root: Path, *, skill: bool) -> Path:
    """The service cohort; without ``skill`` its outcomes are shuffled across patients, so
    neighbours cannot predict them (the leave-one-out C-index is chance)."""
    emb, table = make_cohort(seed=3)
    if skill:  # survival strongly set by the embedding cluster (i % 4): neighbours predict it
        rng = np.random.default_rng(2)
        known = [t is not None for t in table["time"].to_pylist()]
        t = [6.0 * 3.0 ** (i % 4) * rng.exponential() if ok else None for i, ok in enumerate(known)]
        table = table.set_column(table.column_names.index("time"), "time", pa.array(t, pa.float64()))
    else:
        perm = np.random.default_rng(11).permutation(table.num_rows)
        for name in ("time", "event"):
            col = table[name].take(pa.array(perm))
            table = table.set_column(table.column_names.index(name), name, col)
    ev = evaluate_prognosis(emb, table)
    build_snapshot(root, emb, table, model_version=MODEL_VERSION, extra_manifest={EVALUATION_KEY: ev})
    return root


@pytest.fixture(scope="module")
def unskilled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _index(tmp_path_factory.mktemp("unskilled"), skill=False)


@pytest.fixture(scope="module")
def unskilled_server(unskilled: Path) -> Iterator[BackgroundServer]:
    with BackgroundServer(unskilled, device="cpu") as srv:
        yield srv


def test_every_answer_of_an_unskilled_index_leads_with_the_code(
    unskilled_server: BackgroundServer, tmp_path: Path
) -> None:
    _, table = make_cohort(seed=3)
    with CohortsimClient(unskilled_server.target, timeout=30) as client:
        res = client.search(study_uid=table["study_uid"][50].as_py(), k=10)
        info = client.index_info()
    first = res.prognosis.warning_details[0]
    assert first.code == "NO_PROGNOSTIC_SKILL" and "includes 0.5" in first.message
    assert res.prognosis.warnings[0] == first.message  # the string list, same order
    assert [w.code for w in info.warnings] == ["NO_PROGNOSTIC_SKILL"]
    q = info.prognostic_quality
    assert q is not None and q.c_index_lower is not None and q.c_index_upper is not None
    assert q.c_index_lower <= 0.5 <= q.c_index_upper

    # CLI: the code is printed before any neighbour or survival figure
    buf = io.StringIO()
    print_result(res, Console(file=buf, width=200, color_system=None))
    text = buf.getvalue()
    assert text.index("NO_PROGNOSTIC_SKILL") < text.index("most similar patients")
    assert text.index("NO_PROGNOSTIC_SKILL") < text.index("median survival")
    assert text.count(first.message) == 1  # not repeated among the other warnings

    # the plot's title names it
    assert skill_banner(res).startswith("NO PROGNOSTIC SKILL")
    assert plot_survival(res, tmp_path / "km.png").stat().st_size > 0


def test_a_skilled_index_gives_no_skill_warning(tmp_path: Path) -> None:
    root = _index(tmp_path / "skilled", skill=True)
    state = ServiceState.load(root, device="cpu")
    ev = state.snapshot.manifest[EVALUATION_KEY]  # type: ignore[union-attr]
    assert ev["c_index_interval"][0] > 0.5
    with BackgroundServer(root, device="cpu") as srv, CohortsimClient(srv.target, timeout=30) as client:
        res = client.search(study_uid=make_cohort(seed=3)[1]["study_uid"][50].as_py(), k=10)
        info = client.index_info()
    assert res.prognosis.skill_warnings == [] and info.warnings == []
    assert skill_banner(res) == ""


def test_serve_logs_the_skill_warning_at_start(
    unskilled: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="service.servicer"):
        ServiceState.load(unskilled, device="cpu")
    assert any("NO_PROGNOSTIC_SKILL" in r.getMessage() for r in caplog.records)


def test_every_engine_warning_maps_to_a_proto_code() -> None:
    for code in WarningCode:
        msg = convert.warning_to_proto(Notice(code, "text"))
        assert pb.WarningCode.Name(msg.code) == f"WARNING_CODE_{code.value}"
    assert convert.warning_to_proto("plain text").code == pb.WARNING_CODE_UNSPECIFIED
    # and every proto code has an engine name (no orphan on either side)
    names = {v.name.removeprefix("WARNING_CODE_") for v in pb.WarningCode.DESCRIPTOR.values}
    assert names == {c.value for c in WarningCode}


def test_researchers_keep_the_code_but_not_a_message_with_numbers() -> None:
    resp = pb.GetIndexInfoResponse(num_studies=200, dimension=32, index_version="v")
    resp.warnings.append(convert.warning_to_proto(Notice(WarningCode.NO_PROGNOSTIC_SKILL, "C 0.49")))
    out = Governance().index_info(resp)
    assert out.warnings[0].code == pb.WARNING_CODE_NO_PROGNOSTIC_SKILL
    assert out.warnings[0].message == ""
    res = search_result_from_proto(
        pb.SearchSimilarResponse(
            prognosis=pb.Prognosis(warning_details=[out.warnings[0]]),
        )
    )
    buf = io.StringIO()
    print_result(res, Console(file=buf, width=200, color_system=None))
    assert buf.getvalue().startswith("NO_PROGNOSTIC_SKILL: (details withheld)")


def test_cli_query_prints_the_skill_code_first_and_refuses_explanations_without_dicom(
    unskilled_server: BackgroundServer, tmp_path: Path
) -> None:
    from tests.e2e.clirun import cli

    uid = make_cohort(seed=3)[1]["study_uid"][50].as_py()
    code, out, _ = cli("query", "--server", unskilled_server.target, "--study-uid", uid, "--k", "5")
    assert code == 0
    assert out.index("NO_PROGNOSTIC_SKILL") < out.index("most similar patients")
    code, _, err = cli(
        "query", "--server", unskilled_server.target, "--study-uid", uid,
        "--explanations", str(tmp_path / "why.png"),
    )
    assert code != 0 and "--explanations needs --dicom" in err
