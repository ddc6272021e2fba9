"""deploy/kserve/: the InferenceService validated against KServe's own CRD schema (no cluster here), and checked to run
the image as deploy/k8s and docker compose do.

The schema (tests/deploy/fixtures/kserve/, KServe v0.20.0) is validated the way the API server does with kubectl's
default strict field validation: an unknown field is an error. A CRD schema does not say so itself (the server
prunes or refuses fields it does not know), so :func:`strict` adds ``additionalProperties: false`` wherever the schema
lists properties and neither allows extra ones nor preserves unknown fields.
"""

import copy
import functools
import json
import re
import shutil
import subprocess

import jsonschema
import pytest
import yaml

from service.process.settings import Settings
from tests.deploy.tools import DEPLOY, REPO, tool

KSERVE = DEPLOY / "kserve"
K8S = DEPLOY / "k8s"
FIXTURES = REPO / "tests" / "deploy" / "fixtures" / "kserve"
KSERVE_RELEASE = "v0.20.0"
# KServe's InferenceService name format (pkg/apis/serving/v1beta1/inference_service_validation.go, IsvcNameFmt).
ISVC_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def strict(schema):
    """``schema`` with unknown fields refused, as the API server's strict field validation refuses them."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    tightened = {key: strict(value) for key, value in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        tightened["additionalProperties"] = False
    return tightened


@functools.cache
def validator() -> jsonschema.Draft4Validator:
    """KServe's InferenceService schema (OpenAPI v3's subset of JSON Schema: Draft 4 reads it as meant)."""
    schema = json.loads((FIXTURES / "inferenceservice-v1beta1.schema.json").read_text())
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(strict(schema))


def errors(manifest) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator().iter_errors(manifest)]


def documents(path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def isvc() -> dict:
    (manifest,) = documents(KSERVE / "inferenceservice.yaml")
    return manifest


def predictor_container(manifest: dict) -> dict:
    (container,) = manifest["spec"]["predictor"]["containers"]
    return container


def env(container: dict) -> dict[str, str]:
    return {variable["name"]: variable["value"] for variable in container.get("env", [])}


def test_the_fixture_is_kserves_schema_with_its_license():
    readme = (FIXTURES / "README.md").read_text()
    assert KSERVE_RELEASE in readme and "config/crd/full/serving.kserve.io_inferenceservices.yaml" in readme
    assert "Apache License" in (FIXTURES / "LICENSE").read_text()
    assert f"KServe {KSERVE_RELEASE}" in (KSERVE / "inferenceservice.yaml").read_text()


def test_the_inferenceservice_validates_against_kserves_crd_schema():
    manifest = isvc()
    assert (manifest["apiVersion"], manifest["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    assert ISVC_NAME.match(manifest["metadata"]["name"])
    assert errors(manifest) == []


def broken(path: str, value) -> dict:
    """The manifest with ``value`` put at ``path`` (dots; list indexes as numbers); ``...`` deletes the key."""
    manifest = copy.deepcopy(isvc())
    *parents, last = [int(key) if key.isdigit() else key for key in path.split(".")]
    node = manifest
    for key in parents:
        node = node[key]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return manifest


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("spec.predictor.minReplica", 2, "Additional properties are not allowed ('minReplica'"),  # a typo
        ("spec.predictor.scaleMetric", "queue_depth", "'queue_depth' is not one of"),
        ("spec.predictor.containers.0.ports.0.containerPort", "8000", "'8000' is not of type 'integer'"),
        ("spec.predictor.containers.0.name", ..., "'name' is a required property"),
        ("spec.predictor.containers.0.readinessProbe.httpGet.paht", "/v2/health/ready", "('paht' was unexpected)"),
        ("spec.predictor.containers.0.env.0.value", 2, "2 is not of type 'string'"),
        ("spec.predictor.containers.0.resources.limits.cpu", "two", "'two' does not match"),  # not a quantity
        ("spec.predictor", ..., "'predictor' is a required property"),
    ],
)
def test_a_broken_inferenceservice_fails_the_schema(path, value, expected):
    """The validation is not vacuous: unknown fields, wrong types, values out of an enum and missing required
    fields are refused."""
    found = errors(broken(path, value))
    assert any(expected in error for error in found), found


def test_rest_and_grpc_ports_as_kserve_routes_them():
    """Standard mode: KServe's Service maps the first container port to port 80 (REST, the ingress's) and a port named
    h2c to its own number with appProtocol kubernetes.io/h2c. Knative mode would route one port only."""
    manifest = isvc()
    container = predictor_container(manifest)
    assert container["name"] == "kserve-container"
    assert manifest["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Standard"
    rest, grpc = container["ports"]
    assert (rest["name"], rest["containerPort"]) == ("http", 8000)
    assert (grpc["name"], grpc["containerPort"]) == ("h2c", 8001)
    variables = env(container)
    assert variables["PROTOCOL"] == "v2"
    assert int(variables["DETECTOR_GRPC_PORT"]) == grpc["containerPort"]


def image_env() -> dict[str, str]:
    """The ``ENV`` the Dockerfile sets in the runtime image (the last ``ENV`` instruction, with continuations)."""
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    (last,) = re.findall(r"^ENV (.+)$", text, re.MULTILINE)[-1:]
    return dict(re.findall(r"(\w+)=(\S+)", last))


def test_the_image_ports_and_settings_agree_with_the_dockerfile_compose_and_settings():
    container = predictor_container(isvc())
    ports = {port["containerPort"] for port in container["ports"]}
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["detector"]
    assert compose["image"].endswith(":-" + container["image"] + "}")
    assert {int(port) for port in compose["expose"]} == ports
    assert compose["environment"]["DETECTOR_GRPC_PORT"] == env(container)["DETECTOR_GRPC_PORT"]
    (exposed,) = re.findall(r"^EXPOSE (.+)$", (REPO / "Dockerfile").read_text(), re.MULTILINE)
    assert set(map(int, exposed.split())) == ports
    assert int(image_env()["DETECTOR_PORT"]) == container["ports"][0]["containerPort"]
    # Every DETECTOR_ variable is a setting, and together with the image's they make valid settings.
    detector = {
        name: value for name, value in {**image_env(), **env(container)}.items() if name.startswith("DETECTOR_")
    }
    fields = {name.removeprefix("DETECTOR_").lower(): value for name, value in detector.items()}
    assert set(fields) <= set(Settings.model_fields), set(fields) - set(Settings.model_fields)
    settings = Settings(**{name: json.loads(v) if name == "models" else v for name, v in fields.items()})
    assert (settings.host, settings.port, settings.grpc_port) == ("0.0.0.0", 8000, 8001)


def kubernetes_deployment() -> tuple[dict, dict[str, str]]:
    """The base Deployment's pod, and its container's environment with the cpu and own-model overlays applied."""
    (deployment,) = documents(K8S / "base" / "deployment.yaml")
    pod = deployment["spec"]["template"]["spec"]
    variables = env(pod["containers"][0])
    for overlay in ("cpu", "own-model"):
        (patch,) = documents(K8S / "overlays" / overlay / "deployment-patch.yaml")
        variables |= env(patch["spec"]["template"]["spec"]["containers"][0])
    return pod, variables


def test_the_pod_runs_as_the_kubernetes_deployment_does():
    predictor = isvc()["spec"]["predictor"]
    container = predictor_container(isvc())
    pod, k8s_env = kubernetes_deployment()
    (k8s_container,) = pod["containers"]
    assert container["image"] == k8s_container["image"] == "akconv-detector:0.1.0"
    # The same port numbers; the gRPC port's name may differ (KServe and gateways take "grpc" or "h2c" in it for h2c).
    assert [port["containerPort"] for port in container["ports"]] == [
        p["containerPort"] for p in k8s_container["ports"]
    ]
    for key in ("securityContext", "terminationGracePeriodSeconds"):
        assert predictor[key] == pod[key], key
    assert container["securityContext"] == k8s_container["securityContext"]
    assert container["securityContext"]["readOnlyRootFilesystem"] and predictor["securityContext"]["runAsUser"] == 10001
    assert container["lifecycle"] == k8s_container["lifecycle"]
    shared = set(env(container)) & set(k8s_env)
    assert {name: env(container)[name] for name in shared} == {name: k8s_env[name] for name in shared}
    assert set(k8s_env) <= set(env(container)), "every variable deploy/k8s sets (cpu and own-model overlays)"
    # Requests as deploy/k8s; every request has a limit (KServe's defaulter would fill a missing one with its own,
    # 1 CPU, below the request) at least as large, and the torch threads fit the CPU limit.
    resources, k8s_resources = container["resources"], k8s_container["resources"]
    assert resources["requests"] == k8s_resources["requests"]
    assert resources["limits"]["memory"] == k8s_resources["limits"]["memory"]
    assert set(resources["requests"]) <= set(resources["limits"])
    assert int(resources["limits"]["cpu"]) >= int(resources["requests"]["cpu"]) == 2
    assert int(env(container)["DETECTOR_INTRA_OP_THREADS"]) <= int(resources["limits"]["cpu"])
    tmp = next(volume for volume in predictor["volumes"] if volume["name"] == "tmp")
    assert tmp == next(volume for volume in pod["volumes"] if volume["name"] == "tmp")


def test_probes_ask_the_open_inference_protocols_health_on_the_rest_port():
    from service.doors.oip_rest import oip_router  # imports torch: here, not for the whole module

    container = predictor_container(isvc())
    routes = {route.path for route in oip_router.routes}
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert container["startupProbe"]["httpGet"]["path"] == "/v2/health/live"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] in routes
        assert container[probe]["httpGet"]["port"] == "http"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, "long enough for warm-up"


def test_the_models_folder_is_mounted_read_only_whole():
    predictor = isvc()["spec"]["predictor"]
    container = predictor_container(isvc())
    mounts = {mount["mountPath"]: mount for mount in container["volumeMounts"]}
    assert set(mounts) == {"/tmp", "/models"}
    models = mounts["/models"]
    assert models["readOnly"] is True and "subPath" not in models, "read-only, the whole folder (SIGHUP swaps)"
    volume = next(volume for volume in predictor["volumes"] if volume["name"] == models["name"])
    (claim,) = documents(KSERVE / "models-pvc.yaml")
    assert volume["persistentVolumeClaim"] == {"claimName": claim["metadata"]["name"], "readOnly": True}
    assert all(path.startswith("/models/") for path in json.loads(env(container)["DETECTOR_MODELS"]).values())


def test_the_kustomization_applies_the_inferenceservice_and_the_own_model_claim():
    kustomization = yaml.safe_load((KSERVE / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(
        path.name for path in KSERVE.glob("*.yaml") if path.name != "kustomization.yaml"
    )
    assert documents(KSERVE / "models-pvc.yaml") == documents(K8S / "overlays" / "own-model" / "models-pvc.yaml")
    validate = [tool("kubernetes-validate"), "--strict", str(KSERVE / "models-pvc.yaml")]
    result = subprocess.run(validate, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (its built-in kustomize) is not installed")
def test_kustomize_builds_the_inferenceservice_and_the_claim_unchanged():
    built = subprocess.run(["kubectl", "kustomize", str(KSERVE)], capture_output=True, text=True, check=False)
    assert built.returncode == 0, built.stderr
    documents_built = {(doc["kind"], doc["metadata"]["name"]): doc for doc in yaml.safe_load_all(built.stdout) if doc}
    assert documents_built == {
        ("InferenceService", "detector"): isvc(),
        ("PersistentVolumeClaim", "detector-models"): documents(KSERVE / "models-pvc.yaml")[0],
    }


def test_autoscaling_as_the_kubernetes_hpa_on_cpu():
    manifest = isvc()
    predictor = manifest["spec"]["predictor"]
    (hpa,) = documents(K8S / "base" / "hpa.yaml")
    assert manifest["metadata"]["annotations"]["serving.kserve.io/autoscalerClass"] == "hpa"
    assert (predictor["minReplicas"], predictor["maxReplicas"]) == (
        hpa["spec"]["minReplicas"],
        hpa["spec"]["maxReplicas"],
    )
    cpu = next(metric for metric in hpa["spec"]["metrics"] if metric["type"] == "Resource")
    assert (predictor["scaleMetric"], predictor["scaleTarget"]) == (
        "cpu",
        cpu["resource"]["target"]["averageUtilization"],
    )
    strategy = predictor["deploymentStrategy"]
    (deployment,) = documents(K8S / "base" / "deployment.yaml")
    assert strategy == deployment["spec"]["strategy"]
    assert predictor["timeout"] > Settings().request_timeout_s
