import json
import logging
import os
import pickle
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.build import build_model
from model.checkpoint import (
    DEFAULT_BUNDLE,
    METADATA_FILE,
    WEIGHTS_FILE,
    BundleExists,
    CheckpointError,
    CorruptModel,
    ModelMismatch,
    ModelNotFound,
    RefusedModel,
    architecture_name,
    file_sha256,
    import_checkpoint,
    load,
    load_bundle,
    load_model,
    save_bundle,
)
from tests.model.seed_recipe import SEED_MODULE

REPO = Path(__file__).resolve().parents[2]


def make_checkpoint(out_dir: Path, *extra: str) -> Path:
    """Run the seed recipe in its own process: the recipe's module never exists in this one."""
    subprocess.run([sys.executable, "-m", "tests.model.seed_recipe", str(out_dir), *extra], cwd=REPO, check=True)
    return out_dir


@pytest.fixture(scope="module")
def seed_checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("seed"))


def outputs(model, images):
    with torch.no_grad():
        return model.eval()(images)[0]


def test_seed_recipe_checkpoint_loads_where_its_module_does_not_exist(seed_checkpoint):
    assert SEED_MODULE not in sys.modules
    loaded = import_checkpoint(seed_checkpoint / "model.pt")
    assert SEED_MODULE not in sys.modules
    model = loaded.model
    assert not model.training and next(model.parameters()).dtype == torch.float32
    assert loaded.metadata.akconv_indexing == "xy"
    assert loaded.metadata.names == ["triangle", "star"]
    assert loaded.metadata.input_size == 64
    images = torch.load(seed_checkpoint / "input.pt")
    expected = torch.load(seed_checkpoint / "expected.pt")
    torch.testing.assert_close(outputs(model, images), expected, rtol=1e-4, atol=1e-3)


def test_plain_yolov10_checkpoint_loads(tmp_path):
    out = make_checkpoint(tmp_path, "--plain")
    model = load_model(out / "model.pt")
    images = torch.load(out / "input.pt")
    torch.testing.assert_close(outputs(model, images), torch.load(out / "expected.pt"), rtol=1e-4, atol=1e-3)


def test_checkpoint_with_code_outside_the_allow_list_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("pickled code ran",))

    path = tmp_path / "evil.pt"
    torch.save({"ema": Payload()}, path)
    with pytest.raises(RefusedModel, match="builtins.print, which is not on the allow-list"):
        import_checkpoint(path)


def test_checkpoint_without_a_model_is_refused(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, path)
    with pytest.raises(CheckpointError, match="holds no ultralytics model"):
        import_checkpoint(path)


def test_bundle_round_trip_never_unpickles(tmp_path, monkeypatch):
    model = build_model("yolov10n-akconv").eval()
    bundle = save_bundle(model, tmp_path / "bundle", name="yolov10n-akconv", version="1", input_size=64)
    metadata = json.loads((bundle / "model.json").read_text())
    assert metadata["akconv_indexing"] == "ij" and metadata["config"]["scale"] == "n"

    def no_unpickling(*args, **kwargs):
        raise AssertionError("a bundle load unpickled something")

    monkeypatch.setattr(pickle, "Unpickler", no_unpickling)
    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    monkeypatch.setattr(torch, "load", no_unpickling)
    loaded = load_bundle(bundle)
    images = torch.rand(2, 3, 64, 64)
    # the bundle stores fp16 weights: compare against the same model rounded to fp16
    rounded = model.half().float()
    torch.testing.assert_close(outputs(loaded.model, images), outputs(rounded, images), rtol=1e-4, atol=1e-3)


