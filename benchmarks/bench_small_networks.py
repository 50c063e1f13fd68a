"""How long the public nodes of small networks take to be proven reachable (and serve).

In a network of a handful of nodes a newcomer soon has sent to everyone, and a probe only
proves something when it comes from an address the node never sent to (docs/PROTOCOL.md
section 5). Two scenarios, in virtual time on the simulator (dhtnode.sim.network):

* ``together``: the README's figure: 80 networks, 20 each of 3, 4, 5 and 6 public nodes, one
  bootstrap node and the others joining through it at once (280 newcomers). Reported: the
  share serving within 10, 20, 40, 120 s and the time by which all serve.
* ``lab``: the NAT lab's shape (tests/test_natlab.py): two bootstrap nodes, two nodes behind
  filtering NATs that joined earlier, then one public newcomer listing both bootstrap nodes.
  Reported: the newcomer's time to serve over 100 seeds.

Environment: SMALL_SEEDS (networks per size in ``together``, default 20), SMALL_LAB_RUNS (100).
"""

from __future__ import annotations

import os
import statistics
import time

from dhtnode.dht.node import DhtParams
from dhtnode.sim.network import SimHost, SimNetwork, natlab_shape

SEEDS = int(os.environ.get("SMALL_SEEDS", "20"))
LAB_RUNS = int(os.environ.get("SMALL_LAB_RUNS", "100"))
#: Virtual seconds a network gets before a node still a client counts as never proven.
HORIZON = 1800.0
#: Virtual seconds between looks at who serves.
STEP = 0.5
#: Shares reported for the ``together`` scenario, in virtual seconds after joining.
MARKS = (10.0, 20.0, 40.0, 120.0)


def _serve_times(net: SimNetwork, hosts: list[SimHost], t0: float) -> list[float]:
    """Seconds after ``t0`` at which each host first served (HORIZON if never)."""
    out: dict[int, float] = {}
    while len(out) < len(hosts) and net.now - t0 < HORIZON:
        net.run_until(net.now + STEP)
        for i, h in enumerate(hosts):
            if i not in out and h.node.server:
                out[i] = net.now - t0
    return [out.get(i, HORIZON) for i in range(len(hosts))]


def together() -> list[float]:
    times: list[float] = []
    for n in (3, 4, 5, 6):
        for seed in range(SEEDS):
            net = SimNetwork(seed=1000 * n + seed, params=DhtParams())
            first = net.add_node(bootstrap_node=True)
            hosts = [net.add_node(seeds=(first.addr,)) for _ in range(n - 1)]
            for h in hosts:
                net.start(h, lambda node: node.bootstrap())
            times += _serve_times(net, hosts, net.now)
    return times


def lab() -> list[float]:
    times: list[float] = []
    for seed in range(LAB_RUNS):
        net, pub2 = natlab_shape(seed)
        times += _serve_times(net, [pub2], net.now)
    return times


def _report(name: str, times: list[float]) -> None:
    n = len(times)
    shares = "  ".join(f"<={m:g}s {100 * sum(t <= m for t in times) / n:.0f}%" for m in MARKS)
    never = sum(t >= HORIZON for t in times)
    print(f"{name}: {n} newcomers  median {statistics.median(times):.1f}s  "
          f"p90 {sorted(times)[int(0.9 * (n - 1))]:.1f}s  max {max(times):.1f}s  "
          f"never (in {HORIZON:g}s) {never}  |  {shares}")


def main() -> None:
    t0 = time.perf_counter()
    _report("together (80 networks of 3-6 public nodes)", together())
    _report("lab shape (2 bootstrap, 2 filtered NATs, 1 newcomer)", lab())
    print(f"wall {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
