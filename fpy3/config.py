"""Settings: the typed model, TOML loading, validation, env and CLI overrides.

Precedence, lowest first: defaults, the TOML file, ``FPY3_<SECTION>__<KEY>`` env vars,
CLI flags. Every error names where it came from: ``FILE: section.key: reason``.
"""

from __future__ import annotations

import argparse
import datetime
import difflib
import ipaddress
import math
import os
import re
import tomllib
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields

__all__ = [
    "ConfigError",
    "Settings",
    "add_arguments",
    "dump",
    "load",
    "overrides_from_args",
]


class ConfigError(Exception):
    """A config problem; ``str()`` is ``SOURCE: section.key: reason``."""


@dataclass(frozen=True, slots=True)
class ServerSettings:
    app: str = "fpy3.examples.hello:app"  # "module:attr"
    app_dir: str = ""  # prepended to sys.path; "" = the current directory
    host: str = "127.0.0.1"
    port: int = 8443  # TCP for HTTP/1.1 over TLS; UDP for HTTP/3 unless http3.port is set
    http_port: int = 0  # optional cleartext HTTP/1.1 port; 0 = off
    server_header: str = "fpy3"  # "" = no Server header
    root_path: str = ""
    debug: bool = False  # debug logs and tracebacks in 500 bodies
    state_dir: str = ""  # where the dev certificate lives; "" = $XDG_STATE_HOME/fpy3
    pidfile: str = ""  # the master writes its pid here after binding; "" = none
    user: str = ""  # workers drop to this user when the master runs as root; "" = keep
    group: str = ""  # and this group; "" = the user's primary group


@dataclass(frozen=True, slots=True)
class TLSSettings:
    cert: str = ""  # PEM certificate chain
    key: str = ""  # PEM private key
    dev_cert: bool = True  # without cert/key, make (once) and use a self-signed dev certificate
    min_version: str = "1.2"  # "1.2" | "1.3"
    ciphers: str = ""  # OpenSSL cipher list for TLS 1.2; "" = the library default


@dataclass(frozen=True, slots=True)
class WorkersSettings:
    count: int = 0  # worker processes; 0 = one per CPU
    drain_timeout: float = 30.0  # seconds a draining worker may finish in-flight requests
    timeout: float = 30.0  # a worker silent (no heartbeat) this long is killed and replaced
    max_requests: int = 0  # recycle a worker after this many requests; 0 = never
    max_requests_jitter: int = 0  # plus up to this many, so workers do not recycle together
    max_rss_mb: int = 0  # recycle a worker whose resident memory exceeds this; 0 = never


@dataclass(frozen=True, slots=True)
class HTTP1Settings:
    keepalive_timeout: float = 5.0  # idle seconds between requests before closing
    header_timeout: float = 10.0  # seconds to receive a whole request head, else 408
    backlog: int = 2048


@dataclass(frozen=True, slots=True)
class HTTP3Settings:
    enabled: bool = True
    port: int = 0  # UDP port; 0 = server.port
    max_concurrent_streams: int = 100  # request streams a client may open at once
    idle_timeout: float = 30.0  # seconds without packets before a connection is dropped
    handshake_timeout: float = 20.0  # seconds a QUIC handshake may take, else it is dropped
    body_timeout: float = 60.0  # seconds a request stream may make no progress, else reset
    send_timeout: float = 60.0  # seconds a response may make no progress, else reset
    max_udp_payload: int = 1452  # bytes per UDP datagram we send
    initial_max_data: int = 1024 * 1024  # connection flow-control window at first, bytes
    initial_max_stream_data: int = 256 * 1024  # per-stream window at first, bytes
    max_window: int = 16 * 1024 * 1024  # the connection window grows up to this
    max_stream_window: int = 6 * 1024 * 1024  # a stream window grows up to this
    unread_body_budget: int = 64 * 1024 * 1024  # unread request body bytes; past it no growth
    max_connections: int = 10000  # QUIC connections per worker; 0 = unlimited
    max_idle_connections: int = 768  # without a request; past it the longest idle close
    max_handshakes: int = 256  # connections in their handshake before Retry is required
    handshake_memory: int = 16 * 1024 * 1024  # bytes of handshakes before Retry is required
    retry: bool = False  # address validation with Retry before accepting any connection
    qlog_dir: str = ""  # write a qlog file per connection here; "" = off
    engine: str = "auto"  # auto | msquic | ngtcp2; auto = msquic when libmsquic.so.2 loads


