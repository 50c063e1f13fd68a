"""The configuration schema, its TOML loader and command-line overrides.

Every setting has a default here (and in config.example.toml). A bad value raises
:class:`~dhtnode.errors.ConfigError` naming the field (``dht.alpha`` or ``--port``) and what
is allowed. Unknown keys are errors too: a typo must not silently fall back to a default.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from dhtnode.dht.params import DhtParams
from dhtnode.errors import ConfigError
from dhtnode.nat.relay_limits import RelayLimits
from dhtnode.wire.address import parse_host_port
from dhtnode.wire.network import PUBLIC_NETWORK

#: Longest network name (``[node] network``): a label, not a secret, and it is never sent.
MAX_NETWORK_NAME = 64

#: UDP port for DHT, STUN and QUIC. Not HyperDHT's 49737, so both can run side by side.
DEFAULT_PORT = 49200


def default_state_dir() -> Path:
    """$DHTNODE_STATE_DIR, else $XDG_STATE_HOME/dhtnode, else ~/.local/state/dhtnode."""
    env = os.environ.get("DHTNODE_STATE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "state"
    return base / "dhtnode"


@dataclass(frozen=True)
class NodeConfig:
    #: Address to bind. "0.0.0.0" = all IPv4; "::" = dual-stack IPv6 + IPv4 where supported.
    host: str = "::"
    #: UDP port (0 = any free port).
    port: int = DEFAULT_PORT
    #: Nodes to join through, as (host, port).
    bootstrap: tuple[tuple[str, int], ...] = ()
    #: First node of a network on a public address: serve at once without a reachability probe.
    bootstrap_node: bool = False
    #: Public IP a bootstrap node advertises (default: learned from other nodes, or `host`).
    public_host: str = ""
    #: Identity key, node cache and control socket live here.
    state_dir: Path = field(default_factory=default_state_dir)
    #: The DHT network to be part of: nodes of another network are never answered nor
    #: learned from. "public" is the public network; any other name makes a separate one
    #: (a test swarm), whose messages carry 4 bytes of network id.
    network: str = PUBLIC_NETWORK


@dataclass(frozen=True)
class LogConfig:
    #: debug, info, warning or error.
    level: str = "info"
    #: auto (JSON lines unless stderr is a terminal), json or console.
    format: str = "auto"


#: The engine's own defaults: the config file's defaults are these, not a second copy.
_ENGINE = DhtParams()


@dataclass(frozen=True)
class DhtConfig:
    #: Bucket size and replication factor.
    k: int = _ENGINE.k
    #: Lookup requests kept in flight.
    alpha: int = _ENGINE.alpha
    #: Seconds before an unanswered request fails.
    request_timeout: float = _ENGINE.request_timeout
    #: Seconds after which an untouched bucket is refreshed.
    bucket_refresh: float = _ENGINE.bucket_refresh


@dataclass(frozen=True)
class RecordsConfig:
    #: Seconds a stored record lives without a refresh (announcers refresh at ~0.45 x ttl).
    ttl: float = _ENGINE.record_ttl
    #: Records this node stores in total.
    max_total: int = _ENGINE.max_records
    #: Records per topic.
    max_per_topic: int = _ENGINE.max_records_per_topic
    #: Records (and withdrawal markers) per announcing host: an IPv4 address or an IPv6 /64;
    #: four times this per /24 or /48.
    max_per_ip: int = _ENGINE.max_records_per_ip


#: The relay's own defaults (``nat/relay.py``), not a second copy.
_RELAY = RelayLimits()


@dataclass(frozen=True)
class RelayConfig:
    #: Relay for the pairs this node introduces (only while it serves: a public address).
    enabled: bool = True
    #: Relay sessions at once.
    max_sessions: int = _RELAY.max_sessions
    #: Relay sessions at once with one member IP.
    max_sessions_per_ip: int = _RELAY.max_sessions_per_ip
    #: Bytes per second one session may use (both directions together).
    session_rate: float = _RELAY.session_rate
    #: Bytes per second relayed in all.
    total_rate: float = _RELAY.total_rate
    #: Seconds a session may last.
    max_duration: float = _RELAY.max_duration

    def limits(self) -> RelayLimits:
        return RelayLimits(
            max_sessions=self.max_sessions,
            max_sessions_per_ip=self.max_sessions_per_ip,
            session_rate=self.session_rate,
            total_rate=self.total_rate,
            max_duration=self.max_duration,
        )


@dataclass(frozen=True)
class ExposeConfig:
    """One ``[[expose]]``: a local TCP service served under its own key by the daemon."""

    #: The local TCP service, "HOST:PORT".
    target: tuple[str, int]
    #: Client keys allowed (64 hex characters each); empty needs ``public = true``.
    allow: tuple[bytes, ...] = ()
    #: Let anyone who knows the key connect (a key is no secret).
    public: bool = False
    #: Key file; empty: expose-HOST-PORT.key in the state dir.
    key_file: Path | None = None


@dataclass(frozen=True)
class ForwardConfig:
    """One ``[[forward]]``: a local TCP port the daemon carries to a key's exposed service."""

    #: The exposing side's key (64 hex characters).
    public_key: bytes
    #: Local TCP address to accept connections on, "HOST:PORT".
    listen: tuple[str, int]


