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
    factory: bool = False  # server.app is a callable returning the ASGI app
    host: str = "127.0.0.1"  # "::" serves IPv4 too where the host allows it
    hosts: tuple[str, ...] = ()  # several addresses, each with every port; () = [host]
    port: int = 8443  # TCP for HTTP/1.1 over TLS; UDP for HTTP/3 unless http3.port is set; 0 = off
    http_port: int = 0  # optional cleartext HTTP/1.1 port; 0 = off
    uds: str = ""  # a Unix socket serving cleartext HTTP/1.1; "" = none
    uds_mode: int = 0o660  # its permissions
    fds: tuple[str, ...] = ()  # inherited listening sockets: "N" or "N:https|http|quic"
    server_header: str = "fpy3"  # "" = no Server header
    root_path: str = ""
    debug: bool = False  # debug logs and tracebacks in 500 bodies
    state_dir: str = ""  # dev certificate, key file, ACME files; "" = $XDG_STATE_HOME/fpy3
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
    handshake_timeout: float = (
        10.0  # seconds for a TLS handshake on TCP, else the connection closes
    )
    key_password: str = ""  # the passphrase of an encrypted tls.key
    key_password_file: str = ""  # or a file holding it (first line); "" = none
    client_auth: str = "none"  # none | optional | required: client certificates (mTLS)
    client_ca: str = ""  # PEM bundle of the CAs client certificates must chain to
    session_tickets: bool = True  # TLS 1.3 resumption, keys shared by workers and replicas
    ticket_lifetime: int = 21600  # seconds; ticket keys rotate this often
    keys_file: str = ""  # ticket/reset/token keys; "" = server.state_dir/session-keys
    watch_interval: float = 10.0  # seconds between checks of the cert files; 0 = off


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
    body_timeout: float = 30.0  # seconds without body progress (1 KiB) while one is due, else 408
    send_timeout: float = 30.0  # seconds a client may leave the response unread, else dropped
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
    early_data: bool = False  # accept 0-RTT requests (safe methods only; others get 425)
    alt_svc: bool = True  # announce HTTP/3 with Alt-Svc on HTTP/1.1 responses
    alt_svc_port: int = 0  # the port clients reach HTTP/3 on; 0 = the UDP port bound
    alt_svc_host: str = ""  # the host clients reach HTTP/3 on; "" = the same host
    alt_svc_max_age: int = 86400  # seconds clients may remember the announcement (ma)


@dataclass(frozen=True, slots=True)
class ProxySettings:
    headers: bool = True  # apply proxy headers from trusted peers (uvicorn's --proxy-headers)
    header_style: str = "x-forwarded"  # "x-forwarded" (X-Forwarded-*) | "forwarded" (RFC 7239)
    # Trusted proxies: addresses, networks (CIDR) or "*"; default $FORWARDED_ALLOW_IPS.
    forwarded_allow_ips: tuple[str, ...] = ("127.0.0.1",)
    protocol: str = "off"  # PROXY protocol required on: off | tls | cleartext | all
    protocol_timeout: float = 5.0  # seconds for a connection's PROXY header, else closed


@dataclass(frozen=True, slots=True)
class HealthSettings:
    ready_path: str = ""  # readiness: 200, or 503 once the server stops; "" = off
    live_path: str = ""  # liveness: 200 while the worker's loop runs; "" = off
    drain_delay: float = 0.0  # seconds of failing readiness, serving as usual, before a stop drains