@dataclass(frozen=True, slots=True)
class LimitsSettings:
    max_header_size: int = 32768  # bytes of request line + headers, else 431
    max_header_count: int = 100  # else 431
    max_body_size: int = 100 * 1024 * 1024  # bytes, else 413; 0 = unlimited
    max_connections: int = 10000  # per worker; over it new connections get 503; 0 = unlimited


@dataclass(frozen=True, slots=True)
class WebSocketSettings:
    enabled: bool = True  # websockets over HTTP/1.1 Upgrade and HTTP/3 extended CONNECT
    max_message_size: int = 16 * 1024 * 1024  # bytes received in one message, else 1009
    max_connections: int = 10000  # open websockets per worker, else 503; 0 = unlimited
    ping_interval: float = 20.0  # seconds of silence from the peer before a ping; 0 = none
    ping_timeout: float = 20.0  # seconds to wait for traffic after a ping, else drop
    idle_timeout: float = 0.0  # seconds without a message either way, else 1001; 0 = off
    close_timeout: float = 5.0  # seconds to wait for the client's close frame after ours
    per_message_deflate: bool = True  # accept permessage-deflate (RFC 7692) when offered
    deflate_window_bits: int = 15  # server_max_window_bits we compress with (9-15)
    deflate_level: int = 6  # zlib level 1-9


@dataclass(frozen=True, slots=True)
class LoggingSettings:
    level: str = "info"  # critical | error | warning | info | debug
    access_log: bool = True
    access_format: str = "common"  # common | json
    access_log_file: str = ""  # "" = stdout
    error_log_file: str = ""  # "" = stderr


@dataclass(frozen=True, slots=True)
class ReloadSettings:
    enabled: bool = False
    dirs: tuple[str, ...] = ()  # watched trees; () = app_dir and the config file
    include: tuple[str, ...] = ("*.py", "*.toml")
    exclude: tuple[str, ...] = (".*", "__pycache__")


