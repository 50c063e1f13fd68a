#!/usr/bin/env python3
"""`make swarm`: build the dhtnode image offline and test a real Docker swarm, then tear down.

Steps (each timed): install docker.io, docker-compose and debootstrap if missing; start
dockerd if none answers (address pools inside 100.64.0.0/10, no iptables, own pid file); the
base image local/debian-py:bookworm from Debian packages (debootstrap, cached as an image and
as a tarball in the cache dir); wheels built on the host; `docker build --network none`;
`docker-compose up`; checks from outside; `docker-compose down -v`; dockerd stopped if this
script started it. Teardown runs on failure and on Ctrl-C too.

Environment: SWARM_PUB, SWARM_A, SWARM_B, SWARM_C (nodes per service, default 4, 3, 3, 2),
SWARM_CACHE (default /var/cache/dhtnode-swarm), SWARM_KEEP=1 (leave the swarm running),
SWARM_APT=0 (do not run apt-get: the caller already tried, as .ci/run does).

Exit status: 0 all checks passed; 1 a step or check failed; 77 (EXIT_SKIPPED) the Docker
engine cannot run on this machine at all (docker.io cannot be installed, or dockerd does not
come up): a line `SKIPPED make swarm: <reason>` is printed and nothing was tested.
deploy/systemd/realcheck.py (`make systemd-check`) reuses the helpers here, with the same
exit statuses.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
HERE = ROOT / "deploy" / "swarm"
COMPOSE_FILE = HERE / "docker-compose.yml"
PROJECT = "dhtswarm"
BASE_IMAGE = "local/debian-py:bookworm"
IMAGE = "dhtnode:swarm"
CACHE = Path(os.environ.get("SWARM_CACHE", "/var/cache/dhtnode-swarm"))
DOCKER = "/usr/bin/docker"  # Debian's CLI (20.10): classic builder, matches the daemon
BOOT = "203.0.113.11:49200"
BOOTS = ["--bootstrap", BOOT, "--bootstrap", "203.0.113.12:49200"]
SCALE = {
    "node-pub": int(os.environ.get("SWARM_PUB", "4")),
    "node-a": int(os.environ.get("SWARM_A", "3")),
    "node-b": int(os.environ.get("SWARM_B", "3")),
    "node-c": int(os.environ.get("SWARM_C", "2")),
}
DOCKERD_ARGS = [
    "--iptables=false", "--ip-forward=false", "--ip-masq=false",
    "--bip", "100.127.250.1/24",
    "--default-address-pool", "base=100.126.0.0/16,size=24",
]

#: Exit status when the Docker engine cannot run here at all (automake's "skipped").
EXIT_SKIPPED = 77
LOG_PREFIX = "swarm"

T0 = time.monotonic()
timings: list[tuple[str, float]] = []
results: list[tuple[str, bool, str]] = []


def log(msg: str) -> None:
    print(f"[{LOG_PREFIX} {time.monotonic() - T0:6.1f}s] {msg}", flush=True)


def sh(*cmd: str, check: bool = True, timeout: float = 900, quiet: bool = False,
       env: dict[str, str] | None = None,
       input: str | None = None) -> subprocess.CompletedProcess[str]:
    if not quiet:
        log("$ " + " ".join(cmd))
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                         input=input)
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {out.returncode}:\n{out.stdout[-3000:]}\n"
                           f"{out.stderr[-3000:]}")
    return out


class Step:
    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> None:
        self.t = time.monotonic()
        log(f"== {self.name}")

    def __exit__(self, *exc: object) -> None:
        dt = time.monotonic() - self.t
        timings.append((self.name, dt))
        log(f"== {self.name}: {dt:.1f} s")


def compose(*args: str, check: bool = True,
            timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, DHTNODE_IMAGE=IMAGE, COMPOSE_HTTP_TIMEOUT="300")
    return sh("docker-compose", "-f", str(COMPOSE_FILE), "-p", PROJECT, *args, check=check,
              timeout=timeout, env=env)


# --------------------------------------------------------------------------- setup


class Skip(Exception):
    """The Docker engine cannot run on this machine: the check is skipped, not failed."""


TOOLS = (("/usr/bin/docker", "docker.io"), ("/usr/sbin/dockerd", "docker.io"),
         ("/usr/bin/docker-compose", "docker-compose"), ("/usr/sbin/debootstrap", "debootstrap"))


def install_tools(tools: tuple[tuple[str, str], ...] = TOOLS) -> None:
    """apt-get install what is missing (one `apt-get update`). docker.io that cannot be
    installed raises Skip; any other package that cannot be installed is a failure."""
    need = sorted({pkg for tool, pkg in tools if not Path(tool).exists()})
    if need and os.environ.get("SWARM_APT", "1") != "0" and shutil.which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        up = sh("apt-get", "update", "-q", env=env, check=False, timeout=600)
        if up.returncode != 0:
            log(f"apt-get update failed: {up.stderr.strip()[-500:]}")
        # No service starts during the install (policy-rc.d, exit 101): on a machine with
        # systemd, docker.io would start the system dockerd with Docker's defaults
        # (172.17.0.0/16, iptables rules). Ours starts below, with its own address pools.
        policy = Path("/usr/sbin/policy-rc.d")
        ours = not policy.exists()
        if ours:
            policy.write_text("#!/bin/sh\n# dhtnode make swarm: no service starts\nexit 101\n")
            policy.chmod(0o755)
        try:
            sh("apt-get", "install", "-y", "-q", "--no-install-recommends", *need, env=env,
               check=False, timeout=900)
        finally:
            if ours:
                policy.unlink(missing_ok=True)
    missing = sorted({pkg for tool, pkg in tools if not Path(tool).exists()})
    if "docker.io" in missing:
        raise Skip("docker.io is not installed and apt-get could not install it")
    if missing:
        raise RuntimeError(f"could not install {' '.join(missing)}")


def docker_up() -> bool:
    if not Path(DOCKER).exists():
        return False
    return sh(DOCKER, "info", "--format", "{{.ServerVersion}}", check=False, quiet=True,
              timeout=20).returncode == 0


class Dockerd:
    """Starts dockerd only if none answers; stops only the one it started (by its pid)."""

    pidfile = Path("/run/dhtnode-swarm-dockerd.pid")

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.forward_policy_changed = False
        self.had_docker0 = True

    def start(self) -> None:
        if docker_up():
            log("dockerd already running: using it (and leaving it running)")
            return
        CACHE.mkdir(parents=True, exist_ok=True)
        self.had_docker0 = Path("/sys/class/net/docker0").exists()
        logf = open(CACHE / "dockerd.log", "wb")  # noqa: SIM115  (this run's log only)
        self.proc = subprocess.Popen(["dockerd", "--pidfile", str(self.pidfile), *DOCKERD_ARGS],
                                     stdout=logf, stderr=logf, start_new_session=True)
        log(f"started dockerd pid {self.proc.pid} (log {CACHE / 'dockerd.log'})")
        deadline = time.monotonic() + 60
        while not docker_up():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                if self.proc.poll() is None:
                    self.proc.kill()
                self.proc.wait()
                self.proc = None
                tail = (CACHE / "dockerd.log").read_text(errors="replace").strip()
                lines = tail.splitlines()[-5:] or ["(empty log)"]
                log("dockerd.log ends:\n  " + "\n  ".join(lines))
                raise Skip(f"dockerd did not come up ({CACHE / 'dockerd.log'}: {lines[-1]})")
            time.sleep(0.5)
        # Bridged frames pass the host's iptables FORWARD chain (br_netfilter): it must accept.
        if shutil.which("iptables"):
            pol = sh("iptables", "-S", "FORWARD", check=False, quiet=True).stdout
            if "-P FORWARD DROP" in pol:
                log("host FORWARD policy is DROP (left by another dockerd?): ACCEPT while we run")
                sh("iptables", "-P", "FORWARD", "ACCEPT")
                self.forward_policy_changed = True

    def stop(self) -> None:
        if self.forward_policy_changed:
            sh("iptables", "-P", "FORWARD", "DROP", check=False)
        if self.proc is None:
            return
        log(f"stopping dockerd pid {self.proc.pid}")
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
        # dockerd leaves its default bridge (with the --bip address) behind on exit.
        if not self.had_docker0 and Path("/sys/class/net/docker0").exists():
            sh("ip", "link", "delete", "docker0", check=False)


def base_image(image: str = BASE_IMAGE, tar_name: str = "debian-py-bookworm.tar",
               include: str = "python3,python3-venv,nftables,iproute2") -> None:
    """``image`` from Debian packages: debootstrap --variant=minbase --include=``include``,
    cached as a tarball in the cache dir and imported with `docker import`."""
    if sh(DOCKER, "image", "inspect", image, check=False, quiet=True).returncode == 0:
        log(f"{image}: cached")
        return
    tarball = CACHE / tar_name
    if not tarball.exists():
        with tempfile.TemporaryDirectory(prefix="swarm-rootfs-", dir=CACHE) as tmp:
            rootfs = Path(tmp) / "rootfs"
            sh("debootstrap", "--variant=minbase", f"--include={include}",
               "bookworm", str(rootfs), "http://deb.debian.org/debian", timeout=1800)
            sh("rm", "-rf", *[str(p) for p in (rootfs / "var/cache/apt/archives").glob("*.deb")],
               str(rootfs / "var/lib/apt/lists"), check=False, quiet=True)
            sh("tar", "-C", str(rootfs), "-cf", str(tarball) + ".part", ".")
            os.replace(str(tarball) + ".part", tarball)
    with open(tarball, "rb") as f:
        log(f"$ docker import {tarball} {image}")
        subprocess.run([DOCKER, "import", "-", image], stdin=f, check=True,
                       capture_output=True, timeout=600)


def build_wheels(dest: Path) -> None:
    """dhtnode and its dependencies as wheels in ``dest`` (pip on the host, with network)."""
    dest.mkdir(parents=True, exist_ok=True)
    # Wheels from a copy of the source, so no build/ directory lands in the checkout.
    with tempfile.TemporaryDirectory(prefix="swarm-src-") as src:
        for name in ("pyproject.toml", "README.md", "LICENSE"):
            shutil.copy2(ROOT / name, src)
        shutil.copytree(ROOT / "dhtnode", Path(src) / "dhtnode",
                        ignore=shutil.ignore_patterns("__pycache__"))
        py = ROOT / ".venv" / "bin" / "python"
        sh(str(py if py.exists() else sys.executable), "-m", "pip", "wheel", "-q",
           "--disable-pip-version-check", src, "-w", str(dest))


def build_image() -> None:
    ctx = CACHE / "context"
    shutil.rmtree(ctx, ignore_errors=True)
    (ctx / "deploy" / "swarm").mkdir(parents=True)
    build_wheels(ctx / "wheels")
    for name in ("Dockerfile", ".dockerignore"):
        shutil.copy2(ROOT / name, ctx)
    shutil.copy2(HERE / "docker-entrypoint.sh", ctx / "deploy" / "swarm")
    old = sh(DOCKER, "image", "inspect", "-f", "{{.Id}}", IMAGE, check=False, quiet=True)
    env = dict(os.environ, DOCKER_BUILDKIT="0")
    sh(DOCKER, "build", "-q", "--network", "none", "--build-arg", f"BASE={BASE_IMAGE}",
       "-t", IMAGE, str(ctx), env=env)
    new = sh(DOCKER, "image", "inspect", "-f", "{{.Id}} {{.Size}}", IMAGE, quiet=True).stdout
    log(f"{IMAGE}: {new.split()[0][:19]}, {int(new.split()[1]) / 1e6:.0f} MB")
    if old.returncode == 0 and old.stdout.strip() != new.split()[0]:
        sh(DOCKER, "rmi", old.stdout.strip(), check=False, quiet=True)
    # The classic builder keeps the build stage as an untagged image: drop it (and older ones).
    sh(DOCKER, "image", "prune", "-f", "--filter", "label=org.dhtnode.stage=build",
       check=False, quiet=True)


# --------------------------------------------------------------------------- checks


def containers(service: str | None = None) -> list[str]:
    args = [DOCKER, "ps", "-a", "--filter", f"label=com.docker.compose.project={PROJECT}",
            "--format", "{{.Names}}"]
    if service:
        args[3:3] = ["--filter", f"label=com.docker.compose.service={service}"]
    return sorted(sh(*args, quiet=True).stdout.split())


def dexec(name: str, *cmd: str, timeout: float = 90, check: bool = True,
          detach: bool = False) -> subprocess.CompletedProcess[str]:
    return sh(DOCKER, "exec", *(["-d"] if detach else []), "-u", "dhtnode", name, *cmd,
              timeout=timeout, check=check)


def json_lines(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def record(name: str, ok: bool, detail: str) -> None:
    results.append((name, ok, detail))
    log(f"CHECK {'PASS' if ok else 'FAIL'} {name}: {detail}")


def wait_healthy() -> None:
    names = containers()
    # 2 cores start 18 containers in about 15 s and 38 in about 160 s.
    deadline = time.monotonic() + 120 + 5 * len(names)
    while True:
        states = {}
        for n in names:
            st = sh(DOCKER, "inspect", "-f", "{{.State.Status}} {{if .State.Health}}"
                    "{{.State.Health.Status}}{{end}}", n, quiet=True).stdout.split()
            states[n] = st
        bad = {n: s for n, s in states.items() if s[:2] != ["running", "healthy"]}
        if not bad:
            record("all containers healthy", True, f"{len(names)} containers running and healthy")
            return
        if time.monotonic() > deadline or any(s[0] != "running" for s in bad.values()):
            for n in bad:
                logs = sh(DOCKER, "logs", "--tail", "15", n, check=False, quiet=True)
                log(f"--- {n} {bad[n]}\n{logs.stdout}{logs.stderr}")
            record("all containers healthy", False, f"not healthy: {bad}")
            raise RuntimeError("containers not healthy")
        time.sleep(1)


def status(name: str) -> dict[str, Any]:
    st: dict[str, Any] = json.loads(dexec(name, "dhtnode", "status", "--json", timeout=20).stdout)
    return st


def check_nat_status() -> None:
    expect = {"node-a": "consistent", "node-b": "random", "node-c": "consistent"}
    for service, want in expect.items():
        name = containers(service)[0]
        deadline = time.monotonic() + 90
        while True:
            st = status(name)
            got, client = st.get("nat_class"), not st.get("server")
            if (got == want and client) or time.monotonic() > deadline:
                break
            time.sleep(2)
        summary = {k: st.get(k) for k in ("server", "node_id", "nat_class", "reachable",
                                          "public_address", "bind_address",
                                          "routing_table_size")}
        record(f"status of {name} (behind {service.replace('node', 'nat')})",
               got == want and client, f"want client/{want}: {json.dumps(summary)}")


def check_open_status() -> None:
    name = containers("node-pub")[0]
    deadline = time.monotonic() + 90
    while True:
        st = status(name)
        if st.get("server") or time.monotonic() > deadline:
            break
        time.sleep(2)
    summary = {k: st.get(k) for k in ("server", "reachable", "public_address", "nat_class",
                                      "routing_table_size")}
    record(f"status of {name} (open)", bool(st.get("server")), f"want serving: {summary}")


def check_announce_lookup() -> None:
    topic = f"swarm-check-{os.getpid()}-{int(time.time())}"
    announcer = containers("node-a")[0]
    key = status(announcer)["public_key"]
    res = dexec(announcer, "dhtnode", "announce", "--via-daemon", "--topic-name", topic,
                "--json", check=False)
    record(f"announce --via-daemon in {announcer}", res.returncode == 0,
           (res.stdout or res.stderr).strip()[-300:])
    for looker, extra in ((containers("node-c")[0], BOOTS), (containers("node-pub")[-1],
                                                             ["--via-daemon"])):
        deadline = time.monotonic() + 30
        while True:
            out = dexec(looker, "dhtnode", "lookup", "--topic-name", topic, "--json", *extra,
                        check=False)
            keys = [r.get("public_key") for r in json_lines(out.stdout)]
            if key in keys or time.monotonic() > deadline:
                break
            time.sleep(2)
        record(f"lookup {' '.join(extra)} in {looker}", key in keys,
               f"found {len(keys)} record(s), announcer key {key[:16]}... "
               f"{'present' if key in keys else 'MISSING'}; stdout: {out.stdout.strip()[:400]}"
               f"{'' if key in keys else ' stderr: ' + out.stderr.strip()[-400:]}")


def check_connect() -> None:
    listener = containers("node-a")[-1]
    dexec(listener, "sh", "-c", "exec dhtnode listen --echo --json --key-file /tmp/listen.key "
          f"--bootstrap {BOOT} >/tmp/listen.out 2>/tmp/listen.err", detach=True)
    key = ""
    deadline = time.monotonic() + 30
    while not key and time.monotonic() < deadline:
        time.sleep(1)
        out = dexec(listener, "cat", "/tmp/listen.out", check=False, timeout=10).stdout
        key = next((r["public_key"] for r in json_lines(out) if r.get("listening")), "")
    if not key:
        err = dexec(listener, "cat", "/tmp/listen.err", check=False).stdout
        record(f"listen --echo in {listener}", False, f"no key printed; stderr: {err[-500:]}")
        return
    record(f"listen --echo in {listener} (behind nat-a, port-restricted)", True, key)
    pairs = [(containers("node-c")[0], "nat-c port-restricted", True),
             (containers("node-b")[0], "nat-b symmetric", False)]  # reported, not required
    for pinger, where, required in pairs:
        t = time.monotonic()
        res = dexec(pinger, "timeout", "90", "dhtnode", "ping", key, "--json", *BOOTS,
                    check=False, timeout=120)
        rows = json_lines(res.stdout)
        ok = res.returncode == 0 and bool(rows) and rows[-1].get("ok") is True
        record(f"ping KEY from {pinger} (behind {where}) to {listener}",
               ok or not required,
               f"{time.monotonic() - t:.1f} s, rc {res.returncode}: {res.stdout.strip()[:400]}"
               f"{'' if ok else ' stderr: ' + res.stderr.strip()[-600:]}")


def check_no_default_route_to_host() -> None:
    bad = []
    for name in containers():
        routes = sh(DOCKER, "exec", name, "ip", "-4", "route", quiet=True).stdout
        for line in routes.splitlines():
            if line.startswith("default") and not line.split()[2].endswith(".254"):
                # LAN nodes go through their router; nobody else has a default route.
                bad.append(f"{name}: {line}")
    record("no container routes towards the host", not bad, "; ".join(bad) or
           "default routes only via the NAT routers (.254); routers and internet nodes have none")


# --------------------------------------------------------------------------- main


def teardown(dockerd: Dockerd) -> None:
    with Step("teardown"):
        if Path("/usr/bin/docker-compose").exists() and docker_up():
            if os.environ.get("SWARM_KEEP") == "1":
                log("SWARM_KEEP=1: leaving the swarm running")
                return
            compose("down", "-v", "--remove-orphans", "-t", "10", check=False)
            left = containers()
            if left:
                sh(DOCKER, "rm", "-f", "-v", *left, check=False)
            nets = sh(DOCKER, "network", "ls", "-q", "--filter",
                      f"label=com.docker.compose.project={PROJECT}", quiet=True,
                      check=False).stdout.split()
            if nets:
                sh(DOCKER, "network", "rm", *nets, check=False)
        dockerd.stop()


def run_checks(target: str, steps: Callable[[], None], teardown: Callable[[], None]) -> int:
    """Run ``steps`` (which raise on a failed step and record checks in ``results``), then
    ``teardown`` whatever happened (SIGTERM included); print timings and checks; return the
    exit status: 0 passed, 1 failed, :data:`EXIT_SKIPPED` when Docker cannot run here at all
    (``Skip``), 2 not root. Shared by ``make swarm`` and ``make systemd-check``."""
    if os.geteuid() != 0:
        print(f"make {target} needs root (dockerd, debootstrap)", file=sys.stderr)
        return 2
    failed: str | None = None
    skipped: str | None = None

    def on_signal(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    try:
        steps()
    except Skip as exc:
        skipped = str(exc)
        log(f"SKIPPED: {skipped}")
    except (Exception, KeyboardInterrupt) as exc:
        failed = f"{type(exc).__name__}: {exc}"
        log(f"FAILED: {failed}")
    finally:
        teardown()
    print("\n== timings")
    for name, dt in timings:
        print(f"  {dt:7.1f} s  {name}")
    print(f"  {time.monotonic() - T0:7.1f} s  total")
    print("\n== checks")
    for name, ok, detail in results:
        print(f"  {'PASS' if ok else 'FAIL'}  {name}: {detail}")
    bad = [r for r in results if not r[1]]
    if skipped:
        print(f"\nSKIPPED make {target}: {skipped}")
        return EXIT_SKIPPED
    if failed or bad:
        print(f"\nmake {target}: FAILED ({failed or f'{len(bad)} check(s) failed'})")
        return 1
    print(f"\nmake {target}: OK ({len(results)} checks)")
    return 0


def main() -> int:
    dockerd = Dockerd()

    def steps() -> None:
        with Step("install docker.io, docker-compose, debootstrap (if missing)"):
            install_tools()
        with Step("dockerd"):
            dockerd.start()
        CACHE.mkdir(parents=True, exist_ok=True)
        with Step(f"base image {BASE_IMAGE}"):
            base_image()
        with Step(f"wheels and offline image build ({IMAGE})"):
            build_image()
        with Step("docker-compose config"):
            compose("config", "-q")
        # A swarm left over by an interrupted run would clash with the fixed addresses.
        if containers():
            compose("down", "-v", "--remove-orphans", "-t", "5", check=False)
        with Step("docker-compose up"):
            scale = [a for s, n in SCALE.items() for a in ("--scale", f"{s}={n}")]
            compose("up", "-d", "--no-build", *scale)
        with Step("all healthy"):
            wait_healthy()
        with Step("check routes"):
            check_no_default_route_to_host()
        with Step("check status (NAT classes)"):
            check_open_status()
            check_nat_status()
        with Step("check announce / lookup"):
            check_announce_lookup()
        with Step("check connect across two NAT routers"):
            check_connect()

    return run_checks("swarm", steps, lambda: teardown(dockerd))


if __name__ == "__main__":
    sys.exit(main())
