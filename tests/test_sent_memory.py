"""The sent-to memory that decides whether a datagram could have been let in by our own traffic."""

from __future__ import annotations

from dhtnode.dht.sent import MAX_SENT_TO, SENT_TO_TTL, SentMemory


def test_an_ip_we_sent_to_is_solicited_on_any_port() -> None:
    mem = SentMemory()
    mem.note(("198.51.100.7", 4000), now=0.0)
    assert ("198.51.100.7", 4000) in mem
    # An address-restricted NAT lets every port of that IP in.
    assert mem.solicited(("198.51.100.7", 5000))
    assert not mem.solicited(("198.51.100.8", 4000))


def test_loopback_is_judged_by_the_full_address() -> None:
    mem = SentMemory()
    mem.note(("127.0.0.1", 4000), now=0.0)
    assert mem.solicited(("127.0.0.1", 4000))
    assert not mem.solicited(("127.0.0.1", 4001))
    mem.note(("::1", 4000), now=0.0)
    assert not mem.solicited(("::1", 4001))


def test_entries_expire_and_the_memory_is_bounded() -> None:
    mem = SentMemory()
    mem.note(("198.51.100.1", 1), now=0.0)
    mem.note(("198.51.100.2", 1), now=100.0)
    mem.expire(SENT_TO_TTL + 50.0)
    assert not mem.solicited(("198.51.100.1", 2))
    assert mem.solicited(("198.51.100.2", 2))
    for i in range(MAX_SENT_TO + 10):
        mem.note((f"203.0.113.{i % 250}", 1000 + i), now=200.0)
    assert len(mem) == MAX_SENT_TO
    # Forgetting the oldest addresses keeps the per-IP counts right.
    assert not mem.solicited(("198.51.100.2", 2))
    assert mem.solicited(("203.0.113.5", 1))
