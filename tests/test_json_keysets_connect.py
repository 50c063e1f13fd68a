"""Issue 8: every ``--json`` output has a documented, fixed key set. The long-running verbs
(`listen`, `connect`, `join`, `expose`, `forward`) as a user runs them, separate processes
against the in-process loopback network (``net``), their objects compared with the table in
docs/JSON.md (the one-shot verbs: ``tests/test_first_hour.py``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.loopnet import Peer
from tests.test_first_hour import documented_keys

pytestmark = pytest.mark.slow

#: Seconds one verb may take to print an object: a process start (imports) on a loaded 2-core
#: machine, a join, and for events a connect; the test as a whole stays well under this.
LINE_TIMEOUT = 20.0
#: Seconds a verb gets to exit after SIGTERM before it is killed.
STOP_TIMEOUT = 5.0
#: Bytes `connect` pipes through the listener's echo.
PAYLOAD = b"key sets\n"


class Verb:
    """One `dhtnode VERB --json` process; ``line()`` reads its next JSON object."""

    def __init__(self, p: asyncio.subprocess.Process, stream: asyncio.StreamReader) -> None:
        self.p = p
        self._stream = stream

    async def line(self) -> dict[str, Any]:
        while True:
            raw = await asyncio.wait_for(self._stream.readline(), LINE_TIMEOUT)
            assert raw, f"pid {self.p.pid} ended without printing (exit {self.p.returncode})"
            obj = json.loads(raw)
            assert isinstance(obj, dict)
            # On stderr (`connect`) the JSON log lines come too: every output object has `ok`.
            if "ok" in obj:
                return obj


@contextlib.asynccontextmanager
async def verb(tmp: Path, label: str, *args: str, stdin: bool = False) -> AsyncIterator[Verb]:
    """Start `dhtnode ARGS --json` with a state dir of its own (named ``label``); SIGTERM
    (then SIGKILL) on the way out, also when the test fails."""
    state = tmp / label
    state.mkdir(mode=0o700)
    log = (tmp / f"{label}.log").open("wb")
    # `connect` prints its object on stderr (stdout carries the stream): read stderr and drop
    # stdout; every other verb prints on stdout, and its log goes to a file.
    on_stderr = args[0] == "connect"
    p = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dhtnode", *args, "--json", "--state-dir", str(state),
        stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL if on_stderr else asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE if on_stderr else log,
    )
    stream = p.stderr if on_stderr else p.stdout
    assert stream is not None
    try:
        yield Verb(p, stream)
    finally:
        if p.returncode is None:
            p.terminate()
            try:
                await asyncio.wait_for(p.wait(), STOP_TIMEOUT)
            except TimeoutError:
                p.kill()
                await p.wait()
        log.close()


def free_tcp_port() -> int:
    """A port nothing listens on now (`forward --listen` takes 1-65535, not 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def tcp_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(4096):
        writer.write(data)
        await writer.drain()
    writer.close()


async def test_long_running_verbs_print_the_documented_keys(
    net: list[Peer], tmp_path: Path
) -> None:
    host, port = net[0].ep.local_address
    boot = ("--bootstrap", f"{host}:{port}")
    topic = "cd" * 32
    echo = await asyncio.start_server(tcp_echo, "127.0.0.1", 0)
    target = f"127.0.0.1:{echo.sockets[0].getsockname()[1]}"
    seen: dict[str, list[dict[str, Any]]] = {}
    try:
        # All started before any is read: the process starts overlap.
        async with (
            verb(tmp_path, "listen", "listen", *boot, "--echo") as listen,
            verb(tmp_path, "expose", "expose", target, "--public", *boot) as expose,
            verb(tmp_path, "join-a", "join", topic, *boot) as join_a,
            verb(tmp_path, "join-b", "join", topic, *boot) as join_b,
        ):
            first = await asyncio.gather(listen.line(), expose.line(), join_a.line(),
                                         join_b.line())
            seen["listen"] = [first[0]]
            seen["expose"] = [first[1]]
            seen["join"] = list(first[2:])
            async with (
                verb(tmp_path, "connect", "connect", first[0]["public_key"], *boot,
                     stdin=True) as connect,
                verb(tmp_path, "forward", "forward", first[1]["public_key"], "--listen",
                     f"127.0.0.1:{free_tcp_port()}", *boot) as forward,
            ):
                assert connect.p.stdin is not None
                connect.p.stdin.write(PAYLOAD)
                connect.p.stdin.close()  # EOF: connect ends once the echo is back
                objs = await asyncio.gather(connect.line(), listen.line(), forward.line(),
                                            join_a.line(), join_b.line())
                assert await asyncio.wait_for(connect.p.wait(), LINE_TIMEOUT) == 0
            seen["connect (on stderr)"] = [objs[0]]
            seen["listen: each connection"] = [objs[1]]
            seen["forward"] = [objs[2]]
            seen["join: each peer"] = list(objs[3:])
    finally:
        echo.close()
    keys = documented_keys()
    for name, got in seen.items():
        assert name in keys, f"{name!r} is not in docs/JSON.md"
        for obj in got:
            assert obj["ok"] is True, (name, obj)
            assert set(obj) == keys[name], (name, set(obj) ^ keys[name])
    # The events are the ones documented for each verb.
    assert seen["connect (on stderr)"][0]["event"] == "connected"
    assert seen["listen: each connection"][0]["event"] == "connection"
    assert {o["event"] for o in seen["join: each peer"]} == {"peer"}
