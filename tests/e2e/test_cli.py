"""The command line: --check-config, config errors (exit 2), app errors (exit 3),
flags, the dev certificate, graceful SIGTERM, and the master with several workers."""

import socket
import ssl
import subprocess
import threading
import tomllib

import psutil
import pytest
from harness import free_port, to_toml, wait_until


def write_config(path, config) -> str:
    path.write_text(to_toml(config))
    return str(path)


# --- --check-config and precedence --------------------------------------------------


def test_check_config_prints_effective_toml(run_cli, tmp_path):
    cfg = write_config(
        tmp_path / "c.toml",
        {
            "server": {"port": 9443, "host": "127.0.0.1"},
            "limits": {"max_body_size": 1000, "max_header_count": 50},
            "http1": {"keepalive_timeout": 3.0},
        },
    )
    env = {
        "FPY3_LIMITS__MAX_BODY_SIZE": "2000",  # env beats the file
        "FPY3_SERVER__PORT": "9444",  # ... but the flag beats env
        "FPY3_HTTP1__HEADER_TIMEOUT": "7.5",
    }
    p = run_cli(
        ["run", "apps:app", "--config", cfg, "--port", "9555", "--log-level", "debug"]
        + ["--check-config"],
        env=env,
    )
    assert p.returncode == 0, p.stderr
    out = tomllib.loads(p.stdout)
    assert out["server"]["app"] == "apps:app"
    assert out["server"]["port"] == 9555
    assert out["server"]["host"] == "127.0.0.1"
    assert out["limits"]["max_body_size"] == 2000
    assert out["limits"]["max_header_count"] == 50
    assert out["http1"]["keepalive_timeout"] == 3.0
    assert out["http1"]["header_timeout"] == 7.5
    assert out["logging"]["level"] == "debug"
    # untouched defaults are printed too
    assert out["limits"]["max_header_size"] == 32768
    assert out["http3"]["enabled"] is True
    for section in ("server", "tls", "workers", "http1", "http3", "limits", "logging"):
        assert section in out


def test_check_config_without_file(run_cli):
    p = run_cli(["run", "apps:app", "--port", "9556", "--no-access-log", "--check-config"])
    assert p.returncode == 0, p.stderr
    out = tomllib.loads(p.stdout)
    assert out["server"]["port"] == 9556
    assert out["logging"]["access_log"] is False


def test_check_config_does_not_import_the_app(run_cli):
    p = run_cli(["run", "no_such_module_xyz:app", "--check-config"])
    assert p.returncode == 0, p.stderr
    assert tomllib.loads(p.stdout)["server"]["app"] == "no_such_module_xyz:app"


def test_check_config_output_reads_back(run_cli, tmp_path):
    p = run_cli(["run", "apps:app", "--http-port", "9080", "--check-config"])
    assert p.returncode == 0, p.stderr
    (tmp_path / "back.toml").write_text(p.stdout)
    p2 = run_cli(["run", "--config", str(tmp_path / "back.toml"), "--check-config"])
    assert p2.returncode == 0, p2.stderr
    assert tomllib.loads(p2.stdout) == tomllib.loads(p.stdout)


# --- config errors: exit 2, "SOURCE: section.key: reason" ----------------------------


@pytest.mark.parametrize(
    "config,key",
    [
        ({"server": {"port": "abc"}}, "server.port"),
        ({"server": {"port": 70000}}, "server.port"),
        ({"server": {"bogus": 1}}, "server.bogus"),
        ({"limits": {"max_body_size": -1}}, "limits.max_body_size"),
        ({"logging": {"level": "loud"}}, "logging.level"),
        ({"logging": {"access_format": "xml"}}, "logging.access_format"),
        ({"http1": {"keepalive_timeout": 0}}, "http1.keepalive_timeout"),
        ({"tls": {"dev_cert": False}}, "tls.cert"),
    ],
)
def test_config_file_error_exits_2(run_cli, tmp_path, config, key):
    cfg = write_config(tmp_path / "bad.toml", config)
    p = run_cli(["run", "apps:app", "--config", cfg])
    assert p.returncode == 2, p.stderr
    assert f"{cfg}: {key}: " in p.stderr, p.stderr
    assert "Traceback" not in p.stderr


def test_unknown_section_exits_2(run_cli, tmp_path):
    cfg = write_config(tmp_path / "bad.toml", {"servre": {"port": 1}})
    p = run_cli(["run", "apps:app", "--config", cfg])
    assert p.returncode == 2
    assert f"{cfg}: servre" in p.stderr
    assert "Traceback" not in p.stderr


