"""Federation: a coordinator's sites, the parallel fan-out of one vector, the exact merge.

A site is a ``cohortsim serve`` that answers ``SearchSite`` (its top-k neighbours of a
vector, :func:`service.servicer.site_search`). A coordinator (:mod:`service.coordinator`)
reads ``sites.toml``::

    [[site]]
    name = "north"
    address = "north.example.org:50051"
    tls_ca = "ca.pem"        # optional: TLS, the site's certificate verified with this CA
    tls_cert = "coord.pem"   # optional, with tls_key: mutual TLS (the site maps the
    tls_key = "coord.key"    #   certificate's common name to a role)
    token_file = "north.token"  # optional: a bearer token the site issued (mode 0600)

With ``mode = "shards"`` at the top of the file the sites are the shards of one
institution's index (:mod:`service.shards`): each table also names the shard's
``index`` folder, which the coordinator reads for its cohort metadata.

The coordinator sends the same ``SearchSiteRequest`` to every site at once, each call bounded by one
deadline. A researcher's question is asked on behalf of its end user: the coordinator
sends the user's principal id in the :data:`ON_BEHALF_OF_KEY` metadata, and a site that
lists the coordinator's own identity as trusted (``serve --trusted-coordinator``) keeps
its record of releases under that user (any other caller's header is ignored: the
caller's own identity is the principal). :func:`merge` takes the ``k`` most similar of all answered neighbours: each
site returns its own exact top-k, so the union's top-k is among them (the merged list is
the top-k of one index over every site's vectors). Sites that time out, refuse (another
encoder version, no right) or cannot be reached are reported per site
(:class:`SiteCall`), never silently dropped.
"""

from __future__ import annotations

import asyncio
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from indexing.query import NeighborResult
from service import convert
from service.api import cohortsim_pb2 as pb
from service.api import cohortsim_pb2_grpc
from service.auth import AuthConfigError, read_secret_file
from service.status_details import error_metadata_from_trailing, reason_from_trailing
from service.tls import channel_credentials

#: Default time the coordinator waits for the slowest site (seconds).
DEFAULT_SITE_DEADLINE_S = 5.0
#: Metadata key of the end user's principal id that a coordinator asks a site on behalf of.
ON_BEHALF_OF_KEY = "x-cohortsim-on-behalf-of"
_SITE_KEYS = {"name", "address", "tls_ca", "tls_cert", "tls_key", "token_file", "index"}
#: The coordinator's modes: ``federation`` (sites of several institutions, the default)
#: and ``shards`` (one institution's index split by patient; trusted).
MODES = ("federation", "shards")


# token file -> ((mtime, size, mode), call metadata), for Site.metadata
_TOKENS: dict[str, tuple[tuple[int, int, int], tuple[tuple[str, str], ...]]] = {}


class SitesConfigError(ValueError):
    """A ``sites.toml`` that cannot be used; the message names the file and the entry."""

    reason = "sites_config_invalid"


