"""Start-up of a fresh CLI process (issue 5), optionally paired with a baseline tree.

On 127.0.0.1: three ``dhtnode run`` bootstrap nodes and ``dhtnode listen --echo`` (from this
checkout). Then, RUNS rounds, each timing in a fresh process (run 0 warms the caches and is
not counted):

* ``import dhtnode.cli.main``: ``python -c`` start to its first byte on stdout;
* ``dhtnode connect KEY`` with one byte waiting on stdin: start to that byte echoed back
  (the figure HyperDHT reaches in about 60 ms, shared/targets.md);
* ``dhtnode ping KEY --json``: start to exit (connect, 3 echoes, close, interpreter exit);
* ``dhtnode ping KEY --via-daemon --json``: the same through a running daemon (one of the
  three nodes), which makes the connection: what a user with a daemon feels.

Each figure also gets the CPU time the process used (user + system, from the waited-for
child's rusage): on a loaded machine wall times swing by tens of ms, CPU times much less.

With ``--baseline DIR`` (a copy of the tree with ``dhtnode/`` in it, e.g. made with ``git
worktree`` or ``cp -r``), every figure is taken from both trees in the same round, one right
after the other, and the median of the paired differences is printed beside the medians: the
machine's load drifts over a run, and pairing cancels most of it.

Child processes get bytecode caching as an installed package has it (bench_connect.py, "Bytecode").
Everything is sent to 127.0.0.1 only; every process started is stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_connect
from bench_connect import (
    HYPERDHT_FIRST_BYTE_MS,
    ROOT,
    Daemons,
    connect_process,
    dhtnode_cmd,
    line,
    med_p95,
    ping_process,
    timed_floor,
    use_bytecode_cache,
)

#: Rounds counted by default (each runs every figure once per tree).
RUNS = 15


def in_tree(tree: Path) -> None:
    """Make bench_connect's process helpers start ``python -m dhtnode`` in ``tree`` (the
    working directory comes first on ``sys.path``, so its ``dhtnode`` is the one run)."""
    bench_connect.ROOT = tree


def children_cpu_ms() -> float:
    """CPU time (user + system) of all waited-for child processes so far, in ms."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (r.ru_utime + r.ru_stime) * 1000


def ping_via_daemon(key: str, daemon_state: Path) -> float:
    """A fresh ``dhtnode ping KEY --via-daemon --json`` against the daemon whose state dir
    is ``daemon_state``: ms from start to exit."""
    t0 = time.perf_counter()
    out = subprocess.run(dhtnode_cmd("ping", key, "--via-daemon", "--json", "--state-dir",
                                     str(daemon_state)),
                         capture_output=True, cwd=bench_connect.ROOT, timeout=60)
    wall = (time.perf_counter() - t0) * 1000
    res = json.loads(out.stdout.splitlines()[-1]) if out.stdout else {}
    if out.returncode != 0 or not res.get("ok"):
        raise RuntimeError(f"ping --via-daemon exit {out.returncode}: {out.stdout!r} "
                           f"{out.stderr[-500:]!r}")
    return wall


def diff(a: list[float], b: list[float]) -> str:
    d = [x - y for x, y in zip(a, b, strict=True)]
    return f"paired difference median {statistics.median(d):+7.1f} ms" if d else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=RUNS, help=f"rounds counted (default {RUNS})")
    ap.add_argument("--baseline", type=Path, help="another tree to time in alternation")
    args = ap.parse_args()
    trees = {"this": ROOT}
    if args.baseline is not None:
        trees["baseline"] = args.baseline.resolve()
    pyc = use_bytecode_cache()
    print(f"# start-up, Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.2f}, {args.runs} rounds, bytecode {pyc}", flush=True)
    figures = ("import dhtnode.cli.main", "connect KEY: start to 1st echo",
               "ping KEY: start to exit", "ping KEY --via-daemon: start to exit",
               "CPU: import dhtnode.cli.main", "CPU: connect KEY, whole process",
               "CPU: ping KEY, whole process", "CPU: ping KEY --via-daemon, process")
    got: dict[str, dict[str, list[float]]] = {t: {f: [] for f in figures} for t in trees}
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as d:
        daemons = Daemons(Path(d))
        try:
            boot, key = daemons.loopback_network()
            for i in range(args.runs + 1):  # run 0 warms the page and bytecode caches
                for tree_name, tree in trees.items():
                    in_tree(tree)
                    walls: list[float] = []
                    cpus: list[float] = []
                    for run in (lambda: timed_floor("dhtnode.cli.main"),
                                lambda: connect_process(key, boot, Path(d) / "client")[0],
                                lambda: ping_process(key, boot, Path(d) / "client")[0],
                                lambda: ping_via_daemon(key, Path(d) / "dht1")):
                        cpu0 = children_cpu_ms()
                        walls.append(run())
                        cpus.append(children_cpu_ms() - cpu0)
                    values = (*walls, *cpus)
                    if i:
                        for f, v in zip(figures, values, strict=True):
                            got[tree_name][f].append(v)
        finally:
            in_tree(ROOT)
            daemons.close()
    for f in figures:
        for tree_name in trees:
            line(f"{f} [{tree_name}]", med_p95(got[tree_name][f]))
        if "baseline" in trees:
            line("", diff(got["this"][f], got["baseline"][f]))
    first = statistics.median(got["this"][figures[1]])
    line("ratio vs HyperDHT (~60 ms start to 1st echo)",
         f"{first / HYPERDHT_FIRST_BYTE_MS:8.2f}x  (target <= 1.0)")


if __name__ == "__main__":
    main()