def test_invalid_toml_exits_2(run_cli, tmp_path):
    cfg = tmp_path / "broken.toml"
    cfg.write_text("[server\nport = 1\n")
    p = run_cli(["run", "apps:app", "--config", str(cfg)])
    assert p.returncode == 2
    assert str(cfg) in p.stderr
    assert "Traceback" not in p.stderr


def test_missing_config_file_exits_2(run_cli, tmp_path):
    p = run_cli(["run", "apps:app", "--config", str(tmp_path / "nope.toml")])
    assert p.returncode == 2
    assert "nope.toml" in p.stderr
    assert "Traceback" not in p.stderr


def test_env_error_exits_2(run_cli):
    p = run_cli(["run", "apps:app", "--check-config"], env={"FPY3_SERVER__PORT": "abc"})
    assert p.returncode == 2
    assert "FPY3_SERVER__PORT" in p.stderr
    assert "server.port" in p.stderr


@pytest.mark.parametrize(
    "flags,key",
    [
        (["--port", "70000"], "server.port"),
        (["--log-level", "loud"], "logging.level"),
        (["--workers", "2000"], "workers.count"),
        (["--host", "not a host!"], "server.host"),
    ],
)
def test_flag_error_exits_2(run_cli, flags, key):
    p = run_cli(["run", "apps:app", *flags])
    assert p.returncode == 2, p.stderr
    assert f"command line: {key}: " in p.stderr, p.stderr


def test_port_in_use_exits_2(start_server):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        srv = start_server(config={"server": {"port": port}}, wait=False)
        code = srv.wait_exit(20)
    assert code == 2, srv.stderr()
    assert str(port) in srv.stderr() or "in use" in srv.stderr().lower()
    assert "Traceback" not in srv.stderr()


# --- app errors: exit 3 -------------------------------------------------------------


def test_app_module_missing_exits_3(start_server):
    srv = start_server(app="no_such_module_xyz:app", wait=False)
    assert srv.wait_exit(20) == 3, srv.stderr()
    assert "no_such_module_xyz" in srv.stderr()


def test_app_attribute_missing_exits_3(start_server):
    srv = start_server(app="apps:no_such_attr", wait=False)
    assert srv.wait_exit(20) == 3, srv.stderr()
    assert "no_such_attr" in srv.stderr()


def test_app_import_error_exits_3(start_server, tmp_path):
    appdir = tmp_path / "appdir"
    appdir.mkdir()
    (appdir / "broken_app_mod.py").write_text('raise RuntimeError("exploded at import 42")\n')
    srv = start_server(
        app="broken_app_mod:app", config={"server": {"app_dir": str(appdir)}}, wait=False
    )
    assert srv.wait_exit(20) == 3, srv.stderr()
    assert "exploded at import 42" in srv.stderr()


def test_app_dir_makes_module_importable(start_server, tmp_path):
    appdir = tmp_path / "appdir"
    appdir.mkdir()
    (appdir / "tiny_app_mod.py").write_text(TINY_APP)
    srv = start_server(app="tiny_app_mod:app", config={"server": {"app_dir": str(appdir)}})
    assert srv.get("/x").text == "tiny /x"


TINY_APP = """
async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            kind = message["type"].replace("lifespan.", "")
            await send({"type": f"lifespan.{kind}.complete"})
            if kind == "shutdown":
                return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"tiny " + scope["path"].encode()})
"""


# --- flags on a running server ------------------------------------------------------


def test_port_flags_override_file(start_server):
    port, http_port = free_port(), free_port()
    srv = start_server(
        config={"server": {"port": free_port(), "http_port": 0}},
        args=["--port", str(port), "--http-port", str(http_port), "--host", "127.0.0.1"],
        wait=False,
    )
    srv.port, srv.http_port = port, http_port
    srv.wait_ready()
    assert srv.get("/scope").json()["server"] == ["127.0.0.1", port]
    assert srv.get("/scope", tls=False).json()["server"] == ["127.0.0.1", http_port]


def test_certfile_keyfile_flags(start_server, tmp_path):
    from fpy3.devcert import ensure_dev_cert

    certdir = tmp_path / "mycert"
    certdir.mkdir()
    cert, key = ensure_dev_cert(str(certdir))
    state = tmp_path / "unused-state"
    srv = start_server(
        config={"server": {"state_dir": str(state)}, "tls": {"dev_cert": False}},
        args=["--certfile", str(cert), "--keyfile", str(key)],
        cafile=cert,
    )
    r = srv.get("/hello")
    assert r.status_code == 200
    assert not (state / "dev-cert.pem").exists(), "made a dev cert although one was given"


def test_no_access_log_flag(start_server):
    srv = start_server(args=["--no-access-log"])
    assert srv.get("/hello?q=quiet").status_code == 200
    srv.stop()
    assert "q=quiet" not in srv.stdout()


