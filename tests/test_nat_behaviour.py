"""Issue 8: one set of RFC 4787 words for the NAT's behaviour (nat/behaviour.py), used by
`status` (``nat_mapping``, ``nat_filtering`` beside ``nat_class``) and by `netcheck`."""

from __future__ import annotations

import time
from typing import Any

from dhtnode.cli import netcheck
from dhtnode.crypto.identity import Identity
from dhtnode.dht.node import DhtNode, DhtParams
from dhtnode.nat import behaviour as b
from dhtnode.nat.observer import NatClass


def test_mapping_words_follow_the_observer() -> None:
    assert b.mapping_of(NatClass.CONSISTENT) == b.ENDPOINT_INDEPENDENT
    # One witness per IP: another port per witness does not tell which dependent kind.
    assert b.mapping_of(NatClass.RANDOM) == b.ENDPOINT_DEPENDENT
    assert b.mapping_of(NatClass.UNKNOWN) == b.UNKNOWN
    assert {b.mapping_of(c) for c in NatClass} <= set(b.MAPPINGS)


def test_filtering_words_follow_the_reachability_checks() -> None:
    assert b.filtering_of(True, 0) == b.ENDPOINT_INDEPENDENT
    assert b.filtering_of(True, 3) == b.ENDPOINT_INDEPENDENT  # a stranger got in after all
    assert b.filtering_of(False, 1) == b.FILTERING_STRICT
    assert b.filtering_of(False, 0) == b.UNKNOWN  # no conclusive check yet
    assert b.filtering_of(None, 0) == b.UNKNOWN
    assert {b.filtering_of(r, n) for r in (True, False, None) for n in (0, 1)} == set(
        b.FILTERINGS)


def test_netcheck_speaks_the_same_words() -> None:
    assert (netcheck.NONE, netcheck.EIM, netcheck.ADM, netcheck.APDM, netcheck.EDM) == (
        b.MAPPING_NONE, b.ENDPOINT_INDEPENDENT, b.ADDRESS_DEPENDENT,
        b.ADDRESS_AND_PORT_DEPENDENT, b.ENDPOINT_DEPENDENT)
    assert netcheck.classify_mapping([], 49200) == b.UNKNOWN


def node(**kw: Any) -> DhtNode:
    return DhtNode(Identity.generate(), DhtParams(), now=time.monotonic(), wall=time.time,
                   **kw)


def test_status_reports_mapping_and_filtering() -> None:
    st = node().status()
    assert (st["nat_class"], st["nat_mapping"], st["nat_filtering"]) == (
        "unknown", b.UNKNOWN, b.UNKNOWN)
    # A bootstrap node told its public address: consistent, and strangers reach it.
    st = node(public_address=("203.0.113.7", 49200)).status()
    assert (st["nat_class"], st["nat_mapping"], st["nat_filtering"]) == (
        "consistent", b.ENDPOINT_INDEPENDENT, b.ENDPOINT_INDEPENDENT)
    # A one-shot client never checks: filtering unknown.
    assert node(ephemeral=True).status()["nat_filtering"] == b.UNKNOWN