def test_convert_cli_writes_a_bundle(seed_checkpoint, tmp_path):
    subprocess.run(
        [sys.executable, "-m", "model", "convert", str(seed_checkpoint / "model.pt"), str(tmp_path / "b")],
        cwd=REPO,
        check=True,
    )
    loaded = load(tmp_path / "b")
    assert loaded.metadata.akconv_indexing == "xy"
    assert loaded.checksum == "verified"
    assert (loaded.metadata.name, loaded.metadata.version) == ("model-yolov10n-akconv", "2026-01-01")
    provenance = loaded.metadata.provenance
    assert provenance["source"] == {"file": "model.pt", "sha256": file_sha256(seed_checkpoint / "model.pt")}
    assert (provenance["data"], provenance["epochs"], provenance["date"]) == ("seed.yaml", 100, "2026-01-01T00:00:00")
    assert provenance["val_metrics"]["mAP50"] == 0.5 and provenance["project_version"] == "0.1.0"
    images = torch.load(seed_checkpoint / "input.pt")
    torch.testing.assert_close(
        outputs(loaded.model, images), torch.load(seed_checkpoint / "expected.pt"), rtol=1e-3, atol=1e-2
    )


def test_missing_or_foreign_paths_are_clear_errors(tmp_path):
    with pytest.raises(ModelNotFound, match="does not exist"):
        load(tmp_path / "nothing")
    with pytest.raises(ModelNotFound, match="is not a model bundle"):
        load(tmp_path)


def test_a_pt_naming_a_foreign_global_is_refused_before_unpickling(tmp_path, monkeypatch):
    path = tmp_path / "evil.pt"

    class Payload:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"ema": Payload()}, path)
    monkeypatch.setattr(pickle, "Unpickler", None)  # the scan alone must refuse it
    with pytest.raises(RefusedModel, match=r"refers to posix.system, which is not on the allow-list"):
        import_checkpoint(path)


def test_a_pt_without_a_name_is_named_after_its_file_and_architecture(seed_checkpoint, tmp_path):
    best = tmp_path / "best.pt"
    shutil.copy(seed_checkpoint / "model.pt", best)
    assert import_checkpoint(best).metadata.name == "best-yolov10n-akconv"
    named = import_checkpoint(best, name="shapes", version="7")
    assert (named.metadata.name, named.metadata.version) == ("shapes", "7")


@pytest.fixture
def bundle(tmp_path):
    """A copy of the bundled model."""
    copy = tmp_path / "bundle"
    shutil.copytree(DEFAULT_BUNDLE, copy)
    return copy


def test_the_bundled_model_is_verified(bundle):
    assert load(bundle).checksum == "verified"


def test_a_flipped_byte_in_the_weights_is_refused(bundle):
    weights = bundle / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(CorruptModel, match="does not match .* recorded in model.json") as refused:
        load(bundle)
    assert str(weights) in str(refused.value)


def test_truncated_weights_are_refused_naming_the_file(bundle):
    weights = bundle / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CorruptModel, match=str(weights)):
        load(bundle)
    metadata = json.loads((bundle / METADATA_FILE).read_text())
    del metadata["weights_sha256"]
    metadata["format_version"] = 1  # nothing recorded to compare: the reader itself must fail cleanly
    (bundle / METADATA_FILE).write_text(json.dumps(metadata))
    with pytest.raises(CorruptModel, match=rf"{weights} could not be read"):
        load(bundle)


def test_a_broken_model_json_is_refused_naming_the_file(bundle):
    (bundle / METADATA_FILE).write_text('{"name": "x", ')
    with pytest.raises(CorruptModel, match=rf"{bundle / METADATA_FILE} is not valid JSON"):
        load(bundle)


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("name", "../../etc", "model name"),
        ("input_size", 100, "input_size 100"),
        ("names", ["triangle"], "1 class names for a config with nc=2"),
        ("weights_sha256", "abc", "weights_sha256"),
        ("surprise", 1, "unknown key 'surprise'"),
        ("input_size", "384", "wrong type"),
    ],
)
def test_metadata_of_the_wrong_shape_is_refused(bundle, key, value, words):
    metadata = json.loads((bundle / METADATA_FILE).read_text())
    metadata[key] = value
    (bundle / METADATA_FILE).write_text(json.dumps(metadata))
    with pytest.raises(CheckpointError, match=words):
        load(bundle)


def test_weights_of_another_class_count_are_a_clear_mismatch(tmp_path):
    three = save_bundle(build_model("yolov10n-akconv", nc=3), tmp_path / "three", name="t", version="1", input_size=64)
    metadata = json.loads((three / METADATA_FILE).read_text())
    metadata["config"]["nc"], metadata["names"] = 2, ["a", "b"]
    (three / METADATA_FILE).write_text(json.dumps(metadata))
    with pytest.raises(ModelMismatch, match="weights are for 3 classes but the config says nc=2"):
        load(three)


