"""Settings: defaults, TOML, env and CLI layers, validation messages, dump round trip."""

from __future__ import annotations

import argparse
import dataclasses
import os
import tomllib
from pathlib import Path

import pytest

from fpy3.config import (
    ConfigError,
    HTTP1Settings,
    LimitsSettings,
    ReloadSettings,
    ServerSettings,
    Settings,
    TLSSettings,
    add_arguments,
    dump,
    load,
    overrides_from_args,
)

CONFIG_DIR = Path(__file__).resolve().parents[2] / "config"

SECTIONS = [f.name for f in dataclasses.fields(Settings) if f.name != "config_file"]
KEYS = {name: [f.name for f in dataclasses.fields(getattr(Settings(), name))] for name in SECTIONS}


def write(directory: Path, text: str, name: str = "fpy3.toml") -> str:
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def error(path: str | None = None, **kwargs: object) -> str:
    kwargs.setdefault("env", {})
    with pytest.raises(ConfigError) as info:
        load(path, **kwargs)  # type: ignore[arg-type]
    return str(info.value)


@pytest.fixture
def pem(tmp_path: Path) -> tuple[str, str]:
    """A cert and key file; load() only checks that they exist and are readable."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("cert\n")
    key.write_text("key\n")
    return str(cert), str(key)


# --- defaults and file values -------------------------------------------------------


def test_defaults_without_file() -> None:
    settings = load(None, env={})
    assert settings == Settings()
    assert settings.config_file == ""
    assert settings.udp_port == 8443


def test_empty_file_gives_defaults_and_records_its_path(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    assert load(path, env={}) == Settings(config_file=path)


def test_file_values_of_every_type(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [server]
        host = "::1"
        port = 9443
        debug = true
        [workers]
        count = 8
        drain_timeout = 12  # an integer is fine for a float
        [http1]
        header_timeout = 2.5
        [http3]
        port = 9444
        [reload]
        include = ["*.py"]
        exclude = []
        """,
    )
    settings = load(path, env={})
    assert settings.server == ServerSettings(host="::1", port=9443, debug=True)
    assert settings.workers.count == 8
    assert settings.workers.drain_timeout == 12.0
    assert isinstance(settings.workers.drain_timeout, float)
    assert settings.http1 == HTTP1Settings(header_timeout=2.5)
    assert settings.udp_port == 9444
    assert settings.reload == ReloadSettings(include=("*.py",), exclude=())


def test_config_file_is_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, "[server]\nport = 9000\n", name="rel.toml")
    monkeypatch.chdir(tmp_path)
    settings = load("rel.toml", env={})
    assert settings.config_file == str(tmp_path / "rel.toml")
    assert load(Path("rel.toml"), env={}).config_file == str(tmp_path / "rel.toml")


# --- precedence ---------------------------------------------------------------------


def test_precedence_file_env_cli(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nport = 9000\nhost = 'localhost'\n[workers]\ncount = 2\n")
    env = {"FPY3_SERVER__PORT": "9001", "FPY3_WORKERS__COUNT": "3"}
    overrides = {"server.port": 9002}
    settings = load(path, env=env, overrides=overrides)
    assert settings.server.port == 9002  # CLI beats env beats file
    assert settings.workers.count == 3  # env beats file
    assert settings.server.host == "localhost"  # file beats defaults
    assert settings.server.http_port == 0  # default
    assert load(path, env=env).server.port == 9001
    assert load(path, env={}).server.port == 9000


def test_env_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FPY3_SERVER__PORT", "7443")
    assert load(None).server.port == 7443


def test_none_override_means_not_given() -> None:
    assert load(None, env={}, overrides={"server.port": None}).server.port == 8443


def test_env_ignores_other_variables() -> None:
    env = {"FPY3_MSQUIC_LIB": "/x/libmsquic.so", "HOME": "/root", "XFPY3_SERVER__PORT": "1"}
    assert load(None, env=env) == Settings()


# --- env conversion -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("var", "text", "section", "key", "expected"),
    [
        ("FPY3_SERVER__PORT", "9000", "server", "port", 9000),
        ("FPY3_SERVER__PORT", " +9000 ", "server", "port", 9000),
        ("FPY3_WORKERS__DRAIN_TIMEOUT", "2.5", "workers", "drain_timeout", 2.5),
        ("FPY3_WORKERS__DRAIN_TIMEOUT", "3", "workers", "drain_timeout", 3.0),
        ("FPY3_SERVER__SERVER_HEADER", " my server ", "server", "server_header", " my server "),
        ("FPY3_SERVER__SERVER_HEADER", "", "server", "server_header", ""),
        ("FPY3_RELOAD__INCLUDE", "*.py, *.txt,,", "reload", "include", ("*.py", "*.txt")),
        ("FPY3_RELOAD__INCLUDE", "", "reload", "include", ()),
        ("FPY3_server__port", "9000", "server", "port", 9000),
    ],
)
def test_env_conversion(var: str, text: str, section: str, key: str, expected: object) -> None:
    value = getattr(getattr(load(None, env={var: text}), section), key)
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("true", True),
        ("TRUE", True),
        ("1", True),
        ("yes", True),
        ("On", True),
        ("false", False),
        ("False", False),
        ("0", False),
        ("no", False),
        ("OFF", False),
    ],
)
def test_env_booleans(text: str, expected: bool) -> None:
    settings = load(None, env={"FPY3_LOGGING__ACCESS_LOG": text, "FPY3_SERVER__DEBUG": text})
    assert settings.logging.access_log is expected
    assert settings.server.debug is expected


