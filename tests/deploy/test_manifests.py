"""Static checks of every deployment file, with the real validators that install here (no Docker engine)."""

import copy
import json
import re
import subprocess
import tomllib

import pytest
import yaml
from packaging.requirements import Requirement

from service.process.metrics import Metrics
from service.process.settings import Settings
from tests.deploy.tools import DEPLOY, REPO, tool

K8S = DEPLOY / "k8s"


def run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)


SERIES_SUFFIXES = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"], "info": ["_info"], "gauge": [""]}


def exported_metric_names() -> set[str]:
    """Every series name the service's metrics produce, labelled children or not."""
    return {family.name + suffix for family in Metrics().registry.collect() for suffix in SERIES_SUFFIXES[family.type]}


COMPOSE_FILES = [
    "docker-compose.yml",
    "docker-compose.gpu.yml",
    "docker-compose.models.yml",
    "docker-compose.tracing.yml",
]


@pytest.mark.parametrize(
    "files",
    [
        ["docker-compose.yml"],
        ["docker-compose.yml", "docker-compose.gpu.yml"],
        ["docker-compose.yml", "docker-compose.tracing.yml"],
    ],
)
def test_compose_files_validate(files):
    args = [a for f in files for a in ("-f", f)]
    result = run(tool("docker-compose"), *args, "config", "--quiet")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_files_have_no_obsolete_version_key(name):
    """Compose v2 warns that ``version`` is obsolete; compose 1.29 reads the file as the Compose Specification
    without it."""
    assert "version" not in yaml.safe_load((REPO / name).read_text())


def test_compose_images_default_to_the_official_pinned_ones():
    """Stand-ins (deploy/stack.sh) replace an image through its variable only; the file's defaults stay official."""
    services = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    images = {name: service["image"] for name, service in services.items()}
    assert images == {
        "detector": "${DETECTOR_IMAGE:-akconv-detector:0.1.0}",
        "lb": "${NGINX_IMAGE:-nginx:1.27.3-alpine}",
        "prometheus": "${PROMETHEUS_IMAGE:-prom/prometheus:v2.53.2}",
        "grafana": "${GRAFANA_IMAGE:-grafana/grafana:11.2.0}",
    }


def test_compose_publishes_on_loopback_unless_told_otherwise():
    services = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    published = {name: service["ports"] for name, service in services.items() if "ports" in service}
    assert published == {
        "lb": [
            "${PUBLISH_ADDRESS:-127.0.0.1}:${LB_PORT:-8080}:8080",
            "${PUBLISH_ADDRESS:-127.0.0.1}:${LB_GRPC_PORT:-8081}:8081",
        ],
        "prometheus": ["127.0.0.1:${PROMETHEUS_PORT:-9090}:9090"],
        "grafana": ["${PUBLISH_ADDRESS:-127.0.0.1}:${GRAFANA_PORT:-3000}:3000"],
    }


