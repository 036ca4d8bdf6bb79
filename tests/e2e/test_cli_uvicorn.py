"""The command line a uvicorn user knows: its flags, grouped as in uvicorn's settings,
--set for every other key, --env-file, --factory, --log-config and access log
templates with named fields."""

from __future__ import annotations

import json
import re
import tomllib

import pytest


def check(run_cli, *flags: str, env=None) -> dict:
    p = run_cli(["run", "apps:app", *flags, "--check-config"], env=env)
    assert p.returncode == 0, p.stderr
    return tomllib.loads(p.stdout)


def test_help_groups_the_flags_as_uvicorn_does(run_cli):
    p = run_cli(["run", "--help"])
    assert p.returncode == 0, p.stderr
    text = p.stdout
    groups = [
        "application:",
        "socket binding:",
        "development:",
        "production:",
        "logging:",
        "HTTP:",
        "HTTPS:",
        "WebSocket:",
        "resource limits:",
        "timeouts:",
        "configuration:",
    ]
    positions = [text.index("\n" + g) for g in groups]
    assert positions == sorted(positions)
    for flag in (
        "--factory",
        "--env-file",
        "--log-config",
        "--root-path",
        "--proxy-headers",
        "--forwarded-allow-ips",
        "--uds",
        "--fd",
        "--timeout-graceful-shutdown",
        "--limit-concurrency",
        "--set",
        "--ssl-certfile",
    ):
        assert flag in text, flag


def test_uvicorn_flags_map_to_their_keys(run_cli, tmp_path):
    conf = tmp_path / "log.json"
    conf.write_text(json.dumps({"version": 1}))
    out = check(
        run_cli,
        "--root-path", "/api",
        "--no-proxy-headers",
        "--forwarded-allow-ips", "10.0.0.0/8, 127.0.0.1",
        "--timeout-graceful-shutdown", "7.5",
        "--limit-concurrency", "50",
        "--limit-max-requests", "1000",
        "--timeout-keep-alive", "3",
        "--backlog", "512",
        "--ws-max-size", "1024",
        "--ws-per-message-deflate", "false",
        "--factory",
        "--log-config", str(conf),
        "--access-log-format", "{client} {status}",
        "--app-dir", str(tmp_path),
        "--reload-dir", "src", "--reload-dir", "lib",
        "--no-http3",
        "--metrics-port", "9100",
    )  # fmt: skip
    assert out["server"]["root_path"] == "/api"
    assert out["proxy"]["headers"] is False
    assert out["proxy"]["forwarded_allow_ips"] == ["10.0.0.0/8", "127.0.0.1"]
    assert out["server"]["factory"] is True
    assert out["server"]["app_dir"] == str(tmp_path)
    assert out["workers"]["drain_timeout"] == 7.5
    assert out["workers"]["max_requests"] == 1000
    assert out["limits"]["max_connections"] == 50
    assert out["http1"]["keepalive_timeout"] == 3.0
    assert out["http1"]["backlog"] == 512
    assert out["websocket"]["max_message_size"] == 1024
    assert out["websocket"]["per_message_deflate"] is False
    assert out["logging"]["config_file"] == str(conf)
    assert out["logging"]["access_format"] == "{client} {status}"
    assert out["reload"]["dirs"] == [str(tmp_path / "src"), str(tmp_path / "lib")]
    assert out["http3"]["enabled"] is False
    assert out["metrics"]["port"] == 9100
    assert check(run_cli)["proxy"]["headers"] is True  # uvicorn's default


def test_set_reaches_every_key_and_flags_win(run_cli):
    out = check(
        run_cli,
        "--set", "http3.idle_timeout=12.5",
        "--set", "websocket.enabled=off",
        "--set", "server.hosts=127.0.0.1, ::1",
        "--set", "server.uds_mode=0o600",
        "--set", "health.ready_path=/ready",
        "--set", "workers.drain_timeout=9",
        "--timeout-graceful-shutdown", "4",
    )  # fmt: skip
    assert out["http3"]["idle_timeout"] == 12.5
    assert out["websocket"]["enabled"] is False
    assert out["server"]["hosts"] == ["127.0.0.1", "::1"]
    assert out["server"]["uds_mode"] == 0o600
    assert out["health"]["ready_path"] == "/ready"
    assert out["workers"]["drain_timeout"] == 4.0  # the dedicated flag wins


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--set", "oops"], "command line: --set oops: expected section.key=value"),
        (["--set", "server.nope=1"], "command line: server.nope: unknown key"),
        (
            ["--set", "http3.idle_timeout=soon"],
            "command line: http3.idle_timeout: expected a number",
        ),
        (["--forwarded-allow-ips", "10.0.0.300"], "command line: proxy.forwarded_allow_ips:"),
        (["--access-log-format", "{nope}"], "command line: logging.access_format: "),
        (["--log-config", "log.txt"], "command line: logging.config_file: expected a .json"),
        (["--log-config", "missing.yaml"], "command line: logging.config_file: file not found"),
        (["--set", "health.live_path=live"], "command line: health.live_path:"),
    ],
)
def test_bad_values_exit_2_naming_the_key(run_cli, flags, message):
    p = run_cli(["run", "apps:app", *flags, "--check-config"])
    assert p.returncode == 2, p.stdout
    assert message in p.stderr, p.stderr
    assert "Traceback" not in p.stderr


