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
from harness import wait_until

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
        index, view = 0, memoryview(upload_chunk(0))
        sent, blocked = 0, False
        deadline = time.monotonic() + 60
        while index < UPLOAD_CHUNKS and time.monotonic() < deadline:
            try:
                # After a would-block, TLS needs the same buffer again, which it gets.
                n = sock.send(view)
            except (BlockingIOError, ssl.SSLWantWriteError):
                _, w, _ = select.select([], [sock], [], STALL_WINDOW)
                if not w:
                    blocked = True
                    break
                continue
            sent += n
            view = view[n:]  # plain TCP may take part of a chunk
            if not view:
                index += 1
                if index < UPLOAD_CHUNKS:
                    view = memoryview(upload_chunk(index))
        print(f"stalled after {sent / MiB:.1f} MiB")
        assert blocked, f"sent {sent / MiB:.0f} MiB without ever stalling"
        assert sent < UPLOAD_BOUND, f"server took {sent / MiB:.0f} MiB the app never read"
        # The stall is the app's doing: it still has not read a byte.
        assert f"reading {flag}" not in srv.record("slow-consumer")

        srv.flag(flag)
        sock.setblocking(True)
        sock.settimeout(30)
        sock.sendall(view)
        for i in range(index + 1, UPLOAD_CHUNKS):
            sock.sendall(upload_chunk(i))
        h = hashlib.sha256()
        for i in range(UPLOAD_CHUNKS):
            h.update(upload_chunk(i))
        try:
            resp = conn.read_response(timeout=60)
        except TimeoutError:
            got = (srv.shared / f"{flag}-received").read_text().strip() or "0"
            pytest.fail(f"no response: all {total} bytes sent, the app received {got}")
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
        seen = {"value": -1, "since": time.monotonic()}

        def stalled_or_done():
            value, done = _progress(srv, name)
            if done:
                return True
            if value != seen["value"]:
                seen.update(value=value, since=time.monotonic())
                return False
            return time.monotonic() - seen["since"] >= STALL_WINDOW

        wait_until(stalled_or_done, timeout=60, interval=0.05)
        stalled_at, done = _progress(srv, name)
        print(f"app stalled at {stalled_at} chunks")
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
