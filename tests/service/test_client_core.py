"""One client core: the blocking client runs the asyncio client, so both have the same
methods, arguments and answers."""

from __future__ import annotations

import asyncio
import inspect
from pathlib import Path

import pytest

from indexing.snapshot import build_snapshot
from service.background import BackgroundServer
from service.client import AsyncCohortsimClient, CohortsimClient, CohortsimClientError

from .conftest import MODEL_VERSION, make_cohort


def _public(cls: type) -> dict[str, inspect.Signature]:
    return {
        name: inspect.signature(fn)
        for name, fn in vars(cls).items()
        if callable(fn) and not name.startswith("_")
    }


def test_sync_and_async_clients_offer_the_same_calls() -> None:
    sync, asyn = _public(CohortsimClient), _public(AsyncCohortsimClient)
    assert set(sync) == set(asyn)
    for name in ("ingest", "delete_patient", "reload_index", "search_stream"):
        assert name in asyn and inspect.iscoroutinefunction(getattr(AsyncCohortsimClient, name))
    assert "include_thumbnails" in asyn["search_stream"].parameters
    for name, sig in sync.items():
        assert list(sig.parameters) == list(asyn[name].parameters), name


def test_async_admin_calls_and_sync_answers_agree(tmp_path: Path) -> None:
    emb, table = make_cohort(seed=5)
    build_snapshot(tmp_path, emb, table, model_version=MODEL_VERSION, kind="Flat")
    pid = table.column("patient_id")[0].as_py()
    with BackgroundServer(tmp_path, device="cpu", watch_interval=None) as srv:

        async def run() -> tuple:
            async with AsyncCohortsimClient(srv.target) as c:
                first = await c.search(embedding=emb[0], k=3)
                deleted = await c.delete_patient(pid)
                again = await c.delete_patient(pid)
                reloaded = await c.reload_index()
                with pytest.raises(CohortsimClientError) as err:
                    await c.ingest([[b"not dicom"]])
                return first, deleted, again, reloaded, err.value.reason

        first, deleted, again, reloaded, reason = asyncio.run(run())
        with CohortsimClient(srv.target) as c:
            sync_first = c.search(embedding=emb[0], k=3)
            info = c.index_info()
    assert deleted == (True, 2) and again == (False, 0)
    assert reloaded == (info.index_version, False)
    assert reason == "NO_STORE"
    # the blocking client answers as the async one (after the delete, patient 0 is hidden)
    assert first.neighbors[0].study_uid == table.column("study_uid")[0].as_py()
    assert pid not in [n.patient_id for n in sync_first.neighbors]
