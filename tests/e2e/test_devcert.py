"""The development certificate: files, reuse, renewal, locking, and real TLS clients."""

import base64
import contextlib
import ctypes
import ctypes.util
import logging
import multiprocessing
import os
import shutil
import socket
import ssl
import stat
import subprocess
import threading
import time

import pytest

from fpy3 import devcert

DAY = 86400


def _ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.fixture
def pair(tmp_path):
    return devcert.ensure_dev_cert(str(tmp_path / "state"))


@contextlib.contextmanager
def tls_server(cert_path, key_path, host):
    """Serve TLS on host:port; each connection gets a tiny HTTP response if it asks."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert_path, key_path)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    lsock = socket.socket(family, socket.SOCK_STREAM)
    lsock.bind((host, 0))
    lsock.listen(8)
    lsock.settimeout(0.2)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = lsock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(5)
            with contextlib.suppress(OSError), ctx.wrap_socket(conn, server_side=True) as tls:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = tls.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                else:
                    tls.sendall(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
                    )

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield lsock.getsockname()[1]
    finally:
        stop.set()
        t.join(5)
        lsock.close()


def _url_host(host):
    return f"[{host}]" if ":" in host else host


# --- files ---------------------------------------------------------------------------


def test_default_state_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert devcert.default_state_dir() == str(tmp_path / "fpy3")
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert devcert.default_state_dir() == str(tmp_path / "home" / ".local" / "state" / "fpy3")


def test_generate_creates_files_with_modes(tmp_path, caplog):
    state = tmp_path / "a" / "state"
    with caplog.at_level(logging.INFO, logger="fpy3.error"):
        cert_path, key_path = devcert.ensure_dev_cert(str(state))
    assert cert_path == str(state / "dev-cert.pem")
    assert key_path == str(state / "dev-key.pem")
    assert stat.S_IMODE(os.stat(state).st_mode) & 0o077 == 0
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(cert_path).st_mode) == 0o644
    cert, key = open(cert_path, "rb").read(), open(key_path, "rb").read()
    assert cert.startswith(b"-----BEGIN CERTIFICATE-----\n")
    assert key.startswith(b"-----BEGIN PRIVATE KEY-----\n")
    not_before, not_after = devcert.check_pem(cert, key)
    now = time.time()
    assert abs(not_before - (now - 3600)) < 60
    assert abs(not_after - (now + 365 * DAY)) < 60
    # No temp files left behind.
    assert sorted(os.listdir(state)) == [".dev-cert.lock", "dev-cert.pem", "dev-key.pem"]
    generated = [r for r in caplog.records if "generated" in r.getMessage()]
    assert len(generated) == 1 and cert_path in generated[0].getMessage()
    assert generated[0].levelno == logging.INFO


def test_second_call_reuses(pair, caplog):
    cert_path, key_path = pair
    before = open(cert_path, "rb").read(), open(key_path, "rb").read()
    with caplog.at_level(logging.INFO, logger="fpy3.error"):
        assert devcert.ensure_dev_cert(os.path.dirname(cert_path)) == pair
    assert (open(cert_path, "rb").read(), open(key_path, "rb").read()) == before
    assert not [r for r in caplog.records if "generated" in r.getMessage()]


def _replace_cert(cert_path, key_path, not_before, not_after):
    cert, key = devcert.generate_pem(int(not_before), int(not_after))
    open(cert_path, "wb").write(cert)
    open(key_path, "wb").write(key)


def _expired(c, k):
    now = time.time()
    _replace_cert(c, k, now - 30 * DAY, now - DAY)


def _near_expiry(c, k):
    now = time.time()
    _replace_cert(c, k, now - DAY, now + 6 * DAY)


def _not_yet_valid(c, k):
    now = time.time()
    _replace_cert(c, k, now + DAY, now + 300 * DAY)


def _corrupt_cert(c, k):
    data = bytearray(open(c, "rb").read())
    data[100:140] = b"!" * 40
    open(c, "wb").write(bytes(data))


def _garbage_cert(c, k):
    open(c, "wb").write(b"not a certificate\n")


def _corrupt_key(c, k):
    open(k, "wb").write(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")


def _other_key(c, k):
    open(k, "wb").write(devcert.generate_pem(int(time.time()), int(time.time()) + DAY)[1])


def _missing_key(c, k):
    os.unlink(k)


def _missing_cert(c, k):
    os.unlink(c)


@pytest.mark.parametrize(
    "damage",
    [
        _expired,
        _near_expiry,
        _not_yet_valid,
        _corrupt_cert,
        _garbage_cert,
        _corrupt_key,
        _other_key,
        _missing_key,
        _missing_cert,
    ],
)
def test_unusable_pair_is_regenerated(pair, damage, caplog):
    cert_path, key_path = pair
    damage(cert_path, key_path)
    damaged = [open(p, "rb").read() if os.path.exists(p) else None for p in pair]
    with caplog.at_level(logging.INFO, logger="fpy3.error"):
        assert devcert.ensure_dev_cert(os.path.dirname(cert_path)) == pair
    cert, key = open(cert_path, "rb").read(), open(key_path, "rb").read()
    assert cert != damaged[0] and key != damaged[1]
    not_before, not_after = devcert.check_pem(cert, key)
    assert not_before < time.time() < not_after - 300 * DAY
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    assert [r for r in caplog.records if "generated" in r.getMessage()]


def test_check_pem_errors_carry_gnutls_text():
    cert, key = devcert.generate_pem(int(time.time()), int(time.time()) + DAY)
    _, other = devcert.generate_pem(int(time.time()), int(time.time()) + DAY)
    with pytest.raises(devcert.DevCertError, match="certificate"):
        devcert.check_pem(b"junk")
    with pytest.raises(devcert.DevCertError, match="(?i)key"):
        devcert.check_pem(cert, other)
    devcert.check_pem(cert, key)


def test_serials_are_random_positive_16_bytes():
    serials = set()
    for _ in range(4):
        cert, _ = devcert.generate_pem(int(time.time()), int(time.time()) + DAY)
        der = ssl.PEM_cert_to_DER_cert(cert.decode())
        # tbsCertificate: [0] version (a0 03 02 01 02), then INTEGER serial.
        i = der.index(b"\xa0\x03\x02\x01\x02") + 5
        assert der[i] == 0x02 and der[i + 1] == 16
        serial = der[i + 2 : i + 18]
        assert serial[0] & 0x80 == 0 and serial[0] != 0
        serials.add(serial)
    assert len(serials) == 4


# --- TLS clients trusting the cert itself ----------------------------------------------

HOSTS = [
    "localhost",
    "127.0.0.1",
    pytest.param("::1", marks=pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback")),
]

EXPECTED_SAN = (
    ("DNS", "localhost"),
    ("IP Address", "127.0.0.1"),
    ("IP Address", "0:0:0:0:0:0:0:1"),
)


@pytest.mark.parametrize("strict", [False, True], ids=["default", "x509strict"])
@pytest.mark.parametrize("host", HOSTS)
def test_python_ssl_handshake(pair, host, strict):
    cert_path, key_path = pair
    connect_host = "127.0.0.1" if host == "localhost" else host
    client = ssl.create_default_context(cafile=cert_path)
    if strict:  # Python 3.13 turns this on by default.
        client.verify_flags |= ssl.VERIFY_X509_STRICT
    with tls_server(cert_path, key_path, connect_host) as port:
        with (
            socket.create_connection((connect_host, port), timeout=5) as raw,
            client.wrap_socket(raw, server_hostname=host) as tls,
        ):
            peer = tls.getpeercert()
            tls.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert tls.recv(4096).startswith(b"HTTP/1.1 200")
    assert peer["subjectAltName"] == EXPECTED_SAN
    subject = dict(rdn[0] for rdn in peer["subject"])
    assert subject == {"commonName": "fpy3 development certificate", "organizationName": "fpy3"}


def test_python_ssl_rejects_other_names(pair):
    cert_path, key_path = pair
    client = ssl.create_default_context(cafile=cert_path)
    with tls_server(cert_path, key_path, "127.0.0.1") as port:
        for name in ("example.com", "127.0.0.2"):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
                with pytest.raises(ssl.SSLCertVerificationError):
                    client.wrap_socket(raw, server_hostname=name)


def test_python_ssl_rejects_other_anchor(pair, tmp_path):
    cert_path, key_path = pair
    other_cert, _ = devcert.ensure_dev_cert(str(tmp_path / "other"))
    client = ssl.create_default_context(cafile=other_cert)
    with tls_server(cert_path, key_path, "127.0.0.1") as port:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with pytest.raises(ssl.SSLCertVerificationError):
                client.wrap_socket(raw, server_hostname="localhost")


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl CLI not installed")
@pytest.mark.parametrize("host", HOSTS)
def test_curl_cli(pair, host):
    cert_path, key_path = pair
    connect_host = "127.0.0.1" if host == "localhost" else host
    with tls_server(cert_path, key_path, connect_host) as port:
        out = subprocess.run(
            ["curl", "-sS", "--max-time", "10", "--cacert", cert_path,
             f"https://{_url_host(host)}:{port}/"],
            capture_output=True, text=True, timeout=20,
        )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout == "ok"


def _libcurl_gnutls():
    for name in ("libcurl-gnutls.so.4", ctypes.util.find_library("curl-gnutls")):
        if name:
            with contextlib.suppress(OSError):
                return ctypes.CDLL(name)
    return None


CURLOPT_URL = 10002
CURLOPT_CAINFO = 10065
CURLOPT_CAPATH = 10097
CURLOPT_CONNECT_ONLY = 141
CURLOPT_TIMEOUT = 13
CURLOPT_ERRORBUFFER = 10010


def _libcurl_gnutls_connect(cafile, cert_path, key_path, host):
    """TCP + TLS handshake with verification through libcurl-gnutls: (rc, error text)."""
    curl = _libcurl_gnutls()
    curl.curl_version.restype = ctypes.c_char_p
    assert b"GnuTLS" in curl.curl_version()
    curl.curl_easy_init.restype = ctypes.c_void_p
    curl.curl_easy_perform.argtypes = [ctypes.c_void_p]
    curl.curl_easy_cleanup.argtypes = [ctypes.c_void_p]

    def setopt(h, opt, value):
        arg = ctypes.c_long(value) if isinstance(value, int) else value
        rc = curl.curl_easy_setopt(ctypes.c_void_p(h), ctypes.c_int(opt), arg)
        assert rc == 0, (opt, rc)

    connect_host = "127.0.0.1" if host == "localhost" else host
    with tls_server(cert_path, key_path, connect_host) as port:
        h = curl.curl_easy_init()
        errbuf = ctypes.create_string_buffer(256)
        try:
            setopt(h, CURLOPT_URL, f"https://{_url_host(host)}:{port}/".encode())
            setopt(h, CURLOPT_CAINFO, cafile.encode())
            setopt(h, CURLOPT_CAPATH, None)  # only the given anchor, not the system store
            setopt(h, CURLOPT_CONNECT_ONLY, 1)
            setopt(h, CURLOPT_TIMEOUT, 10)
            setopt(h, CURLOPT_ERRORBUFFER, errbuf)
            rc = curl.curl_easy_perform(h)
        finally:
            curl.curl_easy_cleanup(h)
    return rc, errbuf.value


needs_libcurl_gnutls = pytest.mark.skipif(
    _libcurl_gnutls() is None, reason="libcurl-gnutls not installed"
)


@needs_libcurl_gnutls
@pytest.mark.parametrize("host", HOSTS)
def test_libcurl_gnutls(pair, host):
    cert_path, key_path = pair
    assert _libcurl_gnutls_connect(cert_path, cert_path, key_path, host) == (0, b"")


@needs_libcurl_gnutls
def test_libcurl_gnutls_rejects_other_anchor(pair, tmp_path):
    cert_path, key_path = pair
    other_cert, _ = devcert.ensure_dev_cert(str(tmp_path / "other"))
    rc, err = _libcurl_gnutls_connect(other_cert, cert_path, key_path, "localhost")
    assert rc == 60, err  # CURLE_PEER_FAILED_VERIFICATION


# --- SPKI hash -------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")
def test_spki_sha256_matches_openssl(pair):
    cert_path, _ = pair
    pub = subprocess.run(
        ["openssl", "x509", "-in", cert_path, "-pubkey", "-noout"],
        check=True, capture_output=True,
    ).stdout  # fmt: skip
    der = subprocess.run(
        ["openssl", "pkey", "-pubin", "-outform", "der"], input=pub, check=True, capture_output=True
    ).stdout
    digest = subprocess.run(
        ["openssl", "dgst", "-sha256", "-binary"], input=der, check=True, capture_output=True
    ).stdout
    assert len(digest) == 32
    assert devcert.spki_sha256_b64(cert_path) == base64.b64encode(digest).decode()


def test_spki_sha256_rejects_junk(tmp_path):
    p = tmp_path / "junk.pem"
    p.write_bytes(b"junk")
    with pytest.raises(devcert.DevCertError):
        devcert.spki_sha256_b64(str(p))


# --- concurrency -----------------------------------------------------------------------


def _ensure_in_child(state_dir, barrier):
    generated = []

    class Count(logging.Handler):
        def emit(self, record):
            if "generated" in record.getMessage():
                generated.append(record)

    logger = logging.getLogger("fpy3.error")
    logger.setLevel(logging.INFO)
    logger.addHandler(Count())
    barrier.wait()
    cert_path, key_path = devcert.ensure_dev_cert(state_dir)
    with open(cert_path, "rb") as c, open(key_path, "rb") as k:
        return len(generated), c.read(), k.read()


@pytest.mark.parametrize("preexisting", [None, _expired], ids=["fresh", "expired"])
def test_concurrent_processes_agree_on_one_pair(tmp_path, preexisting):
    state = str(tmp_path / "state")
    if preexisting:
        preexisting(*devcert.ensure_dev_cert(state))
    n = 8
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager, ctx.Pool(n) as pool:
        barrier = manager.Barrier(n, timeout=60)
        results = pool.starmap(_ensure_in_child, [(state, barrier)] * n, chunksize=1)
    assert sum(r[0] for r in results) == 1
    assert len({(r[1], r[2]) for r in results}) == 1
    cert, key = results[0][1], results[0][2]
    with open(os.path.join(state, "dev-cert.pem"), "rb") as f:
        assert f.read() == cert
    with open(os.path.join(state, "dev-key.pem"), "rb") as f:
        assert f.read() == key
    devcert.check_pem(cert, key)
    assert sorted(os.listdir(state)) == [".dev-cert.lock", "dev-cert.pem", "dev-key.pem"]
