"""Real dhtnode processes in network namespaces behind real kernel NATs (nftables).

Three public nodes and two NATed ones (a port-restricted "home router" NAT and a symmetric,
fully-random one). Checked: public nodes prove themselves reachable and serve; NATed nodes
learn their router's public address and the NAT's mapping behaviour, stay clients, and never
enter a routing table; a NATed node's announcement is found from the internet with its
router's public address in the record; the STUN reflector reports the NAT's mapping.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dhtnode.daemon import control
from dhtnode.dht import reachability
from dhtnode.nat import behaviour
from tests.netlab import Lab, running_lab
from tests.procs import stop

pytestmark = [pytest.mark.netns, pytest.mark.slow]

PORT = 49200
#: Seconds for a daemon to start (Python imports: several seconds on a loaded 2-core machine)
#: and join. Every wait polls, so a quick start is not slowed down by a generous bound.
START_TIMEOUT = 60.0
#: Largest factor reachability.py's jitter stretches a check delay by (uniform 0.75-1.25).
MAX_JITTER = 1.25
#: Reachability checks a public non-bootstrap node gets to prove itself. In a network this
#: small a check can still fail by chance (a helper the node talked to proves nothing, an
#: unproven one may decline; since each contact asks three helpers, most runs serve within
#: a second, a few after a later check), so the wait is counted in checks, not seconds.
PROOF_CHECKS = 7
#: Lines of a daemon's log shown when a wait for it fails.
LOG_TAIL = 15


def checks_end(n: int) -> float:
    """Seconds after joining by which a node's first ``n`` reachability checks have ended, at
    the slowest jitter: reachability.py waits FIRST_CHECK_DELAY, then FIRST_CHECK_RETRY
    doubling up to MAX_CHECK_RETRY, between checks, and each check waits PROBE_WAIT."""
    t, delay, retry = 0.0, reachability.FIRST_CHECK_DELAY, reachability.FIRST_CHECK_RETRY
    for _ in range(n):
        t += delay * MAX_JITTER + reachability.PROBE_WAIT
        delay, retry = retry, min(retry * 2, reachability.MAX_CHECK_RETRY)
    return t


@pytest.fixture
def lab() -> Iterator[Lab]:
    with running_lab() as lab:
        yield lab


class Node:
    def __init__(self, ns: str, state: Path, *args: str) -> None:
        self.state = state
        state.mkdir(parents=True, exist_ok=True)
        self.log = (state / "log").open("wb")
        self.p = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "dhtnode", "run",
             "--state-dir", str(state), "--port", str(PORT), "--log-format", "json", *args],
            stdout=subprocess.DEVNULL, stderr=self.log,
        )

    def status(self) -> dict[str, Any]:
        st: dict[str, Any] = self.call("status")
        return st

    def call(self, cmd: str, **kw: Any) -> Any:
        # The CLI's own bound: an announce through the daemon is a lookup plus a state save.
        return asyncio.run(control.request(self.state / "control.sock", cmd,
                                           timeout=control.CLIENT_TIMEOUT, **kw))

    def why(self) -> str:
        """For a failed wait: the daemon's status (or why there is none) and its log's end;
        never raises, so that it cannot hide the failure it explains."""
        try:
            shown = json.dumps({k: v for k, v in self.status().items() if k != "stats"})
        except control.ControlError as exc:
            shown = f"no status: {exc}"
        tail = (self.state / "log").read_text(errors="replace").splitlines()[-LOG_TAIL:]
        return "\n".join([f"{self.state.name}: {shown}", *tail])

    def stop(self) -> None:
        stop(self.p)
        self.log.close()


def wait_for(cond: Any, timeout: float) -> bool:
    """Poll ``cond`` until it holds (True) or ``timeout`` s pass (False); a daemon not yet
    answering on its control socket counts as not yet."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if cond():
                return True
        except control.ControlError:
            pass  # not started yet
        time.sleep(0.3)
    return False


