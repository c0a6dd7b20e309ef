"""Server settings from defaults, a TOML file, the environment and flags (later wins).

    [serve]                      # cohortsim.toml (the [serve] table, or top-level keys)
    batch_window_ms = 1.0
    metrics_port = 9464
    log_format = "json"

Environment: ``COHORTSIM_<NAME>`` (``COHORTSIM_BATCH_WINDOW_MS=0.5``,
``COHORTSIM_METRICS_PORT=9464``; an empty value unsets an optional setting). Flags:
``cohortsim serve --batch-window-ms ...``; a flag left out keeps the lower layers' value.
Unknown names, wrong types and out-of-range values raise :class:`ConfigError` naming the
setting and where it came from. Security settings (TLS, tokens, audit log) stay flags and
travel in a :class:`SecurityConfig`; ``create_server(index_dir, config, security)`` takes
the two objects.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENV_PREFIX = "COHORTSIM_"


class ConfigError(ValueError):
    """A setting that cannot be used; the message names it and its source."""


@dataclass(frozen=True)
class ServeConfig:
    """Operational settings of ``cohortsim serve`` (see :func:`service.server.create_server`)."""

    host: str = "127.0.0.1"
    port: int = 50051  # 0: a free one
    device: str = "auto"  # where the index is searched: auto, cpu, cuda, cuda:N
    max_k: int = 1000  # largest k a query may ask for
    max_files: int = 4096  # files of one DICOM upload
    watch_interval_s: float | None = 2.0  # looks at INDEX_DIR/CURRENT (None: never)
    warm_encoder: bool = True  # load the index's encoder (and torch) before listening

    batch_window_ms: float = 1.0  # micro-batching window, [0, 2] ms
    batching: bool = True  # false: every search runs on its own
    max_batch: int = 64  # searches per batched index call
    max_queue: int = 1024  # searches waiting before RESOURCE_EXHAUSTED
    batch_inflight: int = 1  # batches searched at once (<= max_workers)
    max_concurrent_rpcs: int | None = None  # calls in progress before RESOURCE_EXHAUSTED
    max_workers: int = 2  # worker threads (searches and the other RPCs)
    dicom_workers: int = 1  # threads that decode and embed DICOM uploads (apart from searches)
    blas_threads: int | None = 1  # BLAS/OpenMP threads per search (None: the environment's)
    max_receive_mb: int = 64  # largest request message
    max_stream_mb: int = 512  # largest SearchSimilarStream study
    metrics_port: int | None = None  # Prometheus /metrics port (None: off; 0: any free)
    metrics_host: str = "127.0.0.1"  # loopback: the counts are for the host's scraper only
    metrics_tls: bool = False  # serve /metrics with the API's TLS (and client CA)
    # decoded bytes (encoders.budget): one DICOM request, all requests at once; DICOM
    # calls (SearchSimilar / Stream / EmbedStudy with files) one caller may have at once
    decode_budget_mb: int = 1024
    decode_budget_server_mb: int = 1024
    dicom_calls_per_caller: int = 2
    dicom_calls_waiting: int = 8  # more DICOM calls of one caller wait (beyond: refused)
    dicom_cooldown_s: float = 10.0  # a caller's DICOM calls refused this long after a bomb
    # worker processes that decode DICOM uploads (encoders.decode_pool; 0: decode on the
    # server's own DICOM threads), the address space each may add to its imports (0: no
    # cap), the niceness added to theirs, and how long one decode may run
    decode_workers: int = 2
    decode_worker_memory_mb: int = 2048
    decode_worker_nice: int = 10
    decode_timeout_s: float = 300.0
    store: Path | None = None  # cohort store for IngestStudies / DeletePatient
    log_format: str = "text"  # "text" or "json"
    log_level: str = "INFO"
    # SIGTERM: seconds in-flight calls may take to finish before they are cancelled (a
    # queue of DICOM queries embedded on the CPU can need more than a few seconds)
    grace_s: float = 20.0
    # SIGTERM: health turns NOT_SERVING at once, but new calls are taken this much longer
    stop_delay_s: float = 1.0

    def validate(self) -> ServeConfig:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"setting {name}={getattr(self, name)!r}: {why}")

        if not 0.0 <= self.batch_window_ms <= 2.0:
            raise bad("batch_window_ms", "must lie in [0, 2] ms")
        for name in (
            "max_batch", "max_queue", "batch_inflight", "max_workers", "max_receive_mb",
            "max_stream_mb", "max_k", "max_files", "decode_budget_mb", "decode_budget_server_mb",
            "dicom_calls_per_caller", "dicom_workers",
        ):
            if getattr(self, name) < 1:
                raise bad(name, "must be >= 1")
        if self.grace_s < 0:
            raise bad("grace_s", "must be >= 0 seconds")
        if self.stop_delay_s < 0:
            raise bad("stop_delay_s", "must be >= 0 seconds")
        if self.blas_threads is not None and self.blas_threads < 1:
            raise bad("blas_threads", "must be >= 1 (or unset: the environment's)")
        if self.max_concurrent_rpcs is not None and self.max_concurrent_rpcs < 1:
            raise bad("max_concurrent_rpcs", "must be >= 1 (or unset)")
        if not 0 <= self.port <= 65535:
            raise bad("port", "must lie in [0, 65535]")
        if self.dicom_cooldown_s < 0:
            raise bad("dicom_cooldown_s", "must be >= 0 seconds")
        if self.dicom_calls_waiting < 0:
            raise bad("dicom_calls_waiting", "must be >= 0")
        for name in ("decode_workers", "decode_worker_memory_mb"):
            if getattr(self, name) < 0:
                raise bad(name, "must be >= 0 (0: off)")
        if not 0 <= self.decode_worker_nice <= 19:
            raise bad("decode_worker_nice", "must lie in [0, 19]")
        if self.decode_timeout_s <= 0:
            raise bad("decode_timeout_s", "must be > 0 seconds")
        if self.watch_interval_s is not None and self.watch_interval_s <= 0:
            raise bad("watch_interval_s", "must be > 0 seconds (or unset: never)")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise bad("metrics_port", "must lie in [0, 65535]")
        if self.log_format not in ("text", "json"):
            raise bad("log_format", "must be 'text' or 'json'")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise bad("log_level", "must be DEBUG, INFO, WARNING or ERROR")
        return self

    def server_kwargs(self) -> dict[str, Any]:
        """The :func:`service.server.create_server` keyword arguments these settings set."""
        return {
            "batch_window_ms": self.batch_window_ms if self.batching else None,
            "max_batch": self.max_batch,
            "max_queue": self.max_queue,
            "batch_inflight": self.batch_inflight,
            "max_concurrent_rpcs": self.max_concurrent_rpcs,
            "max_workers": self.max_workers,
            "blas_threads": self.blas_threads,
            "max_receive_mb": self.max_receive_mb,
            "max_stream_mb": self.max_stream_mb,
            "store_dir": self.store,
        }


@dataclass(frozen=True)
class SecurityConfig:
    """Security settings of a server (flags only, never from files or the environment):
    TLS, bearer tokens, the audit log, the researcher view's policy and the rates.

    ``tls`` is a :class:`service.tls.TlsConfig`; ``auth_tokens`` a token file or
    :class:`service.auth.TokenStore`; ``audit_log`` a path or :class:`service.audit.AuditLog`
    (``audit_max_mb``: rotate at that size); ``policy`` a
    :class:`service.governance.DisclosurePolicy`; ``pacs`` the PACS and its credentials.
    """

    tls: Any = None
    auth_tokens: Any = None
    audit_log: Any = None
    audit_max_mb: float | None = None
    policy: Any = None
    rate_limit: float | None = None  # calls/s per principal (and 4x per peer host before auth)
    max_concurrent_per_principal: int | None = None
    # service.pacs.dicomweb.DicomwebConfig: the PACS (URL and its credentials) that queries
    # by reference (PacsStudy) retrieve from; None: such queries get FAILED_PRECONDITION
    pacs: Any = None


#: create_server's former keyword arguments that are now ServeConfig fields by another name
_RENAMED = {"store_dir": "store", "watch_interval": "watch_interval_s"}


def options(**kw: Any) -> tuple[ServeConfig, SecurityConfig]:
    """Keyword settings (``create_server``'s former arguments: ``device="cpu"``,
    ``auth_tokens=...``, ``batch_window_ms=None`` for no batching, ...) as a validated
    :class:`ServeConfig` and a :class:`SecurityConfig`."""
    security_names = {f.name for f in dataclasses.fields(SecurityConfig)}
    serve: dict[str, Any] = {}
    security: dict[str, Any] = {}
    for key, value in kw.items():
        if key in security_names:
            security[key] = value
            continue
        name = _RENAMED.get(key, key)
        if name == "batch_window_ms" and value is None:
            serve["batching"] = False
            continue
        if name not in _FIELDS:
            raise ConfigError(f"unknown setting {key!r}")
        serve[name] = value
    return ServeConfig(**serve).validate(), SecurityConfig(**security)


_FIELDS = {f.name: f for f in dataclasses.fields(ServeConfig)}


def _convert(name: str, value: Any, source: str) -> Any:
    """``value`` (TOML value or environment string) as the type of setting ``name``."""
    default = getattr(ServeConfig(), name)
    annotation = str(_FIELDS[name].type)
    optional = "None" in annotation
    try:
        if isinstance(value, str) and value.strip() == "" and optional:
            return None
        if "bool" in annotation:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if "float" in annotation:
            if isinstance(value, bool):
                raise ValueError("expected a number")
            return float(value)
        if "int" in annotation:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError("expected an integer")
            return int(value)
        if "Path" in annotation:
            return Path(str(value)).expanduser()
        if isinstance(default, str) or "str" in annotation:
            if not isinstance(value, str):
                raise ValueError("expected a string")
            return value
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"setting {name} from {source}: {value!r} is not valid ({exc})") from None
    return value


def read_toml(path: Path | str) -> dict[str, Any]:
    """The settings of a TOML file (its ``[serve]`` table, else its top-level keys)."""
    file = Path(path)
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read the config file {file}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"the config file {file} is not valid TOML: {exc}") from None
    table = data.get("serve", data)
    if not isinstance(table, dict):
        raise ConfigError(f"the config file {file}: [serve] must be a table")
    out = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name not in _FIELDS:
            raise ConfigError(
                f"the config file {file}: unknown setting {key!r}; known: {', '.join(sorted(_FIELDS))}"
            )
        out[name] = _convert(name, value, str(file))
    return out


def read_env(env: Mapping[str, str]) -> dict[str, Any]:
    """The settings named ``COHORTSIM_<NAME>`` in ``env`` (other variables are ignored)."""
    out = {}
    for name in _FIELDS:
        key = ENV_PREFIX + name.upper()
        if key in env:
            out[name] = _convert(name, env[key], f"${key}")
    return out


def load_config(
    file: Path | str | None = None,
    *,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> ServeConfig:
    """Defaults < ``file`` < ``env`` (default ``os.environ``) < ``flags`` (None values are
    "not given"); validated."""
    values: dict[str, Any] = {}
    if file is not None:
        values.update(read_toml(file))
    values.update(read_env(os.environ if env is None else env))
    for name, value in (flags or {}).items():
        if name not in _FIELDS:
            raise ConfigError(f"unknown setting {name!r}")
        if value is not None:
            values[name] = value
    return ServeConfig(**values).validate()


__all__ = [
    "ConfigError",
    "SecurityConfig",
    "ServeConfig",
    "load_config",
    "options",
    "read_env",
    "read_toml",
]