# --- relative paths -----------------------------------------------------------------


def test_relative_paths_in_file_are_relative_to_its_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pem: tuple[str, str]
) -> None:
    conf = tmp_path / "etc"
    conf.mkdir()
    (conf / "tls").mkdir()
    for name in ("cert.pem", "key.pem"):
        (conf / "tls" / name).write_text("x")
    path = write(
        conf,
        """
        [server]
        app_dir = "app"
        state_dir = "../state"
        [tls]
        cert = "tls/cert.pem"
        key = "./tls/key.pem"
        [logging]
        access_log_file = "log/access.log"
        error_log_file = "/var/log/fpy3/error.log"
        [reload]
        dirs = ["src", "/abs", "a/../b"]
        """,
    )
    monkeypatch.chdir(tmp_path)  # the current directory must not matter
    settings = load(path, env={})
    assert settings.server.app_dir == str(conf / "app")
    assert settings.server.state_dir == str(tmp_path / "state")
    assert settings.tls.cert == str(conf / "tls" / "cert.pem")
    assert settings.tls.key == str(conf / "tls" / "key.pem")
    assert settings.logging.access_log_file == str(conf / "log" / "access.log")
    assert settings.logging.error_log_file == "/var/log/fpy3/error.log"
    assert settings.reload.dirs == (str(conf / "src"), "/abs", str(conf / "b"))


def test_relative_paths_from_env_and_cli_are_relative_to_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "c.pem").write_text("x")
    (tmp_path / "k.pem").write_text("x")
    conf = tmp_path / "conf"
    conf.mkdir()
    path = write(conf, "[server]\nport = 9000\n")
    monkeypatch.chdir(tmp_path)
    settings = load(
        path,
        env={"FPY3_SERVER__STATE_DIR": "state", "FPY3_RELOAD__DIRS": "a,b"},
        overrides={"tls.cert": "c.pem", "tls.key": "k.pem", "server.app_dir": "."},
    )
    assert settings.server.state_dir == str(tmp_path / "state")
    assert settings.reload.dirs == (str(tmp_path / "a"), str(tmp_path / "b"))
    assert settings.tls.cert == str(tmp_path / "c.pem")
    assert settings.tls.key == str(tmp_path / "k.pem")
    assert settings.server.app_dir == str(tmp_path)


