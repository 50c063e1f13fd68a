"""Stopping the processes a test started: one way, used by every test that starts one."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable


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


def sigterm_timed(
    p: subprocess.Popen[bytes], *, timeout: float = 15.0, during: Callable[[], None] | None = None
) -> tuple[int, float]:
    """SIGTERM ``p`` and wait for it to exit: (exit code, seconds from the signal to the
    exit). ``during`` runs right after the signal (to watch what the process says as it
    stops). SIGKILLed if anything goes wrong, so no test leaves it behind."""
    try:
        t0 = time.monotonic()
        p.send_signal(signal.SIGTERM)
        if during is not None:
            during()
        code = p.wait(timeout=timeout)
        return code, time.monotonic() - t0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
