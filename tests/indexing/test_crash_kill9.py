"""Kill -9 at random points of ingest and index build.

Each run of ``ingest`` or ``index build`` is a forked child killed with SIGKILL either at a
random storage operation (just before its n-th write / fsync / rename / mkdir...) or after
a random delay. After every kill: every store part file verifies and reads, no study is
stored twice, every acknowledged study is there (acknowledged = its ``add_studies``
batch returned), ``CURRENT`` names a complete version at least as new as the last
acknowledged build, every published version verifies, and the served rows hold their
studies' vectors. Re-running finishes the work (an episode ends with everything stored
once and served). The long version is ``benchmarks/chaos_storage.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from storage_chaos import ForkRunner, Workload, kill_campaign, measure

KILLS = 50


@pytest.fixture(scope="module")
def runner(chaos_workload: Workload) -> ForkRunner:
    with ForkRunner(chaos_workload) as runner:
        yield runner  # type: ignore[misc]


def test_kill9_during_ingest_and_build_loses_nothing(runner: ForkRunner, tmp_path: Path) -> None:
    ops, secs = measure(runner, tmp_path)
    assert ops["0:ingest-first"] > 10 and ops["1:build"] > 20  # the plan sees the writes
    stats = kill_campaign(
        runner, runner.workload, tmp_path / "runs", kills=KILLS, seed=9, op_counts=ops, durations=secs
    )
    assert stats.failures == []
    assert stats.killed >= KILLS  # runs really cut short by SIGKILL, each followed by the checks
    assert stats.episodes >= 2  # and the work was finished by re-running, more than once


def test_invariant_check_can_fail(runner: ForkRunner, tmp_path: Path) -> None:
    """The checker is not vacuous: a lost acknowledged study and a stale CURRENT are seen."""
    from storage_chaos import check_invariants

    from indexing.snapshot import publish

    work = tmp_path / "w"
    (work / "data").mkdir(parents=True)
    for phase in ("ingest-first", "build", "ingest-all", "build"):
        assert runner.job(phase, work)["status"] == "done"
    data, acks = work / "data", work / "acks"
    assert check_invariants(data, acks, runner.workload.reference) == []
    versions = (acks / "versions").read_text().split()
    publish(data / "index", versions[0])  # serve the older version again
    assert any("older than acknowledged" in p for p in check_invariants(data, acks, runner.workload.reference))
    publish(data / "index", versions[-1])
    with open(acks / "studies", "a") as fh:
        fh.write("S-never-stored\n")
    assert any("acknowledged studies lost" in p for p in check_invariants(data, acks, runner.workload.reference))
