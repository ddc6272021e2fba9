import datetime as dt

import pytest
import torch

from model.__main__ import main
from model.checkpoint import BundleExists, load
from model.synthetic import write_dataset
from model.train import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    data_yaml = write_dataset(root / "data", train=8, val=4, size=64)
    bundle = train(
        "yolov10n-akconv", data_yaml, root / "bundle", imgsz=64, epochs=1, batch=4, workers=0,
        project=root / "runs", run_name="tiny",
    )  # fmt: skip
    return root, data_yaml, bundle


def test_one_cpu_epoch_on_a_tiny_data_set_writes_a_loadable_bundle(tiny):
    root, data_yaml, bundle = tiny
    loaded = load(bundle)
    assert loaded.metadata.akconv_indexing == "ij"
    assert loaded.metadata.input_size == 64
    assert loaded.metadata.names == ["triangle", "star"]
    assert (loaded.metadata.name, loaded.metadata.version) == ("tiny", dt.date.today().isoformat())
    provenance = loaded.metadata.provenance
    assert provenance["epochs"] == 1 and "mAP50" in provenance["val_metrics"]
    assert provenance["source"] == {"config": "yolov10n-akconv.yaml", "initial_weights": None}
    assert provenance["data"] == str(data_yaml) and provenance["project_version"] == "0.1.0"
    assert (root / "runs" / "tiny" / "weights" / "last.pt").exists(), "training is resumable from last.pt"
    with torch.no_grad():
        assert loaded.model(torch.rand(1, 3, 64, 64))[0].shape[0] == 1


def test_a_run_can_start_from_a_bundle(tiny):
    """With a zero learning rate (set from the command line) the weights stay those of the starting bundle."""
    root, data_yaml, bundle = tiny
    tuned = root / "tuned"
    main([
        "train", "--data", str(data_yaml), "--out", str(tuned), "--imgsz", "64", "--epochs", "1", "--batch", "4",
        "--workers", "0", "--project", str(root / "runs"), "--weights", str(bundle),
        "--set", "lr0=0.0", "--set", "optimizer=SGD",
    ])  # fmt: skip
    metadata = load(tuned).metadata
    overrides = metadata.provenance["training"]["overrides"]
    assert (overrides["lr0"], overrides["optimizer"]) == (0.0, "SGD")
    assert metadata.name == "tuned", "named after the run, never after the bundled model"
    start, after = load(bundle).model.state_dict(), load(tuned).model.state_dict()
    assert metadata.provenance["source"]["initial_weights"]["file"] == str(bundle)
    for key in ("model.1.p_conv.weight", "model.1.conv.0.weight", "model.9.cv2.conv.weight"):
        torch.testing.assert_close(after[key], start[key])


def test_an_existing_bundle_is_refused_before_training_starts(tiny):
    root, data_yaml, bundle = tiny
    with pytest.raises(BundleExists, match="--force"):
        train("yolov10n-akconv", data_yaml, bundle, imgsz=64, epochs=1, project=root / "runs", run_name="again")
    assert not (root / "runs" / "again").exists(), "refused before ultralytics made a run"


def test_a_time_budget_never_raises_the_epoch_count(tiny):
    """Ultralytics re-fits epochs to a --time budget after each epoch (an hour would allow hundreds here)."""
    root, data_yaml, _ = tiny
    bundle = train(
        "yolov10n-akconv", data_yaml, root / "budget", imgsz=64, epochs=1, batch=4, workers=0,
        project=root / "runs", time=1.0,
    )  # fmt: skip
    assert load(bundle).metadata.provenance["epochs"] == 1


def test_help_shows_the_defaults(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # one option per line
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    shown = capsys.readouterr().out
    assert "(default: 640)" in shown and "(default: 100)" in shown and "(default: yolov10n-akconv)" in shown