def test_empty_paths_stay_empty(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\nstate_dir = ""\n[logging]\naccess_log_file = ""\n')
    settings = load(path, env={"FPY3_SERVER__APP_DIR": ""})
    assert settings.server.state_dir == ""
    assert settings.server.app_dir == ""
    assert settings.logging.access_log_file == ""


# --- file errors --------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.toml")
    assert error(path) == f"{path}: cannot read: No such file or directory"


def test_directory_instead_of_file(tmp_path: Path) -> None:
    assert error(str(tmp_path)) == f"{tmp_path}: cannot read: Is a directory"


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_bytes(b"[server]\nhost = '\xff'\n")
    assert error(str(path)) == f"{path}: cannot read: not UTF-8 text (invalid start byte)"


def test_error_names_the_path_as_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, "[server]\nport = -1\n")
    monkeypatch.chdir(tmp_path)
    assert error("fpy3.toml") == "fpy3.toml: server.port: must be between 0 and 65535, got -1"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[server]\nport = \n", "line 2: Invalid value"),
        ("[server]\nport = 1\nport = 2\n", "line 3: Cannot overwrite a value"),
        ("\n\n[server", "line 3: Expected ']' at the end of a table declaration"),
        ('[server]\nhost = "x\n', "line 2: Illegal character '\\n'"),
    ],
)
def test_toml_syntax_errors(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    assert error(path) == f"{path}: {message}"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[sever]\nport = 1\n", "sever: unknown section; did you mean 'server'?"),
        ("[zzz]\n", "zzz: unknown section"),
        ("[server]\nprot = 1\n", "server.prot: unknown key; did you mean 'port'?"),
        ("[server]\nzzz = 1\n", "server.zzz: unknown key"),
        ("[server.extra]\n", "server.extra: unknown key"),
        (
            "[logging]\naccess-log = true\n",
            "logging.access-log: unknown key; did you mean 'access_log'?",
        ),
        (
            "port = 9000\n",
            "port: expected a table, got an integer; did you mean to put it under [server]?",
        ),
        ("server = 'x'\n", "server: expected a table, got a string"),
        ("zzz = [1]\n", "zzz: expected a table, got an array"),
    ],
)
def test_unknown_names_and_top_level_values(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    assert error(path) == f"{path}: {message}"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("[server]\nport = '80'", "server.port: expected an integer, got a string"),
        ("[server]\nport = true", "server.port: expected an integer, got a boolean"),
        ("[server]\nport = 80.0", "server.port: expected an integer, got a float"),
        ("[server]\nport = {a = 1}", "server.port: expected an integer, got a table"),
        ("[server]\ndebug = 1", "server.debug: expected a boolean, got an integer"),
        ("[server]\napp = 1979-05-27", "server.app: expected a string, got a date"),
        ("[server]\napp = 1979-05-27T07:32:00", "server.app: expected a string, got a date-time"),
        ("[server]\napp = ['a:b']", "server.app: expected a string, got an array"),
        (
            "[workers]\ndrain_timeout = '5'",
            "workers.drain_timeout: expected a number, got a string",
        ),
        (
            "[workers]\ndrain_timeout = true",
            "workers.drain_timeout: expected a number, got a boolean",
        ),
        (
            "[workers]\ndrain_timeout = inf",
            "workers.drain_timeout: expected a finite number, got inf",
        ),
        (
            "[workers]\ndrain_timeout = nan",
            "workers.drain_timeout: expected a finite number, got nan",
        ),
        ("[reload]\ndirs = 'src'", "reload.dirs: expected an array of strings, got a string"),
        (
            "[reload]\ninclude = ['*.py', 1]",
            "reload.include: expected an array of strings, got an array holding an integer",
        ),
        ("[tls]\nmin_version = 1.3", "tls.min_version: expected a string, got a float"),
    ],
)
def test_wrong_types_in_file(tmp_path: Path, line: str, message: str) -> None:
    path = write(tmp_path, line + "\n")
    assert error(path) == f"{path}: {message}"


RANGE_ERRORS = [
    ("server", "port", -1, "must be between 0 and 65535, got -1"),
    ("server", "port", 65536, "must be between 0 and 65535, got 65536"),
    ("server", "http_port", -1, "must be between 0 and 65535, got -1"),
    ("server", "http_port", 70000, "must be between 0 and 65535, got 70000"),
    ("http3", "port", 65536, "must be between 0 and 65535, got 65536"),
    ("workers", "count", -1, "must be between 0 and 1024, got -1"),
    ("workers", "count", 1025, "must be between 0 and 1024, got 1025"),
    ("workers", "drain_timeout", 0, "must be greater than 0, got 0.0"),
    ("http1", "keepalive_timeout", -1.5, "must be greater than 0, got -1.5"),
    ("http1", "header_timeout", 0.0, "must be greater than 0, got 0.0"),
    ("http1", "body_timeout", 0, "must be greater than 0, got 0.0"),
    ("http1", "send_timeout", -1, "must be greater than 0, got -1.0"),
    ("tls", "handshake_timeout", 0, "must be greater than 0, got 0.0"),
    ("http1", "backlog", 0, "must be between 1 and 65535, got 0"),
    ("http1", "backlog", 65536, "must be between 1 and 65535, got 65536"),
    ("limits", "max_header_size", 1023, "must be at least 1024, got 1023"),
    ("limits", "max_header_count", 0, "must be between 1 and 10000, got 0"),
    ("limits", "max_header_count", 10001, "must be between 1 and 10000, got 10001"),
    ("limits", "max_body_size", -1, "must be at least 0, got -1"),
    ("limits", "max_connections", -1, "must be at least 0, got -1"),
    ("http3", "handshake_timeout", 0, "must be greater than 0, got 0.0"),
    ("http3", "body_timeout", -1, "must be at least 0, got -1.0"),
    ("http3", "send_timeout", -0.5, "must be at least 0, got -0.5"),
    ("http3", "max_window", 65535, "must be between 65536 and 1099511627776, got 65535"),
    ("http3", "max_stream_window", 100, "must be between 16384 and 1099511627776, got 100"),
    ("http3", "unread_body_budget", 1000, "must be between 1048576 and 1099511627776, got 1000"),
    ("http3", "max_connections", -1, "must be at least 0, got -1"),
    ("http3", "max_handshakes", -1, "must be between 0 and 1048576, got -1"),
    ("http3", "handshake_memory", -1, "must be between 0 and 1099511627776, got -1"),
]


