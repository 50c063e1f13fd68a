"""Start a real `dhtnode run` process for a test and always stop it again."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from tests.procs import stop


@contextlib.contextmanager
def running_daemon(state: Path, *args: str, start_timeout: float = 15.0) -> Iterator[int]:
    """Run `dhtnode run --state-dir STATE --port 0 ARGS` with JSON logs in STATE/log; yields
    the UDP port it bound. SIGTERM on the way out (SIGKILL if it hangs)."""
    # 0700: the daemon refuses a state dir that group or others may write to (umask 002).
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    log = state / "log"
    with log.open("wb") as f:
        p = subprocess.Popen(
            [sys.executable, "-m", "dhtnode", "run", "--state-dir", str(state), "--port", "0",
             "--log-format", "json", *args],
            stderr=f, stdout=subprocess.DEVNULL,
        )
    try:
        port = None
        deadline = time.monotonic() + start_timeout
        while port is None and time.monotonic() < deadline and p.poll() is None:
            for line in log.read_text().splitlines():
                if '"node_started"' in line:
                    port = int(json.loads(line)["bind"].rsplit(":", 1)[1])
            time.sleep(0.05)
        assert port is not None, log.read_text()
        yield port
    finally:
        stop(p)
