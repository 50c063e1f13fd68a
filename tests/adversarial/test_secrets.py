"""Item 1 of the hardening issue: nothing an attacker must not guess comes from the seeded
generator. 2,000 observed transaction ids and tokens are fed to a Mersenne Twister state
recovery (the "untwister": 624 consecutive 32-bit outputs give away ``random.Random``'s whole
state); it predicts the injected generator perfectly, and nothing of the node's."""

from __future__ import annotations

import random

from dhtnode.crypto.identity import Identity
from dhtnode.crypto.tokens import TokenIssuer
from dhtnode.dht.node import DhtNode, DhtParams
from dhtnode.wire import messages as m

OBSERVED = 2000
#: Outputs that fix MT19937's state (624 words of 32 bits).
MT_N = 624
SEED = 1234


def _untemper(y: int) -> int:
    y ^= y >> 18
    y ^= (y << 15) & 0xEFC60000
    x = y
    for _ in range(5):
        x = y ^ ((x << 7) & 0x9D2C5680)
    y = x
    x = y
    for _ in range(3):
        x = y ^ (x >> 11)
    return x & 0xFFFFFFFF


def predictor(outputs: list[int]) -> random.Random:
    """A generator in the state that produced ``outputs`` (624 consecutive 32-bit outputs of
    ``getrandbits(32)``), positioned right after them."""
    state = [_untemper(o) for o in outputs[:MT_N]]
    r = random.Random()
    r.setstate((3, (*state, MT_N), None))
    return r


def hits(observed: list[int]) -> int:
    """How many of the outputs after the first 624 the recovered state predicts exactly."""
    r = predictor(observed[:MT_N])
    return sum(r.getrandbits(32) == o for o in observed[MT_N:])


def _tids(node: DhtNode, n: int) -> list[int]:
    out: list[int] = []
    for i in range(n):
        node.rpc.request(("198.51.100.9", 1000 + i % 50), m.Command.PING)
        for data, _ in node.datagrams_to_send():
            msg = m.decode(data)
            assert isinstance(msg, m.Request)
            out.append(msg.tid)
    return out


def _node(seed: int) -> DhtNode:
    # The simulator's way of building a node, minus its seeded secret source: a seeded rng
    # for jitter and sampling, and (by default) the OS for secrets.
    return DhtNode(Identity.from_seed(bytes(32)), DhtParams(), now=0.0, wall=lambda: 1e9,
                   rng=random.Random(seed))


def test_untwister_predicts_a_mersenne_twister() -> None:
    """The attack works on what it is meant for: the injected generator's own outputs."""
    rng = random.Random(SEED)
    outputs = [rng.getrandbits(32) for _ in range(OBSERVED)]
    got = hits(outputs)
    print(f"\nMT19937 recovery on random.Random outputs: {got}/{OBSERVED - MT_N} predicted")
    assert got == OBSERVED - MT_N


def test_transaction_ids_are_not_predictable() -> None:
    node = _node(SEED)
    tids = _tids(node, OBSERVED)
    assert len(tids) == OBSERVED
    got = hits(tids)
    # The same, reading each id as the little-endian bytes of a Random.randbytes(4).
    swapped = hits([int.from_bytes(t.to_bytes(4, "big"), "little") for t in tids])
    # And the ids are not the injected generator's outputs at any offset.
    injected = random.Random(SEED)
    stream = {injected.getrandbits(32) for _ in range(10 * OBSERVED)}
    shared = sum(t in stream for t in tids)
    twin = _tids(_node(SEED), OBSERVED)  # same seed: same jitter, other ids
    same = sum(a == b for a, b in zip(tids, twin, strict=True))
    print(f"\ntids: untwister predicted {got}/{OBSERVED - MT_N} (byte-swapped {swapped}); "
          f"{shared} of {OBSERVED} in the injected rng's first {10 * OBSERVED} outputs; "
          f"{same} equal between two nodes seeded alike")
    assert got <= 1 and swapped <= 1  # chance: 1376 / 2**32
    assert shared <= 1
    assert same <= 1


def test_tokens_are_not_predictable() -> None:
    """2,000 tokens for 2,000 source addresses (an attacker owning many ports): their 32-bit
    words predict nothing, and the secret is not the injected generator's."""
    node = _node(SEED)
    issuer: TokenIssuer = node.storage.tokens
    addrs = [("203.0.113.5", 2000 + i) for i in range(OBSERVED + 1)]
    observed = [issuer.issue(a, 0.0) for a in addrs[:OBSERVED]]
    words = [int.from_bytes(t[i : i + 4], "little") for t in observed for i in range(0, 16, 4)]
    got = hits(words[: OBSERVED])
    # Replaying the injected generator does not give the secret: a token computed offline for
    # the next address (the attack of the issue) is refused.
    replay = TokenIssuer(random.Random(SEED).randbytes, 0.0)
    forged = replay.issue(addrs[-1], 0.0)
    accepted = issuer.check(forged, addrs[-1], 1.0)
    print(f"\ntokens: untwister predicted {got}/{OBSERVED - MT_N} 32-bit words; a token made "
          f"offline from the injected rng {'ACCEPTED' if accepted else 'refused'}")
    assert got <= 1
    assert not accepted