@pytest.mark.parametrize(("section", "key", "value", "reason"), RANGE_ERRORS)
def test_out_of_range_in_file(
    tmp_path: Path, section: str, key: str, value: object, reason: str
) -> None:
    path = write(tmp_path, f"[{section}]\n{key} = {value}\n")
    assert error(path) == f"{path}: {section}.{key}: {reason}"


@pytest.mark.parametrize(("section", "key", "value", "reason"), RANGE_ERRORS)
def test_out_of_range_on_command_line(section: str, key: str, value: object, reason: str) -> None:
    message = error(overrides={f"{section}.{key}": value})
    assert message == f"command line: {section}.{key}: {reason}"


def test_windows_must_not_start_above_their_growth_limit(tmp_path: Path) -> None:
    path = write(tmp_path, "[http3]\ninitial_max_stream_data = 8388608\n")
    assert error(path) == (
        f"{path}: http3.initial_max_stream_data: http3.max_stream_window (6291456) must be at "
        "least http3.initial_max_stream_data (8388608)"
    )
    message = error(path, overrides={"http3.max_window": 65536})
    assert message == (
        "command line: http3.max_window: http3.max_window (65536) must be at least "
        "http3.initial_max_data (1048576)"
    )
    settings = load(path, env={}, overrides={"http3.max_stream_window": 8388608})
    assert settings.http3.max_stream_window == settings.http3.initial_max_stream_data


def test_http3_limits_can_be_turned_off() -> None:
    settings = load(
        None,
        env={},
        overrides={
            "http3.body_timeout": 0,
            "http3.send_timeout": 0,
            "http3.max_connections": 0,
            "http3.max_handshakes": 0,
            "http3.handshake_memory": 0,
        },
    )
    h3 = settings.http3
    assert (h3.body_timeout, h3.send_timeout, h3.max_connections) == (0, 0, 0)
    assert (h3.max_handshakes, h3.handshake_memory) == (0, 0)


def test_range_edges_are_accepted() -> None:
    settings = load(
        None,
        env={},
        overrides={
            "server.port": 65535,
            "server.http_port": 1,
            "http3.port": 0,
            "workers.count": 1024,
            "http1.backlog": 1,
            "limits.max_header_size": 1024,
            "limits.max_header_count": 10000,
            "limits.max_body_size": 0,
            "limits.max_connections": 0,
        },
    )
    assert settings.limits == LimitsSettings(
        max_header_size=1024, max_header_count=10000, max_body_size=0, max_connections=0
    )
    assert settings.udp_port == 65535


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        (
            "logging.level",
            "verbose",
            "must be one of 'critical', 'error', 'warning', 'info', 'debug'; got 'verbose'",
        ),
        (
            "logging.level",
            "INFO",
            "must be one of 'critical', 'error', 'warning', 'info', 'debug'; got 'INFO'",
        ),
        (
            "logging.access_format",
            "xml",
            "expected 'common', 'json' or a template with {named} fields: names no {field}",
        ),
        ("tls.min_version", "1.1", "must be one of '1.2', '1.3'; got '1.1'"),
    ],
)
def test_enum_values(key: str, value: str, reason: str) -> None:
    assert error(overrides={key: value}) == f"command line: {key}: {reason}"


@pytest.mark.parametrize("value", ["critical", "error", "warning", "info", "debug"])
def test_every_log_level_is_accepted(value: str) -> None:
    assert load(None, env={}, overrides={"logging.level": value}).logging.level == value