@dataclass(frozen=True, slots=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    tls: TLSSettings = field(default_factory=TLSSettings)
    workers: WorkersSettings = field(default_factory=WorkersSettings)
    http1: HTTP1Settings = field(default_factory=HTTP1Settings)
    http3: HTTP3Settings = field(default_factory=HTTP3Settings)
    limits: LimitsSettings = field(default_factory=LimitsSettings)
    websocket: WebSocketSettings = field(default_factory=WebSocketSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    reload: ReloadSettings = field(default_factory=ReloadSettings)
    config_file: str = ""  # absolute path of the file loaded, "" when none

    @property
    def udp_port(self) -> int:
        return self.http3.port or self.server.port


# ---------------------------------------------------------------------------
# Schema: derived from the dataclasses above, so the model stays the one truth.

_SECTIONS: dict[str, type] = {
    f.name: typing.get_type_hints(Settings)[f.name]
    for f in fields(Settings)
    if f.name != "config_file"
}


def _kind(hint: object) -> type:
    """Reduce a field's type hint to the kinds the loader knows how to convert."""
    if hint in (int, float, bool, str):
        return typing.cast(type, hint)
    if hint == tuple[str, ...]:
        return tuple
    raise TypeError(f"config field type {hint!r} is not supported by the loader")


# section -> key -> kind (int, float, bool, str, or tuple meaning tuple[str, ...])
_FIELDS: dict[str, dict[str, type]] = {
    section: {name: _kind(hint) for name, hint in typing.get_type_hints(cls).items()}
    for section, cls in _SECTIONS.items()
}

# Relative paths in these are resolved against the config file's directory (file)
# or the current directory (env, command line).
_PATHS = frozenset(
    {
        "server.app_dir",
        "server.state_dir",
        "server.pidfile",
        "tls.cert",
        "tls.key",
        "logging.access_log_file",
        "logging.error_log_file",
        "reload.dirs",
        "http3.qlog_dir",
    }
)


class _Invalid(Exception):
    """A bad value; the message is the reason, the caller adds source and key."""


# ---------------------------------------------------------------------------
# Per-field checks (after type conversion).


def _between(lo: int, hi: int) -> Callable[[typing.Any], None]:
    def check(value: int) -> None:
        if not lo <= value <= hi:
            raise _Invalid(f"must be between {lo} and {hi}, got {value}")

    return check


def _at_least(lo: int) -> Callable[[typing.Any], None]:
    def check(value: int) -> None:
        if value < lo:
            raise _Invalid(f"must be at least {lo}, got {value}")

    return check


def _positive(value: float) -> None:
    if value <= 0:
        raise _Invalid(f"must be greater than 0, got {value}")


def _one_of(*choices: str) -> Callable[[typing.Any], None]:
    def check(value: str) -> None:
        if value not in choices:
            raise _Invalid(f"must be one of {', '.join(map(repr, choices))}; got {value!r}")

    return check


def _app_ref(value: str) -> None:
    module, colon, attr = value.partition(":")
    parts = [*module.split("."), *attr.split(".")]
    if not colon or not all(part.isidentifier() for part in parts):
        raise _Invalid(f"expected 'module.path:attribute', got {value!r}")


_HOST_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?", re.ASCII)


def _host(value: str) -> None:
    try:
        ipaddress.ip_address(value)
        return
    except ValueError:
        pass
    labels = value.removesuffix(".").split(".")
    # An all-digit last label is a malformed IPv4 address, not a hostname (RFC 1123).
    if (
        len(value) <= 253
        and all(_HOST_LABEL.fullmatch(label) for label in labels)
        and not labels[-1].isdigit()
    ):
        return
    raise _Invalid(f"expected an IP address or a hostname, got {value!r}")


def _engine(value: str) -> None:
    _one_of("auto", "msquic", "ngtcp2")(value)
    if value == "msquic":
        from .msquic import INSTALL_HINT, probe_msquic

        reason = probe_msquic()
        if reason is not None:
            raise _Invalid(f"libmsquic cannot be loaded ({reason}); {INSTALL_HINT}")


_CHECKS: dict[str, Callable[[typing.Any], None]] = {
    "server.app": _app_ref,
    "server.host": _host,
    "server.port": _between(1, 65535),
    "server.http_port": _between(0, 65535),
    "tls.min_version": _one_of("1.2", "1.3"),
    "workers.count": _between(0, 1024),
    "workers.drain_timeout": _positive,
    "workers.timeout": _positive,
    "workers.max_requests": _at_least(0),
    "workers.max_requests_jitter": _at_least(0),
    "workers.max_rss_mb": _at_least(0),
    "http1.keepalive_timeout": _positive,
    "http1.header_timeout": _positive,
    "http1.backlog": _between(1, 65535),
    "http3.port": _between(0, 65535),
    "http3.max_concurrent_streams": _between(1, 100000),
    "http3.idle_timeout": _positive,
    "http3.handshake_timeout": _positive,
    "http3.body_timeout": _at_least(0),
    "http3.send_timeout": _at_least(0),
    "http3.max_udp_payload": _between(1200, 65527),
    "http3.initial_max_data": _between(65536, 1 << 40),
    "http3.initial_max_stream_data": _between(16384, 1 << 40),
    "http3.max_window": _between(65536, 1 << 40),
    "http3.max_stream_window": _between(16384, 1 << 40),
    "http3.unread_body_budget": _between(1 << 20, 1 << 40),
    "http3.max_connections": _at_least(0),
    "http3.max_idle_connections": _at_least(0),
    "http3.max_handshakes": _between(0, 1 << 20),
    "http3.handshake_memory": _between(0, 1 << 40),
    "http3.engine": _engine,
    "limits.max_header_size": _at_least(1024),
    "limits.max_header_count": _between(1, 10000),
    "limits.max_body_size": _at_least(0),
    "limits.max_connections": _at_least(0),
    "websocket.max_message_size": _at_least(0),
    "websocket.max_connections": _at_least(0),
    "websocket.ping_interval": _at_least(0),
    "websocket.ping_timeout": _positive,
    "websocket.idle_timeout": _at_least(0),
    "websocket.close_timeout": _positive,
    "websocket.deflate_window_bits": _between(9, 15),
    "websocket.deflate_level": _between(1, 9),
    "logging.level": _one_of("critical", "error", "warning", "info", "debug"),
    "logging.access_format": _one_of("common", "json"),
}

# ---------------------------------------------------------------------------
# Type conversion: one path for every field, driven by its kind.

_EXPECTED = {
    int: "an integer",
    float: "a number",
    bool: "a boolean",
    str: "a string",
    tuple: "an array of strings",
}

# datetime before date: it is a subclass.
_DESCRIBE: tuple[tuple[type | tuple[type, ...], str], ...] = (
    (bool, "a boolean"),
    (int, "an integer"),
    (float, "a float"),
    (str, "a string"),
    ((list, tuple), "an array"),
    (dict, "a table"),
    (datetime.datetime, "a date-time"),
    (datetime.date, "a date"),
    (datetime.time, "a time"),
)


def _describe(value: object) -> str:
    for types, name in _DESCRIBE:
        if isinstance(value, types):
            return name
    return f"a {type(value).__name__}"


_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})
_INT_TEXT = re.compile(r"[+-]?[0-9]+")


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise _Invalid(f"expected a finite number, got {value}")
    return value


