"""deploy/container: the image builds (deploy/container/build.sh: buildah, and a Debian
base made with debootstrap when no registry is reachable) and serves HTTPS, HTTP/3 and
metrics, its workers as the fpy3 user, and drains on TERM.

Slow (a few minutes: two apt installs and a pip build): marked ``container``, left out
of the default run; ``./dev.sh container`` runs it. ``buildah run --isolation chroot``
runs the image's entrypoint on the host's network (no OCI runtime involved).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import ssl
import subprocess
from pathlib import Path

import h3clients
import httpx
import psutil
import pytest
from harness import call, free_port, wait_until

from fpy3 import devcert

# Building takes minutes: past the suite's per-test timeout.
pytestmark = [pytest.mark.container, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parents[2]
TAG = "localhost/fpy3:test"


@pytest.fixture(scope="module")
def image():
    missing = [tool for tool in ("buildah", "debootstrap") if shutil.which(tool) is None]
    if missing or os.geteuid() != 0:
        pytest.skip(f"needs root, buildah and debootstrap (missing: {missing or 'root'})")
    p = subprocess.run(
        [str(ROOT / "deploy/container/build.sh")],
        env={**os.environ, "TAG": TAG},
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
    return TAG


def test_image_serves_https_h3_metrics_and_drains(image, tmp_path):
    certs = tmp_path / "certs"
    cert, key = devcert.ensure_dev_cert(str(certs))
    os.chmod(key, 0o644)  # the workers run as the fpy3 user, and the mount keeps modes
    os.chmod(certs, 0o755)
    port, metrics = free_port(udp=True), free_port()
    ctr = subprocess.check_output(["buildah", "from", image], text=True).strip()
    log = tmp_path / "run.log"
    env = {
        "FPY3_SERVER__HOST": "127.0.0.1",
        "FPY3_SERVER__PORT": str(port),
        "FPY3_TLS__CERT": "/etc/fpy3/certs/dev-cert.pem",
        "FPY3_TLS__KEY": "/etc/fpy3/certs/dev-key.pem",
        "FPY3_WORKERS__COUNT": "2",
        "FPY3_METRICS__PORT": str(metrics),
    }
    argv = ["buildah", "run", "--isolation", "chroot", "-v", f"{certs}:/etc/fpy3/certs:ro"]
    for name, value in env.items():
        argv += ["-e", f"{name}={value}"]
    argv += [ctr, "--", "fpy3-master", "--config", "/etc/fpy3/fpy3.toml"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        text = wait_until(
            lambda: re.search(r"master (\d+) starting", t := log.read_text()) and t,
            timeout=60,
            message=lambda: log.read_text(),
        )
        master = int(re.search(r"master (\d+) starting", text)[1])
        context = ssl.create_default_context(cafile=cert)

        def get(path: str):
            with httpx.Client(verify=context, trust_env=False, timeout=5) as c:
                return c.get(f"https://127.0.0.1:{port}{path}")

        def serving():
            try:
                return get("/").status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(serving, timeout=30, message=lambda: log.read_text())
        assert "Hello from fpy3" in get("/").text
        resp = call(h3clients.aioquic_request, "127.0.0.1", port, "GET", "/", cafile=cert)
        assert resp.status == 200
        text = httpx.get(f"http://127.0.0.1:{metrics}/metrics", trust_env=False).text
        assert "fpy3_workers 2" in text
        workers = psutil.Process(master).children()
        assert len(workers) == 2
        assert all(w.uids().real != 0 for w in workers)  # switched to the fpy3 user
        os.kill(master, signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()
        assert f"master {master} exiting" in log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        subprocess.run(["buildah", "rm", ctr], capture_output=True)
