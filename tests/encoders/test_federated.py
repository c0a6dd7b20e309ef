"""encoders/federated.py and train_ssl's federated hooks: weight round trip, FedBN key
selection, FedAvg, spec refusal, card provenance, init_state / prox_mu / state_out."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from encoders import federated as fed
from encoders.deid import Pseudonymizer
from encoders.model import EncoderCard, load_encoder, save_encoder
from encoders.spec import InputSpec
from encoders.train import train_ssl

SPEC = InputSpec(spacing_mm=(4.0, 4.0, 4.0), shape=(8, 32, 32))


def _espec(**kw: object) -> dict:
    base = dict(backbone="test_resnet", spec=SPEC, embedding_dim=16, pooling="mean",
                region="whole", calibration="none", method="simclr")
    base.update(kw)
    return fed.encoder_spec(**base)  # type: ignore[arg-type]


def _volumes(n: int = 6, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(-1000, 400, size=(n, *SPEC.shape)).astype(np.int16)


def test_weights_round_trip_keeps_values_and_dtypes() -> None:
    enc, head = fed.initial_model(_espec(), seed=1)
    like = {"encoder": enc.state_dict(), "head": head.state_dict()}
    arrays = fed.model_arrays(like)
    assert all(isinstance(a, np.ndarray) for a in arrays.values())
    assert any(k.startswith("head.") for k in arrays) and any(k.startswith("encoder.") for k in arrays)
    # through float64 (what FedAvg produces) and back to each tensor's own dtype
    back = fed.state_from_arrays({k: a.astype(np.float64) for k, a in arrays.items()}, like)
    for part in ("encoder", "head"):
        for k, t in like[part].items():
            assert back[part][k].dtype == t.dtype
            assert torch.allclose(back[part][k].double(), t.double(), atol=1e-6)
    # the same seed gives the same start at every site and at the server
    enc2, head2 = fed.initial_model(_espec(), seed=1)
    a2 = fed.model_arrays({"encoder": enc2.state_dict(), "head": head2.state_dict()})
    assert all(np.allclose(a2[k], arrays[k]) for k in arrays)


def test_bad_updates_are_refused() -> None:
    enc, head = fed.initial_model(_espec(), seed=0)
    like = {"encoder": enc.state_dict(), "head": head.state_dict()}
    arrays = fed.model_arrays(like)
    key = next(k for k, a in arrays.items() if a.dtype.kind == "f" and a.ndim > 1)
    with pytest.raises(fed.FederationError) as e:
        fed.state_from_arrays({key: np.zeros((1, 1), np.float32)}, like)
    assert e.value.reason == "bad_update"
    bad = arrays[key].copy()
    bad.flat[0] = np.nan
    with pytest.raises(fed.FederationError, match="not finite"):
        fed.state_from_arrays({key: bad}, like)
    with pytest.raises(fed.FederationError, match="unknown"):
        fed.state_from_arrays({"encoder.nope": np.zeros(1)}, like)


def test_fedbn_keys_are_exactly_the_normalisation_layers() -> None:
    enc, head = fed.initial_model(_espec(), seed=0)
    norm = fed.norm_keys(enc, head)
    assert norm, "test_resnet has BatchNorm layers"
    mods = dict(enc.named_modules())
    for k in norm:
        part, rest = k.split(".", 1)
        if part == "encoder":
            owner = rest.rsplit(".", 1)[0]
            assert isinstance(mods[owner], torch.nn.modules.batchnorm._NormBase | torch.nn.LayerNorm
                              | torch.nn.GroupNorm)
    # running statistics are among them, convolution weights are not
    assert any(k.endswith("running_var") for k in norm)
    conv = [f"encoder.{n}.weight" for n, m in enc.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert conv and not set(conv) & norm
    keys = list(fed.model_arrays({"encoder": enc.state_dict(), "head": head.state_dict()}))
    during = fed.sent_keys(keys, norm, fedbn=True, final=False)
    assert set(during) == set(keys) - norm
    assert fed.sent_keys(keys, norm, fedbn=True, final=True) == keys
    assert fed.sent_keys(keys, norm, fedbn=False, final=False) == keys


def test_weighted_average() -> None:
    a = {"w": np.array([1.0, 2.0]), "n": np.array(4)}
    b = {"w": np.array([3.0, 6.0]), "n": np.array(8)}
    avg = fed.weighted_average([a, b], [1, 3])
    assert np.allclose(avg["w"], [2.5, 5.0]) and np.isclose(avg["n"], 7.0)
    with pytest.raises(fed.FederationError, match="different sets"):
        fed.weighted_average([a, {"w": b["w"]}], [1, 1])
    with pytest.raises(fed.FederationError):
        fed.weighted_average([a, b], [0, 0])


def test_site_refuses_a_different_spec() -> None:
    fed.check_site_spec(SPEC, _espec())  # same spec: fine
    other = InputSpec(spacing_mm=(2.0, 2.0, 2.0), shape=(8, 32, 32))
    with pytest.raises(fed.FederationError) as e:
        fed.check_site_spec(other, _espec())
    assert e.value.reason == "spec_mismatch" and "refusing" in str(e.value)
    with pytest.raises(fed.FederationError) as e2:
        fed.parse_encoder_spec('{"input": 1}')
    assert e2.value.reason == "bad_config"


def test_site_pseudonyms_are_keyed_and_round_trip() -> None:
    a = Pseudonymizer(b"site-a-secret-0123456789").site("Hospital North")
    b = Pseudonymizer(b"site-b-secret-0123456789").site("Hospital North")
    assert a != b and a.startswith("site-") and "North" not in a
    assert fed.site_pseudonym(fed.site_number(a)) == a
    assert fed.site_number(a) < 2**63  # fits a signed 64-bit metric


def test_card_provenance_survives_save_and_load(tmp_path) -> None:  # type: ignore[no-untyped-def]
    enc, _head = fed.initial_model(_espec(), seed=0)
    sites = {"site-00000000000000a": 2, "site-00000000000000b": 1}
    card = fed.federated_card(enc, method="simclr", sites=sites, rounds=2, rounds_completed=2,
                              strategy="fedprox", local_epochs=1, fedbn=True, proximal_mu=0.1)
    save_encoder(enc, card, tmp_path / "m")
    _enc, loaded = load_encoder(tmp_path / "m")
    p = loaded.provenance
    assert p["strategy"] == "fedprox" and p["fedbn"] is True and p["rounds_completed"] == 2
    assert [s["id"] for s in p["sites"]] == sorted(sites)
    assert loaded.data_hash.startswith("federated-") and loaded.version.startswith("enc-")
    # cards of ordinary training keep their old form (no provenance key)
    assert "provenance" not in EncoderCard(backbone="x").to_dict()
    with pytest.raises(fed.FederationError):
        fed.federated_card(enc, method="simclr", sites=sites, rounds=1, rounds_completed=1,
                           strategy="fedsgd", local_epochs=1, fedbn=False)


def test_train_ssl_starts_from_init_state_and_returns_its_state() -> None:
    vols = _volumes()
    enc0, head0 = fed.initial_model(_espec(), seed=5)
    start = {"encoder": enc0.state_dict(), "head": head0.state_dict()}
    out: dict = {}
    kw = dict(backbone="test_resnet", spec=SPEC, embedding_dim=16, batch_size=3, device="cpu",
              train_slices=4, seed=1)
    # zero epochs: the encoder is exactly the given start (not the seed-1 initialisation)
    enc, _ = train_ssl(vols, epochs=0, init_state=start, state_out=out, **kw)  # type: ignore[arg-type]
    for k, v in enc0.state_dict().items():
        assert torch.equal(enc.state_dict()[k].cpu(), v)
    assert set(out) == {"encoder", "head"} and set(out["head"]) == set(head0.state_dict())
    with pytest.raises(Exception, match="init_state does not fit"):
        train_ssl(vols, epochs=0, init_state={"encoder": {}, "head": {}}, **kw)  # type: ignore[arg-type]
    with pytest.raises(Exception, match="prox_mu needs init_state"):
        train_ssl(vols, epochs=1, prox_mu=0.1, **kw)  # type: ignore[arg-type]


def test_fedprox_term_keeps_weights_nearer_the_start() -> None:
    vols = _volumes()
    enc0, head0 = fed.initial_model(_espec(), seed=5)
    start = {"encoder": enc0.state_dict(), "head": head0.state_dict()}
    kw = dict(backbone="test_resnet", spec=SPEC, embedding_dim=16, batch_size=3, device="cpu",
              train_slices=4, seed=1, epochs=2, lr=1e-2, init_state=start)

    def drift(mu: float) -> float:
        out: dict = {}
        train_ssl(vols, prox_mu=mu, state_out=out, **kw)  # type: ignore[arg-type]
        return sum(float(((out["encoder"][k].float() - v.float()) ** 2).sum())
                   for k, v in start["encoder"].items() if v.dtype.is_floating_point)

    assert drift(50.0) < drift(0.0)
