"""Issue 8, "a new user's first hour": ordinary mistakes get a clear message, the right exit
code and, with ``--json``, ``{"ok": false, "error": CODE, "message": ...}`` on stdout; never
a traceback. "Nothing answered" (exit 3, ``no_network``) is not "nothing found" (exit 1,
``not_found``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from dhtnode.cli.help import PAGES
from dhtnode.cli.main import PEER_KEYS, build_parser, main
from dhtnode.crypto.identity import Identity
from dhtnode.daemon.config import load_config
from dhtnode.dht.counters import COUNTERS
from dhtnode.dht.ids import topic_from_name
from dhtnode.dht.node import DhtNode, DhtParams
from dhtnode.errors import ConfigError
from dhtnode.wire.address import parse_host_port
from tests.daemon import running_daemon


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[dict[str, Any]],
                                                                         str]:
    """Exit code, the JSON objects on stdout, and stderr."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, [json.loads(line) for line in out.splitlines() if line.strip()], err


def run_cli_text(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def first_key(capsys: pytest.CaptureFixture[str], state: Path) -> str:
    code, objs, _ = run_cli(capsys, "id", "--state-dir", str(state), "--json")
    assert code == 0
    return str(objs[0]["public_key"])


def error_of(objs: list[dict[str, Any]]) -> dict[str, Any]:
    assert len(objs) == 1, objs
    assert objs[0]["ok"] is False
    assert set(objs[0]) == {"ok", "error", "message"}
    return objs[0]


def short_state(tmp_path: Path, name: str = "s") -> Path:
    d = tmp_path / name
    d.mkdir(mode=0o700)
    return d


# ------------------------------------------------------------------ item 3: no tracebacks


@pytest.mark.parametrize("flags", [
    ["--bootstrap-node", "--public-host", "vps.example.com"],
    ["--bootstrap-node", "--public-host", "not-an-ip"],
    ["--host", "localhost", "--bootstrap-node"],
    ["--host", "999.1.1.1"],
])
def test_names_where_an_ip_is_needed_are_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str]
) -> None:
    code, _, err = run_cli(capsys, "run", "--state-dir", str(short_state(tmp_path)),
                              "--port", "0", *flags)
    assert code == 2
    assert "must be an IP address" in err
    assert "Names are not resolved here" in err


