"""Lying witnesses (issue 6, item 4): the observer that learns our public address and NAT class
from what responders say they saw. Before the fix every ip:port was a witness: eight sockets
on one IP pushed a serving node back to client mode in 1.5 s, and 7 lying answers of 16 would
have made it adopt a chosen address."""

from __future__ import annotations

from dhtnode.dht.node import DhtParams
from dhtnode.nat.observer import MAX_PREFIX_VOTES, AddressObserver, NatClass
from dhtnode.sim.network import build_network
from tests.adversarial.engine import add_liars

LIAR_IP = "203.0.113.77"


def test_eight_sockets_on_one_ip_cannot_flip_a_serving_nodes_class_or_address() -> None:
    net = build_network(12, seed=4, params=DhtParams())
    victim = next(h for h in net.hosts.values() if h.node.server and h.node.observer.sample_count)
    before = (victim.node.public, victim.node.nat_class, victim.node.server)
    chosen = ("198.51.100.250", 4444)
    # Eight sockets: four claim a port of their own each (a "random NAT"), four a chosen address.
    liars = add_liars(net, [(LIAR_IP, 6000 + i) for i in range(4)])
    for i, liar in enumerate(liars):
        liar.lie_to = (victim.addr[0], 30000 + i)
    liars += add_liars(net, [(LIAR_IP, 6100 + i) for i in range(4)], lie_to=chosen)
    answered = 0
    for _ in range(20):  # 20 rounds of asking every liar, 0.1 s apart: the 1.5 s attack and more
        for liar in liars:
            net.act(victim, lambda n, a=liar.addr: n.ping(a))  # type: ignore[misc]
        net.run_until(net.now + 0.1)
        answered = sum(liar.requests for liar in liars)
    flips = [e for e in victim.node.events if e[0] in ("public_address_changed", "client_mode")]
    after = (victim.node.public, victim.node.nat_class, victim.node.server)
    print(f"\n8 sockets of one IP answered {answered} of the victim's requests with lies: "
          f"public address, NAT class, serving {before} -> {after}; "
          f"{victim.node.observer.sample_count} witnesses counted")
    assert after == before
    assert not flips


def test_a_quorum_of_distinct_witnesses_is_needed_and_small_networks_still_learn() -> None:
    me = ("192.0.2.10", 4000)
    chosen = ("192.0.2.10", 5555)
    # 16 answers: 9 from honest hosts, then 7 lying about a chosen address from the sockets
    # of one IP (the case): one vote.
    obs = AddressObserver()
    for i in range(9):
        obs.add((f"198.18.{i}.1", 1), me)
    for i in range(7):
        obs.add(("203.0.113.77", 6000 + i), chosen)
    print(f"\n9 honest answers and 7 lies from one IP: public {obs.public_address}, "
          f"class {obs.nat_class.value}, {obs.sample_count} votes")
    assert obs.public_address == me
    assert obs.nat_class is NatClass.CONSISTENT
    assert obs.sample_count == 10
    # Even 7 liars on 7 distinct hosts do not outvote 9 honest ones on the address (they are
    # a quorum against the NAT class, which a botnet that size may indeed flip).
    obs = AddressObserver()
    for i in range(9):
        obs.add((f"198.18.{i}.1", 1), me)
    for i in range(7):
        obs.add((f"198.19.{i}.1", 1), chosen)
    print(f"9 honest and 7 lying witnesses on distinct IPs: public {obs.public_address}, "
          f"class {obs.nat_class.value}")
    assert obs.public_address == me

    # One /24 of liars casts at most MAX_PREFIX_VOTES votes however many IPs it has.
    obs = AddressObserver()
    for i in range(4):
        obs.add((f"198.18.{i}.1", 1), me)
    for i in range(50):
        obs.add((f"203.0.113.{i + 1}", 1), chosen)
    print(f"4 honest witnesses and 50 liars of one /24: public {obs.public_address}, class "
          f"{obs.nat_class.value}, {obs.sample_count} votes counted")
    assert obs.public_address == me
    assert obs.sample_count == 4 + MAX_PREFIX_VOTES

    # A newcomer to a 3-node network whose servers share one /24 (the NAT lab) still learns
    # its address and class: one consistent NAT, one symmetric.
    obs = AddressObserver()
    for i in range(3):
        obs.add((f"203.0.113.{i + 1}", 49200), ("203.0.113.200", 7000))
    assert obs.public_address == ("203.0.113.200", 7000)
    assert obs.nat_class is NatClass.CONSISTENT
    sym = AddressObserver()
    for i in range(3):
        sym.add((f"203.0.113.{i + 1}", 49200), ("203.0.113.201", 7000 + i))
    assert sym.nat_class is NatClass.RANDOM
    print("a newcomer with 3 witnesses in one /24: consistent NAT -> "
          f"{obs.nat_class.value} at {obs.public_address}, symmetric NAT -> {sym.nat_class.value}")

    # Loopback is exempt: a testnet on 127.0.0.1 has one witness per port.
    lo = AddressObserver()
    for p in range(5):
        lo.add(("127.0.0.1", 40000 + p), ("127.0.0.1", 39999))
    assert lo.sample_count == 5 and lo.nat_class is NatClass.CONSISTENT
