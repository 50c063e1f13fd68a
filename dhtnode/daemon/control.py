"""The local control socket: how ``dhtnode status`` (and scripts) talk to a running daemon.

A Unix stream socket created with mode 0600 in the state dir (only the daemon's user may
use it). One JSON object per line each way: a request ``{"cmd": "status", ...}`` gets
``{"ok": true, "result": {...}}`` or ``{"ok": false, "error": "..."}``.

Owns the socket and the framing only; what each command does is the daemon's handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from dhtnode.errors import DhtnodeError

#: Largest request line accepted; control requests are tiny.
MAX_REQUEST = 64 * 1024
#: Seconds a client waits for an answer (lookups through the daemon take a few seconds).
CLIENT_TIMEOUT = 30.0

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class ControlError(DhtnodeError):
    """The control socket could not be reached or the daemon refused the request."""


def _socket_in_use(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


class ControlServer:
    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = path
        self._handler = handler
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        if self.path.exists() or self.path.is_symlink():
            if _socket_in_use(self.path):
                raise ControlError(
                    f"another daemon is already listening on {self.path}; stop it first or "
                    "give this one another --state-dir"
                )
            self.path.unlink()  # left over from a daemon that did not shut down cleanly
        old = os.umask(0o177)  # the socket is created 0600, with no window of wider access
        try:
            self._server = await asyncio.start_unix_server(
                self._serve, path=str(self.path), limit=MAX_REQUEST
            )
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    await _write(writer, {"ok": False, "error": "request line too long"})
                    return
                if not line:
                    return
                try:
                    req = json.loads(line)
                    if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
                        raise ValueError("expected a JSON object with a string 'cmd'")
                except ValueError as exc:
                    await _write(writer, {"ok": False, "error": f"bad request: {exc}"})
                    continue
                try:
                    result = await self._handler(req)
                    await _write(writer, {"ok": True, "result": result})
                except DhtnodeError as exc:
                    await _write(writer, {"ok": False, "error": str(exc)})
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


async def _write(writer: asyncio.StreamWriter, obj: dict[str, Any]) -> None:
    writer.write(json.dumps(obj, separators=(",", ":")).encode() + b"\n")
    await writer.drain()


async def request(path: Path, cmd: str, timeout: float = CLIENT_TIMEOUT, **args: Any) -> Any:
    """Send one command to the daemon at ``path``; returns its result or raises ControlError."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(str(path), limit=1 << 22), timeout
        )
    except (OSError, TimeoutError) as exc:
        raise ControlError(
            f"no daemon answering on {path} ({exc.__class__.__name__}: {exc}); start one with "
            "`dhtnode run`, or point at its state dir with --state-dir"
        ) from None
    try:
        writer.write(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout)
    except (OSError, TimeoutError) as exc:
        raise ControlError(f"daemon on {path} did not answer: {exc}") from None
    finally:
        writer.close()
    if not line:
        raise ControlError(f"daemon on {path} closed the connection without answering")
    resp = json.loads(line)
    if not resp.get("ok"):
        raise ControlError(str(resp.get("error", "unknown error")))
    return resp.get("result")
