"""fpy3-master operations: pidfile, a busy port, sd_notify, USR1 log reopening, user switch."""

from __future__ import annotations

import grp
import os
import pwd
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import pytest
from harness import wait_until
from masters import APP, wait_workers, workers


def test_pidfile_written_after_bind_and_removed_on_exit(start_server):
    # Relative to the config file, like every path in it.
    config = {"server": {"pidfile": "run/fpy3.pid"}, "workers": {"count": 2}}
    workdir = start_server._mkdir()
    (workdir / "run").mkdir()
    srv = start_server(app=APP, command="master", config=config, workdir=workdir)
    pidfile = workdir / "run" / "fpy3.pid"
    assert pidfile.read_text() == f"{srv.pid}\n"
    assert [p.name for p in pidfile.parent.iterdir()] == ["fpy3.pid"]  # no temp file left
    assert srv.stop() == 0, srv.stderr()
    assert not pidfile.exists()


def test_port_in_use_exits_2_naming_it(start_server):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        srv = start_server(app=APP, command="master", config={"server": {"port": port}}, wait=False)
        assert srv.wait_exit(20) == 2
    err = srv.stderr()
    assert f"server.port: cannot listen on 127.0.0.1:{port} (TCP): Address already in use" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "server, message",
    [
        ({"pidfile": "missing-dir/fpy3.pid"}, "server.pidfile: cannot write "),
        ({"user": "no-such-user-xyz"}, "server.user: no such user: 'no-such-user-xyz'"),
        ({"group": "no-such-group-xyz"}, "server.group: no such group: 'no-such-group-xyz'"),
    ],
)
def test_bad_pidfile_user_or_group_exits_2(start_server, server, message):
    srv = start_server(app=APP, command="master", config={"server": server}, wait=False)
    assert srv.wait_exit(20) == 2
    assert message in srv.stderr()
    assert "Traceback" not in srv.stderr()


def test_new_worker_settings_are_validated():
    from fpy3.config import ConfigError, load

    settings = load(None, env={})
    assert settings.workers.timeout == 30.0
    assert (settings.workers.max_requests, settings.workers.max_rss_mb) == (0, 0)
    assert settings.server.pidfile == settings.server.user == settings.server.group == ""
    for key, value, reason in [
        ("workers.timeout", 0, "must be greater than 0"),
        ("workers.max_requests", -1, "must be at least 0"),
        ("workers.max_requests_jitter", -1, "must be at least 0"),
        ("workers.max_rss_mb", -5, "must be at least 0"),
    ]:
        with pytest.raises(ConfigError, match=f"{key}: {reason}"):
            load(None, env={}, overrides={key: value})


class NotifySocket:
    """A stand-in for systemd's notify socket (abstract, as '@name')."""

    def __init__(self):
        self.name = f"@fpy3-test-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name[1:])
        self.messages: list[str] = []

    def wait_for(self, state: str, timeout: float = 15.0) -> str:
        """The next message containing ``state`` (messages before it are kept)."""
        deadline = time.monotonic() + timeout
        while True:
            for i, message in enumerate(self.messages):
                if state in message.splitlines():
                    del self.messages[: i + 1]
                    return message
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"no {state!r} within {timeout}s; got {self.messages}")
            self.sock.settimeout(left)
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                pass

    def close(self) -> None:
        self.sock.close()


def test_sd_notify_ready_reloading_stopping(start_server):
    notify = NotifySocket()
    try:
        srv = start_server(
            app=APP,
            command="master",
            config={"workers": {"count": 2}},
            env={"NOTIFY_SOCKET": notify.name},
        )
        ready = notify.wait_for("READY=1")
        assert "STATUS=serving with 2 worker(s), generation 1" in ready
        old = set(workers(srv))

        os.kill(srv.pid, signal.SIGHUP)
        reloading = notify.wait_for("RELOADING=1")
        assert any(line.startswith("MONOTONIC_USEC=") for line in reloading.splitlines())
        assert "generation 2" in notify.wait_for("READY=1")
        wait_until(lambda: not (set(workers(srv)) & old), timeout=15)
        # The app never sees the socket: only the master speaks for the service.
        assert "NOTIFY_SOCKET" not in _environ(min(workers(srv)))

        srv.proc.terminate()
        notify.wait_for("STOPPING=1")
        assert srv.wait_exit() == 0, srv.stderr()
    finally:
        notify.close()