def test_config_host_must_be_an_ip(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[node]\npublic_host = "vps.example.com"\n')
    with pytest.raises(ConfigError, match=r"node.public_host: must be an IP address"):
        load_config(cfg)


def test_a_bind_failure_names_the_address_not_the_port(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # 192.0.2.1 (TEST-NET-1) is an IP, but not one of this host's.
    code, _, err = run_cli(capsys, "run", "--state-dir", str(short_state(tmp_path)),
                           "--port", "0", "--host", "192.0.2.1")
    assert code == 1
    assert "not an address of this host" in err
    assert "choose another --port" not in err


def test_a_port_in_use_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    busy = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    busy.bind(("127.0.0.1", 0))
    try:
        code, _, err = run_cli(capsys, "run", "--state-dir", str(short_state(tmp_path)),
                               "--host", "127.0.0.1", "--port", str(busy.getsockname()[1]))
    finally:
        busy.close()
    assert code == 1
    assert "the port is in use: choose another --port" in err


def test_a_state_dir_too_long_for_a_unix_socket_names_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    deep = tmp_path / ("x" * (110 - len(str(tmp_path))))
    code, _, err = run_cli(capsys, "run", "--state-dir", str(deep), "--port", "0")
    assert code == 1
    assert "a Unix socket path may have at most 107" in err
    assert "[control] socket" in err
    assert not deep.exists(), "refused before anything was created"
    code, objs, err = run_cli(capsys, "status", "--state-dir", str(deep), "--json")
    assert code == 1
    assert "[control] socket" in error_of(objs)["message"]


@pytest.mark.parametrize("target", ["1.2.3:80", "127.1:80", "2130706433:80"])
def test_ping_refuses_a_short_ipv4_address(
    capsys: pytest.CaptureFixture[str], target: str
) -> None:
    code, objs, _ = run_cli(capsys, "ping", target, "--json")
    assert code == 2
    e = error_of(objs)
    assert e["error"] == "usage"
    assert "is not an IPv4 address" in e["message"]


def test_parse_host_port_keeps_names_and_full_addresses() -> None:
    assert parse_host_port("node1.example.com:80") == ("node1.example.com", 80)
    assert parse_host_port("203.0.113.7:80") == ("203.0.113.7", 80)
    with pytest.raises(ValueError, match="not an IPv4 address"):
        parse_host_port("1.2.3:80")


def test_keygen_creates_no_directories(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "missing" / "dir" / "k.key"
    code, objs, _ = run_cli(capsys, "keygen", "--out", str(out), "--json")
    assert code == 2
    assert "does not exist" in error_of(objs)["message"]
    assert not (tmp_path / "missing").exists()
    ok = tmp_path / "k.key"
    code, objs, _ = run_cli(capsys, "keygen", "--out", str(ok), "--json")
    assert code == 0 and objs[0]["created"] is True and ok.exists()


def test_stun_timeout_bounds_the_total_time(capsys: pytest.CaptureFixture[str]) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # bound, never answers
    s.bind(("127.0.0.1", 0))
    try:
        t0 = time.monotonic()
        code, objs, _ = run_cli(capsys, "stun", f"127.0.0.1:{s.getsockname()[1]}",
                                "--timeout", "0.5", "--json")
        took = time.monotonic() - t0
    finally:
        s.close()
    assert took < 1.0, took  # was 7.5 s: 0.5 + 1 + 2 + 4
    assert code == 3
    assert error_of(objs)["error"] == "no_network"


# ------------------------------------------------------------------ item 1: silence


def test_config_bootstrap_needs_a_port_like_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[node]\nbootstrap = ["127.0.0.1"]\n')
    with pytest.raises(ConfigError, match=r"node.bootstrap: .*no port"):
        load_config(cfg)
    code, objs, _ = run_cli(capsys, "lookup", "--topic-name", "t", "--bootstrap", "127.0.0.1",
                            "--json")
    assert code == 2
    assert "no port" in error_of(objs)["message"]


def test_a_dead_bootstrap_is_no_network_not_not_found(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dead = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dead.bind(("127.0.0.1", 0))
    seed = f"127.0.0.1:{dead.getsockname()[1]}"
    try:
        for verb in ("lookup", "announce", "unannounce"):
            extra = ["--keep-alive", "5"] if verb == "announce" else []
            code, objs, err = run_cli(capsys, verb, "--topic-name", "t", "--bootstrap", seed,
                                      "--state-dir", str(tmp_path / "st"), "--json", *extra)
            assert code == 3, (verb, err)
            e = error_of(objs)
            assert e["error"] == "no_network"
            assert e["message"].startswith("nothing answered")
            assert seed in e["message"]
    finally:
        dead.close()


def test_status_names_a_permission_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    state = short_state(tmp_path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(state / "control.sock"))
    sock.listen()
    os.chmod(state / "control.sock", 0o000)
    try:
        if os.geteuid() != 0:
            code, objs, _ = run_cli(capsys, "status", "--state-dir", str(state), "--json")
        else:  # root connects to any socket: have the connect fail as it would for a user
            async def denied(*_: Any, **__: Any) -> Any:
                raise PermissionError(13, "Permission denied")

            monkeypatch.setattr("asyncio.open_unix_connection", denied)
            code, objs, _ = run_cli(capsys, "status", "--state-dir", str(state), "--json")
    finally:
        sock.close()
    assert code == 1
    e = error_of(objs)
    assert e["error"] == "permission_denied"
    assert "another user" in e["message"]


def test_status_without_daemon_has_its_own_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, objs, _ = run_cli(capsys, "status", "--state-dir", str(short_state(tmp_path)), "--json")
    assert code == 1
    assert error_of(objs)["error"] == "no_daemon"


# ------------------------------------------------------------------ against a live node

ANNOUNCE_KEYS = {"ok", "event", "topic", "public_key", "stored_on", "public_address",
                 "keep_alive", "via_daemon"}
UNANNOUNCE_KEYS = {"ok", "event", "topic", "public_key", "withdrawn_from", "via_daemon"}


def test_against_a_live_node(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    boot = short_state(tmp_path, "boot")
    with running_daemon(boot, "--host", "127.0.0.1", "--bootstrap-node") as port:
        seed = f"127.0.0.1:{port}"
        mine = str(tmp_path / "mine")
        # Nothing found: the network answered (exit 1, not_found), unlike a dead seed.
        code, objs, _ = run_cli(capsys, "lookup", "--topic-name", "empty", "--bootstrap", seed,
                                "--json")
        assert code == 1
        assert error_of(objs)["error"] == "not_found"
        # A topic never announced: say so, withdraw nothing.
        code, objs, _ = run_cli(capsys, "unannounce", "--topic-name", "never", "--bootstrap",
                                seed, "--state-dir", mine, "--json")
        assert code == 1
        e = error_of(objs)
        assert e["error"] == "not_announced" and "nothing to withdraw" in e["message"]
        # A one-shot announce without --keep-alive would publish a port about to close.
        code, objs, _ = run_cli(capsys, "announce", "--topic-name", "t1", "--bootstrap", seed,
                                "--state-dir", mine, "--json")
        assert code == 2 and "dead address" in error_of(objs)["message"]
        # One-shot and daemon announce/unannounce print the same keys. The one-shot
        # announcer stays up (another process) while a one-shot unannounce withdraws.
        announcer = subprocess.Popen(
            [sys.executable, "-m", "dhtnode", "announce", "--topic-name", "t1", "--bootstrap",
             seed, "--state-dir", mine, "--keep-alive", "60", "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            assert announcer.stdout is not None
            first = json.loads(announcer.stdout.readline())
            assert set(first) == ANNOUNCE_KEYS and first["via_daemon"] is False
            code, objs, _ = run_cli(capsys, "unannounce", "--topic-name", "t1", "--bootstrap",
                                    seed, "--state-dir", mine, "--json")
            assert code == 0 and set(objs[0]) == UNANNOUNCE_KEYS
            assert objs[0]["withdrawn_from"] >= 1
        finally:
            announcer.kill()
            announcer.communicate()
        # With a daemon on the state dir, announce goes through it by default...
        code, objs, _ = run_cli(capsys, "announce", "--topic-name", "t2",
                                "--state-dir", str(boot), "--json")
        assert code == 0 and set(objs[0]) == ANNOUNCE_KEYS and objs[0]["via_daemon"] is True
        code, objs, _ = run_cli(capsys, "lookup", "--topic-name", "t2",
                                "--state-dir", str(boot), "--json")
        assert code == 0 and objs[0]["public_key"] == first_key(capsys, boot)
        # ...and a one-shot node there would sign with the daemon's key: refused.
        code, objs, _ = run_cli(capsys, "announce", "--topic-name", "t2", "--one-shot",
                                "--keep-alive", "5", "--state-dir", str(boot), "--json")
        assert code == 2 and "would replace its live record" in error_of(objs)["message"]
        code, objs, _ = run_cli(capsys, "unannounce", "--topic-name", "t2", "--via-daemon",
                                "--state-dir", str(boot), "--json")
        assert code == 0 and set(objs[0]) == UNANNOUNCE_KEYS
        code, objs, _ = run_cli(capsys, "unannounce", "--topic-name", "t2", "--via-daemon",
                                "--state-dir", str(boot), "--json")
        assert code == 1 and error_of(objs)["error"] == "not_announced"
        # The bootstrap node's NAT class is known (fixed public address), not "unknown".
        code, objs, _ = run_cli(capsys, "status", "--state-dir", str(boot), "--json")
        assert code == 0 and objs[0]["nat_class"] == "consistent"
        assert set(objs[0]["stats"]) == set(COUNTERS)  # every counter, even at zero
        # `peers` lists a daemon's routing table; `id` prints the key (and node id).
        other = short_state(tmp_path, "other")
        with running_daemon(other, "--host", "127.0.0.1", "--bootstrap", seed):
            deadline = time.monotonic() + 10
            objs = []
            while not objs and time.monotonic() < deadline:
                code, objs, _ = run_cli(capsys, "peers", "--state-dir", str(other), "--json")
                assert code == 0
                time.sleep(0.1)
            assert objs and all(set(o) == {"ok", *PEER_KEYS} for o in objs)
            assert seed in {o["address"] for o in objs}
            code, text, _ = run_cli_text(capsys, "peers", "--state-dir", str(other))
            assert code == 0 and "NODE ID" in text and seed in text
        code, objs, _ = run_cli(capsys, "id", "--state-dir", str(boot), "--json")
        assert code == 0 and set(objs[0]) == {"ok", "public_key", "key_file", "node_id"}
        assert objs[0]["node_id"]  # the bootstrap node serves: it has a node id
    log = (boot / "log").read_text()
    assert '"first_node_of_network"' in log
    assert f"--bootstrap 127.0.0.1:{port}" in log  # the known address, not <this host's IP>


def test_daemon_warnings(tmp_path: Path) -> None:
    dead = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dead.bind(("127.0.0.1", 0))
    state = short_state(tmp_path)
    try:
        with running_daemon(state, "--bootstrap", f"127.0.0.1:{dead.getsockname()[1]}",
                            "--public-host", "203.0.113.7"):
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and "bootstrap_unanswered" not in (
                    state / "log").read_text():
                time.sleep(0.1)
    finally:
        dead.close()
    events = {json.loads(line)["event"]: json.loads(line)
              for line in (state / "log").read_text().splitlines() if line.startswith("{")}
    assert events["bootstrap_unanswered"]["level"] == "warning"
    assert events["public_host_ignored"]["level"] == "warning"
    state2 = short_state(tmp_path, "s2")
    with running_daemon(state2, "--bootstrap-node"):
        pass
    events = {json.loads(line)["event"]: json.loads(line)
              for line in (state2 / "log").read_text().splitlines() if line.startswith("{")}
    assert events["bootstrap_node_without_public_address"]["level"] == "warning"
    assert events["node_started"]["bootstrap_node"] is True


# ------------------------------------------------------------------ item 6: stable output


def test_every_command_has_a_help_page_with_an_example() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) <= set(PAGES), set(sub.choices) - set(PAGES)
    for verb, p in sub.choices.items():
        page = p.format_help()
        assert p.description, verb
        assert "examples:\n  dhtnode " in page or "examples:\n  echo" in page, verb


def test_id_without_a_key_says_how_to_make_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, objs, _ = run_cli(capsys, "id", "--state-dir", str(short_state(tmp_path)), "--json")
    assert code == 1
    assert "dhtnode keygen" in error_of(objs)["message"]


def test_counters_are_declared_once_and_present_at_zero() -> None:
    root = Path(__file__).parent.parent / "dhtnode"
    counted: set[str] = set()
    for f in root.rglob("*.py"):
        if f.name == "sockets.py":  # the socket pool's own counters, not the node's
            continue
        counted |= set(re.findall(r'stats\["([a-z_0-9]+)"\]', f.read_text()))
    counted |= {"punch_ok", "punch_failed"}
    counted |= {f"drop_hello_{k}" for k in
                re.findall(r'HandshakeError\("([a-z_]+)"', (root / "connect" /
                                                            "handshake.py").read_text())}
    assert counted <= set(COUNTERS), sorted(counted - set(COUNTERS))
    assert set(COUNTERS) <= counted, sorted(set(COUNTERS) - counted)
    node = DhtNode(Identity.generate(), DhtParams(), now=0.0, wall=time.time)
    stats = node.status()["stats"]
    assert set(stats) == set(COUNTERS) and not any(stats.values())


# ------------------------------------------------------------------ item 8: packaging


def test_license_in_the_non_deprecated_form() -> None:
    """`pip install .` warned "project.license as a TOML table is deprecated"."""
    import tomllib

    root = Path(__file__).parent.parent
    doc = tomllib.loads((root / "pyproject.toml").read_text())
    assert isinstance(doc["project"]["license"], str)  # an SPDX expression
    for f in doc["project"].get("license-files", []):
        assert (root / f).is_file(), f
    assert any(r.startswith("setuptools>=77") for r in doc["build-system"]["requires"])


def test_readme_quickstart_is_two_commands() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = readme.split("## Quickstart", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    assert [line.split()[:2] for line in block.strip().splitlines()] == [
        ["make", "run"], ["make", "test"]]
    for section in ("## Install for everyday use", "## Your first network in five minutes",
                    "## Troubleshooting", "pipx install ."):
        assert section in readme


def test_argument_errors_print_the_json_error_too(capsys: pytest.CaptureFixture[str]) -> None:
    """Argparse's own errors printed nothing on stdout with --json."""
    code, objs, err = run_cli(capsys, "lookup", "--json", "--bogus")
    assert code == 2
    assert error_of(objs) == {"ok": False, "error": "usage",
                              "message": "unrecognized arguments: --bogus"}
    assert "dhtnode lookup: error: unrecognized arguments: --bogus" in err
    code, objs, err = run_cli(capsys, "ping", "--json")
    assert code == 2 and "TARGET" in error_of(objs)["message"]
    code, objs, err = run_cli(capsys, "ping")
    assert code == 2 and objs == [] and "dhtnode ping: error:" in err


def documented_keys() -> dict[str, set[str]]:
    """docs/JSON.md's table: object -> keys."""
    doc = (Path(__file__).parent.parent / "docs" / "JSON.md").read_text()
    out: dict[str, set[str]] = {}
    for line in doc.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0] not in ("object", "---"):
            out[cells[0].replace("`", "")] = set(re.findall(r"`([a-z_]+)`", cells[1]))
    return out


def test_json_key_sets_are_the_documented_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from dhtnode.cli.common import ERROR_CODES

    keys = documented_keys()
    doc = (Path(__file__).parent.parent / "docs" / "JSON.md").read_text()
    assert set(re.findall(r"`([a-z_]+)`", doc.split("`error` is one of:", 1)[1])) == set(
        ERROR_CODES)
    boot = short_state(tmp_path, "boot")
    seen: dict[str, list[dict[str, Any]]] = {}

    def json_of(name: str, *argv: str, code: int = 0) -> None:
        rc, objs, err = run_cli(capsys, *argv, "--json")
        assert rc == code, (argv, err)
        seen.setdefault(name, []).extend(objs)

    with running_daemon(boot, "--host", "127.0.0.1", "--bootstrap-node") as port:
        seed = f"127.0.0.1:{port}"
        one = ("--bootstrap", seed, "--state-dir", str(tmp_path / "one"))
        json_of("status", "status", "--state-dir", str(boot))
        json_of("id", "id", "--state-dir", str(boot))
        json_of("announce", "announce", "--topic-name", "k", "--keep-alive", "0.2", *one)
        json_of("announce", "announce", "--topic-name", "k", "--via-daemon", "--state-dir",
                str(boot))
        json_of("lookup (one per record)", "lookup", "--topic-name", "k", *one)
        json_of("unannounce (and announce --keep-alive at its end)", "unannounce",
                "--topic-name", "k", "--via-daemon", "--state-dir", str(boot))
        json_of("ping HOST:PORT", "ping", seed)
        json_of("stun", "stun", seed)
        json_of("error (every command)", "lookup", "--topic-name", "nobody", *one, code=1)
    json_of("keygen", "keygen", "--out", str(tmp_path / "k.key"))
    json_of("topic", "topic", "x")
    json_of("error (every command)", "keygen", "--out", str(tmp_path / "no" / "k.key"), code=2)
    # `announce --keep-alive` ends with the unannounced object.
    seen["announce"], ends = ([o for o in seen["announce"] if o["event"] == "announced"],
                              [o for o in seen["announce"] if o["event"] == "unannounced"])
    assert ends
    seen["unannounce (and announce --keep-alive at its end)"] += ends
    for name, objs in seen.items():
        assert objs, name
        for obj in objs:
            assert set(obj) == keys[name], (name, set(obj) ^ keys[name])


# ------------------------------------------------------------------ item 5: state that survives


def test_topics_announced_through_the_daemon_survive_a_restart(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = short_state(tmp_path)
    with running_daemon(state, "--host", "127.0.0.1", "--bootstrap-node"):
        code, objs, _ = run_cli(capsys, "announce", "--topic-name", "kept", "--state-dir",
                                str(state), "--json")
        assert code == 0 and objs[0]["via_daemon"] is True
        code, _, _ = run_cli(capsys, "announce", "--topic-name", "dropped", "--state-dir",
                             str(state), "--json")
        assert code == 0
        code, _, _ = run_cli(capsys, "unannounce", "--topic-name", "dropped", "--state-dir",
                             str(state), "--json")
        assert code == 0
    assert (state / "topics.json").exists()
    with running_daemon(state, "--host", "127.0.0.1", "--bootstrap-node"):
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and "announcement_restored" not in (
                state / "log").read_text():
            time.sleep(0.05)
        code, objs, _ = run_cli(capsys, "status", "--state-dir", str(state), "--json")
        assert objs[0]["announced_topics"] == [topic_from_name("kept").hex()]
        code, objs, _ = run_cli(capsys, "lookup", "--topic-name", "kept", "--state-dir",
                                str(state), "--json")
        assert code == 0 and objs[0]["public_key"] == first_key(capsys, state)
