"""systemd's notify protocol (``Type=notify``), without a dependency: a datagram of
``KEY=VALUE`` lines to the AF_UNIX socket named by ``$NOTIFY_SOCKET`` (sd_notify(3)).

Outside systemd (no ``$NOTIFY_SOCKET``) every call is a no-op. ``READY=1`` once the node's
socket and control socket are up, ``STOPPING=1`` when a shutdown starts, ``RELOADING=1`` and
``READY=1`` around a SIGHUP reload, and ``WATCHDOG=1`` every half ``$WATCHDOG_USEC`` while the
event loop runs (a stuck loop stops the pings and systemd restarts the service).
"""

from __future__ import annotations

import os
import socket
import time


def _address() -> str | None:
    path = os.environ.get("NOTIFY_SOCKET", "")
    if not path or path[0] not in "/@":
        return None
    # "@name" is an abstract socket: a leading NUL byte.
    return "\0" + path[1:] if path[0] == "@" else path


def notify(*lines: str) -> bool:
    """Send ``lines`` (e.g. ``"READY=1"``); False when not under systemd or the send failed."""
    addr = _address()
    if addr is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto("\n".join(lines).encode(), addr)
        return True
    except OSError:
        return False


def ready(status: str = "") -> bool:
    return notify("READY=1", f"MAINPID={os.getpid()}", *([f"STATUS={status}"] if status else []))


def reloading() -> bool:
    # systemd >= 253 wants MONOTONIC_USEC with RELOADING=1 (Type=notify-reload); harmless before.
    return notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")


def stopping() -> bool:
    return notify("STOPPING=1")


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of ``$WATCHDOG_USEC``), or None when systemd
    asked for none, or asked another process (``$WATCHDOG_PID``)."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) <= 0 or _address() is None:
        return None
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 2e6


def watchdog() -> bool:
    return notify("WATCHDOG=1")
