"""X.509 certificates for QUIC, made from a node's Ed25519 identity.

Owns: building the self-signed certificate and private key a node presents in QUIC's TLS 1.3
handshake, and reading the raw Ed25519 public key back out of a peer's certificate.

Trust is the Ed25519 key alone, pinned by the caller (``transport/quic.py``): no CA, no names,
no validity period is ever checked, and this module must not start doing so. The certificate is
only the container TLS insists on; TLS's CertificateVerify proves the peer holds the key in it.
This module must not do network I/O, read key files or cache private keys.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID

from dhtnode.crypto.identity import PUBLIC_KEY_LEN, Identity

#: Validity window of every node certificate. Fixed and very wide so that a peer whose clock is
#: wrong by years still accepts it (nobody checks it, but other TLS stacks might), and so that
#: the certificate of a given key is byte-for-byte deterministic.
NOT_BEFORE = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
#: See :data:`NOT_BEFORE`.
NOT_AFTER = datetime.datetime(2100, 1, 1, tzinfo=datetime.UTC)


@dataclass(frozen=True, slots=True)
class NodeCertificate:
    """What aioquic's ``QuicConfiguration`` needs: ``certificate`` and ``private_key``."""

    certificate: x509.Certificate
    private_key: Ed25519PrivateKey
    public_key: bytes


def make_certificate(identity: Identity) -> NodeCertificate:
    """A self-signed Ed25519 certificate for ``identity``; subject and issuer CN are the public
    key in hex. Deterministic: Ed25519 signatures are, and so is every field."""
    private_key = Ed25519PrivateKey.from_private_bytes(identity.seed)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.public_key.hex())])
    # Positive, at most 20 bytes (RFC 5280 section 4.1.2.2), and derived from the key so that
    # two certificates of the same key are identical.
    serial = (int.from_bytes(identity.public_key[:16], "big") >> 1) | 1
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private_key.public_key())
        .serial_number(serial)
        .not_valid_before(NOT_BEFORE)
        .not_valid_after(NOT_AFTER)
        .sign(private_key, algorithm=None)  # Ed25519 takes no separate hash
    )
    return NodeCertificate(certificate, private_key, identity.public_key)


def certificate_public_key(certificate: x509.Certificate | None) -> bytes | None:
    """The raw 32-byte Ed25519 public key in ``certificate``, or None if there is no
    certificate or its key is not Ed25519 (or cannot be parsed). Never raises."""
    if certificate is None:
        return None
    try:
        key = certificate.public_key()
    except (ValueError, UnsupportedAlgorithm):  # a peer's malformed or exotic key
        return None
    if not isinstance(key, Ed25519PublicKey):
        return None
    raw = key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return raw if len(raw) == PUBLIC_KEY_LEN else None