def _from_text(text: str, kind: type) -> object:
    """Convert an env var string to ``kind``."""
    stripped = text.strip()
    if kind is str:
        return text
    if kind is tuple:
        return tuple(part.strip() for part in text.split(",") if part.strip())
    if kind is bool and stripped.lower() in _TRUE:
        return True
    if kind is bool and stripped.lower() in _FALSE:
        return False
    if kind is int and _INT_TEXT.fullmatch(stripped):
        return int(stripped)
    if kind is float:
        try:
            return _finite(float(stripped))
        except ValueError:
            pass
    expected = _EXPECTED[kind]
    if kind is bool:
        expected += " (true/false, 1/0, yes/no, on/off)"
    raise _Invalid(f"expected {expected}, got {text!r}")


def _from_value(value: object, kind: type) -> object:
    """Check an already typed value (TOML or command line) against ``kind``."""
    if kind is tuple and isinstance(value, (list, tuple)):
        for item in value:
            if not isinstance(item, str):
                raise _Invalid(
                    f"expected an array of strings, got an array holding {_describe(item)}"
                )
        return tuple(value)
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return _finite(float(value))  # TOML and argparse give ints for whole numbers
        except OverflowError:
            raise _Invalid("expected a finite number, got a huge integer") from None
    # bool is a subclass of int, but true is not a port number.
    if isinstance(value, kind) and (kind is bool or not isinstance(value, bool)):
        return value
    raise _Invalid(f"expected {_EXPECTED[kind]}, got {_describe(value)}")


def _resolve(value: object, base: str) -> object:
    if isinstance(value, tuple):
        return tuple(_resolve(v, base) for v in value)
    assert isinstance(value, str)
    if not value:
        return value
    return os.path.normpath(os.path.join(base, os.path.expanduser(value)))


