"""In-process checks of the TLS pieces: the key file, the ClientHello parsers, the ACME
challenge files, the file watch, the TLS settings and the scope's TLS extension."""

from __future__ import annotations

import os
import ssl
import stat

import pytest

from fpy3 import certs, config, keys, ossl, tls


def test_key_file_is_made_once_private_and_reused(tmp_path):
    path = str(tmp_path / "state" / "session-keys")
    a = keys.load_or_create(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    b = keys.load_or_create(path)
    assert a == b
    assert len(a.quic_secret) == 32 and len(a.quic_ticket_key) == 64
    # Different purposes, different keys; periods rotate the TCP ticket key.
    assert a.quic_secret != a.quic_ticket_key[:32]
    k1, k2 = a.tcp_ticket_key(1), a.tcp_ticket_key(2)
    assert k1 != k2 and len(k1.name) == 16 and len(k1.hmac) == 32 and len(k1.aes) == 32
    assert keys.load_or_create(str(tmp_path / "other")) != a


@pytest.mark.parametrize(
    "text, reason",
    [
        ("junk\n", "not an fpy3 key file"),
        ("fpy3-session-keys-v1\nzz\n", "not hexadecimal"),
        ("fpy3-session-keys-v1\nabcd\n", "has 2 bytes"),
    ],
)
def test_a_damaged_key_file_is_an_error_and_kept(tmp_path, text, reason):
    path = tmp_path / "keys"
    path.write_text(text)
    with pytest.raises(keys.KeyFileError, match=reason):
        keys.load_or_create(str(path))
    assert path.read_text() == text


def test_client_hello_parsers():
    alpn = b"\x00\x0e\x0aacme-tls/1\x02h2"
    assert ossl.parse_alpn(alpn) == [b"acme-tls/1", b"h2"]
    assert ossl.parse_alpn(b"\x00\x05\x09truncated") == []
    name = b"example.org"
    ext = (len(name) + 3).to_bytes(2, "big") + b"\x00" + len(name).to_bytes(2, "big") + name
    assert ossl.parse_server_name(ext) == "example.org"
    assert ossl.parse_server_name(b"\x00") is None


def test_the_openssl_hooks_work_here():
    assert ossl.available() is None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    assert ossl.ctx_pointer(ctx)


def test_http01_answers_only_pending_tokens(tmp_path):
    state = str(tmp_path)
    certs.write_atomic(certs.http01_path(state, "tok_en-1"), b"tok_en-1.thumb", 0o644)
    assert certs.http01_answer(state, b"/.well-known/acme-challenge/tok_en-1") == b"tok_en-1.thumb"
    assert certs.http01_answer(state, b"/.well-known/acme-challenge/other") is None
    assert certs.http01_answer(state, b"/.well-known/acme-challenge/../../etc/passwd") is None
    assert certs.tls_alpn01_file(state, "../x") is None


def test_file_watch_sees_contents_not_times(tmp_path):
    a = tmp_path / "a"
    a.write_bytes(b"one")
    watch = certs.FileWatch([str(a), str(tmp_path / "missing")])
    assert not watch.changed()
    a.write_bytes(b"one")
    assert not watch.changed()
    a.write_bytes(b"two")
    assert watch.changed() and not watch.changed()


def _load(tmp_path, text: str) -> config.Settings:
    path = tmp_path / "fpy3.toml"
    path.write_text(text)
    return config.load(path, env={})


@pytest.mark.parametrize(
    "text, message",
    [
        ('[tls]\nclient_auth = "sometimes"\n', "tls.client_auth: must be one of"),
        ('[tls]\nclient_auth = "required"\n', "tls.client_ca: required when tls.client_auth"),
        ('[tls]\nclient_ca = "nope.pem"\n', "tls.client_ca: file not found"),
        ("[tls]\nticket_lifetime = 10\n", "tls.ticket_lifetime: must be between 60"),
        (
            '[tls]\nkey_password = "a"\nkey_password_file = "fpy3.toml"\n',
            "tls.key_password: set it or tls.key_password_file, not both",
        ),
        ("[acme]\nenabled = true\n", "acme.domains: required when acme.enabled"),
        ('[acme]\ndomains = ["bad name!"]\n', "acme.domains: expected host names"),
        ('[acme]\ndirectory = "ftp://x"\n', "acme.directory: expected 'letsencrypt'"),
        ('[acme]\nchallenge = "dns-01"\n', "acme.challenge: must be one of"),
        (
            '[acme]\nenabled = true\ndomains = ["a.example"]\nchallenge = "http-01"\n',
            "acme.challenge: http-01 is answered on server.http_port",
        ),
        (
            '[tls]\ncert = "fpy3.toml"\nkey = "fpy3.toml"\n'
            '[acme]\nenabled = true\ndomains = ["a.example"]\n',
            "tls.cert: must be empty with acme.enabled",
        ),
    ],
)
def test_tls_and_acme_settings_are_checked(tmp_path, text, message):
    with pytest.raises(config.ConfigError) as info:
        _load(tmp_path, text)
    assert str(info.value).startswith(str(tmp_path / "fpy3.toml") + ": ")
    assert message in str(info.value)


def test_acme_directory_names(tmp_path):
    s = _load(tmp_path, '[acme]\ndirectory = "letsencrypt-staging"\n')
    assert s.acme.directory_url == config.LETSENCRYPT_STAGING
    s = _load(tmp_path, '[acme]\ndirectory = "https://127.0.0.1:14000/dir"\n')
    assert s.acme.directory_url == "https://127.0.0.1:14000/dir"
    assert config.Settings().acme.directory_url == config.LETSENCRYPT


def test_rfc4514_names():
    subject = (
        (("countryName", "FR"),),
        (("organizationName", "A, B"),),
        (("commonName", " lead"),),
    )
    assert tls.rfc4514(subject) == "CN=\\ lead,O=A\\, B,C=FR"


def _handshake(server_ctx, client_ctx, session=None, alpn=None):
    """A TLS 1.3 handshake between memory BIOs: (session, resumed, server cert DER,
    ALPN the server chose)."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    if alpn:
        client_ctx.set_alpn_protocols(alpn)
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="localhost", session=session)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {client: False, server: False}
    for _ in range(20):
        for obj in (client, server):
            if not done[obj]:
                try:
                    obj.do_handshake()
                    done[obj] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            break
    server.write(b"x")  # tickets come after the handshake
    c_in.write(s_out.read())
    client.read(1)
    return (
        client.session,
        client.session_reused,
        client.getpeercert(binary_form=True),
        client.selected_alpn_protocol(),
    )


def test_a_new_certificate_keeps_resumption_and_acme_gets_its_own(tmp_path):
    from fpy3 import devcert

    a_cert, a_key = devcert.ensure_dev_cert(str(tmp_path / "a"))
    b_cert, b_key = devcert.ensure_dev_cert(str(tmp_path / "b"))
    live = tmp_path / "live"
    live.mkdir()
    cert, key = str(live / "cert.pem"), str(live / "key.pem")
    for src, dst in ((a_cert, cert), (a_key, key)):
        with open(src, "rb") as f:
            certs.write_atomic(dst, f.read())
    bundle = tmp_path / "bundle.pem"
    with open(a_cert, "rb") as fa, open(b_cert, "rb") as fb:
        bundle.write_bytes(fa.read() + fb.read())
    settings = config.Settings(
        server=config.ServerSettings(state_dir=str(tmp_path)),
        tls=config.TLSSettings(cert=cert, key=key),
    )
    contexts = tls.TLSContexts(settings, keys.load_or_create(str(tmp_path / "keys")))
    client = ssl.create_default_context(cafile=str(bundle))
    session, resumed, der, _ = _handshake(contexts.listener, client)
    assert not resumed
    # The files change: new handshakes get the new pair, and old tickets still resume.
    for src, dst in ((b_cert, cert), (b_key, key)):
        with open(src, "rb") as f:
            certs.write_atomic(dst, f.read())
    assert contexts.reload()
    _, resumed, _, alpn = _handshake(contexts.listener, client, session, ["http/1.1"])
    assert resumed and alpn == "http/1.1"
    _, resumed, der2, _ = _handshake(contexts.listener, client)
    with open(b_cert, "rb") as f:
        assert der2 == ssl.PEM_cert_to_DER_cert(f.read().decode()) != der
    # A pending tls-alpn-01 challenge for the name: only acme-tls/1 clients see it.
    c_cert, c_key = devcert.ensure_dev_cert(str(tmp_path / "c"))
    with open(c_cert, "rb") as c, open(c_key, "rb") as k:
        challenge = c.read()
        certs.write_atomic(certs.tls_alpn01_path(str(tmp_path), "localhost"), challenge + k.read())
    acme_client = ssl.create_default_context(cafile=c_cert)
    _, _, der3, alpn = _handshake(contexts.listener, acme_client, alpn=["acme-tls/1"])
    assert der3 == ssl.PEM_cert_to_DER_cert(challenge.decode()) and alpn == "acme-tls/1"
    other = ssl.create_default_context(cafile=str(bundle))
    _, _, der4, alpn = _handshake(contexts.listener, other, alpn=["http/1.1"])
    assert der4 == der2 and alpn == "http/1.1"
    # A broken pair is refused and the current one stays.
    certs.write_atomic(key, b"not a key")
    assert not contexts.reload()
    assert _handshake(contexts.listener, other)[2] == der2


def test_tcp_ticket_keys_rotate(tmp_path, monkeypatch):
    from fpy3 import devcert

    cert, key = devcert.ensure_dev_cert(str(tmp_path))
    settings = config.Settings(
        server=config.ServerSettings(state_dir=str(tmp_path)),
        tls=config.TLSSettings(cert=cert, key=key, ticket_lifetime=3600),
    )
    session_keys = keys.load_or_create(str(tmp_path / "keys"))
    clock = [1_000_000 * 3600.0]
    monkeypatch.setattr(ossl.time, "time", lambda: clock[0])
    listener = tls.TLSContexts(settings, session_keys).listener
    client = ssl.create_default_context(cafile=cert)
    session = _handshake(listener, client)[0]
    # Another worker (another context, same key file) in the next period: still resumes.
    clock[0] += 3600
    other = tls.TLSContexts(settings, session_keys).listener
    renewed, resumed, _, _ = _handshake(other, client, session)
    assert resumed
    # Two periods on, that old ticket's key is gone: a full handshake.
    clock[0] += 3600
    assert not _handshake(other, client, session)[1]
    assert _handshake(other, client, renewed)[1]  # the ticket renewed meanwhile is fine
