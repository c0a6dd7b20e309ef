"""serve(): a real process that reports its port, answers, and stops cleanly on SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from service.client import CohortsimClient

from .conftest import N_STUDIES

REPO = Path(__file__).resolve().parents[2]
SCRIPT = """
import asyncio, sys
from service.config import ServeConfig
from service.server import serve
config = ServeConfig(port=0, device="cpu")
asyncio.run(serve(sys.argv[1], config, ready=lambda p: print(f"PORT {p}", flush=True)))
print("STOPPED", flush=True)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_stops_gracefully(index_dir: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(index_dir)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("PORT "), proc.stderr.read() if proc.stderr else line
        port = int(line.split()[1])
        with CohortsimClient(f"127.0.0.1:{port}", timeout=20) as client:
            assert client.index_info().num_studies == N_STUDIES
            assert client.health() == "SERVING"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "STOPPED" in out
