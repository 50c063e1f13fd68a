#!/usr/bin/env python3
"""`make systemd-check`: deploy/systemd/dhtnode.service under a real systemd, installed exactly
as the README says, then torn down.

A container whose PID 1 is systemd (Debian bookworm from debootstrap --variant=minbase with
systemd, python3, venv and dbus; cached as the image local/debian-systemd:bookworm and as a
tarball in the cache dir), privileged for systemd, with no network but loopback
(--network none). dhtnode comes from wheels built on the host. Inside, the shell block of the
README's "Run it as a systemd service" section runs line by line, read from README.md itself,
with two substitutions: `pip install .` becomes `pip install --no-index --find-links /wheels
dhtnode` (no index offline; same package), and `sudo usermod -aG dhtnode $USER` runs as root
with USER=alice. Then:

- `systemctl enable --now` returns with the unit active (Type=notify: READY=1 arrived); the
  main process runs as dhtnode with no capabilities and a seccomp filter; LimitNOFILE; owners
  and modes of /run/dhtnode, the socket, /var/lib/dhtnode, the key, /etc/dhtnode;
- user alice (group dhtnode, fresh login) gets `dhtnode status --json` over
  /run/dhtnode/control.sock; user bob (not in the group) is told to join group dhtnode;
- a bootstrap node on 127.0.0.1 (bob's, outside the unit) goes into the config's bootstrap
  list; `systemctl reload` (SIGHUP) keeps the same main process active and applies it: the
  sandboxed service joins, alice announces through it, bob's lookup finds the record;
- no watchdog kill for 40 s after the start (WatchdogSec=60: a WATCHDOG=1 ping arrives at
  30 s and systemd records it), no restarts;
- `systemctl restart` keeps the identity (same public key from /var/lib/dhtnode);
- `systemctl stop` exits cleanly (status 0, Result=success) within 5 s and removes the socket.

dockerd is started if none answers (the address pools of deploy/swarm/run.py, inside
100.64.0.0/10, no iptables) and stopped again; the container, its cgroups and the wheels are
removed on success, failure and Ctrl-C. The base image and tarball are kept as a cache.

Exit status as deploy/swarm/run.py: 0 passed, 1 failed, 77 the Docker engine cannot run here
(`SKIPPED make systemd-check: <reason>`). SYSTEMD_CHECK_KEEP=1 leaves the container running.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("swarm_run", ROOT / "deploy" / "swarm" / "run.py")
assert _spec is not None and _spec.loader is not None
sw = importlib.util.module_from_spec(_spec)
sys.modules["swarm_run"] = sw
_spec.loader.exec_module(sw)
sw.LOG_PREFIX = "systemd-check"

log, sh, record, Step, DOCKER = sw.log, sw.sh, sw.record, sw.Step, sw.DOCKER
IMAGE = "local/debian-systemd:bookworm"
TARBALL = "debian-systemd-bookworm.tar"
INCLUDE = "systemd,systemd-sysv,dbus,python3,python3-venv,passwd"
NAME = "dhtnode-systemd-check"
LABEL = "org.dhtnode.check=systemd"
SECTION = "## Run it as a systemd service"
CHECKOUT = "/root/dhtnode"  # where the checkout's files land in the container
TOOLS = (("/usr/bin/docker", "docker.io"), ("/usr/sbin/dockerd", "docker.io"),
         ("/usr/sbin/debootstrap", "debootstrap"))
PEER_PORT = 49300
PEER = f"127.0.0.1:{PEER_PORT}"
STOP_LIMIT = 5.0
WATCHDOG_WAIT = 40.0


def readme_commands() -> list[str]:
    """The README's install block, one command per entry (continuation lines joined)."""
    text = (ROOT / "README.md").read_text()
    start = text.index(SECTION)
    m = re.search(r"```sh\n(.*?)```", text[start:], re.S)
    if m is None:
        raise RuntimeError(f"no ```sh block in README section {SECTION!r}")
    cmds, cur = [], ""
    for line in m.group(1).splitlines():
        cur += line
        if cur.endswith("\\"):
            cur = cur[:-1]
            continue
        if cur.strip():
            cmds.append(cur.strip())
        cur = ""
    return cmds


