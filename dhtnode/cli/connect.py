"""The verbs that connect by public key: ``listen``, ``connect``, and ``ping PUBKEY``.

Each starts a short-lived client node (as ``lookup`` does), or asks the running daemon
(``ping --via-daemon``), and prints results like the other verbs (``--json``: one object per
line with ``ok``). No protocol logic lives here.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import signal
import sys
import types
from pathlib import Path
from typing import Any

from dhtnode.cli.common import (
    EXIT_OK,
    UsageError,
    common_args,
    config_from_args,
    control_path,
    emit,
    net_args,
    run_async,
)

#: Bytes read from stdin (or a stream) at once when piping.
PIPE_CHUNK = 65536

#: Modules aioquic 1.7's ``tls.py`` imports at its top but uses only in ``verify_certificate``,
#: which runs only with ``verify_mode`` other than CERT_NONE (a server name checked against a
#: CA store). dhtnode pins the peer's key and sets CERT_NONE (transport/quic.py), so a CLI
#: process never uses them, yet service_identity (with attrs) costs about 20 ms of every fresh
#: ``dhtnode ping``/``connect``/``listen`` (median of 15 runs, 2-core machine). aioquic offers
#: no switch, and importlib's LazyLoader cannot help on 3.11 (the ``import`` statement reads
#: ``__spec__``, which loads a lazy module at once), hence :class:`_DeferredModule`.
DEFERRED_TLS_IMPORTS = ("service_identity", "certifi")


class _DeferredModule(types.ModuleType):
    """Stands in ``sys.modules`` for a module not loaded yet. The first attribute it lacks
    loads the real module (which then takes its place in ``sys.modules``), copies its
    namespace in and answers from it, so code holding this object sees the real module."""

    def __getattr__(self, attr: str) -> Any:
        name = self.__name__
        if sys.modules.get(name) is self:
            del sys.modules[name]
        real = importlib.import_module(name)
        self.__dict__.update(real.__dict__)
        return getattr(real, attr)


def defer_unused_tls_imports(names: tuple[str, ...] = DEFERRED_TLS_IMPORTS) -> None:
    """Put a :class:`_DeferredModule` in ``sys.modules`` for each of ``names`` that is
    installed and not imported yet. Only the CLI does this (at the import of this module,
    before any verb imports aioquic): a program using the library keeps its modules as is."""
    for name in names:
        if name in sys.modules or importlib.util.find_spec(name) is None:
            continue
        sys.modules[name] = _DeferredModule(name)


defer_unused_tls_imports()


def _setup_logging(cfg: Any) -> None:
    """As ``common.setup_logging``, but structlog is imported only when the first event at
    the configured level comes (these verbs log only through ``daemon/logging.py``)."""
    from dhtnode.daemon.logging import configure_logging

    configure_logging(cfg.log.level, cfg.log.format, lazy=True)


def parse_key(text: str, what: str) -> bytes:
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise UsageError(f"{what}: expected a public key of 64 hex characters, got {text!r}")
    return key


def looks_like_key(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdefABCDEF" for c in text)


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("listen", help="serve a public key: accept connections to it")
    common_args(p, log_default="warning")
    net_args(p)
    p.add_argument("--key-file", type=Path,
                   help="key to serve (created, mode 0600, if missing; default: the identity "
                   "in the state dir)")
    p.add_argument("--echo", action="store_true", help="echo every stream back (for ping)")
    p.add_argument("--allow", action="append", metavar="PUBKEY", default=None,
                   help="accept only these client keys (repeatable); default: anyone")
    p.add_argument("--port", type=int, default=0, help="UDP port (default: any free one)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("join", help="join a topic: connect to everyone who joins it")
    common_args(p, log_default="warning")
    net_args(p)
    p.add_argument("topic", nargs="?", help="topic as 64 hex characters")
    p.add_argument("--topic-name", help="derive the topic from a name (BLAKE2b-256)")
    p.add_argument("--key-file", type=Path, help="our key (default: a fresh one)")
    p.add_argument("--echo", action="store_true", help="echo every stream peers open")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("connect", help="connect to a public key and pipe stdin/stdout")
    common_args(p, log_default="warning")
    net_args(p)
    p.add_argument("public_key", metavar="PUBKEY")
    p.add_argument("--key-file", type=Path, help="our key (default: a fresh one)")
    p.add_argument("--json", action="store_true", help="print the connection as JSON on stderr")


def _load_key(args: argparse.Namespace, cfg: Any, *, default_state: bool) -> Any:
    from dhtnode.crypto.identity import Identity, load_or_create_identity
    from dhtnode.daemon.state import ensure_state_dir
    from dhtnode.daemon.wiring import identity_path

    if args.key_file is not None:
        return load_or_create_identity(args.key_file)[0]
    if not default_state:
        return Identity.generate()
    ensure_state_dir(cfg.node.state_dir)
    return load_or_create_identity(identity_path(cfg.node.state_dir))[0]


async def wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def _echo(conn: Any) -> None:
    while True:
        try:
            reader, writer = await conn.accept_stream()
        except Exception:
            return  # the connection ended
        asyncio.get_running_loop().create_task(_echo_stream(reader, writer))


async def _echo_stream(reader: asyncio.StreamReader, writer: Any) -> None:
    try:
        while data := await reader.read(PIPE_CHUNK):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
    except Exception:
        return


async def _stream_to_stdout(reader: asyncio.StreamReader) -> None:
    out = sys.stdout.buffer
    while data := await reader.read(PIPE_CHUNK):
        out.write(data)
        out.flush()


async def _stdin_to_stream(writer: Any) -> None:
    loop = asyncio.get_running_loop()
    read = sys.stdin.buffer.read1  # type: ignore[union-attr]
    while data := await loop.run_in_executor(None, read, PIPE_CHUNK):
        writer.write(data)
        await writer.drain()
    writer.write_eof()


def cmd_listen(args: argparse.Namespace) -> int:
    allow = {parse_key(k, "--allow") for k in args.allow or ()}
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port: must be 0-65535, got {args.port}")
    cfg = config_from_args(args)
    _setup_logging(cfg)

    async def main() -> int:
        from dhtnode.daemon.client import client_node

        ident = _load_key(args, cfg, default_state=True)
        async with client_node(cfg, port=args.port) as c:
            tasks: set[asyncio.Task[None]] = set()

            def on_connection(conn: Any) -> None:
                from dhtnode.wire.address import format_addr

                emit({"event": "connection", "public_key": conn.peer_key.hex(),
                      "address": format_addr(conn.remote_address), "strategy": conn.strategy},
                     args.json, f"connection from {conn.peer_key.hex()} "
                     f"({format_addr(conn.remote_address)}, {conn.strategy})", err=not args.json)
                task = asyncio.get_running_loop().create_task(
                    _echo(conn) if args.echo else _pipe_server(conn)
                )
                tasks.add(task)
                task.add_done_callback(tasks.discard)

            await c.connections.listen(
                ident, on_connection, allow=(lambda k: k in allow) if allow else None
            )
            emit({"public_key": ident.public_key.hex(), "listening": True}, args.json,
                 ident.public_key.hex())
            await wait_for_signal()
            for t in tasks:
                t.cancel()
        return EXIT_OK

    return run_async(main())


async def _pipe_server(conn: Any) -> None:
    reader, writer = await conn.accept_stream()
    await asyncio.gather(_stream_to_stdout(reader), _stdin_to_stream(writer))


def cmd_connect(args: argparse.Namespace) -> int:
    key = parse_key(args.public_key, "PUBKEY")
    cfg = config_from_args(args)
    _setup_logging(cfg)

    async def main() -> int:
        from dhtnode.daemon.client import client_node
        from dhtnode.wire.address import format_addr

        ident = _load_key(args, cfg, default_state=False)
        async with client_node(cfg) as c:
            conn = await c.connections.connect(key, identity=ident)
            emit({"event": "connected", "public_key": key.hex(), "path": conn.path,
                  "strategy": conn.strategy, "connect_ms": round(conn.connect_ms, 2),
                  "address": format_addr(conn.remote_address)},
                 args.json, f"connected to {key.hex()} ({conn.strategy}, "
                 f"{conn.connect_ms:.0f} ms)", err=True)
            reader, writer = await conn.open_stream()
            await asyncio.gather(_stdin_to_stream(writer), _stream_to_stdout(reader))
            await conn.close(wait=False)
        return EXIT_OK

    return run_async(main())


def cmd_ping_key(args: argparse.Namespace) -> int:
    key = parse_key(args.address, "TARGET")
    if args.via_daemon:
        from dhtnode.daemon import control

        path = control_path(args)
        res = asyncio.run(control.request(path, "ping_key", public_key=key.hex(), timeout=30))
    else:
        cfg = config_from_args(args)
        _setup_logging(cfg)

        async def main() -> dict[str, Any]:
            from dhtnode.daemon.client import client_node, ping_key

            async with client_node(cfg) as c:
                return await ping_key(c.connections, key.hex())

        res = run_async(main())
    emit(res, args.json, f"{key.hex()}: {res['path']} ({res['strategy']}), connect "
         f"{res['connect_ms']:.1f} ms, rtt {res['rtt_ms']:.2f} ms")
    return EXIT_OK


def cmd_join(args: argparse.Namespace) -> int:
    from dhtnode.cli.topics import topic_arg

    topic = topic_arg(args)
    cfg = config_from_args(args)
    _setup_logging(cfg)

    async def main() -> int:
        from dhtnode.daemon.client import client_node
        from dhtnode.transport.swarm import Swarm
        from dhtnode.wire.address import format_addr

        ident = _load_key(args, cfg, default_state=False)
        async with client_node(cfg) as c:
            tasks: set[asyncio.Task[None]] = set()

            def on_connection(conn: Any) -> None:
                emit({"event": "peer", "public_key": conn.peer_key.hex(),
                      "address": format_addr(conn.remote_address), "strategy": conn.strategy},
                     args.json, f"peer {conn.peer_key.hex()} ({conn.strategy})")
                if args.echo:
                    task = asyncio.get_running_loop().create_task(_echo(conn))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)

            swarm = await Swarm.join(c.connections, topic, ident, on_connection)
            emit({"topic": topic.hex(), "public_key": ident.public_key.hex(), "joined": True},
                 args.json, f"joined {topic.hex()} as {ident.public_key.hex()}")
            try:
                await wait_for_signal()
            finally:
                for t in tasks:
                    t.cancel()
                await swarm.leave()
        return EXIT_OK

    return run_async(main())