def test_compose_shape():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    detector = services["detector"]
    assert detector["deploy"]["replicas"] == "${DETECTOR_REPLICAS:-2}"
    assert "/readyz" in " ".join(detector["healthcheck"]["test"])
    assert services["lb"]["depends_on"]["detector"]["condition"] == "service_healthy"
    assert int(detector["stop_grace_period"].rstrip("s")) > Settings().request_timeout_s
    gpu = yaml.safe_load((REPO / "docker-compose.gpu.yml").read_text())
    devices = gpu["services"]["detector"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert gpu["services"]["detector"]["build"]["args"] == {"VARIANT": "gpu"}


def test_every_deployment_turns_grpc_on_and_exposes_it():
    """Compose, nginx and the Kubernetes base serve the Open Inference Protocol over gRPC on 8001 (h2c)."""
    detector = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["detector"]
    assert detector["environment"]["DETECTOR_GRPC_PORT"] == "8001" and "8001" in detector["expose"]
    conf = (DEPLOY / "nginx" / "nginx.conf").read_text()
    assert "listen 8081 http2;" in conf and "grpc_pass grpc://detector_grpc;" in conf
    assert "server detector:8001" in conf
    (deployment,) = k8s_documents(K8S / "base" / "deployment.yaml")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert {"name": "grpc", "containerPort": 8001} in container["ports"]
    assert {"name": "DETECTOR_GRPC_PORT", "value": "8001"} in container["env"]
    (service,) = k8s_documents(K8S / "base" / "service.yaml")
    grpc_port = next(port for port in service["spec"]["ports"] if port["name"] == "grpc")
    assert grpc_port["targetPort"] == "grpc" and grpc_port["appProtocol"] == "kubernetes.io/h2c"


def test_dockerfile_lints_clean():
    result = run(tool("hadolint"), "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^USER 10001:10001$", text, re.MULTILINE), "uid and gid 10001, as the Kubernetes deployment"
    assert "HEALTHCHECK" in text and "STOPSIGNAL SIGTERM" in text
    assert re.search(r"^ARG PYTHON_IMAGE=python:[\d.]+-slim-\w+$", text, re.MULTILINE), "base image pinned"
    assert not re.search(r"^# *syntax=", text, re.MULTILINE | re.IGNORECASE), "BuildKit would fetch that frontend"


IMAGE_DIR = DEPLOY / "image"
# What the CPU lock leaves out (Makefile CPU_UNUSED): torch never loads them on a CPU.
CPU_UNUSED = {"triton", "nvidia-cusolver", "nvidia-nvtx", "cuda-bindings", "cuda-pathfinder"}


def locked(variant: str) -> dict[str, str]:
    """Package -> version of deploy/image/requirements-{variant}.txt, checking that every package has hashes."""
    text = (IMAGE_DIR / f"requirements-{variant}.txt").read_text()
    pins = dict(re.findall(r"^([a-z0-9][a-z0-9._-]*)==(\S+) \\$", text, re.MULTILINE))
    assert len(re.findall(r"^[a-z0-9]", text, re.MULTILINE)) == len(pins), "a requirement without == and hashes"
    assert text.count("==") == len(pins) and text.count("--hash=sha256:") >= len(pins)
    return pins


def test_image_locks_hold_the_server_pins_and_the_cpu_lock_only_leaves_out_what_a_cpu_never_loads():
    server = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["server"]
    pins = dict(requirement.split("==") for requirement in server)
    gpu, cpu = locked("gpu"), locked("cpu")
    assert {name: gpu.get(name) for name in pins} == pins, "run `make lock`"
    assert set(gpu) - set(cpu) == CPU_UNUSED and set(cpu) <= set(gpu)
    assert all(cpu[name] == gpu[name] for name in cpu)
    makefile = (REPO / "Makefile").read_text()
    assert set(re.search(r"^CPU_UNUSED := (.+)$", makefile, re.MULTILINE).group(1).split()) == CPU_UNUSED


def constraints() -> dict[str, str]:
    """Package -> version of constraints.txt (the server's exact versions of the client's dependencies)."""
    lines = [line.split("#")[0].strip() for line in (REPO / "constraints.txt").read_text().splitlines()]
    return dict(line.split("==") for line in lines if line)


def test_the_server_installs_the_clients_dependencies_at_the_constraints_versions():
    """pyproject.toml gives the client ranges; constraints.txt pins each at the version the server runs, inside its
    range; the image's locks hold those versions, and every server install (the Makefile's, so CI's) and `make lock`
    read the file."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    ranges = {Requirement(r).name: Requirement(r).specifier for r in project["dependencies"]}
    pins = constraints()
    assert set(pins) == set(ranges), "one exact version per client dependency"
    assert all(ranges[name].contains(version) for name, version in pins.items()), (ranges, pins)
    for variant in ("gpu", "cpu"):
        lock = locked(variant)
        assert {name: lock.get(name) for name in pins} == pins, "run `make lock`"
    makefile = (REPO / "Makefile").read_text()
    installs = re.findall(r"^\t\$\(PYTHON\) -m pip install .*-e '\.\[.*$", makefile, re.MULTILINE)
    assert installs and all(" -c constraints.txt " in line for line in installs), installs
    lock_command = re.search(r"^LOCK := ((?:.*\\\n)*.*)$", makefile, re.MULTILINE).group(1)
    assert "--constraint constraints.txt" in lock_command


def test_nginx_config_matches_the_service_limits():
    conf = (DEPLOY / "nginx" / "nginx.conf").read_text()
    assert "least_conn;" in conf and "max_fails=" in conf and "fail_timeout=" in conf
    body_limit_mib = int(re.search(r"client_max_body_size (\d+)m;", conf).group(1))
    assert body_limit_mib * 1024 * 1024 == Settings().max_upload_bytes
    read_timeout = int(re.search(r"proxy_read_timeout (\d+)s;", conf).group(1))
    assert read_timeout > Settings().request_timeout_s
    retry = re.search(r"proxy_next_upstream ([^;]+);", conf).group(1).split()
    assert "http_503" in retry and "error" in retry and "non_idempotent" in retry
    # A connect timeout is retried, a slow answer never: retries stop before any read or send could time out.
    connect_timeout = int(re.search(r"proxy_connect_timeout (\d+)s;", conf).group(1))
    retry_window = int(re.search(r"proxy_next_upstream_timeout (\d+)s;", conf).group(1))
    send_timeout = int(re.search(r"proxy_send_timeout (\d+)s;", conf).group(1))
    assert connect_timeout < retry_window < min(read_timeout, send_timeout)
    assert "upstream_response_time" in conf and "request_time" in conf


def k8s_documents(path):
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


@pytest.mark.parametrize("name", ["deployment", "service", "hpa", "pdb"])
def test_kubernetes_manifests_validate(name):
    result = run(tool("kubernetes-validate"), "--strict", str(K8S / "base" / f"{name}.yaml"))
    assert result.returncode == 0 and "passed" in result.stdout + result.stderr, result.stdout + result.stderr


def test_service_monitor_structure():
    """No schema for the Prometheus Operator's CRD ships with the validator: check what it needs by hand."""
    (monitor,) = k8s_documents(K8S / "base" / "servicemonitor.yaml")
    (service,) = k8s_documents(K8S / "base" / "service.yaml")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["kind"] == "ServiceMonitor"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"


def test_deployment_probes_and_safety():
    (deployment,) = k8s_documents(K8S / "base" / "deployment.yaml")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, "long enough for warm-up"
    assert pod["terminationGracePeriodSeconds"] > Settings().request_timeout_s + 5
    assert container["lifecycle"]["preStop"]
    assert pod["securityContext"]["runAsNonRoot"] and container["securityContext"]["readOnlyRootFilesystem"]
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/tmp"}


def merge(base, patch):
    """The strategic merge kustomize applies to these patches: dicts by key, lists of named items by name."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = copy.deepcopy(base)
        for key, value in patch.items():
            merged[key] = merge(base[key], value) if key in base else value
        return merged
    if isinstance(base, list) and isinstance(patch, list) and all(isinstance(i, dict) and "name" in i for i in patch):
        merged = copy.deepcopy(base)
        for item in patch:
            index = next((i for i, b in enumerate(merged) if b.get("name") == item["name"]), None)
            if index is None:
                merged.append(item)
            else:
                merged[index] = merge(merged[index], item)
        return merged
    return patch


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_overlays_patch_the_base_into_valid_deployments(overlay, tmp_path):
    kustomization = yaml.safe_load((K8S / "overlays" / overlay / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["../../base"]
    base_resources = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())["resources"]
    assert sorted(base_resources) == sorted(
        p.name for p in (K8S / "base").glob("*.yaml") if p.name != "kustomization.yaml"
    )
    (deployment,) = k8s_documents(K8S / "base" / "deployment.yaml")
    for entry in kustomization["patches"]:
        (patch,) = k8s_documents(K8S / "overlays" / overlay / entry["path"])
        assert (patch["kind"], patch["metadata"]["name"]) == (deployment["kind"], deployment["metadata"]["name"])
        deployment = merge(deployment, patch)
    out = tmp_path / f"{overlay}.yaml"
    out.write_text(yaml.safe_dump(deployment))
    result = run(tool("kubernetes-validate"), "--strict", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    env = {e["name"]: e["value"] for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["DETECTOR_DEVICE"] == ("cuda" if overlay == "gpu" else "cpu")
    if overlay == "gpu":
        assert deployment["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"


def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "detector.json").read_text())
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel["targets"]]


def test_dashboard_uses_only_exported_metrics():
    exported = exported_metric_names()
    titles = {title for title, _ in dashboard_queries()}
    for required in ("Request latency", "Batch size", "Queue depth per replica", "GPU memory", "Readiness per replica"):
        assert required in titles
    for title, expr in dashboard_queries():
        for name in re.findall(r"\bdetector_[a-z_]+", expr):
            assert name in exported, f"panel {title!r} queries {name}, which the service does not export"


def test_alert_rules_use_only_exported_metrics_and_have_runbooks():
    exported = exported_metric_names() | {"up"}
    readme = (DEPLOY / "README.md").read_text().lower()
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"][0]["rules"]
    for rule in rules:
        for name in re.findall(r"\bdetector_[a-z_]+", rule["expr"]):
            assert name in exported, f"{rule['alert']} uses {name}"
        assert rule["annotations"]["summary"]
        assert f"### {rule['alert'].lower()}" in readme, f"no runbook paragraph for {rule['alert']}"


def test_grafana_provisioning_points_at_the_dashboards():
    datasource = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert datasource["datasources"][0]["uid"] == "prometheus"
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "detector.json").read_text())
    uids = {panel["datasource"]["uid"] for panel in dashboard["panels"]}
    assert uids == {"prometheus"}
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    provider = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "dashboards.yml").read_text())
    mounted = {v.split(":")[1] for v in compose["services"]["grafana"]["volumes"]}
    assert provider["providers"][0]["options"]["path"] in mounted
