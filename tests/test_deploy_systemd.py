"""deploy/systemd: the unit passes `systemd-analyze verify` (and its `security` score is
printed), and the daemon started from the unit's ExecStart= line, with the unit's environment
and a scratch state dir, tells a fake $NOTIFY_SOCKET READY=1, WATCHDOG=1 and, on SIGTERM,
STOPPING=1, answers `dhtnode status`, and exits cleanly within a few seconds. ExecReload=
needs no /bin/kill, and the README's install block is what `make systemd-check` (the unit
under a real systemd, deploy/systemd/realcheck.py) runs.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dhtnode.daemon import sdnotify
from tests.procs import sigterm_timed

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "deploy" / "systemd" / "dhtnode.service"
BINARY = "/usr/local/bin/dhtnode"


def unit_settings() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, value = line.split("=", 1)
            out.setdefault(key, []).append(value)
    return out


def _analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    return path


def test_unit_verifies_and_scores(tmp_path: Path) -> None:
    analyze = _analyze()
    # verify checks that ExecStart's binary exists: point it at this checkout's entry point.
    exe = shutil.which("dhtnode", path=str(Path(sys.executable).parent)) or sys.executable
    unit = tmp_path / "dhtnode.service"
    unit.write_text(UNIT.read_text().replace(BINARY, exe))
    r = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr
    r = subprocess.run([analyze, "security", "--offline=yes", str(unit)],
                       capture_output=True, text=True, timeout=60)
    score = [ln for ln in r.stdout.splitlines() if "Overall exposure level" in ln]
    print(score[0] if score else r.stdout[-500:] + r.stderr[-500:])
    if score:
        assert float(score[0].split(":")[1].split()[0]) <= 2.0, score[0]


def test_unit_settings() -> None:
    s = unit_settings()
    assert s["Type"] == ["notify"]
    assert s["User"] == ["dhtnode"] and s["Restart"] == ["on-failure"]
    assert s["StateDirectory"] == ["dhtnode"] and s["RuntimeDirectory"] == ["dhtnode"]
    assert s["ConfigurationDirectory"] == ["dhtnode"]
    assert s["Environment"] == ["DHTNODE_STATE_DIR=%S/dhtnode"]
    assert s["RestrictAddressFamilies"] == ["AF_INET AF_INET6 AF_UNIX"]
    assert int(s["LimitNOFILE"][0]) >= 4096
    cfg = (ROOT / "deploy" / "systemd" / "config.toml").read_text()
    assert 'socket = "/run/dhtnode/control.sock"' in cfg and 'group = "dhtnode"' in cfg


def _notify_socket(tmp: Path) -> tuple[socket.socket, Path]:
    path = tmp / "notify"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    s.settimeout(0.2)
    return s, path


def _wait_for(s: socket.socket, want: str, timeout: float, seen: list[str]) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            msg = s.recv(4096).decode()
        except TimeoutError:
            continue
        seen.append(msg)
        if want in msg.split("\n"):
            return True
    return False


def test_daemon_from_exec_start(tmp_path: Path) -> None:
    """ExecStart= as systemd would run it (specifiers filled in for a scratch root)."""
    settings = unit_settings()
    state = tmp_path / "var-lib"
    etc = tmp_path / "etc"
    (etc / "dhtnode").mkdir(parents=True)
    state.mkdir(mode=0o700)
    run = tmp_path / "run"
    run.mkdir(mode=0o750)
    control = run / "control.sock"
    # The shipped config, with this test's port, socket and no group (no user dhtnode here).
    cfg = (ROOT / "deploy" / "systemd" / "config.toml").read_text()
    cfg = (cfg.replace("port = 49200", "port = 0")
           .replace('socket = "/run/dhtnode/control.sock"', f'socket = "{control}"')
           .replace('group = "dhtnode"', 'group = ""'))
    (etc / "dhtnode" / "config.toml").write_text(cfg)
    argv = shlex.split(settings["ExecStart"][0].replace("%E", str(etc)))
    assert argv[0] == BINARY
    argv = [sys.executable, "-m", "dhtnode", *argv[1:]]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DHTNODE_", "NOTIFY_"))}
    for e in settings["Environment"]:
        k, v = e.split("=", 1)
        env[k] = v.replace("%S/dhtnode", str(state))
    ns, ns_path = _notify_socket(tmp_path)
    env["NOTIFY_SOCKET"] = str(ns_path)
    env["WATCHDOG_USEC"] = "400000"
    log = tmp_path / "log"
    seen: list[str] = []
    with ns, log.open("wb") as f:
        p = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=f)
        try:
            assert _wait_for(ns, "READY=1", 20, seen), (seen, log.read_text())
            assert f"MAINPID={p.pid}" in seen[-1]
            assert _wait_for(ns, "WATCHDOG=1", 2, seen), seen
            assert (state / "identity.key").exists()  # DHTNODE_STATE_DIR from Environment=
            r = subprocess.run([sys.executable, "-m", "dhtnode", "status", "--json",
                                "--control", str(control)],
                               capture_output=True, text=True, timeout=30, env=env)
            assert r.returncode == 0, r.stderr
            assert json.loads(r.stdout)["ok"] is True
            stopping: list[bool] = []
            code, elapsed = sigterm_timed(
                p, timeout=10, during=lambda: stopping.append(_wait_for(ns, "STOPPING=1", 5, seen)))
            assert stopping == [True], seen
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
    print(f"SIGTERM to exit: {elapsed:.2f} s")
    assert code == 0, log.read_text()
    assert elapsed < 5.0
    assert not control.exists()


def test_sdnotify_outside_systemd(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.ready() is False and sdnotify.watchdog_interval() is None
    ns, path = _notify_socket(tmp_path)
    with ns:
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        monkeypatch.setenv("WATCHDOG_USEC", "3000000")
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
        assert sdnotify.watchdog_interval() == 1.5
        monkeypatch.setenv("WATCHDOG_PID", "1")
        assert sdnotify.watchdog_interval() is None  # meant for another process
        assert sdnotify.stopping() is True
        assert ns.recv(100) == b"STOPPING=1"


@pytest.mark.parametrize("path", ["deploy/systemd/config.toml", "deploy/vps/config.toml"])
def test_shipped_configs_load(path: str) -> None:
    from dhtnode.daemon.config import load_config

    cfg = load_config(ROOT / path)
    assert cfg.control_socket_path == Path("/run/dhtnode/control.sock")
    assert cfg.control.group == "dhtnode"
    if "vps" in path:
        assert cfg.node.bootstrap_node and cfg.node.public_host == "203.0.113.7"
        assert cfg.metrics.listen == "127.0.0.1:9464"


def test_sysusers_and_tmpfiles_in_scratch_root(tmp_path: Path) -> None:
    """The sysusers snippet creates user and group dhtnode, the tmpfiles one the state dir
    (0700, the daemon's) and the config dir (0750, group dhtnode), in a scratch --root."""
    sysusers, tmpfiles = shutil.which("systemd-sysusers"), shutil.which("systemd-tmpfiles")
    if sysusers is None or tmpfiles is None:
        pytest.skip("systemd-sysusers / systemd-tmpfiles not installed (apt-get install systemd)")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    for f in ("passwd", "group"):
        shutil.copy(f"/etc/{f}", root / "etc" / f)
    d = ROOT / "deploy" / "systemd"
    subprocess.run([sysusers, f"--root={root}", str(d / "dhtnode.sysusers.conf")],
                   check=True, capture_output=True, timeout=30)
    passwd = (root / "etc/passwd").read_text().splitlines()
    users = {ln.split(":")[0]: ln.split(":") for ln in passwd}
    assert users["dhtnode"][6] == "/usr/sbin/nologin"
    assert any(ln.startswith("dhtnode:") for ln in (root / "etc/group").read_text().splitlines())
    subprocess.run([tmpfiles, f"--root={root}", "--create", str(d / "dhtnode.tmpfiles.conf")],
                   check=True, capture_output=True, timeout=30)
    st = (root / "var/lib/dhtnode").stat()
    assert st.st_mode & 0o777 == 0o700 and st.st_uid == int(users["dhtnode"][2])
    assert (root / "etc/dhtnode").stat().st_mode & 0o777 == 0o750


def test_exec_reload_sends_sighup_without_procps(tmp_path: Path) -> None:
    """ExecReload= needs no /bin/kill (procps, absent on minimal systems and containers: the
    reload failed with 203/EXEC under a real systemd): it is the shell's builtin, and it
    delivers SIGHUP to $MAINPID as systemd substitutes it."""
    (cmd,) = unit_settings()["ExecReload"]
    assert not cmd.startswith(("/bin/kill", "/usr/bin/kill")), cmd
    flag = tmp_path / "hup"
    child = subprocess.Popen([sys.executable, "-c",
                              "import pathlib, signal, sys, time\n"
                              "signal.signal(signal.SIGHUP, lambda *a: (pathlib.Path(sys.argv[1])"
                              ".write_text('x'), sys.exit(0)))\n"
                              "print('ready', flush=True)\n"
                              "time.sleep(30)\n", str(flag)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        argv = shlex.split(cmd.replace("$MAINPID", str(child.pid)))
        subprocess.run(argv, check=True, timeout=10, env={"PATH": "/nonexistent"})
        assert child.wait(timeout=10) == 0 and flag.exists()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_readme_install_block() -> None:
    """The README's install commands, as `make systemd-check` reads and runs them: the
    sysusers.d and tmpfiles.d directories do not exist on a fresh Debian (install -D)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "realcheck", ROOT / "deploy" / "systemd" / "realcheck.py")
    assert spec is not None and spec.loader is not None
    realcheck = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(realcheck)
    cmds = realcheck.readme_commands()
    for d in ("/etc/sysusers.d/", "/etc/tmpfiles.d/"):
        (line,) = [c for c in cmds if d in c]
        assert line.startswith("install -D "), line
    assert any("systemctl enable --now dhtnode" in c for c in cmds)
    assert any("pip install ." in c for c in cmds)
    adapted = [realcheck.adapt(c) for c in cmds]
    assert not any(c.startswith("sudo ") for c in adapted)
