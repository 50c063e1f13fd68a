"""Stopping the processes a test started: one way, used by every test that starts one."""

from __future__ import annotations

import signal
import subprocess


def stop(p: subprocess.Popen[bytes], *, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
    """Signal ``p`` (SIGTERM: a clean shutdown), wait up to ``timeout`` s, then SIGKILL."""
    if p.poll() is not None:
        return
    p.send_signal(sig)
    try:
        p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