@dataclass(frozen=True)
class Site:
    """One site of a coordinator (paths resolved against the ``sites.toml`` folder)."""

    name: str
    address: str
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    token_file: Path | None = None
    index: Path | None = None  # shard mode: the shard's index folder (metadata only)

    @property
    def secure(self) -> bool:
        return self.tls_ca is not None or self.tls_cert is not None

    def channel(self, max_message_mb: int = 64) -> grpc.aio.Channel:
        """An asyncio channel to the site (TLS when configured)."""
        options = [("grpc.max_receive_message_length", max_message_mb * 1024 * 1024)]
        if not self.secure:
            return grpc.aio.insecure_channel(self.address, options=options)
        creds = channel_credentials(self.tls_ca, self.tls_cert, self.tls_key)
        return grpc.aio.secure_channel(self.address, creds, options=options)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The call metadata for this site: its bearer token, read again only when the
        token file changes (one ``stat`` per call, not a read and permission check)."""
        if self.token_file is None:
            return ()
        st = self.token_file.stat()
        sig = (st.st_mtime_ns, st.st_size, st.st_mode)
        path = str(self.token_file)
        cached = _TOKENS.get(path)
        if cached is None or cached[0] != sig:
            token = read_secret_file(self.token_file, "site token file").decode().strip()
            cached = (sig, (("authorization", f"Bearer {token}"),))
            _TOKENS[path] = cached  # one entry per file: a replaced token does not linger
        return cached[1]


def load_sites(path: Path | str) -> list[Site]:
    """The ``[[site]]`` tables of ``path`` (:func:`load_topology`)."""
    return load_topology(path)[1]


def load_topology(path: Path | str) -> tuple[str, list[Site]]:
    """``(mode, sites)`` of a sites file: the top-level ``mode`` (one of :data:`MODES`,
    default ``federation``) and its ``[[site]]`` tables; :class:`SitesConfigError` on a bad
    file (unreadable, not TOML, no site, a missing or unknown key, duplicate names, half
    a client key pair, an unknown mode, a shard without its ``index`` folder)."""
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text())
    except OSError as exc:
        raise SitesConfigError(f"{path}: cannot read the sites file ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise SitesConfigError(f"{path}: not valid TOML ({exc})") from None
    mode = doc.get("mode", "federation")
    if mode not in MODES:
        raise SitesConfigError(f"{path}: mode must be one of {', '.join(MODES)}, not {mode!r}")
    unknown_top = sorted(set(doc) - {"mode", "site"})
    if unknown_top:
        raise SitesConfigError(f"{path}: unknown top-level key(s) {', '.join(unknown_top)}")
    entries = doc.get("site")
    if not isinstance(entries, list) or not entries:
        raise SitesConfigError(f"{path}: no [[site]] table; give one per site (name, address)")
    sites: list[Site] = []
    for i, entry in enumerate(entries):
        where = f"{path}: [[site]] #{i + 1}"
        if not isinstance(entry, dict):
            raise SitesConfigError(f"{where} is not a table")
        unknown = sorted(set(entry) - _SITE_KEYS)
        if unknown:
            raise SitesConfigError(f"{where}: unknown key(s) {', '.join(unknown)}")
        for key in ("name", "address"):
            if not isinstance(entry.get(key), str) or not entry[key].strip():
                raise SitesConfigError(f"{where}: '{key}' must be a non-empty string")
        paths: dict[str, Path | None] = {}
        for key in ("tls_ca", "tls_cert", "tls_key", "token_file", "index"):
            v = entry.get(key)
            if v is not None and not isinstance(v, str):
                raise SitesConfigError(f"{where}: '{key}' must be a path string")
            paths[key] = None if v is None else (path.parent / v)
        if (paths["tls_cert"] is None) != (paths["tls_key"] is None):
            raise SitesConfigError(f"{where}: give both tls_cert and tls_key, or neither")
        if mode == "shards" and paths["index"] is None:
            raise SitesConfigError(f"{where}: shard mode needs 'index', the shard's index folder")
        if mode != "shards" and paths["index"] is not None:
            raise SitesConfigError(f"{where}: 'index' is for mode = \"shards\" only")
        sites.append(Site(entry["name"].strip(), entry["address"].strip(), **paths))
    names = [s.name for s in sites]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise SitesConfigError(f"{path}: site names must be unique; repeated: {', '.join(dup)}")
    return mode, sites


@dataclass
class SiteCall:
    """What one site did with a fan-out: ``state`` a :class:`pb.SiteState` value,
    ``reason`` why it is missing (empty when answered), ``response`` its answer."""

    site: Site
    state: int
    reason: str = ""
    response: Any = None  # SearchSiteResponse or AggregateSiteResponse
    neighbors: list[NeighborResult] = field(default_factory=list)

    @property
    def answered(self) -> bool:
        return self.state == pb.SITE_STATE_ANSWERED


def _failed(site: Site, exc: grpc.RpcError) -> SiteCall:
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    trailing = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    reason = reason_from_trailing(trailing) or (code.name if code is not None else "UNKNOWN")
    rule = error_metadata_from_trailing(trailing).get("rule")
    if rule:  # which differencing rule the site applied (service.releases)
        reason = f"{reason}:{rule}"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return SiteCall(site, pb.SITE_STATE_TIMED_OUT, "DEADLINE_EXCEEDED")
    if code == grpc.StatusCode.UNAVAILABLE:
        return SiteCall(site, pb.SITE_STATE_UNAVAILABLE, reason)
    return SiteCall(site, pb.SITE_STATE_REFUSED, reason)


class Fanout:
    """Channels to every site, opened once; :meth:`search` asks all of them in parallel."""

    def __init__(self, sites: list[Site]) -> None:
        self.sites = sites
        self._stubs: list[tuple[Site, Any, grpc.aio.Channel]] = []

    def _open(self) -> None:
        if not self._stubs:  # in the serving event loop (grpc.aio channels belong to one)
            for site in self.sites:
                channel = site.channel()
                self._stubs.append(
                    (site, cohortsim_pb2_grpc.PatientSimilarityServiceStub(channel), channel)
                )

    async def search(
        self,
        request: pb.SearchSiteRequest | pb.AggregateSiteRequest,
        deadline_s: float,
        *,
        method: str = "SearchSite",
        on_behalf_of: str | None = None,
    ) -> list[SiteCall]:
        """Every site's answer to ``request`` (in ``sites.toml`` order) from ``method``
        (SearchSite, or AggregateSite for researchers), each call bounded by
        ``deadline_s`` seconds; a missing site is a :class:`SiteCall` saying why.
        ``on_behalf_of``: the end user's principal id (:data:`ON_BEHALF_OF_KEY`)."""
        self._open()
        extra = ((ON_BEHALF_OF_KEY, on_behalf_of),) if on_behalf_of else ()

        async def one(site: Site, stub: Any) -> SiteCall:
            try:
                response = await getattr(stub, method)(
                    request, timeout=deadline_s, metadata=(*site.metadata(), *extra)
                )
            except grpc.RpcError as exc:
                return _failed(site, exc)
            except (OSError, ValueError, AuthConfigError) as exc:  # an unreadable token / TLS file
                return SiteCall(site, pb.SITE_STATE_REFUSED, f"LOCAL_CONFIG: {type(exc).__name__}")
            return SiteCall(site, pb.SITE_STATE_ANSWERED, "", response)

        return list(await asyncio.gather(*(one(site, stub) for site, stub, _ in self._stubs)))

    async def close(self) -> None:
        for _, _, channel in self._stubs:
            await channel.close()
        self._stubs.clear()


