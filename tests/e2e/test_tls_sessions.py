"""Session resumption over TCP and QUIC with keys shared by every worker and kept across
restarts (tls.keys_file), and opt-in 0-RTT on HTTP/3: a safe request is served from
early data and tells the app so, an unsafe one gets 425 Too Early. Independent clients:
Python's ssl (OpenSSL), aioquic with a session ticket, gtlsclient with its session and
transport-parameter files."""

from __future__ import annotations

import json
import os
import ssl
import stat

import pytest
from harness import call
from tlsclients import aioquic_session, gtlsclient_session, tcp_request

H3 = {"http3": {"enabled": True, "early_data": True}}


def _tcp_ctx(srv) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(srv.cafile))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return ctx


def test_tcp_sessions_resume_on_any_worker_and_after_a_restart(start_server, tmp_path):
    config = {"workers": {"count": 2}}
    srv = start_server(config=config, command="master", workdir=tmp_path / "srv")
    keyfile = tmp_path / "srv" / "state" / "session-keys"
    assert stat.S_IMODE(os.stat(keyfile).st_mode) == 0o600
    ctx = _tcp_ctx(srv)
    _, session, resumed, _ = tcp_request(srv.host, srv.port, "/pid", ctx)
    assert not resumed and session is not None and session.has_ticket
    first = session
    pids, resumptions = set(), 0
    for _ in range(60):
        body, session, resumed, _ = tcp_request(srv.host, srv.port, "/pid", ctx, session)
        assert resumed, "a ticket from one worker was refused by another"
        pids.add(int(body))
        resumptions += 1
        if len(pids) >= 2 and resumptions >= 10:
            break
    assert len(pids) == 2, f"every connection went to one worker: {pids}"
    # A new master with the same key file accepts the tickets of the old one.
    assert srv.stop() == 0
    again = start_server(config=config, command="master", workdir=tmp_path / "srv")
    _, _, resumed, _ = tcp_request(again.host, again.port, "/pid", ctx, first)
    assert resumed


def test_tcp_tickets_off(start_server):
    srv = start_server(config={"tls": {"session_tickets": False}})
    ctx = _tcp_ctx(srv)
    _, session, _, _ = tcp_request(srv.host, srv.port, "/hello", ctx)
    _, _, resumed, _ = tcp_request(srv.host, srv.port, "/hello", ctx, session)
    assert not resumed


def test_quic_resumption_and_early_data_with_aioquic(start_server, tmp_path):
    srv = start_server(config=H3, workdir=tmp_path / "srv")
    cafile = str(srv.cafile)
    first = call(aioquic_session, srv.host, srv.port, [("GET", "/hello", b"")], cafile)
    assert first.responses[0].status == 200 and not first.resumed
    assert first.ticket is not None
    # 0-RTT: the GET is served from early data, the POST is refused with 425.
    early = call(
        aioquic_session,
        srv.host,
        srv.port,
        [("GET", "/scope", b""), ("POST", "/echo", b"replayable")],
        cafile,
        ticket=first.ticket,
        early=True,
    )
    assert early.resumed and early.early_accepted
    scope = json.loads(early.responses[0].body)
    assert scope["extensions"]["early_data"] == {}
    assert ["early-data", "1"] in scope["headers"]
    assert scope["extensions"]["tls"]["tls_version"] == 0x0304
    assert scope["extensions"]["tls"]["cipher_suite"] in (0x1301, 0x1302, 0x1303)
    assert early.responses[1].status == 425
    assert early.responses[1].body == b"Too Early\n"
    # After the handshake, the same POST goes through, and the app sees no early data.
    later = call(
        aioquic_session,
        srv.host,
        srv.port,
        [("POST", "/echo", b"replayable"), ("GET", "/scope", b"")],
        cafile,
        ticket=early.ticket,
    )
    assert later.resumed and later.responses[0].status == 200
    assert later.responses[0].body == b"replayable"
    assert "early_data" not in json.loads(later.responses[1].body)["extensions"]
    # The ticket outlives the server: a restart with the same key file resumes it.
    assert srv.stop() == 0
    again = start_server(config=H3, workdir=tmp_path / "srv")
    after = call(
        aioquic_session, again.host, again.port, [("GET", "/hello", b"")], cafile, later.ticket
    )
    assert after.resumed and after.responses[0].status == 200


def test_quic_resumes_on_every_worker(start_server):
    srv = start_server(config={**H3, "workers": {"count": 2}}, command="master")
    cafile = str(srv.cafile)
    first = call(aioquic_session, srv.host, srv.port, [("GET", "/pid", b"")], cafile)
    pids, ticket = {int(first.responses[0].body)}, first.ticket
    resumed = 0
    for _ in range(40):
        r = call(aioquic_session, srv.host, srv.port, [("GET", "/pid", b"")], cafile, ticket)
        assert r.resumed, "a ticket from one worker was refused by another"
        resumed += 1
        pids.add(int(r.responses[0].body))
        ticket = r.ticket or ticket
        if len(pids) == 2 and resumed >= 6:
            break
    assert len(pids) == 2, f"every QUIC connection went to one worker: {pids}"


def test_early_data_with_gtlsclient(start_server, tmp_path):
    srv = start_server(config=H3)
    state = tmp_path / "gtls"
    state.mkdir()
    status, _, _ = call(gtlsclient_session, srv.host, srv.port, "/hello", str(state))
    assert status == 200 and (state / "session").exists() and (state / "tp").exists()
    status, body, log = call(gtlsclient_session, srv.host, srv.port, "/scope", str(state))
    assert status == 200, log[-2000:]
    assert "0RTT STREAM" in log  # the request went out in 0-RTT packets
    scope = json.loads(body)
    assert scope["extensions"]["early_data"] == {}, scope["extensions"]
    body_file = tmp_path / "body"
    body_file.write_bytes(b"once only")
    status, _, log = call(
        gtlsclient_session,
        srv.host,
        srv.port,
        "/echo",
        str(state),
        method="POST",
        body_file=str(body_file),
    )
    assert status == 425, log[-2000:]


def test_early_data_is_off_by_default(start_server, tmp_path):
    srv = start_server(config={"http3": {"enabled": True}})
    state = tmp_path / "gtls"
    state.mkdir()
    assert call(gtlsclient_session, srv.host, srv.port, "/hello", str(state))[0] == 200
    status, body, log = call(gtlsclient_session, srv.host, srv.port, "/scope", str(state))
    # The 0-RTT request is refused by TLS and sent again after the handshake.
    assert status == 200, log[-2000:]
    assert "early_data" not in json.loads(body)["extensions"]


@pytest.mark.parametrize("damage", ["short", "garbage"])
def test_a_damaged_key_file_stops_the_server(run_cli, tmp_path, damage):
    keys = tmp_path / "keys"
    keys.write_text("fpy3-session-keys-v1\nabcd\n" if damage == "short" else "hello\n")
    r = run_cli(["run", "apps:app", "--port", "18999"], env={"FPY3_TLS__KEYS_FILE": str(keys)})
    assert r.returncode == 2
    assert "tls.keys_file:" in r.stderr
