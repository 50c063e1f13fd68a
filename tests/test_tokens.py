"""Write tokens: bound to the source address, valid across one rotation, not two."""

from __future__ import annotations

import random

from dhtnode.crypto.tokens import ROTATE_INTERVAL, TokenIssuer


def test_token_bound_to_address_and_rotation() -> None:
    rng = random.Random(1)
    t = TokenIssuer(rng.randbytes, 0.0)
    a, b = ("198.51.100.1", 1000), ("198.51.100.1", 1001)
    tok = t.issue(a, 0.0)
    assert t.check(tok, a, 1.0)
    assert not t.check(tok, b, 1.0)
    assert not t.check(tok[:-1], a, 1.0)
    assert t.check(tok, a, ROTATE_INTERVAL + 1)  # previous secret still accepted
    assert not t.check(tok, a, 2 * ROTATE_INTERVAL + 2)  # two rotations later: gone
