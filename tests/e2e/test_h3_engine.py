"""Choosing the QUIC engine: ``[http3] engine = "auto" | "msquic" | "ngtcp2"``."""

from __future__ import annotations

import ctypes.util
import os
import shutil

import h3clients as kit
import pytest
from harness import msquic_unavailable

MISSING = "/nonexistent/libmsquic.so.2"


def system_msquic() -> bool:
    """libmsquic.so.2 known to the system loader (then "missing" cannot be tested).

    Asks the loader cache: loading it here would also find an FPY3_MSQUIC_LIB copy
    already loaded by this process."""
    return ctypes.util.find_library("msquic") is not None


def test_msquic_without_the_library_exits_2_with_install_hint(run_cli, tmp_path):
    if system_msquic():
        pytest.skip("libmsquic.so.2 is installed on this machine")
    cfg = tmp_path / "fpy3.toml"
    cfg.write_text('[http3]\nengine = "msquic"\n')
    p = run_cli(["run", "apps:app", "--config", str(cfg)], env={"FPY3_MSQUIC_LIB": MISSING})
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert f"{cfg}: http3.engine: libmsquic cannot be loaded" in p.stderr, p.stderr
    assert "FPY3_MSQUIC_LIB" in p.stderr and "install libmsquic.so.2" in p.stderr, p.stderr


def test_engine_must_be_a_known_name(run_cli, tmp_path):
    cfg = tmp_path / "fpy3.toml"
    cfg.write_text('[http3]\nengine = "quiche"\n')
    p = run_cli(["run", "apps:app", "--config", str(cfg)])
    assert p.returncode == 2
    assert "http3.engine" in p.stderr and "quiche" in p.stderr, p.stderr


def test_auto_without_the_library_serves_on_ngtcp2_and_says_so(start_server):
    if system_msquic():
        pytest.skip("libmsquic.so.2 is installed on this machine")
    srv = start_server(
        config={"http3": {"enabled": True, "engine": "auto"}}, env={"FPY3_MSQUIC_LIB": MISSING}
    )
    assert "HTTP/3 engine: ngtcp2 (libmsquic not loaded:" in srv.stderr(), srv.stderr()
    r = kit.aioquic_request(srv.host, srv.port, "GET", "/hello", cafile=str(srv.cafile))
    assert (r.status, r.body) == (200, b"Hello, world!")


def test_auto_with_the_library_serves_on_msquic_and_says_so(start_server):
    if reason := msquic_unavailable():
        pytest.skip(reason)
    srv = start_server(config={"http3": {"enabled": True, "engine": "auto"}})
    assert "HTTP/3 engine: msquic" in srv.stderr(), srv.stderr()
    r = kit.aioquic_request(srv.host, srv.port, "GET", "/hello", cafile=str(srv.cafile))
    assert (r.status, r.body) == (200, b"Hello, world!")


def test_msquic_older_than_2_6_is_refused_with_the_reason(run_cli, tmp_path):
    if reason := msquic_unavailable():
        pytest.skip(reason)
    if system_msquic() or not os.environ.get("FPY3_MSQUIC_LIB"):
        pytest.skip("needs libmsquic from FPY3_MSQUIC_LIB alone")
    # A copy named as MsQuic 2.4's file: the name is all the check reads before a worker.
    old = tmp_path / "libmsquic.so.2.4.0"
    shutil.copyfile(os.path.realpath(os.environ["FPY3_MSQUIC_LIB"]), old)
    cfg = tmp_path / "fpy3.toml"
    cfg.write_text('[http3]\nengine = "msquic"\n')
    p = run_cli(["run", "apps:app", "--config", str(cfg)], env={"FPY3_MSQUIC_LIB": str(old)})
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert "is MsQuic 2.4; fpy3 needs 2.6 or later" in p.stderr, p.stderr