def test_env_file_sets_variables_before_the_config(run_cli, tmp_path):
    env_file = tmp_path / "prod.env"
    env_file.write_text("FPY3_SERVER__PORT=9123\n# a comment\nFPY3_HTTP1__BACKLOG='77'\n")
    out = check(run_cli, "--env-file", str(env_file))
    assert out["server"]["port"] == 9123 and out["http1"]["backlog"] == 77
    # Variables already in the environment win, as with uvicorn.
    out = check(run_cli, "--env-file", str(env_file), env={"FPY3_SERVER__PORT": "9124"})
    assert out["server"]["port"] == 9124
    p = run_cli(["run", "apps:app", "--env-file", str(tmp_path / "none.env")])
    assert p.returncode == 2 and "--env-file: cannot read" in p.stderr


def test_factory_is_called_for_the_app(start_server):
    srv = start_server(app="apps:create_app", args=["--factory"])
    srv.assert_serving()
    assert srv.record("factory") == ["called"]


def test_access_log_template_with_named_fields(start_server):
    fmt = '{client} "{request_line}" {status} {bytes} {protocol} {header_x_request_id} {host}'
    srv = start_server(args=["--access-log-format", fmt])
    assert srv.get("/hello?x=1", headers={"x-request-id": "abc-1"}).status_code == 200
    assert srv.get("/hello").status_code == 200
    srv.stop()
    lines = [line for line in srv.stdout().splitlines() if "/hello" in line]
    assert lines[0] == (
        f'127.0.0.1 "GET /hello?x=1 HTTP/1.1" 200 13 HTTP/1.1 abc-1 127.0.0.1:{srv.port}'
    )
    assert lines[1].endswith(f" - 127.0.0.1:{srv.port}")  # a missing header is "-"


def test_log_config_json_routes_error_and_access_logs(start_server, tmp_path):
    access, errors = tmp_path / "access.log", tmp_path / "error.log"
    conf = {
        "version": 1,
        "formatters": {
            "access": {"format": "ACCESS %(client_addr)s %(status)s %(path)s"},
            "error": {"format": "ERR %(levelname)s %(message)s"},
        },
        "handlers": {
            "access": {
                "class": "logging.FileHandler",
                "filename": str(access),
                "formatter": "access",
            },
            "error": {
                "class": "logging.FileHandler",
                "filename": str(errors),
                "formatter": "error",
            },
        },
        "loggers": {
            "fpy3.access": {"handlers": ["access"], "level": "INFO", "propagate": False},
            "fpy3": {"handlers": ["error"], "level": "INFO", "propagate": False},
        },
    }
    path = tmp_path / "log.json"
    path.write_text(json.dumps(conf))
    srv = start_server(args=["--log-config", str(path)])
    assert srv.get("/hello").status_code == 200
    srv.stop()
    assert re.search(r"^ACCESS 127\.0\.0\.1:\d+ 200 /hello$", access.read_text(), re.M)
    assert "ERR INFO worker" in errors.read_text()
    assert "/hello" not in srv.stdout()  # through the logger, not the fast stream


def test_log_config_yaml_and_ini(start_server, tmp_path):
    yaml_log, ini_log = tmp_path / "yaml.log", tmp_path / "ini.log"
    (tmp_path / "log.yaml").write_text(
        "version: 1\n"
        "handlers:\n"
        f"  f: {{class: logging.FileHandler, filename: '{yaml_log}'}}\n"
        "loggers:\n"
        "  fpy3: {handlers: [f], level: INFO}\n"
    )
    srv = start_server(args=["--log-config", str(tmp_path / "log.yaml")])
    srv.stop()
    assert "serving apps:app" in yaml_log.read_text()
    (tmp_path / "log.ini").write_text(
        "[loggers]\nkeys=root,fpy3\n"
        "[handlers]\nkeys=f\n"
        "[formatters]\nkeys=plain\n"
        "[logger_root]\nhandlers=\n"
        "[logger_fpy3]\nqualname=fpy3\nhandlers=f\nlevel=INFO\npropagate=0\n"
        f"[handler_f]\nclass=FileHandler\nargs=('{ini_log}',)\nformatter=plain\n"
        "[formatter_plain]\nformat=INI %(message)s\n"
    )
    srv = start_server(args=["--log-config", str(tmp_path / "log.ini")])
    srv.stop()
    assert "INI worker" in ini_log.read_text()


def test_broken_log_config_exits_2(run_cli, tmp_path):
    path = tmp_path / "log.json"
    path.write_text('{"version": 1, "handlers": {"h": {"class": "no.such.Handler"}}}')
    p = run_cli(["run", "apps:app", "--log-config", str(path)])
    assert p.returncode == 2
    assert f"{path}: logging.config_file: ValueError" in p.stderr
