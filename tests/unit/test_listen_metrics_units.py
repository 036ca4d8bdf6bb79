"""In-process checks of the listening rules (fpy3.sockets), the new config keys, and
the Prometheus text the master renders (fpy3.metrics)."""

from __future__ import annotations

import os
import socket
import tomllib

import pytest

from fpy3 import config, metrics
from fpy3.sockets import BindError, bind_listeners, dual_stack, systemd_fds


def test_dual_stack_only_for_the_ipv6_wildcard_without_ipv4_beside_it():
    assert dual_stack("::")
    assert dual_stack("::", ("::", "::1"))
    assert not dual_stack("::", ("::", "0.0.0.0"))
    assert not dual_stack("::1")
    assert not dual_stack("0.0.0.0")
    assert not dual_stack("localhost")


def test_nothing_to_listen_on_is_an_error():
    settings = config.load(None, env={}, overrides={"server.port": 0, "http3.enabled": False})
    with pytest.raises(BindError, match="server.port: nothing to listen on"):
        bind_listeners(settings, env={})


def test_systemd_fds_only_for_this_process(monkeypatch):
    monkeypatch.setenv("LISTEN_FDS", "2")
    env = {"LISTEN_FDS": "2", "LISTEN_PID": str(os.getpid() + 1)}
    assert systemd_fds(env) is None  # meant for another process
    assert os.environ["LISTEN_FDS"] == "2"
    env = {"LISTEN_FDS": "2", "LISTEN_PID": str(os.getpid()), "LISTEN_FDNAMES": "quic:x.socket"}
    assert systemd_fds(env) == [(3, "quic"), (4, "")]
    assert "LISTEN_FDS" not in os.environ  # not for the workers or the app


def test_bind_several_hosts_and_a_unix_socket(tmp_path):
    path = str(tmp_path / "s.sock")
    settings = config.load(
        None,
        env={},
        overrides={
            "server.hosts": ("127.0.0.1",),
            "server.port": 0,
            "server.http_port": 0,
            "server.uds": path,
            "http3.enabled": False,
        },
    )
    listeners = bind_listeners(settings, env={})
    try:
        assert [s.family for s in listeners.http] == [socket.AF_UNIX]
        assert listeners.describe() == f"http://unix:{path}"
    finally:
        listeners.close()
    assert not os.path.exists(path)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"server.uds": "/" + "x" * 120}, "server.uds: a Unix socket path is at most 107 bytes"),
        ({"server.fds": ("3", "3:http")}, "server.fds: lists a file descriptor twice"),
        ({"server.fds": ("-1",)}, "server.fds: expected 'N' or 'N:https|http|quic'"),
        ({"server.hosts": ("::1", "::1")}, "server.hosts: lists an address twice"),
        ({"server.uds_mode": 0o1777}, "server.uds_mode: must be between 0 and 511"),
        ({"proxy.forwarded_allow_ips": ("nope",)}, "proxy.forwarded_allow_ips: "),
        ({"logging.access_format": "{client.__class__}"}, "unknown field {client.__class__}"),
        ({"logging.access_format": "{status:q}"}, "logging.access_format: expected"),
        ({"metrics.port": 8443}, "metrics.port: must differ from server.port (8443)"),
        ({"health.ready_path": "/r?x"}, "health.ready_path: "),
    ],
)
def test_new_keys_are_validated(overrides, message):
    with pytest.raises(config.ConfigError) as info:
        config.load(None, env={}, overrides=overrides)
    assert message in str(info.value)


def test_new_keys_accept_good_values_and_dump_reads_back(tmp_path):
    settings = config.load(
        None,
        env={"FPY3_SERVER__UDS_MODE": "0o600", "FPY3_PROXY__FORWARDED_ALLOW_IPS": "*, ::1"},
        overrides={
            "server.fds": ("3", "4:quic"),
            "server.hosts": ("127.0.0.1", "::"),
            "logging.access_format": "{client} {duration_ms:.1f} {header_x_id}",
            "server.port": 0,
        },
    )
    assert settings.server.uds_mode == 0o600
    assert settings.proxy.forwarded_allow_ips == ("*", "::1")
    assert settings.bind_hosts == ("127.0.0.1", "::")
    text = config.dump(settings)
    assert "uds_mode = 0o600" in text
    path = tmp_path / "back.toml"
    path.write_text(text)
    assert tomllib.loads(text)["server"]["uds_mode"] == 0o600
    assert config.load(path, env={}) == config.Settings(
        **{s: getattr(settings, s) for s in config._SECTIONS}, config_file=str(path)
    )


def test_rendered_metrics_parse_and_histograms_are_cumulative():
    parser = pytest.importorskip("prometheus_client.parser")
    block = metrics.Block()
    try:
        h1 = metrics.PROTO_BASE["1.1"]
        block.counts[h1 + 200] = 5
        block.counts[h1 + 503] = 1
        block.counts[h1 + metrics.HIST + 0] = 4  # <= 5 ms
        block.counts[h1 + metrics.HIST + len(metrics.LATENCY_BOUNDS)] = 2  # > 10 s
        block.counts[h1 + metrics.HIST_SUM] = 25_000_000
        block.counts[metrics.QUIC_RTT + 2] = 3
        totals = metrics.Totals()
        totals.retire(block)  # an exited worker's counts stay...
        totals.worker_starts = 3
        values = totals.collect([block])  # ...and a live one adds its own
        text = metrics.render(values, totals, workers=1, generation=2)
    finally:
        block.close()
    families = {f.name: f for f in parser.text_string_to_metric_families(text)}
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in families.values()
        for s in f.samples
    }
    assert samples[("fpy3_requests_total", (("code", "200"), ("protocol", "http/1.1")))] == 10
    hist = "fpy3_request_duration_seconds"
    assert samples[(hist + "_bucket", (("le", "0.005"), ("protocol", "http/1.1")))] == 8
    assert samples[(hist + "_bucket", (("le", "10.0"), ("protocol", "http/1.1")))] == 8
    assert samples[(hist + "_bucket", (("le", "+Inf"), ("protocol", "http/1.1")))] == 12
    assert samples[(hist + "_count", (("protocol", "http/1.1"),))] == 12
    assert samples[(hist + "_sum", (("protocol", "http/1.1"),))] == 50.0
    assert samples[("fpy3_quic_rtt_seconds_bucket", (("le", "0.01"),))] == 6
    assert samples[("fpy3_worker_starts_total", ())] == 3
    assert samples[("fpy3_generation", ())] == 2
