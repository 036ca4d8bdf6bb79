"""The built-in ACME client against Pebble on loopback: first issuance with each
challenge type, renewal of short-lived certificates while HTTP/1.1 and HTTP/3 clients
verifying against Pebble's root run without a failure, and a refused order that leaves
the old certificate serving."""

from __future__ import annotations

import ssl

import pytest
from h3clients import H3ClientError
from harness import RawConn, call, free_port, wait_until
from master_support import Load
from pebble import Pebble
from tlsclients import aioquic_session, tcp_request

DOMAIN = "localhost"


@pytest.fixture
def pebbles():
    made: list[Pebble] = []
    yield made
    for p in made:
        p.stop()


def _start(start_server, tmp_path, pebbles, challenge: str, validity: int = 0, **extra):
    port = free_port(udp=True)
    http_port = free_port()
    pebble = Pebble(tmp_path / "pebble", http_port, port, validity)
    pebbles.append(pebble)
    config = {
        "server": {"port": port, "http_port": http_port},
        "acme": {
            "enabled": True,
            "directory": pebble.directory,
            "domains": [DOMAIN],
            "email": "ops@example.org",
            "challenge": challenge,
            "ca_bundle": pebble.https_ca,
            "retry_interval": 0.5,
        },
        "workers": {"count": 2},
        "http3": {"enabled": True},
        **extra,
    }
    srv = start_server(app="master_support:app", config=config, command="master", http=True)
    return srv, pebble


def _issued(srv, offset: int = 0, timeout: float = 30.0) -> None:
    srv.wait_stderr("ACME: new certificate", offset, timeout)
    srv.wait_stderr("load the new certificate", offset, timeout)


def _ctx(root: str) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=root)


def _served(srv, root: str) -> bytes:
    return tcp_request(srv.host, srv.port, "/pid", _ctx(root), server_name=DOMAIN)[3]


def _quic_ok(srv, root: str) -> None:
    r = call(aioquic_session, srv.host, srv.port, [("GET", "/pid", b"")], root, server_name=DOMAIN)
    assert r.responses[0].status == 200


@pytest.mark.parametrize("challenge", ["tls-alpn-01", "http-01"])
def test_first_certificate(start_server, tmp_path, pebbles, challenge):
    srv, pebble = _start(start_server, tmp_path, pebbles, challenge)
    _issued(srv)
    root = pebble.root(tmp_path / "root.pem")
    # Every worker serves the chain Pebble issued, over TCP and QUIC.
    for _ in range(6):
        _served(srv, root)
    for _ in range(3):
        _quic_ok(srv, root)
    state = tmp_path / "srv0" / "state" / "acme"
    for name in ("key.pem", "account.key"):
        assert (state / name).stat().st_mode & 0o077 == 0, name
    # The challenge answers are gone once the order is done.
    assert not any((state / "http-01").glob("*")) if (state / "http-01").exists() else True
    assert not any((state / "tls-alpn-01").glob("*")) if (state / "tls-alpn-01").exists() else True


def test_renewal_under_load(start_server, tmp_path, pebbles):
    srv, pebble = _start(start_server, tmp_path, pebbles, "tls-alpn-01", validity=12)
    _issued(srv)
    root = pebble.root(tmp_path / "root.pem")
    first = _served(srv, root)
    ctx = _ctx(root)

    def connect(timeout: float = 10.0) -> RawConn:
        return RawConn(srv.host, srv.port, ctx, server_hostname=DOMAIN, timeout=timeout)

    offset = srv.stderr_size()
    quic_failures: list[str] = []
    quic_ok = 0
    with Load(connect, threads=3) as load:
        # Renewal starts at two thirds of the 12 s lifetime.
        deadline_msg = "no renewal"
        while "load the new certificate" not in srv.stderr_since(offset):
            try:
                _quic_ok(srv, root)
                quic_ok += 1
            except (H3ClientError, AssertionError) as exc:
                quic_failures.append(repr(exc))
            assert quic_ok + len(quic_failures) < 400, deadline_msg
        served = load.count()
        wait_until(lambda: load.count() > served + 30, 20, message="load stalled")
        for _ in range(3):
            _quic_ok(srv, root)
    assert load.failures == [], load.failures[:5]
    assert quic_failures == [], quic_failures[:5]
    assert quic_ok > 0 and load.count() > 30
    assert _served(srv, root) != first


def test_a_refused_order_keeps_the_old_certificate(start_server, tmp_path, pebbles):
    srv, pebble = _start(start_server, tmp_path, pebbles, "http-01", validity=9)
    _issued(srv)
    root = pebble.root(tmp_path / "root.pem")
    served = _served(srv, root)
    # The same CA now refuses the name.
    pebble.stop()
    offset = srv.stderr_size()
    refusing = Pebble(
        tmp_path / "pebble2", srv.http_port, srv.port, 9, blocklist=(DOMAIN,), like=pebble
    )
    pebbles.append(refusing)
    text = srv.wait_stderr("rejectedIdentifier", offset, 30)
    assert "ACME: no certificate for localhost" in text, text
    assert "the current certificate keeps serving, next attempt in" in text, text
    assert _served(srv, root) == served
    assert srv.alive()