@dataclass(frozen=True, slots=True)
class HTTP2Settings:
    enabled: bool = True  # h2 in ALPN on the TLS port, prior knowledge (h2c) on http_port
    max_concurrent_streams: int = 100  # request streams a client may have open at once
    max_header_list_size: int = 0  # SETTINGS_MAX_HEADER_LIST_SIZE; 0 = limits.max_header_size
    initial_window_size: int = 1024 * 1024  # per-stream receive window, bytes
    connection_window_size: int = 8 * 1024 * 1024  # connection receive window, bytes
    max_frame_size: int = 16384  # largest frame the client may send, bytes
    idle_timeout: float = 60.0  # seconds without an open stream before GOAWAY and close
    send_timeout: float = 30.0  # a response the client's window holds back this long is reset
    reset_burst: int = 200  # RST_STREAM frames a client may send at once (rapid reset)
    reset_rate: int = 33  # and per second after that; past it GOAWAY
    control_frame_burst: int = 1000  # PING/SETTINGS/PRIORITY/empty DATA frames at once
    control_frame_rate: int = 100  # and per second after that; past it ENHANCE_YOUR_CALM
    max_continuations: int = 8  # CONTINUATION frames after one HEADERS frame


@dataclass(frozen=True, slots=True)
class LimitsSettings:
    max_header_size: int = 32768  # bytes of request line + headers, else 431
    max_header_count: int = 100  # else 431
    max_body_size: int = 100 * 1024 * 1024  # bytes, else 413; 0 = unlimited
    max_connections: int = 10000  # per worker; over it new connections get 503; 0 = unlimited
    # TCP connections per worker with no request in progress; past it the longest idle
    # are closed; 0 = unlimited.
    max_idle_connections: int = 1024


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
    config_file: str = ""  # logging dictConfig (.json, .yaml/.yml) or fileConfig (.ini)
    access_log: bool = True
    access_format: str = "common"  # common | json | a template with {named} fields
    access_log_file: str = ""  # "" = stdout
    error_log_file: str = ""  # "" = stderr


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    port: int = 0  # the master's Prometheus endpoint (GET /metrics); 0 = off
    host: str = "127.0.0.1"


@dataclass(frozen=True, slots=True)
class ReloadSettings:
    enabled: bool = False
    dirs: tuple[str, ...] = ()  # watched trees; () = app_dir and the config file
    include: tuple[str, ...] = ("*.py", "*.toml")
    exclude: tuple[str, ...] = (".*", "__pycache__")


LETSENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"
LETSENCRYPT_STAGING = "https://acme-staging-v02.api.letsencrypt.org/directory"
ACME_DIRECTORIES = {"letsencrypt": LETSENCRYPT, "letsencrypt-staging": LETSENCRYPT_STAGING}


@dataclass(frozen=True, slots=True)
class AcmeSettings:
    enabled: bool = False  # certificates from an ACME CA, made and renewed by the master
    directory: str = "letsencrypt"  # letsencrypt | letsencrypt-staging | a directory URL
    email: str = ""  # contact for the account; "" = none
    domains: tuple[str, ...] = ()  # names on the certificate, the first is its subject
    challenge: str = "tls-alpn-01"  # tls-alpn-01 (on server.port) | http-01 (server.http_port)
    ca_bundle: str = ""  # CA file to trust the ACME server with; "" = the system's
    retry_interval: float = 60.0  # seconds before retrying a failure, doubled up to a day

    @property
    def directory_url(self) -> str:
        return ACME_DIRECTORIES.get(self.directory, self.directory)


