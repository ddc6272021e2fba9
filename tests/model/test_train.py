import pytest
import torch

from model.checkpoint import load
from model.synthetic import write_dataset
from model.train import train


@pytest.mark.slow
def test_one_cpu_epoch_on_a_tiny_data_set_writes_a_loadable_bundle(tmp_path):
    data_yaml = write_dataset(tmp_path / "data", train=8, val=4, size=64)
    bundle = train(
        "yolov10n-akconv",
        data_yaml,
        tmp_path / "bundle",
        imgsz=64,
        epochs=1,
        batch=4,
        workers=0,
        project=tmp_path / "runs",
        name="tiny",
    )
    loaded = load(bundle)
    assert loaded.metadata.akconv_indexing == "ij"
    assert loaded.metadata.input_size == 64
    assert loaded.metadata.names == ["triangle", "star"]
    provenance = loaded.metadata.provenance
    assert provenance["epochs"] == 1 and "metrics/mAP50(B)" in provenance["val_metrics"]
    assert (tmp_path / "runs" / "tiny" / "weights" / "last.pt").exists(), "training is resumable from last.pt"
    with torch.no_grad():
        assert loaded.model(torch.rand(1, 3, 64, 64))[0].shape[0] == 1
