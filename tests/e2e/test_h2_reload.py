"""fpy3-master under HTTP/2 load: a HUP reload fails no request, on TLS (ALPN h2) and
cleartext (prior knowledge). Draining workers send a GOAWAY notice, the final GOAWAY
a grace second later, finish the streams in flight, and close."""

from __future__ import annotations

import os
import signal

from h2clients import H2Raw
from harness import to_toml, wait_until
from master_support import H2Load
from masters import APP, wait_workers, workers


def test_hup_under_h2_load_no_failed_request(start_server):
    srv = start_server(app=APP, command="master", config={"workers": {"count": 2}}, http=True)
    old = set(wait_workers(srv, 2))

    def tls():
        return H2Raw(srv.host, srv.port, str(srv.cafile))

    def clear():
        return H2Raw(srv.host, srv.http_port, tls=False)

    with H2Load(tls, threads=3) as load, H2Load(clear, threads=2) as load_clear:
        wait_until(lambda: load.count() > 100 and load_clear.count() > 100, timeout=15)
        assert load.servers == {"fpy3"}
        srv.config["server"]["server_header"] = "fpy3-gen2"
        srv.config_path.write_text(to_toml(srv.config))
        offset = srv.stderr_size()
        os.kill(srv.pid, signal.SIGHUP)
        srv.wait_stderr("generation 2 ready; draining 2 old worker(s)", offset)
        new = wait_until(
            lambda: len(w := workers(srv)) == 2 and not (set(w) & old) and set(w),
            timeout=15,
            message=lambda: f"{workers(srv)}\n{srv.stderr_since(offset)}",
        )
        served, served_clear = load.count(), load_clear.count()
        wait_until(
            lambda: load.count() > served + 100 and load_clear.count() > served_clear + 100,
            timeout=15,
        )
    assert load.failures == []
    assert load_clear.failures == []
    # A few connections: the kernel may hand them all to one of the new workers.
    assert new & (load.pids() | load_clear.pids())
    assert "fpy3-gen2" in load.servers and "fpy3-gen2" in load_clear.servers
    # The old connections moved over: more connections than threads were opened.
    assert load.connections > 3 and load_clear.connections > 2
    assert srv.stop() == 0, srv.stderr()
