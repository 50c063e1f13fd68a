"""A sans-I/O future: the handle every DHT operation returns.

The asyncio layer turns it into an ``asyncio.Future`` (``NodeEndpoint.run`` in
``dhtnode.transport.udp``); the simulator just reads it. Callbacks run synchronously when
the result is set.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from dhtnode.errors import DhtnodeError

T = TypeVar("T")


class OperationError(DhtnodeError):
    """A DHT operation could not complete; the message says why. ``code`` is the stable
    error name the CLI prints in JSON."""

    code = "failed"


class NoAnswer(OperationError):
    """Nobody answered at all: no network, or no reachable bootstrap node."""

    code = "no_network"


class Op(Generic[T]):
    __slots__ = ("_callbacks", "_error", "_result", "done")

    def __init__(self) -> None:
        self.done = False
        self._result: T | None = None
        self._error: OperationError | None = None
        self._callbacks: list[Callable[[Op[T]], None]] = []

    def result(self) -> T:
        if not self.done:
            raise RuntimeError("operation still running")
        if self._error is not None:
            raise self._error
        return self._result  # type: ignore[return-value]

    @property
    def error(self) -> OperationError | None:
        return self._error

    def set_result(self, value: T) -> None:
        if self.done:
            return
        self._result = value
        self._finish()

    def set_error(self, error: OperationError) -> None:
        if self.done:
            return
        self._error = error
        self._finish()

    def add_done_callback(self, fn: Callable[[Op[T]], None]) -> None:
        if self.done:
            fn(self)
        else:
            self._callbacks.append(fn)

    def _finish(self) -> None:
        self.done = True
        callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            fn(self)


def gather(ops: Sequence[Op[T]]) -> Op[list[Op[T]]]:
    """An Op that completes, with the finished ops in order, once every one of ``ops`` has
    (successfully or not); it never fails itself."""
    out: Op[list[Op[T]]] = Op()
    left = len(ops)
    if left == 0:
        out.set_result([])
        return out

    def one(_: Op[T]) -> None:
        nonlocal left
        left -= 1
        if left == 0:
            out.set_result(list(ops))

    for o in ops:
        o.add_done_callback(one)
    return out