def test_a_format_1_bundle_loads_with_a_warning(bundle, caplog):
    metadata = json.loads((bundle / METADATA_FILE).read_text())
    del metadata["weights_sha256"]
    metadata["format_version"] = 1
    (bundle / METADATA_FILE).write_text(json.dumps(metadata))
    with caplog.at_level(logging.WARNING, logger="model.checkpoint"):
        assert load(bundle).checksum == "not recorded"
    assert "integrity is not verified" in caplog.text


def test_a_model_that_recorded_a_near_zero_map_loads_with_a_warning(bundle, caplog):
    metadata = json.loads((bundle / METADATA_FILE).read_text())
    metadata["provenance"]["val_metrics"]["mAP50"] = 0.0
    (bundle / METADATA_FILE).write_text(json.dumps(metadata))
    with caplog.at_level(logging.WARNING, logger="model.checkpoint"):
        load(bundle)
    assert "recorded a validation mAP50 of 0.000 (below 0.05)" in caplog.text


def test_bundles_are_written_atomically_readable_by_all_and_never_over_another(tmp_path):
    model = build_model("yolov10n-akconv")
    out = tmp_path / "out"
    previous = os.umask(0o077)  # a strict umask must not leak into the bundle's modes
    try:
        save_bundle(model, out, name="a", version="1", input_size=64)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o644}
    with pytest.raises(BundleExists, match="--force"):
        save_bundle(model, out, name="b", version="1", input_size=64)
    assert load(out).metadata.name == "a"
    save_bundle(model, out, name="b", version="1", input_size=64, force=True)
    assert load(out).metadata.name == "b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "no temporary directory is left behind"
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("mine")
    with pytest.raises(BundleExists, match="is not a model bundle"):
        save_bundle(model, precious, name="c", version="1", input_size=64, force=True)
    assert (precious / "notes.txt").read_text() == "mine"


def run_model_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "model", *args], cwd=REPO, capture_output=True, text=True)


def test_convert_refuses_an_existing_bundle_with_one_line(seed_checkpoint, tmp_path):
    out = tmp_path / "b"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = run_model_cli("convert", str(seed_checkpoint / "model.pt"), str(out), "--name", "n", "--version", "v")
    assert result.returncode == BundleExists.exit_status
    assert result.stderr.strip().count("\n") == 0 and "already exists" in result.stderr


def test_inspect_reports_a_bundle_and_refuses_a_damaged_one(bundle):
    result = run_model_cli("inspect", str(bundle), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["name"], report["classes"], report["input_size"]) == ("yolov10n-akconv", ["triangle", "star"], 384)
    assert (report["akconv_indexing"], report["parameters"], report["checksum"]) == ("ij", 2_695_064, "verified")
    assert report["provenance"]["val_metrics"]["mAP50"] > 0.9
    text = run_model_cli("inspect", str(bundle)).stdout
    assert "checksum: verified" in text and "parameters: 2695064" in text
    weights = bundle / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-10])
    damaged = run_model_cli("inspect", str(bundle))
    assert damaged.returncode == CorruptModel.exit_status
    assert damaged.stderr.strip().count("\n") == 0 and "Traceback" not in damaged.stderr
    assert str(weights) in damaged.stderr


@pytest.mark.parametrize(
    ("yaml_file", "scale", "backbone_layer", "name"),
    [
        ("yolov10nAKConv.yaml", "s", "AKConv", "yolov10s-akconv"),  # the seed recipe's yaml, trained at scale s
        ("yolov10n.yaml", "n", "Conv", "yolov10n"),
        (None, "n", "AKConv", "yolov10n-akconv"),
    ],
)
def test_architecture_names_come_from_the_config_not_the_yaml_file_name(yaml_file, scale, backbone_layer, name):
    config = {"scale": scale, "backbone": [[-1, 1, backbone_layer, [64, 3, 2]]], "head": []}
    if yaml_file:
        config["yaml_file"] = yaml_file
    assert architecture_name(config) == name
