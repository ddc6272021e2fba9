"""The tracing override (docker-compose.tracing.yml) and its collector's config (deploy/otel/collector.yaml) agree with
each other and with what the service accepts."""

from urllib.parse import urlsplit

import yaml

from service.process import tracing
from tests.deploy.tools import DEPLOY, REPO


def test_the_detectors_export_to_the_collectors_otlp_http_receiver_which_the_service_accepts():
    override = yaml.safe_load((REPO / "docker-compose.tracing.yml").read_text())["services"]
    collector = yaml.safe_load((DEPLOY / "otel" / "collector.yaml").read_text())
    environment = override["detector"]["environment"]
    endpoint = urlsplit(environment["OTEL_EXPORTER_OTLP_ENDPOINT"])
    receiver = collector["receivers"]["otlp"]["protocols"]["http"]["endpoint"]
    assert endpoint.hostname == "otel-collector" and endpoint.port == int(receiver.rsplit(":", 1)[1]) == 4318
    assert "otel-collector" in override and str(endpoint.port) in override["otel-collector"]["expose"]
    mounted = {volume.split(":")[1] for volume in override["otel-collector"]["volumes"]}
    assert set(override["otel-collector"]["command"]) == {f"--config={path}" for path in mounted}
    pipeline = collector["service"]["pipelines"]["traces"]
    assert pipeline["receivers"] == ["otlp"] and "debug" in pipeline["exporters"]
    assert set(pipeline["processors"]) <= set(collector["processors"])
    try:
        assert tracing.setup(environment)  # every value is one the service takes
    finally:
        tracing.uninstall()


def test_prometheus_keeps_its_flags_and_stores_exemplars():
    base = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["prometheus"]["command"]
    override = yaml.safe_load((REPO / "docker-compose.tracing.yml").read_text())["services"]["prometheus"]["command"]
    assert override == [*base, "--enable-feature=exemplar-storage"]