@dataclass(frozen=True)
class ControlConfig:
    #: Control socket path; empty = <state_dir>/control.sock.
    socket: Path | None = None
    #: Group allowed to use the socket (mode 0660, e.g. "dhtnode" under systemd); empty: only
    #: the daemon's user (mode 0600).
    group: str = ""


@dataclass(frozen=True)
class MetricsConfig:
    #: Prometheus metrics on http://HOST:PORT/metrics, e.g. "127.0.0.1:9464"; empty: off.
    listen: str = ""


@dataclass(frozen=True)
class Config:
    node: NodeConfig = field(default_factory=NodeConfig)
    log: LogConfig = field(default_factory=LogConfig)
    dht: DhtConfig = field(default_factory=DhtConfig)
    records: RecordsConfig = field(default_factory=RecordsConfig)
    relay: RelayConfig = field(default_factory=RelayConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    expose: tuple[ExposeConfig, ...] = ()
    forward: tuple[ForwardConfig, ...] = ()

    @property
    def control_socket_path(self) -> Path:
        return self.control.socket or self.node.state_dir / "control.sock"


# (table, key) -> (kind, low, high) for numbers; kind in int/float/str/ip/bool/path/bootstrap/enum
# (for ip, low says what the address is for)
_RULES: dict[tuple[str, str], tuple[str, Any, Any]] = {
    ("node", "host"): ("ip", "an address of this host to bind", None),
    ("node", "port"): ("int", 0, 65535),
    ("node", "bootstrap"): ("bootstrap", None, None),
    ("node", "bootstrap_node"): ("bool", None, None),
    ("node", "public_host"): ("ip", "the public IP other nodes reach this one at", None),
    ("node", "state_dir"): ("path", None, None),
    ("node", "network"): ("network", None, None),
    ("log", "level"): ("enum", ("debug", "info", "warning", "error"), None),
    ("log", "format"): ("enum", ("auto", "json", "console"), None),
    ("dht", "k"): ("int", 2, 64),
    ("dht", "alpha"): ("int", 1, 16),
    ("dht", "request_timeout"): ("float", 0.05, 30.0),
    ("dht", "bucket_refresh"): ("float", 10.0, 86400.0),
    ("records", "ttl"): ("float", 10.0, 86400.0),
    ("records", "max_total"): ("int", 1, 10_000_000),
    ("records", "max_per_topic"): ("int", 1, 100_000),
    ("records", "max_per_ip"): ("int", 1, 10_000_000),
    ("relay", "enabled"): ("bool", None, None),
    ("relay", "max_sessions"): ("int", 0, 1_000_000),
    ("relay", "max_sessions_per_ip"): ("int", 1, 1_000_000),
    ("relay", "session_rate"): ("float", 1000.0, 1e10),
    ("relay", "total_rate"): ("float", 1000.0, 1e11),
    ("relay", "max_duration"): ("float", 10.0, 86400.0 * 7),
    ("control", "socket"): ("path", None, None),
    ("control", "group"): ("str", None, None),
    ("metrics", "listen"): ("listen", None, None),
}
_TABLES = {"node": NodeConfig, "log": LogConfig, "dht": DhtConfig, "records": RecordsConfig,
           "relay": RelayConfig, "control": ControlConfig, "metrics": MetricsConfig}


def _check(name: str, rule: tuple[str, Any, Any], value: Any) -> Any:
    kind, low, high = rule
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(name, f"must be an integer from {low} to {high}, got {value!r}")
        if not low <= value <= high:
            raise ConfigError(name, f"must be an integer from {low} to {high}, got {value}")
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(name, f"must be a number from {low} to {high}, got {value!r}")
        if not low <= value <= high:
            raise ConfigError(name, f"must be a number from {low} to {high}, got {value}")
        return float(value)
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(name, f"must be true or false, got {value!r}")
        return value
    if kind == "str":
        if not isinstance(value, str):
            raise ConfigError(name, f"must be a string, got {value!r}")
        return value.strip()
    if kind == "ip":
        if not isinstance(value, str):
            raise ConfigError(name, f"must be an IP address string, got {value!r}")
        text = value.strip()
        try:
            if text:
                ipaddress.ip_address(text)
        except ValueError:
            raise ConfigError(
                name, f"must be an IP address ({low}), such as 0.0.0.0, :: or 203.0.113.7; "
                f"got {text!r}. Names are not resolved here: give the address itself "
                "(e.g. the output of `getent ahosts NAME`)"
            ) from None
        return text
    if kind == "enum":
        if value not in low:
            raise ConfigError(name, f"must be one of {', '.join(low)}, got {value!r}")
        return value
    if kind == "path":
        if not isinstance(value, str | Path):
            raise ConfigError(name, f"must be a path string, got {value!r}")
        return Path(value).expanduser() if str(value) else None
    if kind == "listen":
        if not isinstance(value, str):
            raise ConfigError(name, f'must be a "HOST:PORT" string (or "" for off), got {value!r}')
        if not value.strip():
            return ""
        try:
            parse_host_port(value.strip())
        except ValueError as exc:
            raise ConfigError(name, f'must be "HOST:PORT" (or "" for off): {exc}') from None
        return value.strip()
    if kind == "network":
        fix = (f'give a name of 1 to {MAX_NETWORK_NAME} printable characters, such as '
               f'"testnet-1", or "{PUBLIC_NETWORK}" for the public network')
        if not isinstance(value, str):
            raise ConfigError(name, f"must be a string: {fix}; got {value!r}")
        text = value.strip()
        if not text or len(text) > MAX_NETWORK_NAME or not text.isprintable():
            raise ConfigError(name, f"{fix}; got {value!r}")
        return text
    if kind == "bootstrap":
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise ConfigError(name, 'must be a list of "HOST:PORT" strings')
        out = []
        for v in value:
            try:
                # The port is required, as everywhere else (ping, stun, [[forward]]): a
                # silent default would join the wrong port with no trace.
                out.append(parse_host_port(v))
            except ValueError as exc:
                raise ConfigError(name, str(exc)) from None
        return tuple(out)
    raise AssertionError(kind)


def load_config(path: Path | None) -> Config:
    """Defaults, overlaid with the TOML file at ``path`` (if given)."""
    if path is None:
        return Config()
    import tomllib  # only with a config file: a one-shot command without one skips it

    try:
        raw = Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise ConfigError("--config", f"cannot read {path}: {exc.strerror}") from None
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError("--config", f"{path} is not valid TOML: {exc}") from None
    parts: dict[str, Any] = {}
    for table in ("expose", "forward"):
        if table in doc:
            parts[table] = _entries(table, doc.pop(table))
    for table, body in doc.items():
        if table not in _TABLES:
            raise ConfigError(table, f"unknown table; known tables: {', '.join(_TABLES)}")
        if not isinstance(body, dict):
            raise ConfigError(table, "must be a table like [" + table + "]")
        cls = _TABLES[table]
        known = [f.name for f in fields(cls)]
        values: dict[str, Any] = {}
        for key, value in body.items():
            if key not in known:
                raise ConfigError(
                    f"{table}.{key}", f"unknown key; known keys: {', '.join(known)}"
                )
            checked = _check(f"{table}.{key}", _RULES[(table, key)], value)
            if checked is None and key == "state_dir":
                continue
            values[key] = checked
        parts[table] = cls(**values)
    return Config(**parts)


def _hex_key(name: str, value: Any) -> bytes:
    try:
        key = bytes.fromhex(value) if isinstance(value, str) else b""
    except ValueError:
        key = b""
    if len(key) != 32:
        raise ConfigError(name, f"must be a public key of 64 hex characters, got {value!r}")
    return key


def _host_port(name: str, value: Any) -> tuple[str, int]:
    if not isinstance(value, str):
        raise ConfigError(name, f'must be a "HOST:PORT" string, got {value!r}')
    try:
        return parse_host_port(value)
    except ValueError as exc:
        raise ConfigError(name, str(exc)) from None


def _entries(table: str, items: Any) -> tuple[Any, ...]:
    """``[[expose]]`` / ``[[forward]]`` arrays of tables."""
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise ConfigError(table, f"must be an array of tables, written [[{table}]]")
    out: list[Any] = []
    for n, item in enumerate(items):
        where = f"{table}[{n}]"
        known = ("target", "allow", "public", "key_file") if table == "expose" else (
            "public_key", "listen")
        for key in item:
            if key not in known:
                raise ConfigError(f"{where}.{key}", f"unknown key; known keys: {', '.join(known)}")
        if table == "forward":
            for key in known:
                if key not in item:
                    raise ConfigError(f"{where}.{key}", "is required")
            out.append(ForwardConfig(_hex_key(f"{where}.public_key", item["public_key"]),
                                     _host_port(f"{where}.listen", item["listen"])))
            continue
        if "target" not in item:
            raise ConfigError(f"{where}.target", 'is required ("HOST:PORT" of the service)')
        allow = item.get("allow", [])
        if not isinstance(allow, list):
            raise ConfigError(f"{where}.allow", "must be a list of 64-hex public keys")
        public = _check(f"{where}.public", ("bool", None, None), item.get("public", False))
        if not allow and not public:
            raise ConfigError(f"{where}.allow", "is empty: list the client keys allowed, or set "
                              "public = true (a key is no secret: anyone could connect)")
        key_file = _check(f"{where}.key_file", ("path", None, None), item.get("key_file", ""))
        out.append(ExposeConfig(
            _host_port(f"{where}.target", item["target"]),
            tuple(_hex_key(f"{where}.allow", k) for k in allow),
            public,
            key_file,
        ))
    return tuple(out)


def apply_overrides(
    cfg: Config,
    *,
    host: str | None = None,
    port: int | None = None,
    bootstrap: list[str] | None = None,
    state_dir: Path | None = None,
    bootstrap_node: bool | None = None,
    public_host: str | None = None,
    log_level: str | None = None,
    log_format: str | None = None,
    network: str | None = None,
) -> Config:
    """Command-line values (None = not given) on top of ``cfg``; same validation."""
    node: dict[str, Any] = {}
    if host is not None:
        node["host"] = _check("--host", _RULES[("node", "host")], host)
    if port is not None:
        node["port"] = _check("--port", _RULES[("node", "port")], port)
    if bootstrap is not None:
        node["bootstrap"] = _check("--bootstrap", _RULES[("node", "bootstrap")], bootstrap)
    if state_dir is not None:
        node["state_dir"] = Path(state_dir).expanduser()
    if bootstrap_node is not None:
        node["bootstrap_node"] = bool(bootstrap_node)
    if public_host is not None:
        node["public_host"] = _check("--public-host", _RULES[("node", "public_host")], public_host)
    if network is not None:
        node["network"] = _check("--network", _RULES[("node", "network")], network)
    log: dict[str, Any] = {}
    if log_level is not None:
        log["level"] = _check("--log-level", _RULES[("log", "level")], log_level)
    if log_format is not None:
        log["format"] = _check("--log-format", _RULES[("log", "format")], log_format)
    return replace(cfg, node=replace(cfg.node, **node), log=replace(cfg.log, **log))


def with_metrics(cfg: Config, listen: str | None) -> Config:
    """``--metrics HOST:PORT`` (None = not given) on top of ``cfg``; same validation."""
    if listen is None:
        return cfg
    return replace(cfg, metrics=MetricsConfig(_check("--metrics", _RULES[("metrics", "listen")],
                                                     listen)))
