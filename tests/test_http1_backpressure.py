"""Flow control both ways, shown with sizes far beyond any kernel or library buffer.

(a) An app that does not receive() must stop the server reading: the client's send
    blocks with most of the upload unsent; once the app reads, the upload completes.
(b) A client that does not read must hold the app's send(): the app's progress stays
    bounded while the client sleeps on it; then every byte arrives intact.
"""

import hashlib
import json
import select
import ssl
import time

import pytest
from apps import CHUNK, stream_chunk
from conftest import wait_until

MiB = 1024 * 1024
UPLOAD_CHUNKS = 3072  # 192 MiB, far above socket buffers (tcp_rmem max can be 32 MiB)
UPLOAD_BOUND = 64 * MiB  # what may be in flight once the server stops reading
STREAM_CHUNKS = 2000  # 125 MiB response
STREAM_BOUND = 500  # chunks the app may get ahead of a client that reads nothing
STALL_WINDOW = 1.5  # seconds without progress that count as "stalled"


@pytest.fixture(scope="module")
def bp_server(module_server_factory):
    return module_server_factory(config={"limits": {"max_body_size": 0}}, http=True)


def upload_chunk(i: int) -> bytes:
    return stream_chunk(i + 1_000_000)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("tls", [True, False], ids=["https", "http"])
def test_unread_upload_stalls_the_sender(bp_server, tls):
    srv = bp_server
    flag = f"consume-{'tls' if tls else 'plain'}"
    total = UPLOAD_CHUNKS * CHUNK
    conn = srv.connect(tls, sndbuf=64 * 1024, timeout=30)
    try:
        conn.send(
            b"POST /slow-consumer?flag=%s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
            % (flag.encode(), total)
        )
        srv.wait_record("slow-consumer", f"waiting {flag}")
        sock = conn.sock
        sock.setblocking(False)
        sent_chunks, blocked = 0, False
        deadline = time.monotonic() + 60
        while sent_chunks < UPLOAD_CHUNKS and time.monotonic() < deadline:
            try:
                # TLS: a retried send must repeat the same chunk, which it does
                sock.send(upload_chunk(sent_chunks))
                sent_chunks += 1
            except (BlockingIOError, ssl.SSLWantWriteError):
                _, w, _ = select.select([], [sock], [], STALL_WINDOW)
                if not w:
                    blocked = True
                    break
        sent = sent_chunks * CHUNK
        assert blocked, f"sent {sent / MiB:.0f} MiB without ever stalling"
        assert sent < UPLOAD_BOUND, f"server took {sent / MiB:.0f} MiB the app never read"
        # The stall is the app's doing: it still has not read a byte.
        assert f"reading {flag}" not in srv.record("slow-consumer")

        srv.flag(flag)
        sock.setblocking(True)
        sock.settimeout(30)
        h = hashlib.sha256()
        for i in range(sent_chunks):
            h.update(upload_chunk(i))
        for i in range(sent_chunks, UPLOAD_CHUNKS):
            chunk = upload_chunk(i)
            h.update(chunk)
            sock.sendall(chunk)
        resp = conn.read_response(timeout=60)
    finally:
        conn.close()
    assert resp.status == 200
    assert json.loads(resp.body) == {"len": total, "sha256": h.hexdigest()}


def _progress(srv, name) -> tuple[int, bool]:
    path = srv.shared / name
    if not path.exists():
        return 0, False
    text = path.read_text().strip()
    if not text:
        return 0, False
    return int(text.split()[0]), text.endswith("done")


@pytest.mark.timeout(180)
@pytest.mark.parametrize("tls", [True, False], ids=["https", "http"])
def test_slow_reader_holds_back_app_send(bp_server, tls):
    srv = bp_server
    name = f"progress-{'tls' if tls else 'plain'}"
    conn = srv.connect(tls, rcvbuf=64 * 1024, timeout=60)
    try:
        conn.send(
            b"GET /big-stream?n=%d&progress=%s HTTP/1.1\r\nHost: x\r\n\r\n"
            % (STREAM_CHUNKS, name.encode())
        )
        wait_until(lambda: _progress(srv, name)[0] > 0, timeout=10)

        # Wait until the app stops making progress while we read nothing.
        last, last_change = -1, time.monotonic()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            value, done = _progress(srv, name)
            if done:
                break
            if value != last:
                last, last_change = value, time.monotonic()
            elif time.monotonic() - last_change >= STALL_WINDOW:
                break
            conn.readable_within(0.05)  # pacing only; we read nothing
        stalled_at, done = _progress(srv, name)
        assert not done, "the app sent the whole 125 MiB to a client that read nothing"
        assert stalled_at < STREAM_BOUND, (
            f"app got {stalled_at} chunks ({stalled_at * CHUNK / MiB:.0f} MiB) "
            "ahead of a client that reads nothing"
        )

        resp = conn.read_response(timeout=90)
    finally:
        conn.close()
    assert resp.status == 200
    assert resp.chunked
    expected = hashlib.sha256()
    for i in range(STREAM_CHUNKS):
        expected.update(stream_chunk(i))
    assert len(resp.body) == STREAM_CHUNKS * CHUNK
    assert hashlib.sha256(resp.body).hexdigest() == expected.hexdigest()
    wait_until(lambda: _progress(srv, name)[1], timeout=10)
