"""The deployments of your own models: the compose override and the Kubernetes overlay validate, and each mounts a
models folder read-only where ``DETECTOR_MODELS`` points."""

import json
import os
import shutil
import subprocess
from pathlib import PurePosixPath

import pytest
import yaml

from tests.deploy.test_manifests import K8S, k8s_documents, merge, run
from tests.deploy.tools import REPO, tool

OVERRIDE = "docker-compose.models.yml"
OWN_MODEL = K8S / "overlays" / "own-model"


def served_paths(models_setting: str) -> list[PurePosixPath]:
    """The model files a ``DETECTOR_MODELS`` value names (a JSON object: served name -> path)."""
    models = json.loads(models_setting)
    assert isinstance(models, dict) and models, "DETECTOR_MODELS is a JSON object of served name -> model file"
    return [PurePosixPath(path) for path in models.values()]


def compose_config(*files: str, **env: str) -> dict:
    """What ``docker-compose config`` makes of ``files`` (merged, variables substituted)."""
    args = [a for f in files for a in ("-f", f)]
    result = subprocess.run(
        [tool("docker-compose"), *args, "config"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **env},
    )
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


@pytest.mark.parametrize(
    "files",
    [["docker-compose.yml", OVERRIDE], ["docker-compose.yml", "docker-compose.gpu.yml", OVERRIDE]],
    ids=["cpu", "gpu"],
)
def test_models_override_validates(files):
    """Validated only: no Docker engine runs here (``docker-compose config`` checks the merged files)."""
    args = [a for f in files for a in ("-f", f)]
    result = run(tool("docker-compose"), *args, "config", "--quiet")
    assert result.returncode == 0, result.stderr


def test_models_override_mounts_the_folder_read_only_where_detector_models_points():
    base = compose_config("docker-compose.yml")["services"]["detector"]
    detector = compose_config("docker-compose.yml", OVERRIDE, DETECTOR_MODELS_DIR="/srv/models")["services"]["detector"]
    (volume,) = detector["volumes"]
    if isinstance(volume, str):
        source, target, mode = volume.split(":")
    else:
        source, target, mode = volume["source"], volume["target"], "ro" if volume.get("read_only") else "rw"
    assert (source, target, mode) == ("/srv/models", "/models", "ro"), "DETECTOR_MODELS_DIR, read-only at /models"
    for path in served_paths(detector["environment"]["DETECTOR_MODELS"]):
        assert path.is_relative_to(target), f"{path} is not inside the mounted folder {target}"
    assert "DETECTOR_MODEL_PATH" not in detector["environment"], "one model setting, not two"
    assert detector["environment"].items() >= base["environment"].items(), "the base settings stay"
    assert detector["read_only"] and "/tmp" in detector["tmpfs"]
    default = compose_config("docker-compose.yml", OVERRIDE)["services"]["detector"]["volumes"][0]
    assert default.split(":")[0] == str(REPO / "models"), "./models by default"


def own_model_deployment() -> dict:
    """The base deployment with the overlays' patches applied as kustomize does: cpu's, then own-model's."""
    kustomization = yaml.safe_load((OWN_MODEL / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["../cpu", "models-pvc.yaml"]
    (deployment,) = k8s_documents(K8S / "base" / "deployment.yaml")
    for overlay in (K8S / "overlays" / "cpu", OWN_MODEL):
        for entry in yaml.safe_load((overlay / "kustomization.yaml").read_text())["patches"]:
            (patch,) = k8s_documents(overlay / entry["path"])
            assert (patch["kind"], patch["metadata"]["name"]) == (deployment["kind"], deployment["metadata"]["name"])
            deployment = merge(deployment, patch)
    return deployment


def test_own_model_overlay_validates(tmp_path):
    """Validated only (no cluster here): ``kubernetes-validate --strict`` on the merged deployment and the claim."""
    (claim,) = k8s_documents(OWN_MODEL / "models-pvc.yaml")
    out = tmp_path / "own-model.yaml"
    out.write_text(yaml.safe_dump_all([own_model_deployment(), claim]))
    result = run(tool("kubernetes-validate"), "--strict", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed") + result.stderr.count("passed") == 2, result.stdout + result.stderr


def test_own_model_overlay_mounts_the_claim_read_only_where_detector_models_points():
    pod = own_model_deployment()["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["DETECTOR_DEVICE"] == "cpu", "built on the cpu overlay"
    assert "DETECTOR_MODEL_PATH" not in env, "one model setting, not two"
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    models = mounts["models"]
    assert models["readOnly"] is True
    assert "subPath" not in models, "a subPath mount would not see a new version written later"
    assert "tmp" in mounts, "the base's /tmp stays"
    for path in served_paths(env["DETECTOR_MODELS"]):
        assert path.is_relative_to(models["mountPath"]), f"{path} is not inside {models['mountPath']}"
    (claim,) = k8s_documents(OWN_MODEL / "models-pvc.yaml")
    assert volumes["models"]["persistentVolumeClaim"] == {"claimName": claim["metadata"]["name"], "readOnly": True}
    assert claim["spec"]["accessModes"] == ["ReadOnlyMany"]
    assert claim["spec"]["storageClassName"] == "", "bound to an existing volume holding the models, not provisioned"


def by_name(value):
    """Lists of named items as dicts keyed by name (kustomize and the hand merge may order them differently)."""
    if isinstance(value, dict):
        return {key: by_name(item) for key, item in value.items()}
    if isinstance(value, list) and value and all(isinstance(i, dict) and "name" in i for i in value):
        return {item["name"]: by_name(item) for item in value}
    if isinstance(value, list):
        return [by_name(item) for item in value]
    return value


@pytest.mark.skipif(
    shutil.which("kubectl") is None,
    reason="kubectl (its built-in kustomize) is not installed: the hand merge above stands in for it",
)
def test_kustomize_builds_the_own_model_overlay_as_the_hand_merge_does(tmp_path):
    """Where kubectl is at hand, its kustomize builds the overlay into what the tests above check."""
    result = run("kubectl", "kustomize", str(OWN_MODEL))
    assert result.returncode == 0, result.stderr
    documents = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    built = {(doc["kind"], doc["metadata"]["name"]): doc for doc in documents}
    assert by_name(built["Deployment", "detector"]) == by_name(own_model_deployment())
    assert ("PersistentVolumeClaim", "detector-models") in built
    out = tmp_path / "built.yaml"
    out.write_text(result.stdout)
    validated = run(tool("kubernetes-validate"), "--strict", str(out))
    assert validated.returncode == 0, validated.stdout + validated.stderr