def test_public_nodes_serve_and_natted_nodes_are_classified(lab: Lab, tmp_path: Path) -> None:
    nodes: list[Node] = []
    try:
        ns1, ip1 = lab.public_host("pub1")
        ns2, ip2 = lab.public_host("pub2")
        ns3, ip3 = lab.public_host("pub3")
        nsa, _, wan_a = lab.nat_host("home", kind="port-restricted")
        nsb, _, wan_b = lab.nat_host("sym", kind="symmetric")
        # Two bootstrap nodes, as an operator would list; pub2 has to prove itself. (In a
        # network this small a node soon talks to everyone, and only the NAT-bound nodes'
        # probes can prove it quickly: see PROTOCOL.md, probe reserve.)
        boot = ("--bootstrap", f"{ip1}:{PORT}", "--bootstrap", f"{ip3}:{PORT}")
        pub1 = Node(ns1, tmp_path / "pub1", "--bootstrap-node", "--public-host", ip1)
        pub3 = Node(ns3, tmp_path / "pub3", "--bootstrap-node", "--public-host", ip3,
                    "--bootstrap", f"{ip1}:{PORT}")
        nodes += [pub1, pub3]
        assert wait_for(lambda: pub1.status()["server"] and pub3.status()["server"],
                        START_TIMEOUT), pub1.why() + "\n" + pub3.why()
        home = Node(nsa, tmp_path / "home", *boot)
        sym = Node(nsb, tmp_path / "sym", *boot)
        nodes += [home, sym]

        # The home NAT keeps the port (endpoint-independent mapping) and filters strangers.
        assert wait_for(lambda: home.status()["nat_class"] == "consistent",
                        START_TIMEOUT), home.why()
        st = home.status()
        assert st["public_address"] == f"{wan_a}:{PORT}"
        assert st["server"] is False and st["node_id"] is None
        assert st["nat_mapping"] == behaviour.ENDPOINT_INDEPENDENT, st
        # The symmetric NAT gives every destination another port.
        assert wait_for(lambda: sym.status()["nat_class"] == "random", START_TIMEOUT), sym.why()
        st = sym.status()
        assert st["server"] is False and st["nat_mapping"] == behaviour.ENDPOINT_DEPENDENT, st

        # pub2 joins a network whose NATed nodes are settled, as a public node usually does:
        # they are its likely helpers (it has talked to both bootstrap nodes itself).
        pub2 = Node(ns2, tmp_path / "pub2", *boot)
        nodes.append(pub2)
        assert wait_for(lambda: pub2.status()["routing_table_size"] > 0,
                        START_TIMEOUT), pub2.why()
        assert wait_for(lambda: pub2.status()["server"], checks_end(PROOF_CHECKS)), pub2.why()
        st = pub2.status()
        assert st["public_address"] == f"{ip2}:{PORT}"
        # Proven by a stranger's probe: the RFC 4787 words status shows beside nat_class.
        assert (st["nat_mapping"], st["nat_filtering"]) == (
            behaviour.ENDPOINT_INDEPENDENT, behaviour.ENDPOINT_INDEPENDENT), st

        # Give the home node time for a few reachability checks: it must stay a client.
        time.sleep(6)
        st = home.status()
        assert st["reachable"] is False and st["server"] is False, st
        # Its checks prove nothing either way (its probes come from servers it talked to,
        # which its NAT lets in) or prove filtering: never "endpoint-independent".
        assert st["nat_filtering"] in (behaviour.UNKNOWN, behaviour.FILTERING_STRICT), st
        for n in (pub1, pub2, pub3):
            known = n.call("nodes")["nodes"]
            assert not any(a.startswith((wan_a, wan_b)) for a in known), known

        # A NATed node announces; a public node finds it, with the router's public address.
        topic = "ab" * 32
        res = home.call("announce", topic=topic)
        assert res["stored_on"] >= 2
        found = pub3.call("lookup", topic=topic)["records"]
        rec = next(r for r in found if r["public_key"] == home.status()["public_key"])
        direct = [a["address"] for a in rec["addresses"] if a["kind"] == "direct"]
        assert direct == [f"{wan_a}:{PORT}"]

        # Our STUN client from behind the symmetric NAT, against two public reflectors: the
        # mapped addresses share the router's IP but differ in port.
        mapped = []
        for ip in (ip1, ip2):
            out = subprocess.run(
                ["ip", "netns", "exec", nsb, sys.executable, "-m", "dhtnode", "stun",
                 f"{ip}:{PORT}", "--json"], capture_output=True, text=True, timeout=30)
            assert out.returncode == 0, out.stderr
            mapped.append(json.loads(out.stdout)["mapped_address"])
        assert all(m.startswith(f"{wan_b}:") for m in mapped)
    finally:
        for n in nodes:
            n.stop()
