"""The client's result types are the API's messages: a proto-driven check.

Every result type of ``service.client`` has a rule here naming the message it reads, and
its fields must be that message's fields (under the renames listed). A field added to a
response message without reaching the client, or a client field no message carries,
fails; so does a new client type without a rule.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest

import service.client as client
from service.api import cohortsim_pb2 as pb

OUTCOME = ("time", "event", "labels", "values")  # an Outcome message, flattened

# client type -> (message, {proto field: client fields it becomes})
RULES: dict[str, tuple[object, dict[str, tuple[str, ...]]]] = {
    "CodedWarning": (pb.Warning, {}),
    "EmbeddedRegion": (pb.EmbeddedRegion, {}),
    "Explanation": (pb.Explanation, {}),
    "Neighbor": (pb.Neighbor, {"outcome": OUTCOME}),
    "LabelDistribution": (pb.LabelDistribution, {}),
    "ValueSummary": (pb.ValueSummary, {}),
    "Prognosis": (pb.Prognosis, {}),
    "AcquisitionCheck": (pb.AcquisitionCheck, {}),
    "PredictionStability": (pb.PredictionStability, {}),
    "RegionPrognosis": (pb.RegionPrognosis, {}),
    "Diagnostics": (pb.QueryDiagnostics, {"region_prognoses": ("regions",)}),
    "DisclosureControl": (pb.DisclosureControl, {}),
    "SiteReport": (pb.SiteReport, {}),
    "FederationReport": (pb.FederationReport, {}),
    "SearchResult": (pb.SearchSimilarResponse, {"disclosure_control": ("disclosure",)}),
    "CalibrationGroup": (pb.CalibrationGroup, {}),
    "HorizonCalibration": (pb.HorizonCalibration, {}),
    "PrognosticQuality": (pb.PrognosticQuality, {}),
    "IndexInfo": (pb.GetIndexInfoResponse, {}),
    "StudySummary": (pb.StudySummary, {}),
    "PatientRecord": (pb.GetPatientResponse, {"outcome": OUTCOME}),
    "StudyPage": (pb.ListStudiesResponse, {}),
    "CategoryCount": (pb.CategoryCount, {}),
    # researchers' withheld cells: the DisclosureControl's field list, flattened
    "CohortStats": (pb.GetCohortStatsResponse, {"disclosure_control": ("withheld_fields",)}),
    # unpacks as ``vector, model_version``: EmbedStudy's acquisition summary is not part
    # of that two-value contract
    "StudyEmbedding": (pb.EmbedStudyResponse, {"embedding": ("vector",), "acquisition": ()}),
    # the engine's own types (indexing.prognosis_types), shared by the client
    "SurvivalPoint": (pb.SurvivalPoint, {}),
    "HorizonEstimate": (pb.HorizonEstimate, {}),
    "LabelShare": (pb.LabelShare, {}),
}


def _client_types() -> dict[str, type]:
    out = {}
    for name in client.__all__:
        obj = getattr(client, name)
        if inspect.isclass(obj) and (dataclasses.is_dataclass(obj) or hasattr(obj, "_fields")):
            out[name] = obj
    return out


def _fields(cls: type) -> set[str]:
    if dataclasses.is_dataclass(cls):
        return {f.name for f in dataclasses.fields(cls)}
    return set(cls._fields)  # type: ignore[attr-defined]


def test_every_client_result_type_has_a_rule() -> None:
    assert set(_client_types()) == set(RULES)


@pytest.mark.parametrize("name", sorted(RULES))
def test_client_type_carries_its_messages_fields(name: str) -> None:
    message, renames = RULES[name]
    proto = {f.name for f in message.DESCRIPTOR.fields}  # type: ignore[attr-defined]
    assert set(renames) <= proto, f"{name}: renames of fields the message lacks"
    expected = set()
    for f in proto:
        expected |= set(renames.get(f, (f,)))
    assert _fields(_client_types()[name]) == expected


def test_a_federation_report_reaches_the_client() -> None:
    resp = pb.SearchSimilarResponse(
        federation=pb.FederationReport(
            sites=[
                pb.SiteReport(name="north", state=pb.SITE_STATE_ANSWERED, neighbors=3, num_studies=40),
                pb.SiteReport(name="south", state=pb.SITE_STATE_TIMED_OUT, reason="DEADLINE_EXCEEDED"),
            ],
            cohort_studies=40,
        )
    )
    got = client.search_result_from_proto(resp).federation
    assert got is not None and got.cohort_studies == 40
    assert [(s.name, s.state) for s in got.sites] == [("north", "ANSWERED"), ("south", "TIMED_OUT")]
    assert [s.name for s in got.missing] == ["south"]
    assert client.search_result_from_proto(pb.SearchSimilarResponse()).federation is None
    info = client.index_info_from_proto(pb.GetIndexInfoResponse(federation=resp.federation))
    assert info.federation is not None and info.federation.sites[0].num_studies == 40