@dataclass(frozen=True, slots=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    tls: TLSSettings = field(default_factory=TLSSettings)
    workers: WorkersSettings = field(default_factory=WorkersSettings)
    http1: HTTP1Settings = field(default_factory=HTTP1Settings)
    http2: HTTP2Settings = field(default_factory=HTTP2Settings)
    http3: HTTP3Settings = field(default_factory=HTTP3Settings)
    limits: LimitsSettings = field(default_factory=LimitsSettings)
    proxy: ProxySettings = field(default_factory=ProxySettings)
    health: HealthSettings = field(default_factory=HealthSettings)
    websocket: WebSocketSettings = field(default_factory=WebSocketSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    reload: ReloadSettings = field(default_factory=ReloadSettings)
    acme: AcmeSettings = field(default_factory=AcmeSettings)
    config_file: str = ""  # absolute path of the file loaded, "" when none

    @property
    def udp_port(self) -> int:
        """The UDP port HTTP/3 binds (0: none, unless an inherited socket serves it)."""
        return self.http3.port or self.server.port

    @property
    def bind_hosts(self) -> tuple[str, ...]:
        """The addresses every configured port is bound on."""
        return self.server.hosts or (self.server.host,)

    @property
    def state_path(self) -> str:
        """server.state_dir, or its default."""
        return self.server.state_dir or default_state_dir()


def default_state_dir() -> str:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state"
    )
    return os.path.join(base, "fpy3")


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
        "server.uds",
        "logging.config_file",
        "tls.cert",
        "tls.key",
        "tls.key_password_file",
        "tls.client_ca",
        "tls.keys_file",
        "acme.ca_bundle",
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


def _allow_list(value: tuple[str, ...]) -> None:
    for entry in value:
        text = entry.strip()
        if text == "*":
            continue
        try:
            if "/" in text:
                ipaddress.ip_network(text)
            else:
                ipaddress.ip_address(text)
        except ValueError as exc:
            raise _Invalid(
                f"expected addresses, networks (CIDR) or '*', got {entry!r} ({exc})"
            ) from None


def _health_path(value: str) -> None:
    if value and not re.fullmatch(r"/[!$&-;=@-~]*", value):
        raise _Invalid(f"expected a path starting with '/', without a query, got {value!r}")


def _alt_svc_host(value: str) -> None:
    if value:
        _host(value)


def _engine(value: str) -> None:
    _one_of("auto", "msquic", "ngtcp2")(value)
    if value == "msquic":
        from .msquic import INSTALL_HINT, probe_msquic

        reason = probe_msquic()
        if reason is not None:
            raise _Invalid(f"libmsquic cannot be loaded ({reason}); {INSTALL_HINT}")


def _hosts(value: tuple[str, ...]) -> None:
    for host in value:
        _host(host)
    if len(set(value)) != len(value):
        raise _Invalid(f"lists an address twice: {list(value)}")


# sun_path is 108 bytes with its NUL.
_UDS_MAX = 107


def _uds(value: str) -> None:
    if len(os.fsencode(value)) > _UDS_MAX:
        raise _Invalid(f"a Unix socket path is at most {_UDS_MAX} bytes, got {value!r}")


FD_KINDS = ("https", "http", "quic")


def parse_fd(text: str) -> tuple[int, str]:
    """``"N"`` or ``"N:KIND"`` (server.fds) -> (fd, kind); kind "" = by socket type."""
    number, _, kind = text.partition(":")
    if not number.isdigit() or (kind and kind not in FD_KINDS):
        raise _Invalid(f"expected 'N' or 'N:{'|'.join(FD_KINDS)}', got {text!r}")
    return int(number), kind


def _fds(value: tuple[str, ...]) -> None:
    numbers = [parse_fd(text)[0] for text in value]
    if len(set(numbers)) != len(numbers):
        raise _Invalid(f"lists a file descriptor twice: {list(value)}")


_LOG_CONFIG_TYPES = (".json", ".yaml", ".yml", ".ini", ".conf", ".cfg")


def _log_config(value: str) -> None:
    if value and not value.lower().endswith(_LOG_CONFIG_TYPES):
        raise _Invalid(
            f"expected a .json, .yaml/.yml (dictConfig) or .ini (fileConfig) file, got {value!r}"
        )


# The named fields of logging.access_format templates (rendered in logs.AccessLog);
# request headers are "header_<name>" with "-" written "_" (header_x_request_id).
ACCESS_FIELDS = {
    "client": "the client's address",
    "client_addr": "address:port",
    "method": "GET, POST, ...",
    "path": "the request path",
    "query": "the query string, without '?'",
    "target": "path?query as sent",
    "request_line": 'for example "GET /x HTTP/1.1"',
    "protocol": "HTTP/1.1, HTTP/3, ...",
    "http_version": "1.1, 3, ...",
    "scheme": "http, https, ws, wss",
    "status": "the response status",
    "bytes": "response body bytes sent",
    "duration": "seconds from the request to the end of the response",
    "duration_ms": "the same in milliseconds",
    "time": "Common Log Format time",
    "time_iso": "ISO 8601 time, UTC",
    "user_agent": "the User-Agent header or -",
    "referer": "the Referer header or -",
    "host": "the Host header (or :authority) or -",
    "pid": "the worker's process id",
}
ACCESS_PRESETS = ("common", "json")


def access_template_fields(template: str) -> list[str]:
    """The field names of an access log template; raises ValueError when bad."""
    import string

    names = []
    for _, name, spec, _ in string.Formatter().parse(template):
        if name is None:
            continue
        if name not in ACCESS_FIELDS and not (
            name.startswith("header_") and re.fullmatch(r"header_[a-z0-9_]+", name)
        ):
            known = ", ".join(ACCESS_FIELDS)
            raise ValueError(f"unknown field {{{name}}}; known: {known}, header_<name>")
        if spec and "{" in spec:
            raise ValueError(f"nested fields are not supported in {{{name}:{spec}}}")
        names.append(name)
    return names


def _access_format(value: str) -> None:
    if value in ACCESS_PRESETS:
        return
    try:
        names = access_template_fields(value)
        if not names:
            raise ValueError("names no {field}")
        sample: dict[str, object] = {
            name: 0 if name in ("status", "bytes", "pid") else "x" for name in names
        }
        sample.update(duration=0.0, duration_ms=0.0)
        value.format_map(sample)
    except (ValueError, KeyError, IndexError) as exc:
        raise _Invalid(
            f"expected 'common', 'json' or a template with {{named}} fields: {exc}"
        ) from None


def _domains(value: tuple[str, ...]) -> None:
    for name in value:
        host = name.removeprefix("*.")
        try:
            _host(host)
        except _Invalid:
            raise _Invalid(f"expected host names, got {name!r}") from None


def _directory(value: str) -> None:
    if value not in ACME_DIRECTORIES and not re.match(r"https?://[^/\s]+", value):
        names = ", ".join(map(repr, ACME_DIRECTORIES))
        raise _Invalid(f"expected {names} or an http(s) URL, got {value!r}")


_CHECKS: dict[str, Callable[[typing.Any], None]] = {
    "server.app": _app_ref,
    "server.host": _host,
    "server.hosts": _hosts,
    "server.port": _between(0, 65535),
    "server.http_port": _between(0, 65535),
    "server.uds": _uds,
    "server.uds_mode": _between(0, 0o777),
    "server.fds": _fds,
    "tls.min_version": _one_of("1.2", "1.3"),
    "tls.client_auth": _one_of("none", "optional", "required"),
    "tls.ticket_lifetime": _between(60, 7 * 86400),
    "tls.watch_interval": _at_least(0),
    "acme.domains": _domains,
    "acme.directory": _directory,
    "acme.challenge": _one_of("tls-alpn-01", "http-01"),
    "acme.retry_interval": _positive,
    "workers.count": _between(0, 1024),
    "workers.drain_timeout": _positive,
    "workers.timeout": _positive,
    "workers.max_requests": _at_least(0),
    "workers.max_requests_jitter": _at_least(0),
    "workers.max_rss_mb": _at_least(0),
    "http1.keepalive_timeout": _positive,
    "http1.header_timeout": _positive,
    "http1.body_timeout": _positive,
    "http1.send_timeout": _positive,
    "tls.handshake_timeout": _positive,
    "http1.backlog": _between(1, 65535),
    "http2.max_concurrent_streams": _between(1, 100000),
    "http2.max_header_list_size": _between(0, 16 * 1024 * 1024),
    "http2.initial_window_size": _between(65535, 2**31 - 1),
    "http2.connection_window_size": _between(65535, 2**31 - 1),
    "http2.max_frame_size": _between(16384, 16777215),
    "http2.idle_timeout": _positive,
    "http2.send_timeout": _positive,
    "http2.reset_burst": _between(1, 1000000),
    "http2.reset_rate": _between(1, 1000000),
    "http2.control_frame_burst": _between(1, 1000000),
    "http2.control_frame_rate": _between(1, 1000000),
    "http2.max_continuations": _between(1, 10000),
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
    "http3.alt_svc_port": _between(0, 65535),
    "http3.alt_svc_host": _alt_svc_host,
    "http3.alt_svc_max_age": _between(0, 2**31 - 1),
    "proxy.header_style": _one_of("x-forwarded", "forwarded"),
    "proxy.forwarded_allow_ips": _allow_list,
    "proxy.protocol": _one_of("off", "tls", "cleartext", "all"),
    "proxy.protocol_timeout": _positive,
    "health.ready_path": _health_path,
    "health.live_path": _health_path,
    "health.drain_delay": _at_least(0),
    "limits.max_header_size": _at_least(1024),
    "limits.max_header_count": _between(1, 10000),
    "limits.max_body_size": _at_least(0),
    "limits.max_connections": _at_least(0),
    "limits.max_idle_connections": _at_least(0),
    "websocket.max_message_size": _at_least(0),
    "websocket.max_connections": _at_least(0),
    "websocket.ping_interval": _at_least(0),
    "websocket.ping_timeout": _positive,
    "websocket.idle_timeout": _at_least(0),
    "websocket.close_timeout": _positive,
    "websocket.deflate_window_bits": _between(9, 15),
    "websocket.deflate_level": _between(1, 9),
    "logging.level": _one_of("critical", "error", "warning", "info", "debug"),
    "logging.access_format": _access_format,
    "logging.config_file": _log_config,
    "metrics.port": _between(0, 65535),
    "metrics.host": _host,
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
    if kind is int and re.fullmatch(r"0o[0-7]+", stripped):
        return int(stripped, 8)  # permissions (server.uds_mode)
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
        draft.put(_CLI_SOURCE, _CLI, section, key, value, text=isinstance(value, Text), base=cwd)


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
    acme = draft.get("acme.enabled")
    if acme and cert:
        source = draft.blame("acme.enabled", "tls.cert")
        raise ConfigError(f"{source}: tls.cert: must be empty with acme.enabled (ACME makes it)")
    for name in ("tls.cert", "tls.key", "tls.key_password_file", "tls.client_ca"):
        if draft.get(name) and (reason := _check_file(draft.get(name))):
            raise ConfigError(f"{draft.blame(name)}: {name}: {reason}")
    if draft.get("logging.config_file") and (
        reason := _check_file(draft.get("logging.config_file"))
    ):
        raise ConfigError(f"{draft.blame('logging.config_file')}: logging.config_file: {reason}")
    if draft.get("tls.key_password") and draft.get("tls.key_password_file"):
        source = draft.blame("tls.key_password", "tls.key_password_file")
        raise ConfigError(f"{source}: tls.key_password: set it or tls.key_password_file, not both")
    if draft.get("tls.client_auth") != "none" and not draft.get("tls.client_ca"):
        source = draft.blame("tls.client_auth", "tls.client_ca")
        raise ConfigError(
            f"{source}: tls.client_ca: required when tls.client_auth is "
            f"{draft.get('tls.client_auth')!r}"
        )
    if acme:
        if not draft.get("acme.domains"):
            source = draft.blame("acme.enabled", "acme.domains")
            raise ConfigError(f"{source}: acme.domains: required when acme.enabled is true")
        if draft.get("acme.challenge") == "http-01" and not draft.get("server.http_port"):
            source = draft.blame("acme.challenge", "server.http_port")
            raise ConfigError(
                f"{source}: acme.challenge: http-01 is answered on server.http_port, which is 0"
            )
        if draft.get("acme.ca_bundle") and (reason := _check_file(draft.get("acme.ca_bundle"))):
            raise ConfigError(f"{draft.blame('acme.ca_bundle')}: acme.ca_bundle: {reason}")
        try:
            import acme.client  # noqa: F401
        except ImportError:
            raise ConfigError(
                f"{draft.blame('acme.enabled')}: acme.enabled: needs the 'acme' package "
                "(pip install 'fpy3[acme]')"
            ) from None
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
    if http_port and http_port == port:
        # Name whichever of the two was set last: that is the one to fix.
        name, other = "server.http_port", "server.port"
        if draft.rank(other) > draft.rank(name):
            name, other = other, name
        raise ConfigError(f"{draft.blame(name)}: {name}: must differ from {other} ({port})")
    metrics = draft.get("metrics.port")
    for other in ("server.port", "server.http_port"):
        if metrics and metrics == draft.get(other):
            raise ConfigError(
                f"{draft.blame('metrics.port')}: metrics.port: must differ from {other} ({metrics})"
            )
    ready, live = draft.get("health.ready_path"), draft.get("health.live_path")
    if ready and ready == live:
        name = max(("health.ready_path", "health.live_path"), key=draft.rank)
        raise ConfigError(
            f"{draft.blame(name)}: {name}: the readiness and liveness paths must differ"
        )


def load(
    path: str | os.PathLike[str] | None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> Settings:
    """Build validated Settings from defaults, a TOML file, env vars and CLI overrides.

    ``env`` defaults to ``os.environ`` (its ``FORWARDED_ALLOW_IPS``, as uvicorn reads it,
    is the default of ``proxy.forwarded_allow_ips``); ``overrides`` maps ``"section.key"`` to typed
    values (None values are skipped). Raises ConfigError on the first problem found.
    """
    draft = _Draft()
    env = os.environ if env is None else env
    if (allow := env.get("FORWARDED_ALLOW_IPS")) is not None:
        # uvicorn's variable: the default of proxy.forwarded_allow_ips, below the file.
        draft.put(
            "env FORWARDED_ALLOW_IPS",
            _DEFAULT,
            "proxy",
            "forwarded_allow_ips",
            allow,
            text=True,
            base=os.getcwd(),
        )
    config_file = ""
    if path is not None:
        source = os.fsdecode(path)
        config_file = os.path.abspath(source)
        _apply_file(draft, source, config_file)
    _apply_env(draft, env)
    _apply_overrides(draft, overrides or {})
    _check_together(draft)
    sections = {s: cls(**draft.values[s]) for s, cls in _SECTIONS.items()}
    return Settings(**sections, config_file=config_file)


# ---------------------------------------------------------------------------
# Command line.


class Text(str):
    """A value given as text on the command line (``--set``): converted by the key's type,
    as environment variables are."""


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


# argparse dest -> ("section.key", conversion of the parsed value), for flags with a value.
_ARG_KEYS: dict[str, tuple[str, Callable[[typing.Any], object]]] = {
    "app": ("server.app", str),
    "app_dir": ("server.app_dir", str),
    "port": ("server.port", int),
    "http_port": ("server.http_port", int),
    "uds": ("server.uds", str),
    "fd": ("server.fds", tuple),
    "root_path": ("server.root_path", str),
    "forwarded_allow_ips": ("proxy.forwarded_allow_ips", _csv),
    "proxy_headers": ("proxy.headers", bool),
    "server_header": ("server.server_header", str),
    "workers": ("workers.count", int),
    "timeout_graceful_shutdown": ("workers.drain_timeout", float),
    "limit_max_requests": ("workers.max_requests", int),
    "certfile": ("tls.cert", str),
    "keyfile": ("tls.key", str),
    "ssl_ciphers": ("tls.ciphers", str),
    "limit_concurrency": ("limits.max_connections", int),
    "backlog": ("http1.backlog", int),
    "timeout_keep_alive": ("http1.keepalive_timeout", float),
    "http3": ("http3.enabled", bool),
    "ws_max_size": ("websocket.max_message_size", int),
    "ws_ping_interval": ("websocket.ping_interval", float),
    "ws_ping_timeout": ("websocket.ping_timeout", float),
    "ws_per_message_deflate": ("websocket.per_message_deflate", bool),
    "log_level": ("logging.level", str),
    "log_config": ("logging.config_file", str),
    "access_log": ("logging.access_log", bool),
    "access_log_format": ("logging.access_format", str),
    "reload_dir": ("reload.dirs", tuple),
    "reload_include": ("reload.include", tuple),
    "reload_exclude": ("reload.exclude", tuple),
    "metrics_port": ("metrics.port", int),
}
# argparse dest -> ("section.key", value set when the switch is given).
_ARG_SWITCHES = {
    "reload": ("reload.enabled", True),
    "factory": ("server.factory", True),
}


def _flag_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE or value in _FALSE:
        return value in _TRUE
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the config flags, grouped as uvicorn's settings are; turn the parsed result
    into overrides with overrides_from_args. Every key without a flag of its own is
    ``--set section.key=value``."""
    group = parser.add_argument_group("application")
    add = group.add_argument
    add("--app", metavar="MODULE:ATTR", help="ASGI application (server.app)")
    add("--factory", action="store_true", help="the app is a factory: call it to get the app")
    add("--app-dir", metavar="DIR", help="put DIR first on sys.path (server.app_dir)")
    add("--env-file", metavar="FILE", help="load environment variables from a .env file first")

    group = parser.add_argument_group("socket binding")
    add = group.add_argument
    add(
        "--host",
        metavar="H",
        action="append",
        help="address to bind; '::' serves IPv4 too; repeat for several (server.host/hosts)",
    )
    add("--port", metavar="P", type=int, help="HTTPS and HTTP/3 port, 0 = none (server.port)")
    add("--http-port", metavar="P", type=int, help="cleartext HTTP/1.1 port, 0 = off")
    add("--uds", metavar="PATH", help="serve cleartext HTTP/1.1 on this Unix socket (server.uds)")
    add(
        "--fd",
        metavar="N[:KIND]",
        action="append",
        help="serve on inherited socket N (KIND https, http or quic); repeatable (server.fds)",
    )

    group = parser.add_argument_group("development")
    add = group.add_argument
    add("--reload", action="store_true", help="restart workers when files change")
    add("--reload-dir", metavar="DIR", action="append", help="watch DIR (repeatable)")
    add("--reload-include", metavar="GLOB", action="append", help="reload on these files")
    add("--reload-exclude", metavar="GLOB", action="append", help="never watch these")

    group = parser.add_argument_group("production")
    add = group.add_argument
    add("--workers", metavar="N", type=int, help="worker processes (workers.count)")
    add("--metrics-port", metavar="P", type=int, help="Prometheus endpoint of the master")

    group = parser.add_argument_group("logging")
    add = group.add_argument
    add("--log-config", metavar="FILE", help="logging config: .json/.yaml dictConfig or .ini")
    add("--log-level", metavar="L", help="critical|error|warning|info|debug")
    add(
        "--access-log",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="log one line per request (logging.access_log)",
    )
    add(
        "--access-log-format",
        metavar="FMT",
        help="common, json, or a template such as '{client} \"{request_line}\" {status}'",
    )

    group = parser.add_argument_group("HTTP")
    add = group.add_argument
    add("--root-path", metavar="PATH", help="ASGI root_path, for an app mounted under a prefix")
    add(
        "--proxy-headers",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="trust X-Forwarded-* and Forwarded from --forwarded-allow-ips",
    )
    add(
        "--forwarded-allow-ips",
        metavar="IPS",
        help="comma-separated addresses or networks to trust proxy headers from, or '*'",
    )
    add("--server-header", metavar="TEXT", help="the Server header; '' sends none")
    add("--http3", action=argparse.BooleanOptionalAction, default=None, help="serve HTTP/3")

    group = parser.add_argument_group("HTTPS")
    add = group.add_argument
    add("--certfile", "--ssl-certfile", metavar="F", help="PEM certificate chain (tls.cert)")
    add("--keyfile", "--ssl-keyfile", metavar="F", help="PEM private key (tls.key)")
    add("--ssl-ciphers", metavar="C", help="TLS 1.2 cipher list (tls.ciphers)")

    group = parser.add_argument_group("WebSocket")
    add = group.add_argument
    add("--ws-max-size", metavar="BYTES", type=int, help="largest message received")
    add("--ws-ping-interval", metavar="S", type=float, help="seconds of silence before a ping")
    add("--ws-ping-timeout", metavar="S", type=float, help="seconds to wait for the pong")
    add("--ws-per-message-deflate", metavar="BOOL", type=_flag_bool, help="permessage-deflate")

    group = parser.add_argument_group("resource limits")
    add = group.add_argument
    add("--limit-concurrency", metavar="N", type=int, help="connections per worker, then 503")
    add("--limit-max-requests", metavar="N", type=int, help="recycle a worker after N requests")
    add("--backlog", metavar="N", type=int, help="listen backlog (http1.backlog)")

    group = parser.add_argument_group("timeouts")
    add = group.add_argument
    add("--timeout-keep-alive", metavar="S", type=float, help="idle keep-alive seconds")
    add(
        "--timeout-graceful-shutdown",
        metavar="S",
        type=float,
        help="seconds a draining worker may finish requests (workers.drain_timeout)",
    )

    group = parser.add_argument_group("configuration")
    add = group.add_argument
    add("--config", metavar="FILE", help="TOML config file")
    add(
        "--set",
        metavar="SECTION.KEY=VALUE",
        action="append",
        dest="set_values",
        help="any config key, as an environment variable would give it (repeatable)",
    )
    add("--check-config", action="store_true", help="print the effective config and exit")


def overrides_from_args(args: argparse.Namespace) -> dict[str, object]:
    """Map the flags that were given to ``{"section.key": value}`` for load().

    ``--set`` values come first, so a dedicated flag for the same key wins. ``--uds``
    or ``--fd`` without ``--host``/``--port``/``--http-port`` listen there only, as
    uvicorn does.
    """
    overrides: dict[str, object] = {}
    for item in getattr(args, "set_values", None) or ():
        name, eq, text = item.partition("=")
        name = name.strip()
        if not eq or "." not in name:
            raise ConfigError(f"{_CLI_SOURCE}: --set {item}: expected section.key=value")
        overrides[name] = Text(text)
    hosts = getattr(args, "host", None)
    if isinstance(hosts, str):
        hosts = [hosts]
    if hosts:
        if len(hosts) == 1:
            overrides["server.host"] = hosts[0]
        else:
            overrides["server.hosts"] = tuple(hosts)
    for dest, (name, convert) in _ARG_KEYS.items():
        value = getattr(args, dest, None)
        if value is not None:
            overrides[name] = convert(value)
    for dest, (name, value) in _ARG_SWITCHES.items():
        if getattr(args, dest, False):
            overrides[name] = value
    only_there = getattr(args, "uds", None) or getattr(args, "fd", None)
    ports = (getattr(args, "port", None), getattr(args, "http_port", None))
    if only_there and not hosts and ports == (None, None):
        overrides.setdefault("server.port", 0)
        overrides.setdefault("server.http_port", 0)
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
        for key in keys:
            value = getattr(values, key)
            # Permissions read best in octal, as TOML allows.
            text = f"0o{value:o}" if key == "uds_mode" else _toml_value(value)
            lines.append(f"{key} = {text}")
    return "\n".join(lines) + "\n"