@pytest.mark.parametrize("app", ["main:app", "pkg.sub.mod:app", "pkg:factory.app", "_m:_a"])
def test_app_reference_accepted(app: str) -> None:
    assert load(None, env={}, overrides={"server.app": app}).server.app == app


@pytest.mark.parametrize(
    "app", ["main", "main:", ":app", "pkg.:app", "my-pkg:app", "pkg:app:x", "pkg:a b", ""]
)
def test_app_reference_rejected(app: str) -> None:
    message = error(overrides={"server.app": app})
    assert message == f"command line: server.app: expected 'module.path:attribute', got {app!r}"


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "0.0.0.0", "::", "::1", "fe80::1%eth0", "localhost", "example.com.", "a-b.c1"],
)
def test_host_accepted(host: str) -> None:
    assert load(None, env={}, overrides={"server.host": host}).server.host == host


@pytest.mark.parametrize(
    "host",
    ["", "256.1.1.1", "1.2.3", "[::1]", "-bad.com", "bad-.com", "a..b", "a b", "x" * 64, "h:80"],
)
def test_host_rejected(host: str) -> None:
    message = error(overrides={"server.host": host})
    assert (
        message == f"command line: server.host: expected an IP address or a hostname, got {host!r}"
    )


# --- env and command-line errors ----------------------------------------------------


@pytest.mark.parametrize(
    ("var", "text", "message"),
    [
        ("FPY3_SERVER__PORT", "abc", "server.port: expected an integer, got 'abc'"),
        ("FPY3_SERVER__PORT", "80.0", "server.port: expected an integer, got '80.0'"),
        ("FPY3_SERVER__PORT", "", "server.port: expected an integer, got ''"),
        ("FPY3_SERVER__PORT", "-1", "server.port: must be between 0 and 65535, got -1"),
        (
            "FPY3_WORKERS__DRAIN_TIMEOUT",
            "soon",
            "workers.drain_timeout: expected a number, got 'soon'",
        ),
        (
            "FPY3_WORKERS__DRAIN_TIMEOUT",
            "inf",
            "workers.drain_timeout: expected a finite number, got inf",
        ),
        (
            "FPY3_LOGGING__ACCESS_LOG",
            "maybe",
            "logging.access_log: expected a boolean (true/false, 1/0, yes/no, on/off), got 'maybe'",
        ),
        ("FPY3_SERVR__PORT", "1", "servr: unknown section; did you mean 'server'?"),
        ("FPY3_SERVER__PROT", "1", "server.prot: unknown key; did you mean 'port'?"),
        ("FPY3_SERVER__", "1", "server.: unknown key"),
        (
            "FPY3_LOGGING__LEVEL",
            "loud",
            "logging.level: must be one of 'critical', 'error', "
            "'warning', 'info', 'debug'; got 'loud'",
        ),
    ],
)
def test_env_errors(var: str, text: str, message: str) -> None:
    assert error(env={var: text}) == f"env {var}: {message}"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"workers.count": "4"}, "workers.count: expected an integer, got a string"),
        ({"workers.count": True}, "workers.count: expected an integer, got a boolean"),
        ({"reload.enabled": "yes"}, "reload.enabled: expected a boolean, got a string"),
        ({"server.prot": 1}, "server.prot: unknown key; did you mean 'port'?"),
        ({"srv.port": 1}, "srv: unknown section; did you mean 'server'?"),
        ({"zzz.port": 1}, "zzz: unknown section"),
        ({"port": 1}, "port: expected 'section.key'"),
    ],
)
def test_command_line_errors(overrides: dict[str, object], message: str) -> None:
    assert error(overrides=overrides) == f"command line: {message}"


def test_first_error_in_file_order(tmp_path: Path) -> None:
    path = write(tmp_path, "[workers]\ncount = -1\n[server]\nport = -1\n")
    assert error(path) == f"{path}: workers.count: must be between 0 and 1024, got -1"


