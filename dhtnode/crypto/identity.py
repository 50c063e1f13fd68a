"""The node's Ed25519 identity (PyNaCl) and its key file.

Key file format (text, mode 0600)::

    dhtnode-ed25519-seed-v1
    <64 hex characters: the 32-byte private seed>

The file is created atomically and never overwritten. A key file that others can read or
write, that another user owns, that is a symbolic link (it is opened with ``O_NOFOLLOW``: a
link planted in a shared directory must not make us read, or publish as ours, another file), or
that does not parse, is refused with a message naming the file and the fix: a node must not run
with a leaked key, nor silently replace an identity its peers know.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import nacl.exceptions
import nacl.signing

from dhtnode.daemon.atomic import write_atomic
from dhtnode.errors import StateError

KEY_FILE_HEADER = "dhtnode-ed25519-seed-v1"
SEED_LEN = 32
PUBLIC_KEY_LEN = 32
SIGNATURE_LEN = 64


class Identity:
    """An Ed25519 signing key and its public key."""

    __slots__ = ("_signing_key", "public_key")

    def __init__(self, signing_key: nacl.signing.SigningKey) -> None:
        self._signing_key = signing_key
        self.public_key: bytes = bytes(signing_key.verify_key)

    @classmethod
    def generate(cls) -> Identity:
        return cls(nacl.signing.SigningKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        if len(seed) != SEED_LEN:
            raise ValueError(f"an Ed25519 seed is {SEED_LEN} bytes, got {len(seed)}")
        return cls(nacl.signing.SigningKey(seed))

    @property
    def seed(self) -> bytes:
        return bytes(self._signing_key)

    def sign(self, message: bytes) -> bytes:
        """The 64-byte detached signature of ``message``."""
        return bytes(self._signing_key.sign(message).signature)

    def __repr__(self) -> str:  # never print the private key
        return f"Identity(public_key={self.public_key.hex()})"


def verify(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """True iff ``signature`` is a valid Ed25519 signature of ``message`` by ``public_key``.
    Never raises: bad lengths, bad keys and bad signatures are all just False."""
    if len(public_key) != PUBLIC_KEY_LEN or len(signature) != SIGNATURE_LEN:
        return False
    try:
        nacl.signing.VerifyKey(public_key).verify(message, signature)
        return True
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.CryptoError, ValueError):
        return False


def encode_key_file(identity: Identity) -> bytes:
    return f"{KEY_FILE_HEADER}\n{identity.seed.hex()}\n".encode()


#: Largest key file read: the real one is 89 bytes; anything much larger is not ours.
MAX_KEY_FILE = 4096


def _read_key_file(path: Path) -> bytes:
    """The key file's bytes, opened without following a symbolic link and checked on the open
    descriptor (no window between the check and the read): a regular file, owned by us, with
    no access for group or others."""
    try:
        # O_NONBLOCK: a FIFO planted at the path must not hang the open.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StateError(
                f"identity key {path} is a symbolic link; refusing to follow it (whoever can "
                "change the link chooses our key). Fix: replace the link with the key file "
                f"itself (mv \"$(readlink -f {path})\" {path}), or pass the real path"
            ) from None
        raise StateError(f"cannot read identity key {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StateError(
                f"identity key {path} is not a regular file; move it away to create a new "
                "identity, or point at the key file"
            )
        if st.st_uid != os.geteuid():
            raise StateError(
                f"identity key {path} is owned by uid {st.st_uid}, not by this user (uid "
                f"{os.geteuid()}): another user could have read or replaced it. Fix: if the "
                f"key is yours, chown {os.geteuid()} {path}; otherwise move it away to create "
                "a new identity"
            )
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise StateError(
                f"identity key {path} is readable or writable by other users (mode "
                f"{stat.S_IMODE(st.st_mode):04o}); fix with: chmod 600 {path}"
            )
        return os.read(fd, MAX_KEY_FILE)
    except OSError as exc:
        raise StateError(f"cannot read identity key {path}: {exc.strerror}") from None
    finally:
        os.close(fd)


def load_identity(path: Path) -> Identity:
    raw = _read_key_file(Path(path))
    try:
        lines = raw.decode("ascii").split()
    except UnicodeDecodeError as exc:
        raise StateError(f"cannot read identity key {path}: {exc}") from None
    if len(lines) != 2 or lines[0] != KEY_FILE_HEADER:
        raise StateError(
            f"identity key {path} is not a dhtnode key file (expected a first line "
            f"'{KEY_FILE_HEADER}'); move it away to create a new identity"
        )
    try:
        seed = bytes.fromhex(lines[1])
        return Identity.from_seed(seed)
    except ValueError:
        raise StateError(
            f"identity key {path} is corrupt (the seed must be {SEED_LEN * 2} hex characters); "
            "restore it from a backup, or move it away to create a new identity"
        ) from None


def load_or_create_identity(path: Path) -> tuple[Identity, bool]:
    """Load the key at ``path``, or create one there if there is none.
    Returns the identity and whether it was created."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        return load_identity(path), False
    identity = Identity.generate()
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # O_EXCL inside write_atomic's temp file plus this check: never replace a key.
        if path.exists():
            return load_identity(path), False
        write_atomic(path, encode_key_file(identity), mode=0o600)
    except OSError as exc:
        raise StateError(f"cannot write identity key {path}: {exc.strerror or exc}") from None
    return identity, True


def key_file_mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)