# --- dev certificate ----------------------------------------------------------------


def test_dev_cert_created_then_reused(start_server, tmp_path):
    state = tmp_path / "shared-state"
    cert, key = state / "dev-cert.pem", state / "dev-key.pem"
    assert not cert.exists()
    first = start_server(config={"server": {"state_dir": str(state)}})
    assert cert.exists() and key.exists()
    cert_bytes, key_bytes = cert.read_bytes(), key.read_bytes()
    assert b"BEGIN CERTIFICATE" in cert_bytes
    assert b"PRIVATE KEY" in key_bytes
    assert first.get("/hello").status_code == 200
    first.stop()

    second = start_server(config={"server": {"state_dir": str(state)}})
    assert second.get("/hello").status_code == 200
    assert cert.read_bytes() == cert_bytes
    assert key.read_bytes() == key_bytes


def test_dev_cert_names(start_server):
    srv = start_server()
    ctx = srv.ssl_context()
    for name in ("localhost", "127.0.0.1"):
        with socket.create_connection((srv.host, srv.port), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname=name) as tls:
                assert tls.version() in ("TLSv1.2", "TLSv1.3")
    decode = getattr(ssl._ssl, "_test_decode_cert", None)
    if decode is not None:
        sans = decode(str(srv.cafile)).get("subjectAltName", ())
        assert ("DNS", "localhost") in sans
        assert ("IP Address", "127.0.0.1") in sans
        assert any(
            kind == "IP Address" and value.rstrip() in ("::1", "0:0:0:0:0:0:0:1")
            for kind, value in sans
        )


def test_wrong_hostname_is_rejected(start_server):
    srv = start_server()
    ctx = srv.ssl_context()
    with socket.create_connection((srv.host, srv.port), timeout=10) as raw:
        with pytest.raises(ssl.SSLCertVerificationError):
            ctx.wrap_socket(raw, server_hostname="example.com")


# --- SIGTERM: graceful drain --------------------------------------------------------


def _request_in_thread(srv, path):
    result = {}

    def run():
        try:
            with srv.client(timeout=30) as c:
                r = c.get(path)
                result["status"], result["body"] = r.status_code, r.text
        except Exception as e:  # reported by the test
            result["error"] = repr(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, result


@pytest.mark.parametrize("command", ["run", "master"])
def test_sigterm_drains_in_flight_request(start_server, command):
    args = ["--workers", "2"] if command == "master" else []
    srv = start_server(command=command, args=args)
    t, result = _request_in_thread(srv, "/wait-flag?flag=drain")
    srv.wait_record("drain-started", "started")
    srv.proc.terminate()
    # the request is in flight: the server must wait for it
    with pytest.raises(subprocess.TimeoutExpired):
        srv.proc.wait(1.0)
    srv.flag("drain")
    t.join(20)
    assert result == {"status": 200, "body": "finished"}
    assert srv.wait_exit(20) == 0, srv.stderr()


def test_sigterm_gives_up_after_drain_timeout(start_server):
    srv = start_server(config={"workers": {"drain_timeout": 1.0}})
    t, result = _request_in_thread(srv, "/wait-flag?flag=never")
    srv.wait_record("never-started", "started")
    srv.proc.terminate()
    srv.wait_exit(15)
    t.join(15)
    assert "status" not in result or result["status"] != 200


def test_sigterm_idle_exits_0(start_server):
    srv = start_server(http=True)
    assert srv.get("/hello").status_code == 200
    assert srv.stop() == 0, srv.stderr()


# --- master -------------------------------------------------------------------------


def test_master_forks_workers_and_serves(start_server):
    srv = start_server(command="master", args=["--workers", "2"], http=True)
    master = psutil.Process(srv.pid)
    wait_until(lambda: len(master.children()) == 2, timeout=15)
    pids = {c.pid for c in master.children()}
    with srv.client() as c:
        for _ in range(10):
            r = c.get("/pid")
            assert r.status_code == 200
            assert int(r.text) in pids
    assert srv.get("/hello", tls=False).text == "Hello, world!"
    assert srv.stop() == 0, srv.stderr()
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"


def test_master_config_error_exits_2(start_server):
    srv = start_server(command="master", config={"limits": {"max_header_count": 0}}, wait=False)
    assert srv.wait_exit(20) == 2
    assert "limits.max_header_count" in srv.stderr()


def test_master_app_import_error_exits_3(start_server):
    srv = start_server(command="master", app="no_such_module_xyz:app", wait=False)
    code = srv.wait_exit(30)
    assert code == 3, srv.stderr()
    assert "no_such_module_xyz" in srv.stderr()
