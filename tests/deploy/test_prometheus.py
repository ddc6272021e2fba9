"""Prometheus from Debian: config and rule checks, alert unit tests, and a real Prometheus scraping a replica."""

import contextlib
import json
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from bench.processes import free_port, running_process
from model.synthetic import render
from tests.deploy.tools import DEPLOY, tool
from tests.image_files import encode
from tests.service.server import running_server

PROMETHEUS = DEPLOY / "prometheus"


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([tool("promtool"), *args], cwd=PROMETHEUS, capture_output=True, text=True, check=False)


def test_config_and_rules_check():
    for args in (("check", "config", "prometheus.yml"), ("check", "rules", "alerts.yml")):
        result = promtool(*args)
        assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_unit_test_and_they_pass():
    result = promtool("test", "rules", "alerts.test.yml")
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr
    alerts = {r["alert"] for r in yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"][0]["rules"]}
    tested = {
        case["alertname"]
        for test in yaml.safe_load((PROMETHEUS / "alerts.test.yml").read_text())["tests"]
        for case in test["alert_rule_test"]
    }
    assert alerts == tested


@contextlib.contextmanager
def running_prometheus(tmp_path: Path, target: str):
    """The project's prometheus.yml with its DNS discovery swapped for the loopback replica, 1 s scrapes."""
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    config["global"]["evaluation_interval"] = "1s"
    config["rule_files"] = [str(PROMETHEUS / "alerts.yml")]
    (job,) = config["scrape_configs"]
    del job["dns_sd_configs"]
    job["static_configs"] = [{"targets": [target]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    command = [
        tool("prometheus"),
        f"--config.file={tmp_path / 'prometheus.yml'}",
        f"--web.listen-address=127.0.0.1:{port}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
    ]
    url = f"http://127.0.0.1:{port}"
    with running_process(command, tmp_path / "prometheus.log", url + "/-/ready", timeout=60):
        yield url


def query(url: str, expr: str) -> list:
    body = httpx.get(url + "/api/v1/query", params={"query": expr}, timeout=10).json()
    assert body["status"] == "success", body
    return body["data"]["result"]


@pytest.mark.e2e
@pytest.mark.slow
def test_dashboard_queries_return_data_from_a_real_replica(tmp_path):
    with (
        running_server(tmp_path, "--max-batch-size", "4") as replica,
        running_prometheus(tmp_path, replica.url.removeprefix("http://")) as prometheus,
    ):
        deadline = time.monotonic() + 60
        while not query(prometheus, 'up{job="detector"} == 1'):
            assert time.monotonic() < deadline, "the replica was never scraped"
            time.sleep(0.5)
        for _round in range(3):  # traffic across several scrapes, so rate() has something to work on
            for _ in range(4):
                httpx.post(
                    replica.url + "/detect",
                    params={"conf": 0},
                    files={"file": ("x.png", encode(render(7, 320)[0]))},
                    timeout=60,
                )
            httpx.post(replica.url + "/detect", params={"conf": "abc"}, content=b"x", timeout=10)
            time.sleep(1.5)
        empty = panels_without_data(prometheus)
        assert empty == ["GPU memory"], f"panels without data: {empty} (GPU memory is expected empty on CPU)"
        assert_rules_loaded(prometheus)


def panels_without_data(prometheus: str) -> list[str]:
    """Titles of the Grafana dashboard's panels whose queries return nothing from Prometheus at ``prometheus``."""
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "detector.json").read_text())
    return [
        panel["title"]
        for panel in dashboard["panels"]
        for target in panel["targets"]
        if not query(prometheus, target["expr"])
    ]


def assert_rules_loaded(prometheus: str) -> None:
    """Prometheus at ``prometheus`` evaluates every alert of alerts.yml, each healthy."""
    rules = httpx.get(prometheus + "/api/v1/rules", timeout=10).json()["data"]["groups"][0]["rules"]
    defined = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"][0]["rules"]
    assert [rule["name"] for rule in rules] == [rule["alert"] for rule in defined]
    assert all(rule["health"] == "ok" for rule in rules), rules
