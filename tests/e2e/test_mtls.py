"""Client certificates (tls.client_auth, tls.client_ca) on TCP with curl and on QUIC with
aioquic, the ASGI TLS extension in the scope, and a server key encrypted with a
passphrase (tls.key_password_file)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from h3clients import H3ClientError
from harness import call, client_missing
from pki import make_ca, make_leaf
from tlsclients import aioquic_session

NAME = "CN=client one,O=fpy3 tests"


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("pki")
    server_ca, client_ca, other_ca = make_ca("server CA"), make_ca("client CA"), make_ca("rogue")
    files = {}
    files["server_ca"], _ = server_ca.write(d, "server-ca")
    files["client_ca"], _ = client_ca.write(d, "client-ca")
    leaf = make_leaf(server_ca, "server", ["127.0.0.1", "localhost"])
    files["cert"], files["key"] = leaf.write(d, "server", password=b"s3cret passphrase")
    (d / "password").write_text("s3cret passphrase\n")
    files["password"] = str(d / "password")
    files["client"], files["client_key"] = make_leaf(client_ca, "client one", client=True).write(
        d, "client"
    )
    files["rogue"], files["rogue_key"] = make_leaf(other_ca, "client one", client=True).write(
        d, "rogue"
    )
    return files


def _server(start_server, pki, mode: str):
    config = {
        "tls": {
            "cert": pki["cert"],
            "key": pki["key"],
            "key_password_file": pki["password"],
            "client_auth": mode,
            "client_ca": pki["client_ca"],
            "dev_cert": False,
        },
        "http3": {"enabled": True},
    }
    # The harness's readiness probe sends no certificate: with "required" it cannot
    # pass, so wait for the log line instead.
    srv = start_server(config=config, cafile=Path(pki["server_ca"]), wait=mode != "required")
    if mode == "required":
        srv.wait_stderr("serving apps:app")
    return srv


def _curl(srv, pki, cert: str | None = None) -> subprocess.CompletedProcess:
    curl = shutil.which("curl")
    if curl is None:
        client_missing(RuntimeError("curl not found"))
    cmd = [curl, "-sS", "--max-time", "10", "--cacert", pki["server_ca"]]
    if cert:
        cmd += ["--cert", pki[cert], "--key", pki[cert + "_key"]]
    cmd.append(srv.url("/scope"))
    # curl is not under test: keep a sanitizer runtime preloaded for fpy3 away from it.
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=False, env=env)


def _quic(srv, pki, cert: str | None = None):
    kwargs = {"certfile": pki[cert], "keyfile": pki[cert + "_key"]} if cert else {}
    return call(
        aioquic_session,
        srv.host,
        srv.port,
        [("GET", "/scope", b"")],
        pki["server_ca"],
        **kwargs,
    )


def _tls_ext(body: bytes | str) -> dict:
    return json.loads(body)["extensions"]["tls"]


def test_required(start_server, pki):
    srv = _server(start_server, pki, "required")
    # Present and from the CA: served, and the app sees who it is on both transports.
    r = _curl(srv, pki, "client")
    assert r.returncode == 0, r.stderr
    ext = _tls_ext(r.stdout)
    assert ext["client_cert_name"] == NAME
    assert len(ext["client_cert_chain"]) == 1
    assert ext["client_cert_chain"][0].startswith("-----BEGIN CERTIFICATE-----")
    assert ext["client_cert_error"] is None
    assert ext["tls_version"] in (0x0303, 0x0304) and ext["cipher_suite"]
    q = _quic(srv, pki, "client")
    ext = _tls_ext(q.responses[0].body)
    assert ext["client_cert_name"] == NAME and len(ext["client_cert_chain"]) == 1
    assert ext["tls_version"] == 0x0304
    # Missing, or from another CA: refused on both.
    for cert in (None, "rogue"):
        r = _curl(srv, pki, cert)
        assert r.returncode != 0, (cert, r.stdout)
        with pytest.raises(H3ClientError):
            _quic(srv, pki, cert)
    assert srv.alive()


def test_optional(start_server, pki):
    srv = _server(start_server, pki, "optional")
    r = _curl(srv, pki)
    assert r.returncode == 0, r.stderr
    ext = _tls_ext(r.stdout)
    assert ext["client_cert_chain"] == [] and ext["client_cert_name"] is None
    q = _quic(srv, pki)
    assert _tls_ext(q.responses[0].body)["client_cert_name"] is None
    r = _curl(srv, pki, "client")
    assert r.returncode == 0 and _tls_ext(r.stdout)["client_cert_name"] == NAME
    q = _quic(srv, pki, "client")
    assert _tls_ext(q.responses[0].body)["client_cert_name"] == NAME
    # A certificate that does not verify fails the handshake, as with nginx's "optional".
    assert _curl(srv, pki, "rogue").returncode != 0
    with pytest.raises(H3ClientError):
        _quic(srv, pki, "rogue")


def test_no_client_auth_and_the_tls_extension(start_server, pki):
    srv = _server(start_server, pki, "none")
    r = _curl(srv, pki, "client")  # offered but never asked for
    assert r.returncode == 0, r.stderr
    ext = _tls_ext(r.stdout)
    assert ext["client_cert_chain"] == [] and ext["client_cert_name"] is None
    # Cleartext connections have no TLS extension.
    srv2 = start_server(http=True)
    scope = srv2.get("/scope", tls=False).json()
    assert "tls" not in scope.get("extensions", {})


def test_a_wrong_key_password_stops_the_server(run_cli, pki, tmp_path):
    bad = tmp_path / "bad"
    bad.write_text("not it\n")
    r = run_cli(
        ["run", "apps:app", "--port", "18998", "--certfile", pki["cert"], "--keyfile", pki["key"]],
        env={"FPY3_TLS__KEY_PASSWORD_FILE": str(bad)},
    )
    assert r.returncode == 2, r.stderr
    assert "tls.cert:" in r.stderr