def merge(calls: list[SiteCall], k: int, messages: list[pb.Neighbor] | None = None) -> list[NeighborResult]:
    """The ``k`` most similar neighbours over the answered sites, best first.

    Sorted by similarity (descending), ties by site order then the site's own rank, so the
    order is deterministic. Sets ``calls[i].neighbors`` to the site's part of the answer;
    each neighbour's ``row`` is its rank in the merged list. ``messages``, when given,
    receives the sites' ``Neighbor`` messages in the merged order (the answer copies
    them instead of encoding the neighbours again).
    """
    pool: list[tuple[float, int, int, pb.Neighbor]] = []
    for s, call in enumerate(calls):
        call.neighbors = []
        if call.answered and call.response is not None:
            for r, nb in enumerate(call.response.neighbors):
                pool.append((-float(nb.similarity), s, r, nb))
    pool.sort(key=lambda t: t[:3])
    merged: list[NeighborResult] = []
    for rank, (_, s, _, nb) in enumerate(pool[:k]):
        result = convert.neighbor_from_proto(nb, rank)
        calls[s].neighbors.append(result)
        merged.append(result)
        if messages is not None:
            messages.append(nb)
    return merged


def answer_neighbors(
    response: pb.SearchSimilarResponse, messages: list[pb.Neighbor], merged: list[NeighborResult]
) -> None:
    """Fill ``response.neighbors`` with copies of the sites' ``messages`` (merged order)
    carrying the weights of ``merged``: what encoding ``merged`` again would give, for a
    copy in the protobuf runtime instead of a message built field by field in Python."""
    for msg, nb in zip(messages, merged, strict=True):
        out = response.neighbors.add()
        out.CopyFrom(msg)
        out.weight = float(nb.weight)


__all__ = [
    "DEFAULT_SITE_DEADLINE_S",
    "MODES",
    "ON_BEHALF_OF_KEY",
    "Fanout",
    "Site",
    "SiteCall",
    "SitesConfigError",
    "answer_neighbors",
    "load_sites",
    "load_topology",
    "merge",
]