def _unknown(what: str, name: str, known: Mapping[str, object]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f"unknown {what}; did you mean {close[0]!r}?" if close else f"unknown {what}"


# ---------------------------------------------------------------------------
# Loading.

# Precedence ranks, used to blame the right source for a cross-field error.
_DEFAULT, _FILE, _ENV, _CLI = range(4)
_CLI_SOURCE = "command line"


class _Draft:
    """Values gathered so far, and where each came from."""

    def __init__(self) -> None:
        defaults = Settings()
        self.values = {
            section: {key: getattr(getattr(defaults, section), key) for key in keys}
            for section, keys in _FIELDS.items()
        }
        self.origins: dict[str, tuple[int, str]] = {}

    def put(
        self,
        source: str,
        rank: int,
        section: str,
        key: str,
        value: object,
        *,
        text: bool,
        base: str,
    ) -> None:
        if section not in _FIELDS:
            raise ConfigError(f"{source}: {section}: {_unknown('section', section, _FIELDS)}")
        name = f"{section}.{key}"
        if key not in _FIELDS[section]:
            raise ConfigError(f"{source}: {name}: {_unknown('key', key, _FIELDS[section])}")
        kind = _FIELDS[section][key]
        try:
            value = _from_text(typing.cast(str, value), kind) if text else _from_value(value, kind)
            if name in _PATHS:
                value = _resolve(value, base)
            if name in _CHECKS:
                _CHECKS[name](value)
        except _Invalid as exc:
            raise ConfigError(f"{source}: {name}: {exc}") from None
        self.values[section][key] = value
        self.origins[name] = (rank, source)

    def get(self, name: str) -> typing.Any:
        section, _, key = name.partition(".")
        return self.values[section][key]

    def rank(self, name: str) -> int:
        return self.origins.get(name, (_DEFAULT, ""))[0]

    def blame(self, *names: str) -> str:
        """The source of whichever of ``names`` was set last (highest precedence)."""
        name = max(names, key=self.rank)
        return self.origins.get(name, (_DEFAULT, "defaults"))[1]


def _read_toml(source: str) -> dict[str, typing.Any]:
    try:
        with open(source, "rb") as f:
            raw = f.read()
        text = raw.decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: cannot read: not UTF-8 text ({exc.reason})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        # Python 3.12's TOMLDecodeError has no lineno; the position is in the message.
        if m := re.fullmatch(r"(.*) \(at line (\d+), column \d+\)", message, re.S):
            reason, line = m[1], int(m[2])
        elif m := re.fullmatch(r"(.*) \(at end of document\)", message, re.S):
            reason, line = m[1], max(1, text.count("\n") + (not text.endswith("\n")))
        else:
            raise ConfigError(f"{source}: {message}") from None
        raise ConfigError(f"{source}: line {line}: {reason}") from None


def _apply_file(draft: _Draft, source: str, config_file: str) -> None:
    base = os.path.dirname(config_file)
    for section, table in _read_toml(source).items():
        if not isinstance(table, dict):
            reason = f"expected a table, got {_describe(table)}"
            owners = [s for s, keys in _FIELDS.items() if section in keys]
            if section not in _FIELDS and owners:
                reason += f"; did you mean to put it under [{owners[0]}]?"
            raise ConfigError(f"{source}: {section}: {reason}")
        if section not in _FIELDS:
            raise ConfigError(f"{source}: {section}: {_unknown('section', section, _FIELDS)}")
        for key, value in table.items():
            draft.put(source, _FILE, section, key, value, text=False, base=base)


def _apply_env(draft: _Draft, env: Mapping[str, str]) -> None:
    cwd = os.getcwd()
    for var, text in sorted(env.items()):
        # FPY3_ vars without "__" belong to other parts of fpy3 (e.g. FPY3_MSQUIC_LIB).
        if not var.startswith("FPY3_") or "__" not in var:
            continue
        section, _, key = var.removeprefix("FPY3_").partition("__")
        draft.put(f"env {var}", _ENV, section.lower(), key.lower(), text, text=True, base=cwd)


def _apply_overrides(draft: _Draft, overrides: Mapping[str, object]) -> None:
    cwd = os.getcwd()
    for name, value in overrides.items():
        if value is None:  # a flag that was not given
            continue
        section, dot, key = name.partition(".")
        if not dot:
            raise ConfigError(f"{_CLI_SOURCE}: {name}: expected 'section.key'")
        draft.put(_CLI_SOURCE, _CLI, section, key, value, text=False, base=cwd)


def _check_file(path: str) -> str | None:
    if not os.path.exists(path):
        return f"file not found: {path}"
    if not os.path.isfile(path):
        return f"not a regular file: {path}"
    if not os.access(path, os.R_OK):
        return f"file not readable: {path}"
    return None


def _check_together(draft: _Draft) -> None:
    """Rules that span several fields, checked once every layer is applied."""
    cert, key = draft.get("tls.cert"), draft.get("tls.key")
    if bool(cert) != bool(key):
        missing, given = ("tls.key", "tls.cert") if cert else ("tls.cert", "tls.key")
        raise ConfigError(f"{draft.blame(given)}: {missing}: required when {given} is set")
    if not cert and not draft.get("tls.dev_cert"):
        source = draft.blame("tls.dev_cert", "tls.cert")
        raise ConfigError(f"{source}: tls.cert: required when tls.dev_cert is false")
    for name in ("tls.cert", "tls.key"):
        if draft.get(name) and (reason := _check_file(draft.get(name))):
            raise ConfigError(f"{draft.blame(name)}: {name}: {reason}")
    for small, large in (
        ("http3.initial_max_data", "http3.max_window"),
        ("http3.initial_max_stream_data", "http3.max_stream_window"),
    ):
        if draft.get(small) > draft.get(large):
            name = large if draft.rank(large) >= draft.rank(small) else small
            raise ConfigError(
                f"{draft.blame(small, large)}: {name}: {large} ({draft.get(large)}) must be at "
                f"least {small} ({draft.get(small)})"
            )
    port, http_port = draft.get("server.port"), draft.get("server.http_port")
    if http_port == port:
        # Name whichever of the two was set last: that is the one to fix.
        name, other = "server.http_port", "server.port"
        if draft.rank(other) > draft.rank(name):
            name, other = other, name
        raise ConfigError(f"{draft.blame(name)}: {name}: must differ from {other} ({port})")


def load(
    path: str | os.PathLike[str] | None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> Settings:
    """Build validated Settings from defaults, a TOML file, env vars and CLI overrides.

    ``env`` defaults to ``os.environ``; ``overrides`` maps ``"section.key"`` to typed
    values (None values are skipped). Raises ConfigError on the first problem found.
    """
    draft = _Draft()
    config_file = ""
    if path is not None:
        source = os.fsdecode(path)
        config_file = os.path.abspath(source)
        _apply_file(draft, source, config_file)
    _apply_env(draft, os.environ if env is None else env)
    _apply_overrides(draft, overrides or {})
    _check_together(draft)
    sections = {s: cls(**draft.values[s]) for s, cls in _SECTIONS.items()}
    return Settings(**sections, config_file=config_file)


# ---------------------------------------------------------------------------
# Command line.

# argparse dest -> "section.key", for flags that carry a value.
_ARG_KEYS = {
    "app": "server.app",
    "host": "server.host",
    "port": "server.port",
    "http_port": "server.http_port",
    "workers": "workers.count",
    "certfile": "tls.cert",
    "keyfile": "tls.key",
    "log_level": "logging.level",
}
# argparse dest -> ("section.key", value set when the switch is given).
_ARG_SWITCHES = {
    "reload": ("reload.enabled", True),
    "no_access_log": ("logging.access_log", False),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the config flags; turn the parsed result into overrides with overrides_from_args."""
    group = parser.add_argument_group("configuration")
    add = group.add_argument
    add("--config", metavar="FILE", help="TOML config file")
    add("--app", metavar="MODULE:ATTR", help="ASGI application (server.app)")
    add("--host", metavar="H", help="address to bind (server.host)")
    add("--port", metavar="P", type=int, help="HTTPS and HTTP/3 port (server.port)")
    add("--http-port", metavar="P", type=int, help="cleartext HTTP/1.1 port, 0 = off")
    add("--workers", metavar="N", type=int, help="worker processes (workers.count)")
    add("--certfile", metavar="F", help="PEM certificate chain (tls.cert)")
    add("--keyfile", metavar="F", help="PEM private key (tls.key)")
    add("--log-level", metavar="L", help="critical|error|warning|info|debug")
    add("--reload", action="store_true", help="restart workers when files change")
    add("--no-access-log", action="store_true", help="turn the access log off")
    add("--check-config", action="store_true", help="print the effective config and exit")


def overrides_from_args(args: argparse.Namespace) -> dict[str, object]:
    """Map the flags that were given to ``{"section.key": value}`` for load()."""
    overrides: dict[str, object] = {}
    for dest, name in _ARG_KEYS.items():
        if (value := getattr(args, dest, None)) is not None:
            overrides[name] = value
    for dest, (name, value) in _ARG_SWITCHES.items():
        if getattr(args, dest, False):
            overrides[name] = value
    return overrides


# ---------------------------------------------------------------------------
# Dump.

_TOML_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


def _toml_string(text: str) -> str:
    out = []
    for ch in text:
        if ch in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[ch])
        elif ch < " " or ch == "\x7f":  # other control characters must be escaped
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def dump(settings: Settings) -> str:
    """The effective settings as TOML text that load() reads back unchanged."""
    lines = ["# fpy3 effective configuration"]
    if settings.config_file:
        lines.append(f"# loaded from {_toml_string(settings.config_file)}")
    for section, keys in _FIELDS.items():
        values = getattr(settings, section)
        lines += ["", f"[{section}]"]
        lines += [f"{key} = {_toml_value(getattr(values, key))}" for key in keys]
    return "\n".join(lines) + "\n"
