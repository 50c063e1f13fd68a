"""QUIC between nodes: the application error codes and the exceptions of the QUIC layer.

Owns: the codes dhtnode puts in CONNECTION_CLOSE and RESET_STREAM / STOP_SENDING, and the
:class:`QuicError` family raised by :mod:`dhtnode.transport.quic` and its parts. Holds no state
and imports nothing else of the QUIC layer, so every part can import it.
"""

from __future__ import annotations

from dhtnode.errors import DhtnodeError

# Application error codes carried in CONNECTION_CLOSE and RESET_STREAM / STOP_SENDING.
#: Normal close.
CLOSE_NO_ERROR = 0x0
#: The peer's certificate key was not the pinned / an allowed one, or it sent none.
CLOSE_AUTH_FAILED = 0x1
#: The node is shutting down (:meth:`QuicBridge.close`).
CLOSE_SHUTDOWN = 0x2
#: The handshake did not finish in time.
CLOSE_HANDSHAKE_TIMEOUT = 0x3
#: aioquic raised on input it should have handled: the connection is abandoned.
CLOSE_INTERNAL_ERROR = 0x4
#: A relayed-only connection lost its relay and no other relay could carry it.
CLOSE_RELAY_LOST = 0x5
#: Nothing came from the peer for a while despite PINGs (port forwarding's liveness check).
CLOSE_PEER_SILENT = 0x6
#: A stream was refused (too many waiting to be accepted, or unidirectional).
STREAM_REFUSED = 0x10
#: The application closed its writer before reading everything the peer sent.
STREAM_CLOSED = 0x11
#: The application aborted the stream both ways (port forwarding: its TCP side was reset).
STREAM_ABORTED = 0x12


class QuicError(DhtnodeError):
    """Base class of the QUIC layer's errors."""


class QuicConnectError(QuicError):
    """An outgoing QUIC connection could not be established and authenticated."""


class QuicConnectionClosed(QuicError):
    """The connection ended; raised by stream operations and ``accept_stream`` afterwards."""

    def __init__(self, message: str, error_code: int = CLOSE_NO_ERROR, reason: str = "") -> None:
        super().__init__(message)
        self.error_code = error_code
        self.reason = reason


class QuicStreamError(QuicError):
    """A stream was reset by the peer, asked to stop sending, or used after write_eof/close."""


class QuicExpectationLimit(QuicError):
    """Too many pending :meth:`QuicBridge.expect` calls."""
