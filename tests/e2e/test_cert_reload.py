"""Certificate files that change on disk are picked up without a signal: the master
checks them, then every worker serves them to new handshakes, TCP and QUIC, while load
runs without one failed request. A pair that does not load leaves the old one serving."""

from __future__ import annotations

import os
import ssl
from pathlib import Path

from harness import RawConn, call, wait_until
from master_support import Load
from pki import make_ca, make_leaf
from tlsclients import aioquic_session, tcp_request


def _replace(path: str, data: bytes) -> None:
    tmp = path + ".new"
    Path(tmp).write_bytes(data)
    os.replace(tmp, path)


def _served(srv, cafile: str) -> bytes:
    ctx = ssl.create_default_context(cafile=cafile)
    return tcp_request(srv.host, srv.port, "/pid", ctx)[3]


def test_new_files_reach_every_worker_under_load(start_server, tmp_path):
    old_ca, new_ca = make_ca("old CA"), make_ca("new CA")
    old = make_leaf(old_ca, "server", ["127.0.0.1"])
    new = make_leaf(new_ca, "server", ["127.0.0.1"])
    cert, key = old.write(tmp_path, "server")
    both = tmp_path / "both.pem"
    both.write_bytes(old_ca.cert_pem + new_ca.cert_pem)
    new_ca_file = tmp_path / "new-ca.pem"
    new_ca_file.write_bytes(new_ca.cert_pem)
    srv = start_server(
        app="master_support:app",
        config={
            "tls": {"cert": cert, "key": key, "dev_cert": False, "watch_interval": 0.2},
            "workers": {"count": 2},
            "http3": {"enabled": True},
        },
        command="master",
        cafile=both,
    )
    ctx = ssl.create_default_context(cafile=str(both))

    def connect(timeout: float = 10.0) -> RawConn:
        return RawConn(srv.host, srv.port, ctx, timeout=timeout)

    der_old = old.cert.public_bytes(ssl_der())
    der_new = new.cert.public_bytes(ssl_der())
    assert _served(srv, str(both)) == der_old
    with Load(connect, threads=4) as load:
        wait_until(lambda: load.count() > 50, 20, message="load did not start")
        # A certificate without its key first: it must not be taken.
        offset = srv.stderr_size()
        _replace(cert, new.cert_pem)
        srv.wait_stderr("do not load, keeping the old", offset)
        assert _served(srv, str(both)) == der_old
        _replace(key, new.key_pem())
        wait_until(lambda: _served(srv, str(both)) == der_new, 15, message="not switched")
        served = load.count()
        wait_until(lambda: load.count() > served + 50, 20, message="load stalled")
    assert load.failures == [], load.failures[:5]
    # Every worker serves it, on TCP and on QUIC (verified against the new CA only).
    for _ in range(10):
        assert _served(srv, str(new_ca_file)) == der_new
    for _ in range(4):
        r = call(aioquic_session, srv.host, srv.port, [("GET", "/pid", b"")], str(new_ca_file))
        assert r.responses[0].status == 200
    assert "TLS: now serving" in srv.stderr() and "HTTP/3: now serving" in srv.stderr()


def ssl_der():
    from cryptography.hazmat.primitives.serialization import Encoding

    return Encoding.DER


def test_a_lone_worker_watches_the_files_itself(start_server, tmp_path):
    ca = make_ca("CA")
    cert, key = make_leaf(ca, "one", ["127.0.0.1"]).write(tmp_path, "server")
    cafile = tmp_path / "ca.pem"
    cafile.write_bytes(ca.cert_pem)
    srv = start_server(
        config={"tls": {"cert": cert, "key": key, "dev_cert": False, "watch_interval": 0.2}},
        cafile=cafile,
    )
    second = make_leaf(ca, "two", ["127.0.0.1"])
    _replace(key, second.key_pem())
    _replace(cert, second.cert_pem)
    der = second.cert.public_bytes(ssl_der())
    wait_until(lambda: _served(srv, str(cafile)) == der, 10, message="not switched")