def adapt(cmd: str) -> str:
    if "pip install ." in cmd:
        return cmd.replace("pip install .", "pip install --no-index --find-links /wheels dhtnode")
    if cmd.startswith("sudo "):
        return cmd[len("sudo "):]
    return cmd


def dx(*cmd: str, check: bool = True, timeout: float = 120, user: str | None = None,
       quiet: bool = False, detach: bool = False) -> subprocess.CompletedProcess[str]:
    """A command in the container: as root, or as ``user`` through a login (runuser -l, so
    the user's groups are read afresh, as after logging in again)."""
    if user is not None:
        cmd = ("runuser", "-l", user, "-c", shlex.join(cmd))
    return sh(DOCKER, "exec", *(["-d"] if detach else []), "-w", CHECKOUT, NAME, *cmd,
              check=check, timeout=timeout, quiet=quiet)


def show(*props: str) -> dict[str, str]:
    out = dx("systemctl", "show", "dhtnode", *[f"--property={p}" for p in props],
             quiet=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def journal(since_cursor: str | None = None, lines: int = 40) -> str:
    args = ["journalctl", "-u", "dhtnode", "--no-pager", "-o", "cat"]
    args += ["--after-cursor", since_cursor] if since_cursor else ["-n", str(lines)]
    return dx(*args, check=False, quiet=True).stdout


def cursor() -> str:
    out = dx("journalctl", "-u", "dhtnode", "-n", "0", "--show-cursor", "--no-pager",
             check=False, quiet=True).stdout
    m = re.search(r"-- cursor: (\S+)", out)
    return m.group(1) if m else ""


def status_json(user: str = "alice") -> dict[str, object]:
    r = dx("dhtnode", "status", "--json", user=user, check=False, timeout=30)
    if r.returncode != 0:
        raise RuntimeError(f"dhtnode status as {user}: rc {r.returncode}: {r.stderr.strip()}")
    out: dict[str, object] = json.loads(r.stdout)
    return out


# --------------------------------------------------------------------------- setup


def host_caps() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapBnd:"):
            return int(line.split()[1], 16)
    return 0


CAP_SYS_RESOURCE = 24


def privileges() -> list[str]:
    """--privileged asks for every capability; where root itself lacks some (a VM sandbox
    without CAP_SYS_RESOURCE: runc fails "unable to apply caps"), all it has instead, with
    seccomp and AppArmor off and all devices, as --privileged would."""
    last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    have = host_caps()
    if all(have >> i & 1 for i in range(last + 1)):
        return ["--privileged"]
    names = {24: "SYS_RESOURCE", 25: "SYS_TIME", 16: "SYS_MODULE", 38: "PERFMON", 39: "BPF",
             40: "CHECKPOINT_RESTORE", 21: "SYS_ADMIN", 17: "SYS_RAWIO"}
    missing = [i for i in range(last + 1) if not have >> i & 1]
    log(f"root here lacks capabilities {missing}: not --privileged but all the others")
    drops = [a for i in missing for a in ("--cap-drop", names.get(i, str(i)))]
    return ["--cap-add", "ALL", *drops, "--security-opt", "seccomp=unconfined",
            "--security-opt", "apparmor=unconfined", "--device-cgroup-rule", "a *:* rwm"]


def start_container(wheels: Path) -> None:
    sh(DOCKER, "rm", "-f", "-v", NAME, check=False, quiet=True)
    sh(DOCKER, "run", "-d", "--name", NAME, "--label", LABEL, "--hostname", "dhtnode-check",
       *privileges(), "--cgroupns=host", "-v", "/sys/fs/cgroup:/sys/fs/cgroup:rw",
       "--tmpfs", "/run", "--tmpfs", "/run/lock", "--tmpfs", "/tmp",
       "--network", "none", "-e", "container=docker", "--stop-signal", "SIGRTMIN+3",
       IMAGE, "/sbin/init")
    t = time.monotonic()
    # Right after `docker run`, systemctl may not reach systemd yet: ask again.
    while True:
        r = sh(DOCKER, "exec", NAME, "systemctl", "is-system-running", "--wait", check=False,
               timeout=120, quiet=True)
        state = r.stdout.strip()
        if state in ("running", "degraded") or time.monotonic() - t > 90:
            break
        time.sleep(0.5)
    if state not in ("running", "degraded"):
        logs = sh(DOCKER, "logs", "--tail", "30", NAME, check=False, quiet=True)
        raise RuntimeError(f"systemd in the container: {state!r}\n{logs.stdout}{logs.stderr}")
    failed = sh(DOCKER, "exec", NAME, "systemctl", "--failed", "--no-legend", "--plain",
                check=False, quiet=True).stdout.strip()
    ver = sh(DOCKER, "exec", NAME, "systemctl", "--version", quiet=True).stdout.split("\n")[0]
    log(f"{ver}: system {state} after {time.monotonic() - t:.1f} s"
        + (f"; failed units (not ours): {failed}" if failed else ""))
    # The checkout's files the README's commands use, and the wheels.
    with tempfile.TemporaryDirectory(prefix="systemd-check-") as tmp:
        co = Path(tmp) / "dhtnode"
        shutil.copytree(ROOT / "deploy" / "systemd", co / "deploy" / "systemd",
                        ignore=shutil.ignore_patterns("__pycache__", "*.py"))
        shutil.copy2(ROOT / "README.md", co)
        sh(DOCKER, "cp", str(co), f"{NAME}:{CHECKOUT}")
    sh(DOCKER, "cp", str(wheels), f"{NAME}:/wheels")
    for user in ("alice", "bob"):
        dx("useradd", "--create-home", "--shell", "/bin/sh", user)


def readme_install() -> None:
    cmds = readme_commands()
    if not any("pip install ." in c for c in cmds):
        raise RuntimeError("README install block has no `pip install .` line to run offline")
    for cmd in cmds:
        run = adapt(cmd)
        t = time.monotonic()
        r = sh(DOCKER, "exec", "-w", CHECKOUT, "-e", "USER=alice", NAME, "sh", "-ec", run,
               check=False, timeout=300)
        ok = r.returncode == 0
        record(f"README: {cmd}", ok, f"rc {r.returncode} in {time.monotonic() - t:.1f} s"
               + ("" if run == cmd else f" (ran: {run})")
               + ("" if ok else f"; stdout: {r.stdout.strip()[-800:]} stderr: "
                  f"{r.stderr.strip()[-1500:]}"))
        if not ok:
            log("journal:\n" + journal())
            raise RuntimeError(f"README command failed: {cmd}")


# --------------------------------------------------------------------------- checks


def check_started(t_start: float) -> dict[str, str]:
    p = show("ActiveState", "SubState", "Type", "MainPID", "NRestarts", "StatusText",
             "WatchdogUSec", "WatchdogTimestampMonotonic", "User")
    ok = p.get("ActiveState") == "active" and p.get("SubState") == "running"
    record("enable --now: active (READY=1 arrived)", ok,
           f"{json.dumps(p)}; {time.monotonic() - t_start:.1f} s after the README's commands "
           "began")
    if not ok:
        log("journal:\n" + journal())
        raise RuntimeError("dhtnode.service is not active")
    proc = dx("grep", "-E", "^(Uid|Gid|Groups|CapEff|NoNewPrivs|Seccomp):",
              f"/proc/{p['MainPID']}/status", check=False, quiet=True).stdout
    ids = dx("id", "-u", "dhtnode", check=False, quiet=True).stdout.strip()
    fields = dict(ln.split(":", 1) for ln in proc.splitlines())
    uid_ok = fields.get("Uid", "").split()[:1] == [ids] and ids not in ("", "0")
    record("main process runs as user dhtnode, no capabilities, seccomp on",
           uid_ok and fields.get("CapEff", "").strip() == "0000000000000000"
           and fields.get("Seccomp", "").strip() == "2",
           f"uid of dhtnode {ids}; " + "; ".join(" ".join(ln.split()) for ln in proc.splitlines()))
    lim = dx("grep", "Max open files", f"/proc/{p['MainPID']}/limits", check=False,
             quiet=True).stdout.split()
    want, note = 65536, ""
    if not host_caps() >> CAP_SYS_RESOURCE & 1:
        # Without CAP_SYS_RESOURCE systemd cannot raise a hard limit: it applies the closest
        # value it may, its own hard limit (inherited from this host's root).
        init = dx("grep", "Max open files", "/proc/1/limits", quiet=True).stdout.split()
        want = min(want, int(init[4]))
        note = (f" (root here lacks CAP_SYS_RESOURCE: systemd's own hard limit {init[4]} caps "
                "it; a real host applies 65536)")
    record("LimitNOFILE applied", lim[3:5] == [str(want), str(want)],
           " ".join(lim) + f", want {want}{note}")
    st = dx("stat", "-c", "%A %U:%G %n", "/run/dhtnode", "/run/dhtnode/control.sock",
            "/var/lib/dhtnode", "/var/lib/dhtnode/identity.key", "/etc/dhtnode",
            "/etc/dhtnode/config.toml", check=False, quiet=True)
    modes = ["drwxr-xr-x dhtnode:dhtnode /run/dhtnode",
            "srw-rw---- dhtnode:dhtnode /run/dhtnode/control.sock",
            "drwx------ dhtnode:dhtnode /var/lib/dhtnode",
            "-rw------- dhtnode:dhtnode /var/lib/dhtnode/identity.key",
            "drwxr-x--- root:dhtnode /etc/dhtnode",
            "-rw-r----- root:dhtnode /etc/dhtnode/config.toml"]
    got = st.stdout.strip().splitlines()
    sec = dx("systemd-analyze", "security", "--no-pager", "dhtnode", check=False,
             quiet=True).stdout
    score = [ln for ln in sec.splitlines() if "Overall exposure level" in ln]
    level = float(score[0].split(":")[1].split()[0]) if score else 99.0
    record("systemd-analyze security of the running unit <= 2.0", level <= 2.0,
           " ".join(score[0].split()[-3:]) if score else sec[-300:])
    record("files and modes", got == modes, "; ".join(got) + (st.stderr.strip() or ""))
    return p


def check_status_users() -> dict[str, object]:
    st = status_json("alice")
    summary = {k: st.get(k) for k in ("ok", "public_key", "bind_address", "server")}
    record("alice (group dhtnode): dhtnode status --json", st.get("ok") is True,
           json.dumps(summary))
    r = dx("dhtnode", "status", user="bob", check=False, timeout=30)
    msg = (r.stderr + r.stdout).strip()
    record("bob (not in group dhtnode): told to join the group",
           r.returncode != 0 and "add yourself to group dhtnode" in msg,
           f"rc {r.returncode}: {msg[-400:]}")
    return st


def start_peer() -> None:
    """A bootstrap node on loopback in the container (as bob, outside the unit): the service
    gets it by `systemctl reload`, so the sandboxed daemon does real DHT traffic."""
    dx("runuser", "-u", "bob", "--", "sh", "-c",
       f"exec dhtnode run --bootstrap-node --host 127.0.0.1 --port {PEER_PORT} "
       "--state-dir /tmp/peer --log-format json >/tmp/peer.log 2>&1", detach=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        r = dx("dhtnode", "status", "--json", "--state-dir", "/tmp/peer", user="bob",
               check=False, quiet=True)
        if r.returncode == 0:
            return
        time.sleep(0.5)
    raise RuntimeError("the loopback bootstrap node did not start: "
                       + dx("cat", "/tmp/peer.log", check=False).stdout[-800:])


def check_reload(pid: str) -> None:
    start_peer()
    # The operator's edit: the bootstrap list, which a reload applies at once.
    dx("sed", "-i", f's/^bootstrap = \\[\\]/bootstrap = ["{PEER}"]/',
       "/etc/dhtnode/config.toml")
    cfg = dx("grep", "^bootstrap", "/etc/dhtnode/config.toml", quiet=True).stdout.strip()
    if PEER not in cfg:
        raise RuntimeError(f"could not set the bootstrap list: {cfg!r}")
    cur = cursor()
    t = time.monotonic()
    r = dx("systemctl", "reload", "dhtnode", check=False, timeout=60)
    dt = time.monotonic() - t
    time.sleep(1.5)
    p = show("ActiveState", "SubState", "MainPID", "NRestarts")
    logged = journal(cur)
    reloaded = any('"reloaded"' in ln and "node.bootstrap" in ln for ln in logged.splitlines())
    ok = (r.returncode == 0 and p.get("ActiveState") == "active" and p.get("MainPID") == pid
          and reloaded)
    record("systemctl reload (SIGHUP): same process, still active, new bootstrap applied", ok,
           f"rc {r.returncode} in {dt:.1f} s, {json.dumps(p)}; journal: "
           f"{logged.strip()[-600:]}{r.stderr.strip()}")
    deadline = time.monotonic() + 30
    while True:
        st = status_json("alice")
        size = int(st.get("routing_table_size") or 0)  # type: ignore[call-overload]
        if size > 0 or time.monotonic() > deadline:
            break
        time.sleep(1)
    record("after reload: joined the DHT through the new bootstrap node", size > 0,
           f"routing_table_size {size}")
    topic = f"systemd-check-{os.getpid()}"
    r = dx("dhtnode", "announce", "--via-daemon", "--topic-name", topic, "--json", user="alice",
           check=False, timeout=60)
    record("alice: announce --via-daemon through the service", r.returncode == 0,
           (r.stdout or r.stderr).strip()[-300:])
    r = dx("dhtnode", "lookup", "--topic-name", topic, "--json", "--bootstrap", PEER,
           user="bob", check=False, timeout=60)
    found = str(st.get("public_key")) in r.stdout
    record("bob: lookup finds the service's record", r.returncode == 0 and found,
           f"rc {r.returncode}: {(r.stdout or r.stderr).strip()[-300:]}")


def check_watchdog(pid: str, started: float, wd0: str) -> None:
    left = WATCHDOG_WAIT - (time.monotonic() - started)
    if left > 0:
        log(f"waiting {left:.0f} s (watchdog: WatchdogSec=60, a ping every 30 s)")
        time.sleep(left)
    p = show("ActiveState", "MainPID", "NRestarts", "WatchdogUSec",
             "WatchdogTimestampMonotonic", "ActiveEnterTimestampMonotonic")
    pinged = int(p.get("WatchdogTimestampMonotonic", "0") or 0) > int(wd0 or 0)
    ok = (p.get("ActiveState") == "active" and p.get("MainPID") == pid
          and p.get("NRestarts") == "0" and pinged)
    since = (int(p["WatchdogTimestampMonotonic"]) - int(p["ActiveEnterTimestampMonotonic"])) / 1e6
    record(f"watchdog: alive and not restarted {time.monotonic() - started:.0f} s after start",
           ok, f"{json.dumps(p)}; last WATCHDOG=1 {since:.1f} s after active "
           f"({'received' if pinged else 'NONE received'})")


def check_restart_keeps_identity(key: object, pid: str) -> None:
    t = time.monotonic()
    r = dx("systemctl", "restart", "dhtnode", check=False, timeout=60)
    dt = time.monotonic() - t
    p = show("ActiveState", "MainPID", "NRestarts")
    st = status_json("alice")
    ok = (r.returncode == 0 and p.get("ActiveState") == "active" and p.get("MainPID") != pid
          and st.get("public_key") == key)
    record("systemctl restart keeps the identity key", ok,
           f"rc {r.returncode} in {dt:.1f} s; pid {pid} -> {p.get('MainPID')}; key "
           f"{str(key)[:16]}... -> {str(st.get('public_key'))[:16]}...")


def check_stop() -> None:
    cur = cursor()
    t = time.monotonic()
    r = dx("systemctl", "stop", "dhtnode", check=False, timeout=60)
    dt = time.monotonic() - t
    p = show("ActiveState", "Result", "ExecMainCode", "ExecMainStatus")
    gone = dx("test", "-e", "/run/dhtnode/control.sock", check=False, quiet=True).returncode
    logged = journal(cur)
    ok = (r.returncode == 0 and dt < STOP_LIMIT and p.get("ActiveState") == "inactive"
          and p.get("Result") == "success" and p.get("ExecMainStatus") == "0")
    record(f"systemctl stop: clean exit within {STOP_LIMIT:.0f} s", ok,
           f"{dt:.2f} s, {json.dumps(p)}, socket {'removed' if gone else 'STILL THERE'}; "
           f"journal: {logged.strip()[-500:]}")


def check_journal_clean() -> None:
    bad = []
    text = journal(lines=1000)
    log("journal of dhtnode.service, systemd's own lines:\n  " + "\n  ".join(
        ln for ln in text.splitlines() if not ln.startswith("{")))
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                level = json.loads(line).get("level")
            except json.JSONDecodeError:
                continue
            if level in ("error", "critical"):
                bad.append(line)
        elif re.search(r"(?i)traceback|permission denied|operation not permitted|"
                       r"bad system call|watchdog timeout|core-dump", line):
            bad.append(line)
    record("journal: no errors, tracebacks or denials", not bad, "; ".join(bad)[-800:] or
           "clean")


# --------------------------------------------------------------------------- teardown


def remove_cgroups(cid: str) -> list[str]:
    """With --cgroupns=host, systemd in the container made cgroups below docker/<id>: remove
    what the runtime left (deepest first)."""
    left = []
    for top in Path("/sys/fs/cgroup").iterdir():
        d = top / "docker" / cid
        if not d.is_dir():
            continue
        for sub, _dirs, _files in sorted(os.walk(d), key=lambda w: -len(w[0])):
            try:
                os.rmdir(sub)
            except OSError:
                left.append(sub)
    return left


def teardown(dockerd: sw.Dockerd, wheels: Path) -> None:
    with Step("teardown"):
        shutil.rmtree(wheels, ignore_errors=True)
        if Path(DOCKER).exists() and sw.docker_up():
            if os.environ.get("SYSTEMD_CHECK_KEEP") == "1":
                log(f"SYSTEMD_CHECK_KEEP=1: leaving {NAME} (and dockerd) running")
                return
            ids = sh(DOCKER, "ps", "-aq", "--no-trunc", "--filter", f"label={LABEL}",
                     quiet=True, check=False).stdout.split()
            if ids:
                sh(DOCKER, "rm", "-f", "-v", *ids, check=False)
            for cid in ids:
                left = remove_cgroups(cid)
                if left:
                    log(f"cgroups left behind: {left}")
        dockerd.stop()


def main() -> int:
    if os.geteuid() != 0:  # before anything is made (run_checks says the same)
        print("make systemd-check needs root (dockerd, debootstrap)", file=sys.stderr)
        return 2
    dockerd = sw.Dockerd()
    sw.CACHE.mkdir(parents=True, exist_ok=True)
    wheels = Path(tempfile.mkdtemp(prefix="systemd-check-wheels-", dir=sw.CACHE))

    def steps() -> None:
        with Step("install docker.io, debootstrap (if missing)"):
            sw.install_tools(TOOLS)
        with Step("dockerd"):
            dockerd.start()
        with Step(f"base image {IMAGE}"):
            sw.base_image(IMAGE, TARBALL, INCLUDE)
            size = sh(DOCKER, "image", "inspect", "-f", "{{.Size}}", IMAGE, quiet=True).stdout
            log(f"{IMAGE}: {int(size) / 1e6:.0f} MB")
        with Step("wheels"):
            sw.build_wheels(wheels)
        with Step("container with systemd as PID 1"):
            start_container(wheels)
        with Step("the README's install commands"):
            t_start = time.monotonic()
            readme_install()
        started = time.monotonic()
        with Step("started: state, files, status as group member and non-member"):
            p = check_started(t_start)
            pid, wd0 = p["MainPID"], p.get("WatchdogTimestampMonotonic", "0")
            key = check_status_users().get("public_key")
        with Step("reload"):
            check_reload(pid)
        with Step("watchdog"):
            check_watchdog(pid, started, wd0)
        with Step("restart"):
            check_restart_keeps_identity(key, pid)
        with Step("stop"):
            check_stop()
        check_journal_clean()

    return int(sw.run_checks("systemd-check", steps, lambda: teardown(dockerd, wheels)))


if __name__ == "__main__":
    sys.exit(main())
