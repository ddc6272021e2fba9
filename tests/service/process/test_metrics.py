"""The exported series the alerts read (deploy/prometheus/alerts.yml)."""

from service.process.metrics import Metrics


def test_the_process_resident_memory_is_exported_for_the_memory_alert():
    body, _ = Metrics().render()
    assert "process_resident_memory_bytes " in body.decode()
