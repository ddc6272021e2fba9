import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.build import build_model
from model.checkpoint import CheckpointError, import_checkpoint, load, load_bundle, load_model, save_bundle
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
    with pytest.raises(CheckpointError, match="builtins.print, which is not on the allow-list"):
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
    assert loaded.metadata.provenance["imported_from"] == "model.pt"
    images = torch.load(seed_checkpoint / "input.pt")
    torch.testing.assert_close(
        outputs(loaded.model, images), torch.load(seed_checkpoint / "expected.pt"), rtol=1e-3, atol=1e-2
    )


def test_missing_or_foreign_paths_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load(tmp_path / "nothing")
    with pytest.raises(CheckpointError, match="is not a model bundle"):
        load(tmp_path)
