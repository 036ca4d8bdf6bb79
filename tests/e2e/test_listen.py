"""Where fpy3 listens: several addresses, the IPv6 wildcard serving IPv4 too, a Unix
socket, sockets inherited by --fd and from systemd socket activation; the master
keeps each across a HUP reload without a failed request."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import sys

import h3clients
import pytest
from harness import (
    SUPPORT_DIR,
    RawConn,
    call,
    free_port,
    ipv6_available,
    wait_until,
)
from master_support import Load
from masters import APP, wait_workers

SDLAUNCH = [sys.executable, str(SUPPORT_DIR / "sdlaunch.py")]
needs_ipv6 = pytest.mark.skipif(not ipv6_available(), reason="no IPv6 loopback here")


def scope_over(conn: RawConn) -> dict:
    conn.send(b"GET /scope HTTP/1.1\r\nHost: example.test\r\n\r\n")
    resp = conn.read_response()
    assert resp.status == 200, resp
    return json.loads(resp.body)


def h3_scope(host: str, srv) -> dict:
    resp = call(h3clients.aioquic_request, host, srv.port, "GET", "/scope", cafile=str(srv.cafile))
    assert resp.status == 200, resp
    return json.loads(resp.body)


def refused(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return False
    except ConnectionRefusedError:
        return True


def port_free_everywhere(hosts: list[str]) -> int:
    """A port free for TCP and UDP on every one of ``hosts``."""
    for _ in range(50):
        port = free_port(hosts[0], udp=True)
        try:
            for host in hosts[1:]:
                family = socket.AF_INET6 if ":" in host else socket.AF_INET
                for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                    with socket.socket(family, kind) as s:
                        s.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no port free on every address")


def hup_under_load(srv, connect, generation: int = 2) -> None:
    """HUP while new and keep-alive connections send requests: nothing fails."""
    old = set(wait_workers(srv, 2))
    with Load(connect, threads=3) as load, Load(connect, threads=3, keepalive=True) as kept:
        wait_until(lambda: load.count() > 30 and kept.count() > 30, timeout=15)
        offset = srv.stderr_size()
        os.kill(srv.pid, signal.SIGHUP)
        srv.wait_stderr(f"generation {generation} ready; draining 2 old worker(s)", offset, 20)
        wait_until(
            lambda: not (set(wait_workers(srv, 2)) & old),
            timeout=20,
            message=lambda: srv.stderr_since(offset)[-2000:],
        )
        served, kept_served = load.count(), kept.count()
        wait_until(
            lambda: load.count() > served + 30 and kept.count() > kept_served + 30, timeout=15
        )
    assert load.failures == []
    assert kept.failures == []


# --- addresses ------------------------------------------------------------------------


@needs_ipv6
def test_ipv6_wildcard_serves_ipv4_too_over_tcp_and_udp(start_server):
    srv = start_server(
        host="::", http=True, config={"http3": {"enabled": True, "engine": "ngtcp2"}}, wait=False
    )
    srv.host = "127.0.0.1"  # the dev certificate names 127.0.0.1 and ::1, not ::
    srv.wait_ready()
    with srv.connect() as c:
        scope = scope_over(c)
    assert scope["client"][0] == "127.0.0.1"  # not ::ffff:127.0.0.1
    assert scope["server"] == ["127.0.0.1", srv.port]
    with RawConn("::1", srv.port, srv.ssl_context(), server_hostname="::1") as c:
        assert scope_over(c)["client"][0] == "::1"
    with RawConn("127.0.0.1", srv.http_port) as c:
        assert scope_over(c)["scheme"] == "http"
    assert h3_scope("127.0.0.1", srv)["client"][0] == "127.0.0.1"
    assert h3_scope("::1", srv)["client"][0] == "::1"


@needs_ipv6
def test_several_addresses_each_serve_every_protocol_across_a_reload(start_server):
    hosts = ["127.0.0.1", "::1"]
    port, http_port = port_free_everywhere(hosts), port_free_everywhere(hosts)
    config = {
        "server": {"hosts": hosts, "port": port, "http_port": http_port},
        "http3": {"enabled": True, "engine": "ngtcp2"},
        "workers": {"count": 2},
    }
    srv = start_server(app=APP, command="master", config=config)
    log = srv.stderr()
    assert "HTTP/3 steered on 2 UDP address(es)" in log, log
    for generation in (1, 2):
        for host in hosts:
            with RawConn(host, port, srv.ssl_context(), server_hostname=host) as c:
                assert scope_over(c)["server"][0] == host
            with RawConn(host, http_port) as c:
                assert scope_over(c)["scheme"] == "http"
            # Several connections, so that both workers' sockets get some.
            for _ in range(4):
                assert h3_scope(host, srv)["server"][0] == host
        if generation == 1:
            old = set(wait_workers(srv, 2))
            offset = srv.stderr_size()
            os.kill(srv.pid, signal.SIGHUP)
            srv.wait_stderr("generation 2 ready", offset, 20)
            wait_until(lambda old=old: not (set(wait_workers(srv, 2)) & old), timeout=20)
    assert srv.stop() == 0, srv.stderr()


def test_host_flag_repeated_binds_each(run_cli):
    p = run_cli(["run", "apps:app", "--host", "127.0.0.1", "--host", "::1", "--check-config"])
    assert p.returncode == 0, p.stderr
    assert 'hosts = ["127.0.0.1", "::1"]' in p.stdout


# --- a Unix socket -----------------------------------------------------------------------


def test_unix_socket_serves_cleartext_http(start_server, tmp_path):
    path = str(tmp_path / "fpy3.sock")
    srv = start_server(config={"server": {"uds": path}})
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
    with RawConn(path, 0) as c:
        scope = scope_over(c)
    assert scope["server"] == [path, None]
    assert scope["client"] is None
    assert scope["scheme"] == "http"
    srv.assert_serving()  # TLS on the TCP port as well
    assert srv.stop() == 0
    assert not os.path.exists(path)  # removed on exit


def test_unix_socket_stale_file_replaced_live_one_refused(start_server, run_cli, tmp_path):
    path = str(tmp_path / "fpy3.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # the file stays, nobody accepts on it
    start_server(config={"server": {"uds": path, "uds_mode": 0o600}})
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with RawConn(path, 0) as c:
        assert scope_over(c)["scheme"] == "http"
    # A second server on the same path: exit 2, and the first one keeps its socket.
    p = run_cli(["run", "apps:app", "--uds", path])
    assert p.returncode == 2
    assert f"server.uds: cannot listen on unix:{path}: another server accepts there" in p.stderr
    with RawConn(path, 0) as c:
        assert scope_over(c)["scheme"] == "http"
    regular = tmp_path / "file"
    regular.write_text("x")
    p = run_cli(["run", "apps:app", "--uds", str(regular)])
    assert p.returncode == 2 and "exists and is not a socket" in p.stderr
    assert regular.read_text() == "x"


def test_uds_flag_alone_listens_there_only(start_server, tmp_path):
    path = str(tmp_path / "fpy3.sock")
    srv = start_server(args=["--uds", path], config={"http3": {"enabled": True}}, ready=False)
    with RawConn(path, 0) as c:
        assert scope_over(c)["scheme"] == "http"
    assert refused("127.0.0.1", srv.port)  # uvicorn's --uds: no TCP port
    assert f"http://unix:{path}" in srv.stderr()


def test_hup_under_load_on_a_unix_socket_fails_nothing(start_server, tmp_path):
    path = str(tmp_path / "fpy3.sock")
    config = {"server": {"uds": path}, "workers": {"count": 2}}
    srv = start_server(app=APP, command="master", config=config)
    hup_under_load(srv, lambda timeout=10.0: RawConn(path, 0, timeout=timeout))
    assert srv.stop() == 0, srv.stderr()
    assert not os.path.exists(path)


# --- inherited sockets -------------------------------------------------------------------


def test_hup_under_load_on_an_inherited_fd_fails_nothing(start_server):
    port = free_port()
    srv = start_server(
        app=APP,
        command="master",
        config={"server": {"port": port}, "workers": {"count": 2}},
        launcher=[*SDLAUNCH, "fd", f"tcp:127.0.0.1:{port}", "--"],
    )
    assert f"https://127.0.0.1:{port}" in srv.stderr()
    hup_under_load(srv, srv.connect)
    assert srv.stop() == 0, srv.stderr()


def test_fd_kinds_cleartext_and_unix(start_server, tmp_path):
    port, http_port = free_port(), free_port()
    path = str(tmp_path / "inherited.sock")
    srv = start_server(
        config={"server": {"port": port}},
        launcher=[
            *SDLAUNCH,
            "fd",
            f"tcp:127.0.0.1:{port}",
            f"tcp:127.0.0.1:{http_port}:http",
            f"unix:{path}",
            "--",
        ],
    )
    srv.assert_serving()
    with RawConn("127.0.0.1", http_port) as c:
        assert scope_over(c)["scheme"] == "http"
    with RawConn(path, 0) as c:
        assert scope_over(c)["server"] == [path, None]
    srv.stop()
    assert os.path.exists(path)  # not fpy3's file: left to whoever made it


def test_a_bad_fd_is_a_config_error(run_cli):
    p = run_cli(["run", "apps:app", "--fd", "97"])
    assert p.returncode == 2
    assert "server.fds: fd 97 is not a usable socket" in p.stderr
    p = run_cli(["run", "apps:app", "--fd", "3:ftp", "--check-config"])
    assert p.returncode == 2
    assert "command line: server.fds: expected 'N' or 'N:https|http|quic', got '3:ftp'" in p.stderr


def test_systemd_socket_activation_tcp_udp_unix_across_a_reload(start_server, tmp_path):
    port = free_port(udp=True)
    unused = free_port()
    path = str(tmp_path / "activated.sock")
    srv = start_server(
        app=APP,
        command="master",
        config={
            "server": {"port": port, "http_port": unused},
            "http3": {"enabled": True, "engine": "ngtcp2"},
            "workers": {"count": 2},
        },
        launcher=[
            *SDLAUNCH,
            "systemd",
            f"tcp:127.0.0.1:{port}:https",
            f"udp:127.0.0.1:{port}:quic",
            f"unix:{path}:fpy3.socket",  # a unit's default name: kind from the socket
            "--",
        ],
    )
    log = srv.stderr()
    assert "(sockets from systemd)" in log and "HTTP/3 steered on 1 UDP address(es)" in log, log
    assert refused("127.0.0.1", unused)  # the configured ports are not bound
    with RawConn(path, 0) as c:
        assert scope_over(c)["scheme"] == "http"
    for _ in range(4):
        assert h3_scope("127.0.0.1", srv)["http_version"] == "3"
    hup_under_load(srv, srv.connect)
    for _ in range(4):
        assert h3_scope("127.0.0.1", srv)["http_version"] == "3"
    with RawConn(path, 0) as c:
        assert scope_over(c)["scheme"] == "http"
    assert srv.stop() == 0, srv.stderr()


def test_inherited_udp_without_reuseport_is_served_by_one_worker(start_server):
    port = free_port(udp=True)
    srv = start_server(
        app=APP,
        command="master",
        config={
            "server": {"port": port},
            "http3": {"enabled": True, "engine": "ngtcp2"},
            "workers": {"count": 2},
        },
        launcher=[
            *SDLAUNCH,
            "systemd",
            f"tcp:127.0.0.1:{port}",
            f"udp-plain:127.0.0.1:{port}",
            "--",
        ],
    )
    assert "is not in a SO_REUSEPORT group" in srv.stderr()
    pids = set()
    for _ in range(4):
        resp = call(
            h3clients.aioquic_request, "127.0.0.1", port, "GET", "/pid", cafile=str(srv.cafile)
        )
        assert resp.status == 200
        pids.add(int(resp.body))
    assert len(pids) == 1
