"""STUN: codec round trips and RFC 5769 vectors, decoder robustness, the reflector's
amplification bound, and real Debian STUN clients against a real `dhtnode run`."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dhtnode.nat.reflector import AMPLIFICATION_SLACK, MAX_AMPLIFICATION, answer_binding
from dhtnode.wire import stun
from tests.daemon import running_daemon

# RFC 5769 2.2 / 2.3: Binding success responses (IPv4 / IPv6) with XOR-MAPPED-ADDRESS.
RFC5769_V4 = bytes.fromhex(
    "0101003c2112a442b7e7a701bc34d686fa87dfae8022000b7465737420766563746f7220"
    "002000080001a147e112a643000800142b91f599fd9e90c38c7489f92af9ba53f06be7d7"
    "80280004c07d4c96"
)
RFC5769_V6 = bytes.fromhex(
    "010100482112a442b7e7a701bc34d686fa87dfae8022000b7465737420766563746f7220"
    "002000140002a1470113a9faa5d3f179bc25f4b5bed2b9d900080014a382954e4be67bf1"
    "1784c97c8292c275bfe3ed4180280004c8fb0b4c"
)
TID = bytes.fromhex("b7e7a701bc34d686fa87dfae")


def test_rfc5769_vectors() -> None:
    assert stun.parse_binding_response(RFC5769_V4, TID) == ("192.0.2.1", 32853)
    assert stun.parse_binding_response(RFC5769_V6, TID) == (
        "2001:db8:1234:5678:11:2233:4455:6677",
        32853,
    )


def test_fingerprint_is_checked() -> None:
    bad = bytearray(RFC5769_V4)
    bad[-1] ^= 1
    with pytest.raises(stun.StunError, match="FINGERPRINT"):
        stun.decode(bytes(bad))


@pytest.mark.parametrize("source", [("203.0.113.4", 5000), ("2001:db8::9", 65535)])
@pytest.mark.parametrize("fingerprint", [True, False])
def test_reflector_answers_binding(source: tuple[str, int], fingerprint: bool) -> None:
    tid, req = stun.build_binding_request(fingerprint=fingerprint)
    answer = answer_binding(req, source)
    assert answer is not None
    assert stun.parse_binding_response(answer, tid) == source
    assert stun.decode(answer).has_fingerprint is fingerprint
    assert len(answer) <= len(req) * MAX_AMPLIFICATION + AMPLIFICATION_SLACK


def test_reflector_answers_rfc3489_classic_with_mapped_address() -> None:
    tid = bytes(range(16))
    req = b"\x00\x01\x00\x08" + tid + b"\x00\x03\x00\x04\x00\x00\x00\x00"
    answer = answer_binding(req, ("198.51.100.3", 4242))
    assert answer is not None
    assert stun.parse_binding_response(answer, tid) == ("198.51.100.3", 4242)
    # Asking for a reply from another IP/port cannot be honoured from one socket: dropped.
    change = b"\x00\x01\x00\x08" + tid + b"\x00\x03\x00\x04\x00\x00\x00\x06"
    assert answer_binding(change, ("198.51.100.3", 4242)) is None


def test_reflector_drops_non_requests_and_unknown_required_attributes() -> None:
    tid, req = stun.build_binding_request(fingerprint=False)
    resp = answer_binding(req, ("198.51.100.1", 1))
    assert resp is not None and answer_binding(resp, ("198.51.100.1", 1)) is None
    odd = stun.encode(stun.StunMessage(stun.METHOD_BINDING, stun.CLASS_REQUEST, tid,
                                       ((0x7777, b"abcd"),)))
    assert answer_binding(odd, ("198.51.100.1", 1)) is None
    indication = stun.encode(stun.StunMessage(stun.METHOD_BINDING, stun.CLASS_INDICATION, tid))
    assert answer_binding(indication, ("198.51.100.1", 1)) is None


@given(st.binary(max_size=700))
def test_decode_raises_only_stun_error(data: bytes) -> None:
    try:
        stun.decode(data)
    except stun.StunError:
        pass


@given(st.binary(max_size=600), st.sampled_from([("198.51.100.1", 1), ("2001:db8::1", 9)]))
def test_reflector_never_raises_and_never_amplifies(data: bytes, src: tuple[str, int]) -> None:
    out = answer_binding(data, src)
    if out is not None:
        assert len(out) <= len(data) * MAX_AMPLIFICATION + AMPLIFICATION_SLACK


@given(st.data())
def test_mutated_valid_requests(data: st.DataObject) -> None:
    _, req = stun.build_binding_request(fingerprint=data.draw(st.booleans()))
    raw = bytearray(req)
    raw[data.draw(st.integers(0, len(raw) - 1))] ^= data.draw(st.integers(1, 255))
    cut = data.draw(st.integers(0, len(raw)))
    for candidate in (bytes(raw), bytes(raw[:cut])):
        out = answer_binding(candidate, ("198.51.100.7", 7))
        if out is not None:
            assert len(out) <= len(candidate) * MAX_AMPLIFICATION + AMPLIFICATION_SLACK


# --------------------------------------------------------------------- real clients


@pytest.fixture(scope="module")
def running_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A real `dhtnode run` on 127.0.0.1; yields its UDP port."""
    with running_daemon(tmp_path_factory.mktemp("stun-node"), "--host", "127.0.0.1") as port:
        yield port


@pytest.mark.slow
def test_turnutils_stunclient(running_node: int) -> None:
    if shutil.which("turnutils_stunclient") is None:
        pytest.skip("turnutils_stunclient not installed (apt-get install coturn)")
    out = subprocess.run(["turnutils_stunclient", "-p", str(running_node), "127.0.0.1"],
                         capture_output=True, text=True, timeout=20)
    m = re.search(r"UDP reflexive addr: 127\.0\.0\.1:(\d+)", out.stdout + out.stderr)
    assert m, out.stdout + out.stderr
    assert 1 <= int(m.group(1)) <= 65535


@pytest.mark.slow
def test_classic_stun_client(running_node: int) -> None:
    if shutil.which("stun") is None:
        pytest.skip("stun not installed (apt-get install stun-client)")
    out = subprocess.run(["stun", f"127.0.0.1:{running_node}", "-v", "-p", "34123"],
                         capture_output=True, text=True, timeout=30)
    text = out.stdout + out.stderr
    assert "MappedAddress = 127.0.0.1:34123" in text, text


@pytest.mark.slow
def test_our_stun_command(running_node: int) -> None:
    out = subprocess.run([sys.executable, "-m", "dhtnode", "stun", f"127.0.0.1:{running_node}",
                          "--json"], capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out.stderr
    mapped = json.loads(out.stdout)["mapped_address"]
    assert mapped.startswith("127.0.0.1:")
