"""The compose stack up for real (``deploy/stack.sh up``, as ``make deploy-up`` runs it): two detector replicas
serving an own-model folder (docker-compose.models.yml) behind nginx, Prometheus scraping each replica. Load at
concurrency 16 through the load balancer while one replica is killed and restarted fails no request; Prometheus
has every replica up and the alert rules loaded; the dashboard's queries return data; SIGHUP swaps the model in
every replica. Stand-ins replace the official images where those cannot be pulled (deploy/README.md)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton

from bench.processes import free_port
from tests.deploy.containers import SAMPLE, Load, docker, require_image, wait_until
from tests.deploy.model_versions import point, write_version
from tests.deploy.test_prometheus import assert_rules_loaded, panels_without_data, query
from tests.deploy.tools import REPO

pytestmark = [pytest.mark.container, pytest.mark.slow]

REPLICAS = 2
CONCURRENCY = 16
FILES = ["-f", "docker-compose.models.yml"]


@dataclass
class Stack:
    project: str
    environment: dict[str, str]
    lb: str  # the load balancer's URL on 127.0.0.1
    lb_grpc: str  # its gRPC address on 127.0.0.1
    prometheus: str  # Prometheus's URL on 127.0.0.1
    models: Path  # the host folder mounted at /models in every replica

    def compose(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        compose = ["docker", "compose"] if docker("compose", "version", check=False).returncode == 0 else None
        command = [*(compose or ["docker-compose"]), "-f", "docker-compose.yml", *FILES, *args]
        result = subprocess.run(
            command, cwd=REPO, env=self.environment, capture_output=True, text=True, timeout=timeout, check=False
        )
        assert result.returncode == 0, f"{' '.join(command)}:\n{result.stdout}\n{result.stderr}"
        return result

    def replicas(self) -> list[str]:
        """Names of the detector containers, running or not."""
        return sorted(self.compose("ps", "-q", "detector").stdout.split())

    def replica_version(self, container: str) -> str:
        """The version of model ``shapes`` that ``container`` serves, asked from inside it (replicas publish no
        port: the test reaches them on their own loopback)."""
        probe = (
            "import json, urllib.request; "
            "print(json.load(urllib.request.urlopen('http://127.0.0.1:8000/v1/model?model=shapes'))['version'])"
        )
        return docker("exec", container, "python", "-c", probe).stdout.strip()


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    require_image()
    models = tmp_path_factory.mktemp("stack") / "models"
    models.mkdir(mode=0o755)
    point(models / "shapes", write_version(models, "stack-1"))
    lb_port, lb_grpc_port, prometheus_port = free_port(), free_port(), free_port()
    environment = {
        **os.environ,
        "COMPOSE_PROJECT_NAME": f"akconv-test-{os.getpid()}",
        "DETECTOR_REPLICAS": str(REPLICAS),
        "DETECTOR_MODELS_DIR": str(models),
        "PUBLISH_ADDRESS": "127.0.0.1",
        "LB_PORT": str(lb_port),
        "LB_GRPC_PORT": str(lb_grpc_port),
        "PROMETHEUS_PORT": str(prometheus_port),
        "GRAFANA_PORT": str(free_port()),
    }
    stack = Stack(
        environment["COMPOSE_PROJECT_NAME"],
        environment,
        f"http://127.0.0.1:{lb_port}",
        f"127.0.0.1:{lb_grpc_port}",
        f"http://127.0.0.1:{prometheus_port}",
        models,
    )
    up = subprocess.run(
        ["deploy/stack.sh", "up", *FILES], cwd=REPO, env=environment, capture_output=True, text=True, timeout=900
    )
    try:
        assert up.returncode == 0, f"deploy/stack.sh up:\n{up.stdout}\n{up.stderr}"
        yield stack
    finally:
        subprocess.run(["deploy/stack.sh", "down", *FILES], cwd=REPO, env=environment, capture_output=True, timeout=300)


def detect(url: str) -> httpx.Response:
    return httpx.post(url + "/detect", files={"file": ("sample.jpg", SAMPLE.read_bytes())}, timeout=60)


def test_the_load_balancer_answers_from_the_own_model(stack):
    response = detect(stack.lb)
    assert response.status_code == 200, response.text
    assert response.json()["model"] == {"name": "shapes", "version": "stack-1"}
    assert {detection["class_name"] for detection in response.json()["detections"]} == {"star", "triangle"}


def test_grpc_through_the_load_balancer_answers_what_detect_answers(stack):
    """tritonclient.grpc on the load balancer's gRPC listener (nginx grpc_pass to the replicas' port 8001)."""
    client = triton.InferenceServerClient(stack.lb_grpc)
    image = triton.InferInput("IMAGE", [1], "BYTES")
    image.set_data_from_numpy(np.array([SAMPLE.read_bytes()], dtype=np.object_))
    result = client.infer("shapes", [image], client_timeout=60)
    expected = detect(stack.lb).json()["detections"]
    assert result.get_response().model_version == "stack-1"
    assert result.as_numpy("num_dets")[0, 0] == len(expected)
    assert result.as_numpy("det_classes")[0, : len(expected)].tolist() == [d["class_id"] for d in expected]


def test_a_replica_killed_and_restarted_under_load_fails_no_request(stack):
    victim = stack.replicas()[0]
    with Load(stack.lb + "/detect", concurrency=CONCURRENCY) as load:
        load.wait_for(2 * CONCURRENCY, 120)
        docker("kill", victim)
        load.wait_for(load.count() + 2 * CONCURRENCY, 120)
        docker("start", victim)
        wait_until(
            lambda: docker("inspect", "-f", "{{.State.Health.Status}}", victim).stdout.strip() == "healthy",
            240,
            "the restarted replica healthy again",
            interval=1,
        )
        load.wait_for(load.count() + 2 * CONCURRENCY, 120)
    failed = [outcome for outcome in load.outcomes if outcome.status != 200]
    assert not failed, f"{len(failed)} of {len(load.outcomes)} failed: {failed[:5]}"


def test_prometheus_scrapes_every_replica_and_loaded_the_alert_rules(stack):
    def every_replica_up() -> bool:
        targets = httpx.get(stack.prometheus + "/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
        return len(targets) == REPLICAS and all(target["health"] == "up" for target in targets)

    wait_until(every_replica_up, 90, f"{REPLICAS} detector targets up in Prometheus", interval=1)
    assert_rules_loaded(stack.prometheus)


def test_the_dashboard_queries_return_data(stack):
    def traffic_seen_by_rate() -> bool:
        """One more answer and one more refusal (for the error and rejection panels): rate() sees a series once it
        has grown between two scrapes (every 5 s) inside its window."""
        assert detect(stack.lb).status_code == 200
        refused = httpx.post(stack.lb + "/detect", params={"conf": "abc"}, content=b"x", timeout=10)
        assert 400 <= refused.status_code < 500
        return bool(query(stack.prometheus, 'sum(rate(detector_requests_total{status=~"4.."}[1m])) > 0'))

    wait_until(traffic_seen_by_rate, 90, "refusals seen by rate()", interval=3)
    empty = panels_without_data(stack.prometheus)
    assert empty == ["GPU memory"], f"panels without data: {empty} (GPU memory is expected empty on CPU)"


def test_sighup_swaps_the_model_in_every_replica(stack):
    point(stack.models / "shapes", write_version(stack.models, "stack-2"))
    stack.compose("kill", "-s", "SIGHUP", "detector")
    for replica in stack.replicas():
        wait_until(lambda r=replica: stack.replica_version(r) == "stack-2", 120, f"{replica} serving stack-2", 1)
    assert detect(stack.lb).json()["model"]["version"] == "stack-2"
    logs = stack.compose("logs", "--no-color", "detector").stdout
    assert logs.count('"message": "model swapped"') >= REPLICAS
    for replica in stack.replicas():
        mounts = json.loads(docker("inspect", "-f", "{{json .Mounts}}", replica).stdout)
        assert [(mount["Destination"], mount["RW"]) for mount in mounts] == [("/models", False)]
