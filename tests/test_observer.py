"""Public address and NAT class from the addresses responders report."""

from __future__ import annotations

from dhtnode.nat.observer import AddressObserver, NatClass


def test_agreeing_responders_mean_a_consistent_mapping() -> None:
    obs = AddressObserver()
    assert obs.public_address is None and obs.nat_class is NatClass.UNKNOWN
    assert obs.add(("198.51.100.1", 1), ("203.0.113.5", 4000))
    assert obs.public_address == ("203.0.113.5", 4000)  # the only sample so far
    assert obs.nat_class is NatClass.UNKNOWN
    obs.add(("198.51.100.2", 1), ("203.0.113.5", 4000))
    assert obs.nat_class is NatClass.CONSISTENT


def test_a_port_per_destination_means_a_random_mapping() -> None:
    obs = AddressObserver()
    for i in range(4):
        obs.add((f"198.51.100.{i + 1}", 1), ("203.0.113.5", 4000 + i))
    assert obs.nat_class is NatClass.RANDOM
    assert obs.public_address is None  # no two responders agree


def test_dual_stack_is_not_mistaken_for_a_random_mapping() -> None:
    obs = AddressObserver()
    obs.add(("198.51.100.1", 1), ("203.0.113.5", 4000))
    obs.add(("2001:db8::1", 1), ("2001:db8::5", 4000))
    obs.add(("198.51.100.2", 1), ("203.0.113.5", 4000))
    obs.add(("2001:db8::2", 1), ("2001:db8::5", 4000))
    assert obs.nat_class is NatClass.CONSISTENT
    assert obs.public_address == ("203.0.113.5", 4000)  # IPv4 is the primary family
    assert obs.public_addresses == (("203.0.113.5", 4000), ("2001:db8::5", 4000))
    assert obs.sample_count == 2


def test_ipv6_only_node_uses_its_ipv6_samples() -> None:
    obs = AddressObserver()
    obs.add(("2001:db8::1", 1), ("2001:db8::5", 4000))
    obs.add(("2001:db8::2", 1), ("2001:db8::5", 4000))
    assert obs.public_address == ("2001:db8::5", 4000)
    assert obs.nat_class is NatClass.CONSISTENT