def _environ(pid: int) -> str:
    return Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")


def test_usr1_reopens_access_and_error_logs(start_server):
    workdir = start_server._mkdir()
    access, errors = workdir / "access.log", workdir / "error.log"
    config = {
        "workers": {"count": 2},
        "logging": {"access_log_file": str(access), "error_log_file": str(errors)},
    }
    srv = start_server(app=APP, command="master", config=config, workdir=workdir)
    wait_workers(srv, 2)
    wait_until(lambda: srv.get("/hello?before").status_code == 200 and "?before" in _text(access))
    access.rename(workdir / "access.log.1")
    errors.rename(workdir / "error.log.1")

    os.kill(srv.pid, signal.SIGUSR1)
    # The master and both workers say so in the new error log.
    wait_until(lambda: _text(errors).count("reopened log files") == 3, timeout=10)

    # Both workers reopen: each new connection lands on one; all end up in the new file.
    def both_logged() -> bool:
        for i in range(4):
            srv.get(f"/hello?after{i}")
        return sum("?after" in line for line in _text(access).splitlines()) >= 4

    wait_until(both_logged, timeout=10)
    assert "?after" not in _text(workdir / "access.log.1")
    assert srv.stop() == 0, _text(errors)
    assert "exiting" in _text(errors)


def _text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def test_workers_switch_group_when_root(start_server):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    group = grp.getgrgid(65534).gr_name  # nogroup / nobody
    srv = start_server(
        app=APP, command="master", config={"server": {"group": group}, "workers": {"count": 2}}
    )
    master = psutil.Process(srv.pid)
    assert master.gids().effective == 0
    for pid in wait_workers(srv, 2):
        proc = psutil.Process(pid)
        assert proc.gids().real == proc.gids().effective == 65534
        assert proc.uids().effective == 0
        assert _groups(pid) <= {65534} | set(os.getgrouplist("root", 65534))
    srv.assert_serving()
    assert srv.stop() == 0, srv.stderr()


def _groups(pid: int) -> set[int]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Groups:"):
            return {int(g) for g in line.split()[1:]}
    return set()


def _nobody_can_run_python() -> bool:
    """Workers import more modules after switching user: the interpreter must be readable."""
    nobody = pwd.getpwnam("nobody")

    def drop() -> None:
        os.setgroups([])
        os.setgid(nobody.pw_gid)
        os.setuid(nobody.pw_uid)

    code = "import asyncio, ssl, uvloop, fpy3.worker"
    try:
        result = subprocess.run(
            [sys.executable, "-c", code], preexec_fn=drop, capture_output=True, timeout=30
        )
    except PermissionError:
        return False
    return result.returncode == 0


def test_workers_switch_user_when_root(start_server):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    if not _nobody_can_run_python():
        pytest.skip("user nobody cannot read this Python installation")
    from fpy3.devcert import generate_pem

    # The worker (as nobody) reads the certificate: a world-readable directory.
    certdir = Path(tempfile.mkdtemp(prefix="fpy3-user-"))
    try:
        certdir.chmod(0o755)
        now = int(time.time())
        cert, key = generate_pem(now - 3600, now + 86400)
        (certdir / "cert.pem").write_bytes(cert)
        (certdir / "key.pem").write_bytes(key)
        (certdir / "key.pem").chmod(0o644)
        config = {
            "server": {"user": "nobody"},
            "tls": {"cert": str(certdir / "cert.pem"), "key": str(certdir / "key.pem")},
        }
        srv = start_server(app=APP, command="master", config=config, cafile=certdir / "cert.pem")
        assert psutil.Process(srv.pid).uids().effective == 0
        for pid in wait_workers(srv, 1):
            uid = pwd.getpwnam("nobody").pw_uid
            assert tuple(psutil.Process(pid).uids()) == (uid, uid, uid)
        srv.assert_serving()
        assert srv.stop() == 0, srv.stderr()
    finally:
        for f in certdir.iterdir():
            f.unlink()
        certdir.rmdir()
