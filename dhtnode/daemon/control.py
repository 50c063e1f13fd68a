"""The local control socket: how ``dhtnode status`` (and scripts) talk to a running daemon.

A Unix stream socket created with mode 0600 in the state dir (only the daemon's user may
use it). One JSON object per line each way: a request ``{"cmd": "status", ...}`` gets
``{"ok": true, "result": {...}}`` or ``{"ok": false, "error": "..."}``.

The daemon deletes nothing at the control path but a socket: a stale one left by a daemon
that died is replaced; a regular file, a directory or a symbolic link there (a mistyped
``[control] socket`` setting, or a planted link) is refused with the fix, and left alone.

Owns the socket and the framing only; what each command does is the daemon's handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import stat
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
    """The control socket could not be reached or the daemon refused the request. ``code``:
    ``no_daemon``, ``permission_denied`` or ``failed``."""

    def __init__(self, message: str, *, code: str = "failed") -> None:
        super().__init__(message)
        self.code = code


#: Longest Unix socket path the kernel takes (sun_path is 108 bytes with its NUL on Linux).
MAX_SOCKET_PATH = 107


def check_socket_path(path: Path) -> None:
    """Refuse a control socket path the kernel cannot bind or connect to, with the fix."""
    n = len(os.fsencode(str(path)))
    if n > MAX_SOCKET_PATH:
        raise ControlError(
            f"control socket path {path} is {n} bytes; a Unix socket path may have at most "
            f"{MAX_SOCKET_PATH}. Fix: set [control] socket in the config to a shorter path "
            "(e.g. /run/user/$UID/dhtnode.sock), or use a shorter --state-dir"
        )


def _group_id(name: str) -> int:
    import grp

    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise ControlError(
            f"[control] group: no group named {name!r} on this machine; create it "
            "(systemd-sysusers deploy/systemd/dhtnode.sysusers.conf) or leave the key empty"
        ) from None


def _socket_in_use(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISREG(mode):
        return "a regular file"
    return "not a socket"


class ControlServer:
    def __init__(self, path: Path, handler: Handler, *, group: str = "") -> None:
        """``group``: members of that group may use the socket too (mode 0660)."""
        self.path = path
        self._handler = handler
        self._group = group
        self._server: asyncio.base_events.Server | None = None
        # (device, inode) of the socket we created: the only thing close() may delete.
        self._created: tuple[int, int] | None = None

    async def start(self) -> None:
        check_socket_path(self.path)
        st = _lstat(self.path)
        if st is not None:
            if not stat.S_ISSOCK(st.st_mode):
                raise ControlError(
                    f"control socket path {self.path} is {_kind(st.st_mode)}, not a socket; "
                    "refusing to delete it. Fix: set [control] socket (or --state-dir) to a "
                    "path where nothing exists yet, or move that file away yourself"
                )
            if _socket_in_use(self.path):
                raise ControlError(
                    f"another daemon is already listening on {self.path}; stop it first or "
                    "give this one another --state-dir"
                )
            self.path.unlink()  # left over from a daemon that did not shut down cleanly
        gid = _group_id(self._group) if self._group else None
        # Created 0600 (0660 for a group), with no window of wider access.
        old = os.umask(0o117 if gid is not None else 0o177)
        try:
            self._server = await asyncio.start_unix_server(
                self._serve, path=str(self.path), limit=MAX_REQUEST
            )
        finally:
            os.umask(old)
        if gid is not None:
            try:
                if os.stat(self.path).st_gid != gid:
                    os.chown(self.path, -1, gid)
            except OSError as exc:
                await self.close()
                raise ControlError(
                    f"cannot give the control socket {self.path} to group {self._group!r} "
                    f"([control] group): {exc.strerror}. The daemon's user must be a member"
                ) from None
        os.chmod(self.path, 0o660 if gid is not None else 0o600)
        st = _lstat(self.path)
        if st is not None:
            self._created = (st.st_dev, st.st_ino)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None
        st = _lstat(self.path)
        # Only our own socket: something else may have been put there meanwhile.
        if st is not None and stat.S_ISSOCK(st.st_mode) and (
            (st.st_dev, st.st_ino) == self._created
        ):
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        self._created = None

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
    check_socket_path(path)
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(str(path), limit=1 << 22), timeout
        )
    except PermissionError:
        raise ControlError(
            f"permission denied on the control socket {path}: the daemon runs as another "
            "user. For the systemd service, add yourself to group dhtnode (sudo usermod -aG "
            "dhtnode $USER, then log in again); else run this command as the daemon's user, "
            "or give the daemon [control] group and join that group",
            code="permission_denied",
        ) from None
    except (OSError, TimeoutError) as exc:
        raise ControlError(
            f"no daemon answering on {path} ({exc.__class__.__name__}: {exc}); start one with "
            "`dhtnode run`, or point at its state dir with --state-dir",
            code="no_daemon",
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
