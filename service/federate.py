"""``cohortsim federate server | site``: federated encoder training in Flower's
deployment mode (a SuperLink at the coordinator, one SuperNode per site).

``server`` starts ``flower-superlink``, writes a Flower App whose components are
:mod:`service.flower_apps`'s ServerApp and ClientApp (with this run's settings as its
run config), submits it with ``flwr run``, waits for the run to finish, and leaves the
encoder, its card and ``federation.json`` in ``--out``. ``site`` runs
``flower-supernode`` for one store (it replaces this process). Neither installs
anything at run time (``--disable-runtime-dependency-installation``; a SuperNode never
does unless told): every machine has ``cohortsim[federated]`` installed beforehand.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

APP_NAME = "cohortsim-federated"


def _error(message: str, code: int = 2) -> Exception:
    """:class:`service.cli.CliError` (imported when raised: service.cli registers this
    module's commands, so it cannot be imported at the top)."""
    from service.cli import CliError as _CliError

    return _CliError(message, code)


def _say(message: str) -> None:
    from service.cli import _say as say

    say(message)


def _need_flower() -> None:
    if importlib.util.find_spec("flwr") is None:
        raise _error("federated training needs Flower: pip install 'cohortsim[federated]'")


def _tool(name: str) -> str:
    """A Flower executable of this environment (beside this Python), else on PATH."""
    here = Path(sys.executable).parent / name
    if here.is_file():
        return str(here)
    found = shutil.which(name)
    if found is None:
        raise _error(f"{name} not found; install cohortsim[federated] in this environment")
    return found


def _with_tools_on_path(env: dict[str, str]) -> dict[str, str]:
    """``env`` with this environment's bin folder first on PATH: the SuperLink and the
    SuperNode start ``flower-superexec`` / ``flwr-clientapp`` by name."""
    bin_dir = str(Path(_tool("flower-superlink")).parent)
    return {**env, "PATH": os.pathsep.join([bin_dir, env.get("PATH", "")])}


def _split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise _error(f"address must be HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def _read_spec(spec_file: Path | None, spec_from: Path | None) -> Any:
    from encoders.spec import DEFAULT_SPEC, InputSpec

    if spec_file is not None and spec_from is not None:
        raise _error("give --spec or --spec-from, not both")
    if spec_from is not None:
        from indexing.ingest import store_spec
        from indexing.store import CohortStore

        return store_spec(CohortStore(spec_from))
    if spec_file is None:
        return DEFAULT_SPEC
    try:
        d = json.loads(spec_file.read_text())
        return InputSpec.from_dict(d.get("input", d))  # an InputSpec or an encoder card
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise _error(f"--spec {spec_file}: not an input spec or encoder card JSON ({exc})") from exc


def _write_app(app_dir: Path, run_config: dict[str, Any]) -> None:
    """The Flower App: a pyproject naming cohortsim's components; no code of its own."""
    app_dir.mkdir(parents=True, exist_ok=True)
    lines = [f"{k} = {json.dumps(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else v}"
             for k, v in run_config.items()]
    (app_dir / "pyproject.toml").write_text(
        "[build-system]\nrequires = [\"hatchling\"]\nbuild-backend = \"hatchling.build\"\n\n"
        f"[project]\nname = \"{APP_NAME}\"\nversion = \"1.0.0\"\n"
        "description = \"cohortsim federated encoder training\"\nlicense = \"Apache-2.0\"\n"
        "# nothing to install at run time: cohortsim[federated] is installed at every site\n"
        "dependencies = []\n\n"
        "[tool.flwr.app]\npublisher = \"cohortsim\"\n\n"
        "[tool.flwr.app.components]\nserverapp = \"service.flower_apps:server_app\"\n"
        "clientapp = \"service.flower_apps:client_app\"\n\n"
        "[tool.flwr.app.config]\n" + "\n".join(lines) + "\n"
    )


def _write_connection(home: Path, address: str, *, insecure: bool, ca: Path | None) -> None:
    home.mkdir(parents=True, exist_ok=True)
    conn = [f"address = {_toml_str(address)}"]
    if insecure:
        conn.append("insecure = true")
    elif ca is not None:
        conn.append(f"root-certificates = {_toml_str(str(ca.resolve()))}")
    (home / "config.toml").write_text(
        "[superlink]\ndefault = \"cohortsim\"\n\n[superlink.cohortsim]\n" + "\n".join(conn) + "\n"
    )


def _wait_port(host: str, port: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise _error(f"flower-superlink exited with status {proc.returncode} (see its log)", 1)
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            return
        time.sleep(0.5)
    raise _error(f"flower-superlink did not open {host}:{port} within {timeout:g} s", 1)


def _flwr_json(args: list[str], env: dict[str, str], timeout: float) -> dict[str, Any]:
    """Run ``flwr ARGS --format json`` and parse its JSON answer."""
    proc = subprocess.run([_tool("flwr"), *args, "--format", "json"], env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)
    text = proc.stdout
    start = text.find("{")
    try:
        payload: dict[str, Any] = json.loads(text[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        payload = {}
    if proc.returncode != 0 or not payload.get("success", False):
        reason = payload.get("error-message") or (proc.stderr or text).strip()[-300:]
        raise _error(f"flwr {args[0]} failed: {reason}", 1)
    return payload


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def server(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the federated encoder (model.safetensors, card.json, federation.json).")],
    address: Annotated[str, typer.Option(help="SuperLink HOST:PORT (one port: Fleet, Control and ServerAppIo APIs over HTTP).")] = "127.0.0.1:9091",
    rounds: Annotated[int, typer.Option(min=1, max=10_000)] = 5,
    local_epochs: Annotated[int, typer.Option(min=1, max=10_000, help="Epochs each site trains per round.")] = 1,
    strategy: Annotated[str, typer.Option(help="fedavg or fedprox.")] = "fedavg",
    proximal_mu: Annotated[float, typer.Option(min=0.0, max=100.0, help="FedProx's proximal weight mu.")] = 0.01,
    fedbn: Annotated[bool, typer.Option("--fedbn/--no-fedbn", help="Keep normalisation layers at each site while training (FedBN); the shared encoder gets their average at the end.")] = False,
    min_sites: Annotated[int, typer.Option(min=1, max=10_000, help="Sites connected before a round starts.")] = 2,
    min_replies: Annotated[int, typer.Option(min=1, max=10_000, help="Site updates a round needs to be kept (fewer: the previous weights stay).")] = 2,
    round_timeout: Annotated[float, typer.Option(min=1, help="Seconds a round waits for sites; late or dropped sites are left out of it.")] = 3600.0,
    backbone: Annotated[str, typer.Option(help="Any timm model name.")] = "resnet10t",
    spec: Annotated[Path | None, typer.Option(help="Input spec JSON (or an encoder card) the sites' stores must hold (default: the default spec).")] = None,
    spec_from: Annotated[Path | None, typer.Option(help="Take the input spec from this store.")] = None,
    embedding_dim: Annotated[int, typer.Option(min=8, max=4096)] = 128,
    method: Annotated[str, typer.Option(help="simclr or vicreg.")] = "simclr",
    region: Annotated[str, typer.Option(help="lesion or whole.")] = "whole",
    pooling: Annotated[str, typer.Option(help="attention or mean.")] = "mean",
    calibration: Annotated[str, typer.Option(help="tissue or none.")] = "none",
    batch_size: Annotated[int, typer.Option(min=2, max=4096)] = 16,
    lr: Annotated[float, typer.Option(min=1e-7, max=1.0)] = 1e-3,
    views: Annotated[int, typer.Option(min=0, max=16, help="Views per study per step (0: train_ssl's default).")] = 0,
    seed: Annotated[int, typer.Option()] = 0,
    insecure: Annotated[bool, typer.Option(help="Plain HTTP between SuperLink and sites (loopback tests only).")] = False,
    ssl_certfile: Annotated[Path | None, typer.Option(help="SuperLink TLS certificate (PEM).")] = None,
    ssl_keyfile: Annotated[Path | None, typer.Option(help="SuperLink TLS key (PEM).")] = None,
    ssl_ca_certfile: Annotated[Path | None, typer.Option(help="CA certificate (PEM) that signed the SuperLink's.")] = None,
) -> None:
    """Coordinate federated training: SuperLink + ServerApp (FedAvg or FedProx)."""
    from encoders.federated import STRATEGIES, encoder_spec

    _need_flower()
    if strategy not in STRATEGIES:
        raise _error(f"--strategy must be one of {', '.join(STRATEGIES)}, not {strategy!r}")
    if min_replies > min_sites:
        raise _error(f"--min-replies ({min_replies}) cannot exceed --min-sites ({min_sites})")
    if not insecure and not (ssl_certfile and ssl_keyfile and ssl_ca_certfile):
        raise _error("give --ssl-certfile, --ssl-keyfile and --ssl-ca-certfile, or --insecure (loopback tests only)")
    host, port = _split_address(address)
    espec = encoder_spec(backbone=backbone, spec=_read_spec(spec, spec_from), embedding_dim=embedding_dim,
                         pooling=pooling, region=region, calibration=calibration, method=method)
    out_dir = out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    work = out_dir / ".federation"
    shutil.rmtree(work, ignore_errors=True)
    env = _with_tools_on_path({**os.environ, "FLWR_HOME": str(work / "flwr-home")})
    _write_connection(work / "flwr-home", f"{host}:{port}", insecure=insecure, ca=ssl_ca_certfile)
    _write_app(work / "app", {
        "out-dir": str(out_dir), "encoder-spec": json.dumps(espec), "strategy": strategy,
        "proximal-mu": float(proximal_mu), "fedbn": fedbn, "rounds": rounds,
        "local-epochs": local_epochs, "min-sites": min_sites, "min-replies": min_replies,
        "round-timeout": float(round_timeout), "batch-size": batch_size, "lr": float(lr),
        "views": views, "seed": seed,
    })
    for stale in ("card.json", "model.safetensors", "federation.json"):
        (out_dir / stale).unlink(missing_ok=True)
    cmd = [_tool("flower-superlink"), "--host", host, "--port", str(port),
           "--disable-runtime-dependency-installation", "--database", ":flwr-in-memory:"]
    if insecure:
        cmd.append("--insecure")
    else:
        cmd += ["--ssl-certfile", str(ssl_certfile), "--ssl-keyfile", str(ssl_keyfile),
                "--ssl-ca-certfile", str(ssl_ca_certfile)]
    log_path = work / "superlink.log"
    with log_path.open("wb") as log_file:
        link = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        _wait_port(host, port, link, timeout=60)
        _say(f"SuperLink on {host}:{port}; waiting for {min_sites} sites, {rounds} rounds of {strategy}"
             f"{' + FedBN' if fedbn else ''}")
        started = time.monotonic()
        run_id = ""
        for attempt in range(3):  # the Control API may refuse a run while it starts up
            try:
                run_id = str(_flwr_json(["run", str(work / "app"), "cohortsim"], env, 300)["run-id"])
                break
            except Exception:  # CliError from _flwr_json; retried, the last one raised
                if attempt == 2:
                    raise
                time.sleep(5)
        deadline = started + rounds * round_timeout + 1800
        status, info = "", {}
        while time.monotonic() < deadline:
            time.sleep(3)
            info = _flwr_json(["ls", "cohortsim", "--run-id", run_id], env, 120)["runs"][0]
            status = str(info.get("status", ""))
            if status.startswith("finished"):
                break
        if status != "finished:completed" or not (out_dir / "card.json").is_file():
            raise _error(f"federated run {run_id} ended {status or 'by timeout'} "
                           f"({info.get('status-details', '')}); see {log_path} and `FLWR_HOME={work / 'flwr-home'} "
                           f"flwr log {run_id} cohortsim`", 1)
        summary = json.loads((out_dir / "federation.json").read_text())
        summary["network_traffic"] = info.get("network-traffic", {})
        summary["wall_seconds"] = round(time.monotonic() - started, 1)
        (out_dir / "federation.json").write_text(json.dumps(summary, indent=2) + "\n")
    finally:
        _stop(link)
    from service.cli import out

    out.print(f"federated encoder {summary['encoder_version']} from {len(summary['sites'])} sites, "
              f"{summary['rounds_completed']}/{rounds} rounds ({strategy}{' + FedBN' if fedbn else ''}) "
              f"in {summary['wall_seconds']:.0f} s -> {out_dir}")


def site(
    store: Annotated[Path, typer.Option(help="This site's cohort store (never leaves the site).")],
    superlink: Annotated[str, typer.Option(help="The coordinator's SuperLink HOST:PORT.")] = "127.0.0.1:9091",
    site_name: Annotated[str, typer.Option(help="This site's name (the card lists only its keyed pseudonym). Default: the store's site column.")] = "",
    runtime_port: Annotated[int, typer.Option(min=1, max=65535, help="Local port of the SuperNode's ClientApp API (one per site on a machine).")] = 9094,
    device: Annotated[str, typer.Option(help="cpu or cuda for local training.")] = "cpu",
    secret_file: Annotated[Path | None, typer.Option(help="Site secret file (default: $COHORTSIM_SITE_SECRET or ~/.config/cohortsim/site-secret).")] = None,
    insecure: Annotated[bool, typer.Option(help="Plain HTTP to the SuperLink (loopback tests only).")] = False,
    root_certificates: Annotated[Path | None, typer.Option(help="CA certificate (PEM) of the SuperLink's TLS certificate.")] = None,
) -> None:
    """Join a federation as a site: a SuperNode training on STORE (runs until stopped)."""
    from indexing.ingest import store_spec
    from indexing.store import CohortStore

    _need_flower()
    _split_address(superlink)
    if device not in ("cpu", "cuda"):
        raise _error(f"--device must be cpu or cuda, not {device!r}")
    if not insecure and root_certificates is None:
        raise _error("give --root-certificates (the SuperLink's CA), or --insecure (loopback tests only)")
    cohort = CohortStore(store)
    if len(cohort.study_uids()) < 2:
        raise _error(f"the store at {store} holds fewer than 2 studies; nothing to train on")
    store_spec(cohort)  # a readable, single-spec store
    node_config = [f"store={_toml_str(str(store.resolve()))}", f"device={_toml_str(device)}"]
    if site_name:
        node_config.append(f"site-name={_toml_str(site_name)}")
    if secret_file is not None:
        node_config.append(f"secret-file={_toml_str(str(secret_file.resolve()))}")
    cmd = [_tool("flower-supernode"), "--superlink", superlink, "--port", str(runtime_port),
           "--node-config", " ".join(node_config)]
    cmd += ["--insecure"] if insecure else ["--root-certificates", str(root_certificates)]
    sys.stdout.flush()
    sys.stderr.flush()
    # the SuperNode replaces this process (signals reach it directly)
    os.execve(cmd[0], cmd, _with_tools_on_path(dict(os.environ)))


def split_store_by_scanner(store: Path, out_dirs: list[Path], *, site_names: list[str] | None = None) -> list[Path]:
    """Simulated sites for tests and benchmarks: the studies of ``store`` dealt out to
    ``len(out_dirs)`` new stores by scanner (manufacturer + model, sorted, round-robin),
    so each site sees its own scanners (non-IID), with the outcomes of its patients."""
    import dataclasses

    import numpy as np
    import pyarrow as pa

    from indexing.store import CohortStore, StudyRecord

    src = CohortStore(store)
    rows = src.studies().to_pylist()
    scanners = sorted({f"{r.get('manufacturer')}|{r.get('model')}" for r in rows})
    if len(scanners) < len(out_dirs):
        raise _error(f"{len(scanners)} scanners cannot make {len(out_dirs)} sites")
    site_of = {s: i % len(out_dirs) for i, s in enumerate(scanners)}
    names = site_names or [f"site{i + 1}" for i in range(len(out_dirs))]
    fields = {f.name for f in dataclasses.fields(StudyRecord)} - {"volume", "site"}
    outcomes = src.outcomes()
    for i, out_dir in enumerate(out_dirs):
        mine = [r for r in rows if site_of[f"{r.get('manufacturer')}|{r.get('model')}"] == i]
        records = [
            StudyRecord(
                volume=np.frombuffer(r["volume"], dtype="<i2").reshape(r["volume_shape"]),
                site=names[i],
                **{k: r[k] for k in fields if k in r},
            )
            for r in mine
        ]
        dst = CohortStore(out_dir, create=True)
        dst.add_studies(records)
        if outcomes.num_rows:
            pids = pa.array(sorted({r["patient_id"] for r in mine}))
            keep = pa.compute.is_in(outcomes["patient_id"], value_set=pids)
            dst.set_outcomes(outcomes.filter(keep))
    return out_dirs
