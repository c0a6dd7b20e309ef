"""What one record of releases per principal costs (issue #24): time of a check and
memory per recorded patient entry, beside references measured in the same run.

* **check time**: ``check_and_add`` of a fresh k-patient set in a record already holding
  ``--sets`` sets, for one principal (the reference: a single server-wide record) and
  for one of ``--principals`` principals that each hold as many (the per-principal book);
  printed as the ratio book / single.
* **memory**: bytes a record holds per patient entry (tracemalloc), and as a ratio to
  the same sets kept as plain frozensets (the least any record of the sets must hold).

    python benchmarks/bench_release_records.py --preset small
"""

from __future__ import annotations

import argparse
import gc
import random
import time
import tracemalloc

from service.releases import ReleaseBook

PRESETS = {
    "small": {"patients": 20_000, "k": 110, "sets": 500, "principals": 50, "checks": 300},
    "medium": {"patients": 100_000, "k": 220, "sets": 2_000, "principals": 100, "checks": 500},
}


def _sets(rng: random.Random, pids: list[str], n: int, k: int) -> list[frozenset[str]]:
    return [frozenset(rng.sample(pids, k)) for _ in range(n)]


def _fill(book: ReleaseBook, principal: str, sets: list[frozenset[str]]) -> None:
    book.record(principal).add([("aggregate", s) for s in sets])


def _check_time(book: ReleaseBook, principal: str, probes: list[frozenset[str]]) -> float:
    """Seconds per check of ``probes`` (``conflict``: checked as check_and_add does, then
    nothing kept, so every probe meets the same record)."""
    record = book.record(principal)
    t0 = time.perf_counter()
    for s in probes:
        record.conflict([("aggregate", s)])
    return (time.perf_counter() - t0) / len(probes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_argument_group("size")
    size.add_argument("--preset", choices=sorted(PRESETS), default="small")
    size.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    p = PRESETS[args.preset]
    rng = random.Random(args.seed)
    pids = [f"P-{i:016x}" for i in range(p["patients"])]
    probes = _sets(rng, pids, p["checks"], p["k"])

    single = ReleaseBook(11, limit=10**7, max_members=10**10)
    _fill(single, "everyone", _sets(rng, pids, p["sets"], p["k"]))

    book = ReleaseBook(11, limit=10**7, max_principals=p["principals"], max_members=10**10)
    for i in range(p["principals"]):
        _fill(book, f"researcher-{i}", _sets(rng, pids, p["sets"], p["k"]))
    # interleaved, best of 5: the machine is shared, the minimum is the least disturbed
    runs = [(_check_time(single, "everyone", probes), _check_time(book, "researcher-7", probes)) for _ in range(5)]
    t_single, t_book = min(r[0] for r in runs), min(r[1] for r in runs)

    gc.collect()
    plain_sets = _sets(rng, pids, p["sets"], p["k"])
    tracemalloc.start()
    kept = [frozenset(list(s)) for s in plain_sets]  # copies: the reference holds its own sets
    plain = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del kept
    gc.collect()
    tracemalloc.start()
    one = ReleaseBook(11, limit=10**7, max_members=10**10)
    _fill(one, "r", [frozenset(list(s)) for s in plain_sets])  # its own sets, as in service
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    entries = p["sets"] * p["k"]

    print(f"preset {args.preset}: {p['patients']} patients, sets of {p['k']}, {p['sets']} sets a "
          f"principal, {p['principals']} principals, {p['checks']} checks")
    print(f"check time, single record (reference): {t_single * 1e6:.0f} us")
    print(f"check time, one of {p['principals']} principals' records: {t_book * 1e6:.0f} us "
          f"(ratio {t_book / t_single:.2f})")
    print(f"memory per patient entry: {held / entries:.0f} B "
          f"(ratio to plain frozensets {held / plain:.2f}); the default cap of 10 M entries "
          f"is about {held / entries * 1e7 / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
