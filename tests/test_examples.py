"""The scripts in examples/ run against a small loopback network, so docs/API.md and the
examples cannot go stale; and the public API is what dhtnode/__init__.py exports."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from dhtnode.wire.address import format_addr
from tests.loopnet import Peer

EXAMPLES = Path(__file__).parent.parent / "examples"


@pytest.mark.parametrize("script, expect", [
    ("announce_lookup.py", "bob found"),
    ("listen_connect.py", "echoed: hello over dhtnode"),
    ("expose_forward.py", "service answered: HELLO SERVICE"),
])
async def test_example_runs(net: list[Peer], script: str, expect: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(EXAMPLES / script), format_addr(net[0].ep.local_address),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert expect in out.decode(), out.decode()
    assert "Traceback" not in err.decode()


def test_every_example_is_tested() -> None:
    assert {p.name for p in EXAMPLES.glob("*.py")} == {
        "announce_lookup.py", "listen_connect.py", "expose_forward.py"}


def test_the_public_api_and_no_logging_on_import() -> None:
    code = (
        "import logging, dhtnode, structlog\n"
        "assert not structlog.is_configured()\n"
        "assert logging.getLogger().handlers == []\n"
        "assert logging.getLogger('dhtnode').handlers == []\n"
        "print(sorted(dhtnode.__all__))\n"
        "for name in dhtnode.__all__: getattr(dhtnode, name)\n"
        "assert not structlog.is_configured() and logging.getLogger().handlers == []\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    assert out.strip() == str(sorted([
        "Config", "ConfigError", "Connection", "DhtnodeError", "Found", "Identity", "Node",
        "Server", "__version__", "load_identity", "open_node", "topic_from_name"]))


def test_a_library_user_sees_no_logs_on_stdout(tmp_path: Path) -> None:
    """The library logs through `logging` until the program configures it: nothing on
    stdout, even for an event at warning level (a dead bootstrap)."""
    code = (
        "import asyncio, socket, dhtnode\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('127.0.0.1', 0))\n"
        "async def main():\n"
        "    try:\n"
        "        async with dhtnode.open_node([f'127.0.0.1:{s.getsockname()[1]}']):\n"
        "            pass\n"
        "    except dhtnode.DhtnodeError as exc:\n"
        "        print('error', exc.code)\n"
        "asyncio.run(main())\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=30, check=True)
    assert p.stdout == "error no_network\n"
