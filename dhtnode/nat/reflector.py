"""The STUN reflector every node runs on its DHT port: Binding request in, answer out.

Answers a valid Binding request with a Binding success response carrying the source address:
XOR-MAPPED-ADDRESS for RFC 5389/8489 clients (plus FINGERPRINT if the request had one), and
MAPPED-ADDRESS for RFC 3489 clients (no magic cookie). Nothing else is added, so the answer
is never much larger than the request: on the wire (IP and UDP headers counted) at most
:data:`MAX_AMPLIFICATION` times it, which is checked for every answer. The worst case is a
bare 20-byte request over IPv6: 68 bytes in, 92 out (1.35x). The reflector cannot be used to
amplify a spoofed flood, so it needs no proof of address (standard clients have none to give).

Classic RFC 3489 requests are answered: their answer is the same size as a modern one, so
they are no better for reflection, and old clients (``stun`` 0.99) still use them.

Dropped (None): anything that is not a Binding request; requests carrying attributes we do
not understand from the comprehension-required range (RFC 8489 would answer 420; we stay
silent rather than grow the answer); and RFC 3489 CHANGE-REQUESTs asking to answer from
another IP or port, which one socket cannot honour. Pure function; the caller counts drops.
"""

from __future__ import annotations

import struct

from dhtnode.errors import DecodeError
from dhtnode.wire import stun
from dhtnode.wire.address import Address, datagram_overhead

#: Answer bytes per request byte, on the wire with IP and UDP headers, at most; an answer
#: that would exceed it is dropped. Without headers: a 20-byte IPv6 request gets at most 44
#: bytes back, so every answer is at most ``len(request) * MAX_AMPLIFICATION +
#: AMPLIFICATION_SLACK`` bytes of STUN.
MAX_AMPLIFICATION = 1.5
AMPLIFICATION_SLACK = 40
#: Comprehension-required attributes we accept in a request (and ignore).
_UNDERSTOOD = frozenset(
    {
        stun.ATTR_MAPPED_ADDRESS,
        stun.ATTR_CHANGE_REQUEST,
        stun.ATTR_USERNAME,
        stun.ATTR_MESSAGE_INTEGRITY,
        stun.ATTR_XOR_MAPPED_ADDRESS,
        0x001C,  # MESSAGE-INTEGRITY-SHA256
        0x001D,  # PASSWORD-ALGORITHM
        0x0024,  # PRIORITY (ICE connectivity checks)
        0x0025,  # USE-CANDIDATE
    }
)


def answer_binding(data: bytes, source: Address) -> bytes | None:
    """The Binding success response for ``data`` from ``source``, or None to drop it."""
    try:
        req = stun.decode(data)
    except DecodeError:
        return None
    if req.method != stun.METHOD_BINDING or req.cls != stun.CLASS_REQUEST:
        return None
    for t, v in req.attributes:
        if t < 0x8000 and t not in _UNDERSTOOD:
            return None
        # A CHANGE-REQUEST for another IP or port cannot be honoured from one socket.
        if t == stun.ATTR_CHANGE_REQUEST and (len(v) != 4 or struct.unpack(">I", v)[0] & 0x6):
            return None
    if req.classic:
        attrs = ((stun.ATTR_MAPPED_ADDRESS, stun.encode_plain_address(source)),)
        answer = stun.encode(stun.StunMessage(stun.METHOD_BINDING, stun.CLASS_SUCCESS,
                                              req.transaction_id, attrs))
    else:
        attrs = (
            (stun.ATTR_XOR_MAPPED_ADDRESS, stun.encode_xor_address(source, req.transaction_id)),
        )
        answer = stun.encode(
            stun.StunMessage(stun.METHOD_BINDING, stun.CLASS_SUCCESS, req.transaction_id, attrs),
            fingerprint=req.has_fingerprint,
        )
    overhead = datagram_overhead(source)
    if len(answer) + overhead > MAX_AMPLIFICATION * (len(data) + overhead):
        return None  # cannot happen with the answers above; a guard for future attributes
    return answer
