"""deploy/kubernetes: the manifests parse, and agree with the fpy3 config they ship
(the ports, the probes on the health paths, the grace period above the drain)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fpy3 import config

yaml = pytest.importorskip("yaml")

DIR = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"


@pytest.fixture(scope="module")
def docs() -> dict[str, dict]:
    found: dict[str, dict] = {}
    for path in sorted(DIR.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["kind"] not in found, f"two {doc['kind']}s"
            found[doc["kind"]] = doc
    assert {"ConfigMap", "Deployment", "Service"} <= set(found)
    return found


@pytest.fixture(scope="module")
def settings(docs, tmp_path_factory) -> config.Settings:
    """The ConfigMap's fpy3.toml, validated by fpy3 itself (the certificate files are the
    Secret's: stand-ins here)."""
    tmp = tmp_path_factory.mktemp("k8s")
    path = tmp / "fpy3.toml"
    path.write_text(docs["ConfigMap"]["data"]["fpy3.toml"])
    raw = tomllib.loads(path.read_text())
    for name in ("cert", "key"):
        (tmp / name).write_text("x")
    return config.load(
        path, env={}, overrides={"tls.cert": str(tmp / "cert"), "tls.key": str(tmp / "key")}
    ), raw


def container(docs) -> dict:
    (only,) = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    return only


def port_named(docs, name) -> dict:
    ports = {p["name"]: p for p in container(docs)["ports"]}
    return ports[name]


def test_probes_use_the_health_paths_on_the_tls_port(docs, settings):
    settings, _ = settings
    c = container(docs)
    assert settings.health.ready_path and settings.health.live_path
    ready, live = c["readinessProbe"]["httpGet"], c["livenessProbe"]["httpGet"]
    assert ready["path"] == settings.health.ready_path
    assert live["path"] == settings.health.live_path
    for probe in (ready, live):
        port = port_named(docs, probe["port"])
        assert port["protocol"] == "TCP" and port["containerPort"] == settings.server.port
        assert probe["scheme"] == "HTTPS"  # server.port serves TLS


def test_grace_period_covers_the_prestop_sleep_and_the_drain(docs, settings):
    settings, _ = settings
    spec = docs["Deployment"]["spec"]["template"]["spec"]
    command = container(docs)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    assert spec["terminationGracePeriodSeconds"] > pre_stop + settings.workers.drain_timeout


def test_service_has_tcp_and_udp_on_the_same_port_reaching_fpy3(docs, settings):
    settings, _ = settings
    service = docs["Service"]["spec"]
    by_protocol = {p["protocol"]: p for p in service["ports"]}
    assert set(by_protocol) == {"TCP", "UDP"}
    assert by_protocol["TCP"]["port"] == by_protocol["UDP"]["port"]
    tcp = port_named(docs, by_protocol["TCP"]["targetPort"])
    udp = port_named(docs, by_protocol["UDP"]["targetPort"])
    assert (tcp["protocol"], tcp["containerPort"]) == ("TCP", settings.server.port)
    assert settings.http3.enabled
    assert (udp["protocol"], udp["containerPort"]) == ("UDP", settings.udp_port)
    # Alt-Svc names the bind port: the Service must expose that same number.
    assert by_protocol["UDP"]["port"] == settings.udp_port
    labels = docs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert service["selector"].items() <= labels.items()
    assert docs["Deployment"]["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_config_and_tls_mounts_match_the_config(docs, settings):
    settings, raw = settings
    c = container(docs)
    spec = docs["Deployment"]["spec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    config_volume = next(n for n, v in volumes.items() if "configMap" in v)
    assert volumes[config_volume]["configMap"]["name"] == docs["ConfigMap"]["metadata"]["name"]
    args = c["args"]
    assert args[args.index("--config") + 1] == f"{mounts[config_volume]}/fpy3.toml"
    tls_volume = next(n for n, v in volumes.items() if "secret" in v)
    assert raw["tls"]["cert"] == f"{mounts[tls_volume]}/tls.crt"
    assert raw["tls"]["key"] == f"{mounts[tls_volume]}/tls.key"
    assert raw["tls"]["dev_cert"] is False


def test_metrics_port_and_annotations(docs, settings):
    settings, _ = settings
    metadata = docs["Deployment"]["spec"]["template"]["metadata"]
    assert settings.metrics.port == port_named(docs, "metrics")["containerPort"]
    assert metadata["annotations"]["prometheus.io/port"] == str(settings.metrics.port)
    assert settings.metrics.host in ("::", "0.0.0.0")  # reachable from the cluster
