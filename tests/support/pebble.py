"""Pebble, Let's Encrypt's ACME test server (Debian package ``pebble``), on loopback.

Validation connects to ``httpPort`` (http-01) and ``tlsPort`` (tls-alpn-01) of the name
being validated, so tests point them at the fpy3 server's ports. Its HTTPS certificate
is made here; the root of the certificates it issues is fetched from its management
port (it makes a new one at each start).
"""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import urllib.request
from pathlib import Path

from harness import client_missing, free_port, wait_until
from pki import make_ca, make_leaf


class Pebble:
    def __init__(
        self,
        workdir: Path,
        http_port: int,
        tls_port: int,
        validity: int = 0,
        blocklist: tuple[str, ...] = (),
        port: int | None = None,
        like: Pebble | None = None,
    ):
        """``like``: take over another (stopped) Pebble's address and HTTPS certificate,
        as a restarted CA would."""
        exe = shutil.which("pebble")
        if exe is None:
            client_missing(RuntimeError("pebble not found (Debian: pebble)"))
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        if like is not None:
            self.https_ca, cert, key, port = like.https_ca, like.cert, like.key, like.port
        else:
            ca = make_ca("pebble https CA")
            self.https_ca = str(workdir / "https-ca.pem")
            Path(self.https_ca).write_bytes(ca.cert_pem)
            cert, key = make_leaf(ca, "pebble", ["127.0.0.1", "localhost"]).write(workdir, "https")
        self.cert, self.key = cert, key
        self.port, self.mgmt_port = port or free_port(), free_port()
        config = {
            "pebble": {
                "listenAddress": f"127.0.0.1:{self.port}",
                "managementListenAddress": f"127.0.0.1:{self.mgmt_port}",
                "certificate": cert,
                "privateKey": key,
                "httpPort": http_port,
                "tlsPort": tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": False,
                "domainBlocklist": list(blocklist),
                "certificateValidityPeriod": validity,
            }
        }
        (workdir / "pebble.json").write_text(json.dumps(config))
        self.log = workdir / "pebble.log"
        env = {"PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0", "PEBBLE_AUTHZREUSE": "0"}
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [exe, "-config", str(workdir / "pebble.json")],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=workdir,
            )
        self._ctx = ssl.create_default_context(cafile=self.https_ca)
        wait_until(self._up, 15, message=lambda: self.log.read_text()[-2000:])

    @property
    def directory(self) -> str:
        return f"https://127.0.0.1:{self.port}/dir"

    def _get(self, url: str) -> bytes:
        with urllib.request.urlopen(url, context=self._ctx, timeout=5) as r:
            return r.read()

    def _up(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"pebble exited: {self.log.read_text()[-2000:]}")
        try:
            self._get(self.directory)
            return True
        except OSError:
            return False

    def root(self, path: Path) -> str:
        """Pebble's current root (and intermediates) as a CA file."""
        pem = self._get(f"https://127.0.0.1:{self.mgmt_port}/roots/0")
        path.write_bytes(pem)
        return str(path)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
