"""Generated gRPC stubs of ``protos/cohortsim/v1`` (written by ``service/api/generate.py``).

``from service.api import cohortsim_pb2, cohortsim_pb2_grpc``. The stubs are imported
lazily so that ``python -m service.api.generate`` works even when they are stale or absent.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["SERVICE_FULL_NAME", "cohortsim_pb2", "cohortsim_pb2_grpc"]

#: Fully-qualified name of the gRPC service (health checks, reflection).
SERVICE_FULL_NAME = "cohortsim.v1.PatientSimilarityService"


def __getattr__(name: str) -> ModuleType:
    if name in ("cohortsim_pb2", "cohortsim_pb2_grpc"):
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
