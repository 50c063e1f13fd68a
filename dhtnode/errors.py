"""Exception classes shared across the package.

Every error a user can see carries a message that says what was wrong and how to fix it.
Decoders raise only their module's subclass of :class:`DecodeError`.
"""


class DhtnodeError(Exception):
    """Base class of every error this package raises on purpose."""


class DecodeError(DhtnodeError):
    """Bytes from the network did not parse. Receivers count and drop; they never propagate."""


class ConfigError(DhtnodeError):
    """A config file value or CLI argument is invalid. The message names the field and the fix."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class StateError(DhtnodeError):
    """The state directory (identity key, node cache) cannot be read or written."""