def test_first_error_file_then_env_then_cli(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nport = -1\n")
    env = {"FPY3_WORKERS__COUNT": "0", "FPY3_SERVER__HOST": "a b"}
    cli = {"http1.backlog": 0}
    assert error(path, env=env, overrides=cli).startswith(f"{path}: server.port:")
    # Env vars are checked in sorted order.
    assert error(env=env, overrides=cli) == (
        "env FPY3_SERVER__HOST: server.host: expected an IP address or a hostname, got 'a b'"
    )
    assert error(overrides=cli) == "command line: http1.backlog: must be between 1 and 65535, got 0"


def test_bad_file_value_is_an_error_even_if_overridden(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nport = -1\n")
    message = error(path, overrides={"server.port": 9000})
    assert message == f"{path}: server.port: must be between 0 and 65535, got -1"


# --- cross-field rules --------------------------------------------------------------


def test_cert_without_key(tmp_path: Path, pem: tuple[str, str]) -> None:
    path = write(tmp_path, f"[tls]\ncert = {pem[0]!r}\n")
    assert error(path) == f"{path}: tls.key: required when tls.cert is set"


def test_key_without_cert_on_command_line(pem: tuple[str, str]) -> None:
    message = error(overrides={"tls.key": pem[1]})
    assert message == "command line: tls.cert: required when tls.key is set"


def test_no_certificate_and_no_dev_cert(tmp_path: Path) -> None:
    path = write(tmp_path, "[tls]\ndev_cert = false\n")
    assert error(path) == f"{path}: tls.cert: required when tls.dev_cert is false"
    message = error(env={"FPY3_TLS__DEV_CERT": "off"})
    assert message == "env FPY3_TLS__DEV_CERT: tls.cert: required when tls.dev_cert is false"


def test_cert_and_key_may_replace_dev_cert(pem: tuple[str, str]) -> None:
    overrides = {"tls.cert": pem[0], "tls.key": pem[1], "tls.dev_cert": False}
    settings = load(None, env={}, overrides=overrides)
    assert settings.tls == TLSSettings(cert=pem[0], key=pem[1], dev_cert=False)


def test_cert_file_not_found(tmp_path: Path, pem: tuple[str, str]) -> None:
    path = write(tmp_path, f"[tls]\ncert = 'missing.pem'\nkey = {pem[1]!r}\n")
    missing = tmp_path / "missing.pem"
    assert error(path) == f"{path}: tls.cert: file not found: {missing}"


def test_key_file_not_found_from_env(tmp_path: Path, pem: tuple[str, str]) -> None:
    missing = str(tmp_path / "gone.pem")
    env = {"FPY3_TLS__CERT": pem[0], "FPY3_TLS__KEY": missing}
    assert error(env=env) == f"env FPY3_TLS__KEY: tls.key: file not found: {missing}"


def test_cert_is_a_directory(tmp_path: Path, pem: tuple[str, str]) -> None:
    message = error(overrides={"tls.cert": str(tmp_path), "tls.key": pem[1]})
    assert message == f"command line: tls.cert: not a regular file: {tmp_path}"


def test_key_not_readable(pem: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    # Simulated: the tests may run as root, who can read any file.
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: path != pem[1] and real_access(path, mode))
    message = error(overrides={"tls.cert": pem[0], "tls.key": pem[1]})
    assert message == f"command line: tls.key: file not readable: {pem[1]}"


def test_http_port_must_differ_from_port(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nhttp_port = 8443\n")
    assert error(path) == f"{path}: server.http_port: must differ from server.port (8443)"
    # The key set last (highest precedence) is the one named.
    path = write(tmp_path, "[server]\nhttp_port = 8080\n")
    message = error(path, overrides={"server.port": 8080})
    assert message == "command line: server.port: must differ from server.http_port (8080)"


def test_http_port_zero_means_off() -> None:
    assert load(None, env={}, overrides={"server.http_port": 0}).server.http_port == 0


# --- command line -------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fpy3")
    add_arguments(p)
    return p


def test_arguments_default_to_no_overrides() -> None:
    args = parser().parse_args([])
    assert args.config is None
    assert args.check_config is False
    assert overrides_from_args(args) == {}


def test_every_flag_maps_to_its_key() -> None:
    args = parser().parse_args(
        [
            "--config", "x.toml",
            "--app", "m:a",
            "--host", "::",
            "--port", "9443",
            "--http-port", "9080",
            "--workers", "3",
            "--certfile", "c.pem",
            "--keyfile", "k.pem",
            "--log-level", "debug",
            "--reload",
            "--no-access-log",
            "--check-config",
        ]
    )  # fmt: skip
    assert args.config == "x.toml"
    assert args.check_config is True
    assert overrides_from_args(args) == {
        "server.app": "m:a",
        "server.host": "::",
        "server.port": 9443,
        "server.http_port": 9080,
        "workers.count": 3,
        "tls.cert": "c.pem",
        "tls.key": "k.pem",
        "logging.level": "debug",
        "reload.enabled": True,
        "logging.access_log": False,
    }


def test_flags_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "c.pem").write_text("x")
    (tmp_path / "k.pem").write_text("x")
    path = write(tmp_path, "[server]\nport = 9000\n[workers]\ncount = 2\n")
    monkeypatch.chdir(tmp_path)
    args = parser().parse_args(
        ["--config", path, "--port", "9001", "--certfile", "c.pem", "--keyfile", "k.pem",
         "--no-access-log", "--reload"]
    )  # fmt: skip
    settings = load(args.config, env={}, overrides=overrides_from_args(args))
    assert settings.server.port == 9001
    assert settings.workers.count == 2
    assert settings.tls.cert == str(tmp_path / "c.pem")
    assert settings.logging.access_log is False
    assert settings.reload.enabled is True
    assert settings.config_file == path


def test_bad_flag_value_is_a_command_line_error() -> None:
    args = parser().parse_args(["--workers", "-1"])
    message = error(overrides=overrides_from_args(args))
    assert message == "command line: workers.count: must be between 0 and 1024, got -1"


# --- dump ---------------------------------------------------------------------------


def test_dump_lists_every_key_in_model_order() -> None:
    text = dump(Settings())
    doc = tomllib.loads(text)
    assert list(doc) == SECTIONS
    assert {name: list(table) for name, table in doc.items()} == KEYS


def test_dump_round_trips_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, dump(Settings()), name="dumped.toml")
    assert load(path, env={}) == Settings(config_file=path)


def test_dump_round_trips_unusual_values(tmp_path: Path, pem: tuple[str, str]) -> None:
    overrides = {
        "server.server_header": 'a "quoted" \\ back\\slash\nnew\ttab\r\x01\x1f\x7f é ☃',
        "server.root_path": "/prefix with 'single' quotes",
        "server.state_dir": str(tmp_path / 'dir "x"'),
        "server.host": "::",
        "tls.cert": pem[0],
        "tls.key": pem[1],
        "tls.dev_cert": False,
        "tls.ciphers": "ECDHE+AESGCM:!aNULL",
        "workers.drain_timeout": 1e-3,
        "http1.keepalive_timeout": 1e20,
        "http1.header_timeout": 0.1,
        "limits.max_body_size": 2**40,
        "reload.dirs": (str(tmp_path / "a"), str(tmp_path / "b,c")),
        "reload.include": (),
        "logging.access_format": "json",
    }
    original = load(None, env={}, overrides=overrides)
    path = write(tmp_path, dump(original), name="dumped.toml")
    assert load(path, env={}) == dataclasses.replace(original, config_file=path)


def test_dump_names_the_loaded_file(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    assert f'# loaded from "{path}"' in dump(load(path, env={}))


# --- the shipped config files -------------------------------------------------------


def test_dev_config() -> None:
    path = str(CONFIG_DIR / "fpy3.toml")
    settings = load(path, env={})
    assert settings.server.app == "fpy3.examples.hello:app"
    assert settings.server.host == "127.0.0.1"
    assert settings.server.port == 8443
    assert settings.tls.dev_cert is True
    assert settings.workers.count == 1
    assert settings.logging.access_log is True
    assert settings.logging.level == "info"
    assert settings.config_file == path


def test_production_config_has_every_key_each_with_a_comment() -> None:
    text = (CONFIG_DIR / "production.toml").read_text(encoding="utf-8")
    doc = tomllib.loads(text)
    assert {name: list(table) for name, table in doc.items()} == KEYS
    lines = [line.strip() for line in text.splitlines()]
    for i, line in enumerate(lines):
        if line and not line.startswith(("#", "[")):
            assert lines[i - 1].startswith("#"), f"no comment above {line!r}"


def test_production_config_loads_with_real_cert_paths(pem: tuple[str, str]) -> None:
    path = str(CONFIG_DIR / "production.toml")
    overrides = {"tls.cert": pem[0], "tls.key": pem[1]}
    settings = load(path, env={}, overrides=overrides)
    assert settings.server.host == "0.0.0.0"
    assert settings.server.port == 443
    assert settings.server.http_port == 80
    assert settings.tls == TLSSettings(cert=pem[0], key=pem[1], dev_cert=False)
    assert settings.logging.access_format == "json"
    assert settings.server.debug is False
    assert settings.reload.enabled is False
    assert settings.config_file == path


def test_production_config_without_certs_names_the_missing_file() -> None:
    path = str(CONFIG_DIR / "production.toml")
    assert error(path) == f"{path}: tls.cert: file not found: /etc/fpy3/cert.pem"


# --- proxy, health and Alt-Svc keys ---------------------------------------------------


def test_proxy_defaults_are_uvicorns() -> None:
    proxy = load(None, env={}).proxy
    assert proxy.headers is True
    assert proxy.forwarded_allow_ips == ("127.0.0.1",)
    assert proxy.protocol == "off"
    assert proxy.header_style == "x-forwarded"


def test_forwarded_allow_ips_env_is_the_default_below_file_and_fpy3_env(tmp_path: Path) -> None:
    env = {"FORWARDED_ALLOW_IPS": "10.0.0.1, 192.168.0.0/16"}
    assert load(None, env=env).proxy.forwarded_allow_ips == ("10.0.0.1", "192.168.0.0/16")
    assert load(None, env={"FORWARDED_ALLOW_IPS": "*"}).proxy.forwarded_allow_ips == ("*",)
    path = write(tmp_path, '[proxy]\nforwarded_allow_ips = ["10.9.9.9"]\n')
    assert load(path, env=env).proxy.forwarded_allow_ips == ("10.9.9.9",)
    env["FPY3_PROXY__FORWARDED_ALLOW_IPS"] = "::1"
    assert load(path, env=env).proxy.forwarded_allow_ips == ("::1",)


def test_bad_allow_list_entries_are_named(tmp_path: Path) -> None:
    path = write(tmp_path, '[proxy]\nforwarded_allow_ips = ["127.0.0.1", "example.com"]\n')
    message = error(path)
    assert message.startswith(
        f"{path}: proxy.forwarded_allow_ips: expected addresses, networks (CIDR) or '*', "
        "got 'example.com'"
    )
    message = error(env={"FORWARDED_ALLOW_IPS": "10.0.0.1/8"})
    assert message.startswith(
        "env FORWARDED_ALLOW_IPS: proxy.forwarded_allow_ips: expected addresses, "
        "networks (CIDR) or '*', got '10.0.0.1/8' (10.0.0.1/8 has host bits set)"
    )


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        (
            "proxy.protocol",
            "on",
            "must be one of 'off', 'tls', 'cleartext', 'all'; got 'on'",
        ),
        ("proxy.header_style", "both", "must be one of 'x-forwarded', 'forwarded'; got 'both'"),
        ("proxy.protocol_timeout", 0, "must be greater than 0, got 0.0"),
        (
            "health.ready_path",
            "readyz",
            "expected a path starting with '/', without a query, got 'readyz'",
        ),
        (
            "health.live_path",
            "/livez?x=1",
            "expected a path starting with '/', without a query, got '/livez?x=1'",
        ),
        (
            "health.ready_path",
            "/a b",
            "expected a path starting with '/', without a query, got '/a b'",
        ),
        ("health.drain_delay", -1, "must be at least 0, got -1.0"),
        ("http3.alt_svc_port", 65536, "must be between 0 and 65535, got 65536"),
        ("http3.alt_svc_max_age", -1, "must be between 0 and 2147483647, got -1"),
        (
            "http3.alt_svc_host",
            "h3 example",
            "expected an IP address or a hostname, got 'h3 example'",
        ),
    ],
)
def test_proxy_health_alt_svc_errors(key: str, value: object, reason: str) -> None:
    assert error(overrides={key: value}) == f"command line: {key}: {reason}"


def test_proxy_health_alt_svc_values_accepted() -> None:
    settings = load(
        None,
        env={},
        overrides={
            "proxy.protocol": "tls",
            "proxy.forwarded_allow_ips": ("10.0.0.0/8", "::1", "*"),
            "health.ready_path": "/readyz",
            "health.live_path": "/-/live",
            "health.drain_delay": 5,
            "http3.alt_svc_port": 443,
            "http3.alt_svc_host": "2001:db8::1",
            "http3.alt_svc_max_age": 0,
        },
    )
    assert settings.health.drain_delay == 5.0
    assert settings.http3.alt_svc_host == "2001:db8::1"


def test_ready_and_live_paths_must_differ(tmp_path: Path) -> None:
    path = write(tmp_path, '[health]\nready_path = "/health"\nlive_path = "/health"\n')
    message = error(path)
    assert message == f"{path}: health.ready_path: the readiness and liveness paths must differ"
    # The key set last (highest precedence) is the one named.
    path = write(tmp_path, '[health]\nready_path = "/health"\n')
    message = error(path, overrides={"health.live_path": "/health"})
    assert message == "command line: health.live_path: the readiness and liveness paths must differ"
