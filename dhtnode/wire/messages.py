"""DHT RPC messages: the byte layout of every request and response (see docs/PROTOCOL.md).

Request (first byte 0x10)::

    u8 type=0x10 | u8 version=1 | u8 flags | u8 command | u32 tid
    [4 network]      if flags & F_NETWORK the sender's network id; absent: the public network
    [32 id]          if flags & F_ID      sender is a server; id must equal H(source address)
    [32 target]      if flags & F_TARGET
    [u8 n, n token]  if flags & F_TOKEN   (n <= 32)
    [u16 n, n value] if flags & F_VALUE   (command-specific body)
    [u16 n, n pad]   if flags & F_PAD     padding, ignored: buys a larger answer before the
                                          sender has proven its address (docs/PROTOCOL.md)

Response (first byte 0x11)::

    u8 type=0x11 | u8 version=1 | u8 flags | u8 command | u32 tid
    [4 network]      if flags & F_NETWORK as in requests
    compact address  "to": the requester's address as this responder saw it (always present)
    [32 id]          if flags & F_ID      responder is a server; id == H(responder address)
    [u8 n, n token]  if flags & F_TOKEN
    [u8 n, n x compact address] if flags & F_NODES   closer nodes
    [u8 code]        if flags & F_ERROR
    [u16 n, n value] if flags & F_VALUE
    (no body)        if flags & F_MORE    part of the answer was withheld from an unproven
                                          source; the same request with the token gets it

All integers are big-endian. Any trailing byte, unknown flag bit, unknown version or
out-of-range length is a :class:`MessageError`; decoders raise nothing else.

The network id is carried, not judged: :func:`decode` exposes it as ``network`` and the engine
drops messages of another network (``dht/node.py``); :func:`network_id` derives it from a name.

This module owns only the byte layout. What a command means lives in ``dhtnode.dht``.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from dhtnode.errors import DecodeError
from dhtnode.wire import address as wire_address
from dhtnode.wire.address import Address
from dhtnode.wire.demux import DHT_REQUEST, DHT_RESPONSE
from dhtnode.wire.network import NETWORK_ID_LEN

PROTOCOL_VERSION = 1
#: Largest datagram this node sends. 1200 bytes fits the IPv6 minimum MTU (1280) with headers,
#: so nothing we send is ever fragmented.
MAX_SEND_SIZE = 1200
#: Largest DHT datagram accepted; anything bigger is counted as oversized and dropped.
MAX_RECEIVE_SIZE = 1500
MAX_TOKEN_LEN = 32
#: Closer-node lists longer than this are malformed (k is at most 64).
MAX_NODES = 64

F_ID = 0x01
F_TARGET = 0x02  # requests only
F_TOKEN = 0x04
F_VALUE = 0x08
F_PAD = 0x10  # requests only
F_NODES = 0x10  # responses only
F_ERROR = 0x20  # responses only
F_MORE = 0x40  # responses only
#: Both directions: a network id follows the header (a network other than the public one).
F_NETWORK = 0x80
_REQUEST_FLAGS = F_ID | F_TARGET | F_TOKEN | F_VALUE | F_PAD | F_NETWORK
_RESPONSE_FLAGS = F_ID | F_TOKEN | F_VALUE | F_NODES | F_ERROR | F_MORE | F_NETWORK
#: Bytes of the fixed request/response header (type, version, flags, command, tid).
HEADER_LEN = 8

_HEADER = struct.Struct(">BBBBI")

class MessageError(DecodeError):
    """A DHT datagram does not follow the layout above."""


class Command(enum.IntEnum):
    PING = 0x01
    FIND_NODE = 0x02
    LOOKUP = 0x03
    ANNOUNCE = 0x04
    UNANNOUNCE = 0x05
    #: "Please get some other node to probe me": the reachability check.
    CHECK_REACHABLE = 0x06
    #: Sent by the checked node's helper to a third node: "send PROBE to this address".
    FORWARD_PROBE = 0x07
    #: The unsolicited datagram itself; never answered.
    PROBE = 0x08
    #: Client -> introducer: "pass this sealed hello to the listener of ``target``".
    INTRODUCE = 0x09
    #: Introducer -> listener: the hello, with the client's address as the introducer saw it.
    INTRO_FORWARD = 0x0A


class ErrorCode(enum.IntEnum):
    UNKNOWN_COMMAND = 1
    BAD_TOKEN = 2
    BAD_RECORD = 3
    STALE = 4
    FULL = 5
    NOT_SERVING = 6
    MISSING_FIELD = 7
    #: No listener for this target here (or it did not answer).
    NOT_FOUND = 8
    #: Rate limit or table full: try another node, or later.
    BUSY = 9


_COMMANDS = frozenset(int(c) for c in Command)


@dataclass(frozen=True, slots=True)
class Request:
    command: Command
    tid: int
    id: bytes | None = None
    target: bytes | None = None
    token: bytes | None = None
    value: bytes | None = None
    #: Bytes of padding (sent as zeros, ignored when received).
    pad: int = 0
    #: The sender's network id (:func:`network_id`); None: the public network.
    network: bytes | None = None


@dataclass(frozen=True, slots=True)
class Response:
    command: Command
    tid: int
    to: Address
    id: bytes | None = None
    token: bytes | None = None
    nodes: tuple[Address, ...] | None = None
    error: int | None = None
    value: bytes | None = None
    #: Something was withheld from an unproven requester (echo the token to get it).
    more: bool = False
    #: The responder's network id (:func:`network_id`); None: the public network.
    network: bytes | None = None


def request_size(req: Request) -> int:
    """Bytes of ``req`` on the wire (DHT payload only), from its fields: the layout has no
    optional byte that the fields do not account for."""
    size = HEADER_LEN
    if req.network is not None:
        size += NETWORK_ID_LEN
    if req.id is not None:
        size += 32
    if req.target is not None:
        size += 32
    if req.token is not None:
        size += 1 + len(req.token)
    if req.value is not None:
        size += 2 + len(req.value)
    if req.pad:
        size += 2 + req.pad
    return size


def encode_request(req: Request) -> bytes:
    flags = 0
    parts: list[bytes] = []
    if req.network is not None:
        flags |= F_NETWORK
        parts.append(_check_network(req.network))
    if req.id is not None:
        flags |= F_ID
        parts.append(_check_key(req.id, "id"))
    if req.target is not None:
        flags |= F_TARGET
        parts.append(_check_key(req.target, "target"))
    if req.token is not None:
        flags |= F_TOKEN
        parts.append(_short_bytes(req.token))
    if req.value is not None:
        flags |= F_VALUE
        parts.append(struct.pack(">H", len(req.value)) + req.value)
    if req.pad:
        flags |= F_PAD
        parts.append(struct.pack(">H", req.pad) + bytes(req.pad))
    head = _HEADER.pack(DHT_REQUEST, PROTOCOL_VERSION, flags, int(req.command), req.tid)
    return head + b"".join(parts)


def encode_response(res: Response) -> bytes:
    flags = 0
    parts: list[bytes] = []
    if res.network is not None:
        flags |= F_NETWORK
        parts.append(_check_network(res.network))
    parts.append(wire_address.encode(res.to))
    if res.id is not None:
        flags |= F_ID
        parts.append(_check_key(res.id, "id"))
    if res.token is not None:
        flags |= F_TOKEN
        parts.append(_short_bytes(res.token))
    if res.nodes is not None:
        flags |= F_NODES
        if len(res.nodes) > MAX_NODES:
            raise ValueError(f"at most {MAX_NODES} nodes per response")
        parts.append(bytes((len(res.nodes),)))
        parts.extend(wire_address.encode(a) for a in res.nodes)
    if res.error is not None:
        flags |= F_ERROR
        parts.append(bytes((res.error,)))
    if res.value is not None:
        flags |= F_VALUE
        parts.append(struct.pack(">H", len(res.value)) + res.value)
    if res.more:
        flags |= F_MORE
    head = _HEADER.pack(DHT_RESPONSE, PROTOCOL_VERSION, flags, int(res.command), res.tid)
    return head + b"".join(parts)


def encode_nodes_response(
    command: Command,
    tid: int,
    to: Address,
    node_id: bytes | None,
    packed_nodes: list[bytes],
    token: bytes | None = None,
    network: bytes | None = None,
) -> bytes:
    """``encode_response`` of a plain nodes answer (FIND_NODE), for the hot path: the node
    addresses arrive already in compact form. Same bytes as the general encoder."""
    if len(packed_nodes) > MAX_NODES:
        raise ValueError(f"at most {MAX_NODES} nodes per response")
    flags = F_NODES
    head_network = b""
    if network is not None:
        flags |= F_NETWORK
        head_network = _check_network(network)
    head_id = b""
    if node_id is not None:
        flags |= F_ID
        head_id = _check_key(node_id, "id")
    head_token = b""
    if token is not None:
        flags |= F_TOKEN
        head_token = _short_bytes(token)
    head = _HEADER.pack(DHT_RESPONSE, PROTOCOL_VERSION, flags, int(command), tid)
    return b"".join(
        (head, head_network, wire_address.encode(to), head_id, head_token,
         bytes((len(packed_nodes),)), *packed_nodes)
    )


def decode(data: bytes) -> Request | Response:
    """Parse one DHT datagram. Raises only :class:`MessageError`."""
    if len(data) > MAX_RECEIVE_SIZE:
        raise MessageError(f"oversized datagram ({len(data)} bytes)")
    if len(data) < _HEADER.size:
        raise MessageError("truncated header")
    kind, version, flags, command, tid = _HEADER.unpack_from(data)
    if version != PROTOCOL_VERSION:
        raise MessageError(f"unsupported version {version}")
    if command not in _COMMANDS:
        raise MessageError(f"unknown command {command}")
    pos = _HEADER.size
    network = None
    if flags & F_NETWORK:
        network, pos = _take(data, pos, NETWORK_ID_LEN)
    if kind == DHT_REQUEST:
        if flags & ~_REQUEST_FLAGS:
            raise MessageError("unknown request flag")
        rid = target = token = value = None
        pad = 0
        if flags & F_ID:
            rid, pos = _take(data, pos, 32)
        if flags & F_TARGET:
            target, pos = _take(data, pos, 32)
        if flags & F_TOKEN:
            token, pos = _take_short(data, pos)
        if flags & F_VALUE:
            value, pos = _take_long(data, pos)
        if flags & F_PAD:
            start = pos
            _, pos = _take_long(data, pos)  # the content is ignored
            pad = pos - start - 2
        _end(data, pos)
        return Request(Command(command), tid, rid, target, token, value, pad, network)
    if kind == DHT_RESPONSE:
        if flags & ~_RESPONSE_FLAGS:
            raise MessageError("unknown response flag")
        try:
            to, pos = wire_address.decode(data, pos)
        except DecodeError as exc:
            raise MessageError(f"bad 'to' address: {exc}") from None
        rid = token = value = None
        nodes: tuple[Address, ...] | None = None
        error: int | None = None
        if flags & F_ID:
            rid, pos = _take(data, pos, 32)
        if flags & F_TOKEN:
            token, pos = _take_short(data, pos)
        if flags & F_NODES:
            if pos >= len(data):
                raise MessageError("truncated node count")
            count = data[pos]
            pos += 1
            if count > MAX_NODES:
                raise MessageError(f"too many nodes ({count})")
            found: list[Address] = []
            for _ in range(count):
                try:
                    a, pos = wire_address.decode(data, pos)
                except DecodeError as exc:
                    raise MessageError(f"bad node address: {exc}") from None
                found.append(a)
            nodes = tuple(found)
        if flags & F_ERROR:
            if pos >= len(data):
                raise MessageError("truncated error code")
            error = data[pos]
            pos += 1
        if flags & F_VALUE:
            value, pos = _take_long(data, pos)
        _end(data, pos)
        return Response(
            Command(command), tid, to, rid, token, nodes, error, value, bool(flags & F_MORE),
            network,
        )
    raise MessageError(f"first byte 0x{kind:02x} is not a DHT message")


def _check_key(key: bytes, name: str) -> bytes:
    if len(key) != 32:
        raise ValueError(f"{name} must be 32 bytes")
    return key


def _check_network(network: bytes) -> bytes:
    if len(network) != NETWORK_ID_LEN:
        raise ValueError(f"a network id must be {NETWORK_ID_LEN} bytes")
    return network


def _short_bytes(b: bytes) -> bytes:
    if len(b) > MAX_TOKEN_LEN:
        raise ValueError(f"token longer than {MAX_TOKEN_LEN} bytes")
    return bytes((len(b),)) + b


def _take(data: bytes, pos: int, n: int) -> tuple[bytes, int]:
    end = pos + n
    if end > len(data):
        raise MessageError("truncated field")
    return data[pos:end], end


def _take_short(data: bytes, pos: int) -> tuple[bytes, int]:
    if pos >= len(data):
        raise MessageError("truncated token length")
    n = data[pos]
    if n > MAX_TOKEN_LEN:
        raise MessageError("token too long")
    return _take(data, pos + 1, n)


def _take_long(data: bytes, pos: int) -> tuple[bytes, int]:
    if pos + 2 > len(data):
        raise MessageError("truncated value length")
    n = (data[pos] << 8) | data[pos + 1]
    return _take(data, pos + 2, n)


def _end(data: bytes, pos: int) -> None:
    if pos != len(data):
        raise MessageError(f"{len(data) - pos} trailing bytes")
