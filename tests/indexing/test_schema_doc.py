"""The README documents the store and index schema: every column and manifest key."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa

from indexing.snapshot import build_snapshot
from indexing.store import OUTCOME_SCHEMA, STUDY_SCHEMA
from indexing.tombstones import TOMBSTONE_SCHEMA

README = Path(__file__).resolve().parents[2] / "README.md"


def documented() -> set[str]:
    text = README.read_text()
    section = text[text.index("### Store and index schema") :]
    return set(re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", section))


def test_every_store_column_is_documented() -> None:
    names = {f.name for schema in (STUDY_SCHEMA, OUTCOME_SCHEMA, TOMBSTONE_SCHEMA) for f in schema}
    assert names - documented() == set()


def test_every_manifest_key_is_documented(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 8)).astype(np.float32)
    meta = pa.table({"patient_id": [f"P-{i}" for i in range(30)], "study_uid": [f"S-{i}" for i in range(30)]})
    version = build_snapshot(tmp_path, x, meta, model_version="m")
    manifest = json.loads((tmp_path / "versions" / version / "manifest.json").read_text())
    internal = {"format", "deleted_patients_dropped"}  # bookkeeping, not schema
    assert set(manifest) - internal - documented() == set()
