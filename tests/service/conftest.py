"""Fixtures: a small seeded snapshot (200 x 32, clustered) served in-process on a free port."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from indexing.snapshot import build_snapshot
from indexing.store import OUTCOME_SCHEMA, STUDY_SCHEMA, VOLUME_COLUMNS
from service.background import BackgroundServer

N_STUDIES = 200
DIM = 32
N_CLUSTERS = 4
MODEL_VERSION = "enc-000000000000"
SCANNERS = [("GE", "Revolution"), ("SIEMENS", "Force"), ("PHILIPS", "iCT"), ("CANON", "Aquilion")]


def cohort_schema() -> pa.Schema:
    """The schema of ``CohortStore.cohort_table()``: studies without volumes + outcomes."""
    studies = [f for f in STUDY_SCHEMA if f.name not in VOLUME_COLUMNS]
    outcomes = [f for f in OUTCOME_SCHEMA if f.name != "patient_id"]
    return pa.schema(studies + outcomes)


def make_cohort(seed: int = 0) -> tuple[np.ndarray, pa.Table]:
    """``(embeddings (200, 32) float32, cohort table)``; patients 0..19 have two studies."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(N_CLUSTERS, DIM))
    cluster = np.arange(N_STUDIES) % N_CLUSTERS
    emb = centres[cluster] + 0.35 * rng.normal(size=(N_STUDIES, DIM))
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
    patient = np.array([i // 2 if i < 40 else i - 20 for i in range(N_STUDIES)])
    rows = []
    for i in range(N_STUDIES):
        manufacturer, model = SCANNERS[(i * 7) % len(SCANNERS)]
        known = i % 17 != 0  # some patients without outcomes
        rows.append(
            {
                "patient_id": f"P-{int(patient[i]):016x}",
                "study_uid": f"S-{i:024x}",
                "site": ["north", "south"][i % 2],
                "modality": "CT",
                "study_day": 0,
                "manufacturer": manufacturer,
                "model": model,
                "kernel": None if i % 5 == 0 else "STANDARD",
                "kvp": "120",
                "slice_thickness": "1.25",
                "pixel_spacing": "0.7\\0.7",
                "spec": None,
                "ingested_at": datetime(2024, 1, 1, tzinfo=UTC),
                "time": float(rng.exponential(12.0 * (1 + cluster[i]))) if known else None,
                "event": bool(rng.random() < 0.7) if known else None,
                "labels": [("histology", ["adeno", "squamous", "small-cell"][cluster[i] % 3])]
                if known
                else None,
                "values": [("tumor_volume_ml", float(10 + 5 * cluster[i] + rng.normal()))]
                if known
                else None,
            }
        )
    table = pa.Table.from_pylist(rows, schema=cohort_schema())
    return emb, table


@pytest.fixture(scope="session")
def cohort() -> tuple[np.ndarray, pa.Table]:
    return make_cohort()


@pytest.fixture(scope="session")
def index_dir(
    tmp_path_factory: pytest.TempPathFactory, cohort: tuple[np.ndarray, pa.Table]
) -> Path:
    emb, table = cohort
    root = tmp_path_factory.mktemp("index")
    build_snapshot(root, emb, table, model_version=MODEL_VERSION, kind="Flat")
    return root


@pytest.fixture(scope="session")
def server(index_dir: Path) -> Iterator[BackgroundServer]:
    with BackgroundServer(index_dir, device="cpu") as srv:
        yield srv
