"""Local files (issue 6, item 6): the state dir, the identity key and the control socket path.
Before the fix a state dir with mode 0777 was used silently, the key file's owner was not
checked and symlinks were followed, and a ``[control] socket`` setting naming a regular file
deleted that file."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from dhtnode.crypto.identity import load_or_create_identity
from dhtnode.daemon.control import ControlError, ControlServer
from dhtnode.daemon.state import ensure_state_dir
from dhtnode.errors import StateError

NOBODY = 65534


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dhtnode", *args], capture_output=True,
                          text=True, timeout=30)


def test_state_dir_writable_by_others_is_refused_with_the_fix(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    os.chmod(state, 0o777)
    with pytest.raises(StateError) as exc:
        ensure_state_dir(state)
    print(f"\nstate dir 0777: {exc.value}")
    assert f"chmod 700 {state}" in str(exc.value)
    # The daemon says the same and exits non-zero, having written nothing there.
    p = run_cli("run", "--state-dir", str(state), "--port", "0")
    assert p.returncode != 0
    assert "chmod 700" in p.stderr
    assert list(state.iterdir()) == []
    os.chmod(state, 0o700)
    assert ensure_state_dir(state) == state


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_key_file_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    key = tmp_path / "identity.key"
    ident, created = load_or_create_identity(key)
    assert created and stat.S_IMODE(key.stat().st_mode) == 0o600
    os.chown(key, NOBODY, NOBODY)
    with pytest.raises(StateError) as exc:
        load_or_create_identity(key)
    print(f"\nkey file owned by uid {NOBODY}: {exc.value}")
    assert "chown" in str(exc.value)
    os.chown(key, os.geteuid(), os.getegid())
    assert load_or_create_identity(key)[0].public_key == ident.public_key

    # A state dir owned by another user is refused too.
    other = tmp_path / "other"
    other.mkdir(mode=0o700)
    os.chown(other, NOBODY, NOBODY)
    with pytest.raises(StateError, match="chown"):
        ensure_state_dir(other)


def test_symlinked_key_file_is_not_followed(tmp_path: Path) -> None:
    real = tmp_path / "real.key"
    load_or_create_identity(real)
    link = tmp_path / "identity.key"
    link.symlink_to(real)
    with pytest.raises(StateError) as exc:
        load_or_create_identity(link)
    print(f"\nsymlinked key file: {exc.value}")
    assert "symbolic link" in str(exc.value)
    # A dangling link is not followed to create a key at its target either.
    dangling = tmp_path / "dangling.key"
    dangling.symlink_to(tmp_path / "nowhere" / "k")
    with pytest.raises(StateError, match="symbolic link"):
        load_or_create_identity(dangling)
    assert not (tmp_path / "nowhere").exists()
    # A key readable by others, as before.
    os.chmod(real, 0o644)
    with pytest.raises(StateError, match="chmod 600"):
        load_or_create_identity(real)


def test_listen_key_file_is_created_0600_and_reused(tmp_path: Path) -> None:
    key = tmp_path / "keys" / "listener.key"
    ident, created = load_or_create_identity(key)
    assert created and stat.S_IMODE(key.stat().st_mode) == 0o600
    again, created = load_or_create_identity(key)
    assert not created and again.public_key == ident.public_key


def test_control_path_naming_a_regular_file_is_refused_and_the_file_kept(tmp_path: Path) -> None:
    victim = tmp_path / "precious.txt"
    victim.write_text("do not delete\n")

    async def handler(req: dict[str, Any]) -> dict[str, Any]:
        return {}

    server = ControlServer(victim, handler)
    with pytest.raises(ControlError) as exc:
        asyncio.run(server.start())
    print(f"\n[control] socket naming a regular file: {exc.value}")
    assert "not a socket" in str(exc.value) and "[control] socket" in str(exc.value)
    assert victim.read_text() == "do not delete\n"

    # Through the daemon and its config file, as a user would hit it.
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[control]\nsocket = "{victim}"\n')
    p = run_cli("run", "--config", str(cfg), "--state-dir", str(state), "--port", "0")
    assert p.returncode != 0, p.stderr
    assert "not a socket" in p.stderr
    assert victim.read_text() == "do not delete\n"

    # A stale socket of a dead daemon is still replaced, and close() removes only ours.
    sock_path = tmp_path / "s.sock"

    async def cycle() -> None:
        first = ControlServer(sock_path, handler)
        await first.start()
        first._server.close()  # type: ignore[union-attr]  # dies without cleaning up
        second = ControlServer(sock_path, handler)
        await second.start()
        await second.close()

    asyncio.run(cycle())
    assert not sock_path.exists()
