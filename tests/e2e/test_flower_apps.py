"""service/flower_apps.py without a deployment: one ClientApp round on a tiny store
(what leaves the site, FedBN state kept locally, spec refusal) and the server strategy's
averaging, min-replies rule and site bookkeeping."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr", reason="Flower is the optional extra cohortsim[federated]")

from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)

import service.flower_apps as apps
from encoders import federated as fed
from encoders.spec import InputSpec
from indexing.store import CohortStore, StudyRecord

SPEC = InputSpec(spacing_mm=(4.0, 4.0, 4.0), shape=(8, 32, 32))


def _store(root: Path, n: int = 4, spec: InputSpec = SPEC) -> Path:
    rng = np.random.default_rng(0)
    st = CohortStore(root, create=True)
    st.add_studies([
        StudyRecord(patient_id=f"P-{i:016x}", study_uid=f"S-{i:024x}", site="north",
                    volume=rng.integers(-1000, 400, size=spec.shape).astype(np.int16),
                    spec=spec.to_dict(), manufacturer="ACME", model="CT1")
        for i in range(n)
    ])
    return root


def _espec(spec: InputSpec = SPEC) -> dict:
    return fed.encoder_spec(backbone="test_resnet", spec=spec, embedding_dim=16)


def _train_message(espec: dict, *, rnd: int = 1, rounds: int = 2, fedbn: bool = False) -> Message:
    enc, head = fed.initial_model(espec, seed=0)
    arrays = fed.model_arrays({"encoder": enc.state_dict(), "head": head.state_dict()})
    config = ConfigRecord({
        "encoder-spec": json.dumps(espec), "rounds": rounds, "fedbn": fedbn, "seed": 0,
        "local-epochs": 1, "batch-size": 2, "lr": 1e-3, "views": 0, "server-round": rnd,
    })
    return Message(content=RecordDict({apps.ARRAYS: apps._record(arrays), apps.CONFIG: config}),
                   dst_node_id=1, message_type="train")


def _context(store: Path) -> Context:
    return Context(run_id=1, node_id=1, node_config={"store": str(store), "site-name": "North"},
                   state=RecordDict(), run_config={})


@pytest.fixture(autouse=True)
def _site(monkeypatch: pytest.MonkeyPatch) -> None:
    """The site secret, and the task identity Flower's runtime sets in a ClientApp process
    (a Message cannot be made without it)."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setenv("COHORTSIM_SITE_SECRET", "flower-apps-test-secret-0123456789")
    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


def test_site_reply_holds_only_weights_and_scalar_metrics(tmp_path: Path) -> None:
    store = _store(tmp_path / "store")
    espec = _espec()
    msg = _train_message(espec, fedbn=True)
    ctx = _context(store)
    reply = apps.train_at_site(msg, ctx)
    content = reply.content
    # exactly one ArrayRecord and one MetricRecord; no config, no strings, no volumes
    assert set(content.keys()) == {apps.ARRAYS, apps.METRICS}
    assert isinstance(content[apps.ARRAYS], ArrayRecord)
    metrics = content[apps.METRICS]
    assert isinstance(metrics, MetricRecord)
    assert set(metrics.keys()) == {"num-examples", "train-loss", "site-id"}
    assert all(isinstance(v, int | float) for v in metrics.values())
    assert metrics["num-examples"] == 4
    assert fed.site_pseudonym(int(metrics["site-id"])).startswith("site-")
    # the weights are the model's (FedBN: without the normalisation layers before the last round)
    enc, head = fed.initial_model(espec, seed=0)
    like = {"encoder": enc.state_dict(), "head": head.state_dict()}
    sent = set(content[apps.ARRAYS].keys())
    norm = fed.norm_keys(enc, head)
    assert sent == set(fed.model_arrays(like)) - norm
    # ... and they were trained: not the global weights sent
    glob = apps._numpy(msg.content[apps.ARRAYS])
    got = apps._numpy(content[apps.ARRAYS])
    assert any(not np.allclose(got[k], glob[k]) for k in sent)
    # the site keeps its own normalisation layers for the next round
    assert set(ctx.state[apps.LOCAL_NORM].keys()) == norm
    # last round: everything, so the one shared encoder gets averaged normalisation layers
    final = apps.train_at_site(_train_message(espec, rnd=2, fedbn=True), ctx)
    assert set(final.content[apps.ARRAYS].keys()) == set(fed.model_arrays(like))


def test_site_refuses_a_round_with_another_spec(tmp_path: Path) -> None:
    store = _store(tmp_path / "store")
    other = InputSpec(spacing_mm=(2.0, 2.0, 2.0), shape=(8, 32, 32))
    with pytest.raises(fed.FederationError) as e:
        apps.train_at_site(_train_message(_espec(other)), _context(store))
    assert e.value.reason == "spec_mismatch"


def _reply(arrays: dict, n: int, site: int, loss: float = 1.0) -> Message:
    content = RecordDict({
        apps.ARRAYS: ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()}),
        apps.METRICS: MetricRecord({"num-examples": n, "train-loss": loss, "site-id": site}),
    })
    msg = Message(content=content, dst_node_id=site, message_type="train")
    return msg


def test_strategy_averages_keeps_missing_keys_and_needs_min_replies() -> None:
    seen = apps._Rounds()
    strategy = apps._make_strategy("fedavg", min_sites=2, min_replies=2, mu=0.0, seen=seen)
    strategy.current = {"w": np.array([0.0, 0.0]), "bn": np.array([5.0]),
                        "count": np.array(3, dtype=np.int64)}
    a = _reply({"w": [1.0, 2.0], "count": np.array(3)}, 1, 10)
    b = _reply({"w": [3.0, 6.0], "count": np.array(5)}, 3, 11)
    arrays, metrics = strategy.aggregate_train(1, [a, b])
    got = apps._numpy(arrays)
    assert np.allclose(got["w"], [2.5, 5.0])
    assert np.allclose(got["bn"], [5.0])  # not sent (FedBN): the previous value stays
    assert got["count"].dtype == np.int64 and got["count"].shape == ()
    assert metrics is not None and metrics["num-examples"] == 4
    assert seen.completed == 1 and sorted(seen.sites) == [fed.site_pseudonym(10), fed.site_pseudonym(11)]
    # one reply (another site dropped out): the round's update is not kept
    arrays2, metrics2 = strategy.aggregate_train(2, [a])
    assert metrics2 is None and np.allclose(apps._numpy(arrays2)["w"], strategy.current["w"])
    assert seen.completed == 1 and seen.rounds[-1]["kept_previous"] is True
