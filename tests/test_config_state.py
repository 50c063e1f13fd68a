"""Config loading and validation, CLI usage errors, identity key file, node cache, logging."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dhtnode.crypto.identity import Identity, load_or_create_identity, verify
from dhtnode.daemon.config import Config, apply_overrides, load_config
from dhtnode.daemon.logging import configure_logging, get_logger
from dhtnode.daemon.state import MAX_CACHED_NODES, load_node_cache, save_node_cache
from dhtnode.errors import ConfigError, StateError

ROOT = Path(__file__).resolve().parent.parent


def test_example_config_is_exactly_the_defaults() -> None:
    assert load_config(ROOT / "config.example.toml") == Config()


@pytest.mark.parametrize(
    ("toml", "field", "hint"),
    [
        ("[dht]\nalpha = 0", "dht.alpha", "from 1 to 16"),
        ("[dht]\nk = true", "dht.k", "integer"),
        ("[dht]\nkk = 3", "dht.kk", "known keys"),
        ("[node]\nport = 70000", "node.port", "0 to 65535"),
        ("[node]\nbootstrap = [\"host:abc\"]", "node.bootstrap", "1-65535"),
        ("[node]\nbootstrap = \"1.2.3.4:5\"", "node.bootstrap", "list"),
        ("[node]\nbootstrap_node = \"yes\"", "node.bootstrap_node", "true or false"),
        ("[log]\nlevel = \"loud\"", "log.level", "debug, info"),
        ("[records]\nttl = 1", "records.ttl", "from 10"),
        ("[nosuch]\na = 1", "nosuch", "known tables"),
        ("not toml [", "--config", "not valid TOML"),
    ],
)
def test_bad_config_names_field_and_fix(tmp_path: Path, toml: str, field: str, hint: str) -> None:
    p = tmp_path / "c.toml"
    p.write_text(toml)
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    assert exc.value.field == field
    assert hint in str(exc.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.toml")


def test_overrides_win_and_are_validated(tmp_path: Path) -> None:
    cfg = apply_overrides(Config(), port=1234, bootstrap=["203.0.113.1:5", "[2001:db8::1]:6"],
                          state_dir=tmp_path, log_level="debug")
    assert cfg.node.port == 1234
    assert cfg.node.bootstrap == (("203.0.113.1", 5), ("2001:db8::1", 6))
    assert cfg.control_socket_path == tmp_path / "control.sock"
    with pytest.raises(ConfigError, match="--bootstrap"):
        apply_overrides(Config(), bootstrap=["203.0.113.1:0"])


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dhtnode", *args], capture_output=True,
                          text=True, timeout=30)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["run", "--port", "70000"], "--port"),
        (["run", "--bootstrap", "1.2.3.4:x"], "--bootstrap"),
        (["lookup", "abc"], "TOPIC"),
        (["lookup"], "topic is required"),
        (["announce", "--topic-name", "x", "--keep-alive", "-1"], "--keep-alive"),
        (["ping", "nope"], "HOST:PORT"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_cli_usage_errors_exit_2(args: list[str], needle: str) -> None:
    out = run_cli(*args)
    assert out.returncode == 2, out.stderr
    assert needle in out.stderr


def test_cli_bad_config_file_exits_2(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text("[dht]\nalpha = 99\n")
    out = run_cli("run", "--config", str(p), "--state-dir", str(tmp_path))
    assert out.returncode == 2 and "dht.alpha" in out.stderr


def test_cli_topic_and_keygen(tmp_path: Path) -> None:
    out = run_cli("topic", "myapp", "--json")
    assert out.returncode == 0
    assert len(json.loads(out.stdout)["topic"]) == 64
    first = json.loads(run_cli("keygen", "--state-dir", str(tmp_path), "--json").stdout)
    again = json.loads(run_cli("keygen", "--state-dir", str(tmp_path), "--json").stdout)
    assert first["created"] is True and again["created"] is False
    assert first["public_key"] == again["public_key"]


def test_identity_persists_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "identity.key"
    ident, created = load_or_create_identity(path)
    assert created and os.stat(path).st_mode & 0o777 == 0o600
    again, created2 = load_or_create_identity(path)
    assert not created2 and again.public_key == ident.public_key
    sig = ident.sign(b"hello")
    assert verify(ident.public_key, b"hello", sig)
    assert not verify(ident.public_key, b"hellO", sig)
    assert not verify(b"short", b"hello", sig)
    assert not verify(ident.public_key, b"hello", b"\x00" * 64)
    assert "seed" not in repr(ident) and ident.seed.hex() not in repr(ident)


def test_identity_refuses_readable_or_corrupt_keys_without_overwriting(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    load_or_create_identity(path)
    os.chmod(path, 0o644)
    with pytest.raises(StateError, match="chmod 600"):
        load_or_create_identity(path)
    os.chmod(path, 0o600)
    path.write_text("garbage\n")
    with pytest.raises(StateError, match="not a dhtnode key file"):
        load_or_create_identity(path)
    assert path.read_text() == "garbage\n"  # never overwritten


def test_node_cache_round_trip_bound_and_corruption(tmp_path: Path) -> None:
    nodes = [(f"198.51.100.{i % 250 + 1}", 1000 + i) for i in range(MAX_CACHED_NODES + 10)]
    save_node_cache(tmp_path, [*nodes, ("2001:db8::1", 5)], now=1.0)
    loaded = load_node_cache(tmp_path)
    assert loaded == nodes[:MAX_CACHED_NODES]
    (tmp_path / "nodes.json").write_text("{broken")
    assert load_node_cache(tmp_path) == []
    assert (tmp_path / "nodes.json.corrupt").read_text() == "{broken"
    assert load_node_cache(tmp_path / "missing") == []


def test_json_logs_when_not_a_tty() -> None:
    buf = io.StringIO()
    configure_logging("info", "auto", stream=buf)
    get_logger("t").info("node_started", port=5)
    get_logger("t").debug("hidden_event")
    lines = [json.loads(x) for x in buf.getvalue().splitlines()]
    assert lines[0]["event"] == "node_started" and lines[0]["port"] == 5
    assert lines[0]["level"] == "info" and "timestamp" in lines[0]
    assert all(x["event"] != "hidden_event" for x in lines)


def test_identity_from_seed_is_deterministic() -> None:
    seed = b"\x01" * 32
    assert Identity.from_seed(seed).public_key == Identity.from_seed(seed).public_key
    with pytest.raises(ValueError):
        Identity.from_seed(b"\x01")
