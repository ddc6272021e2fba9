import numpy as np
import pytest
import yaml
from PIL import Image, ImageDraw

from model.synthetic import CLASS_NAMES, MIN_OBJECT_PX, SPLITS, render, scene, write_dataset


def test_same_seed_same_sample_and_seeds_differ():
    image, boxes = render(7, 128)
    again_image, again_boxes = render(7, 128)
    assert np.array_equal(image, again_image) and np.array_equal(boxes, again_boxes)
    other, _ = render(8, 128)
    assert not np.array_equal(image, other)


@pytest.mark.parametrize("size", [96, 320])
def test_shapes_and_ranges(size):
    image, boxes = render(3, size)
    assert image.shape == (size, size, 3) and image.dtype == np.uint8
    assert boxes.dtype == np.float32 and boxes.shape[1] == 5
    assert set(boxes[:, 0].tolist()) <= set(range(len(CLASS_NAMES)))
    assert np.all(boxes[:, 1:] >= 0) and np.all(boxes[:, 1:] <= size)
    assert np.all(boxes[:, 3] > boxes[:, 1]) and np.all(boxes[:, 4] > boxes[:, 2])


@pytest.mark.parametrize("seed", range(12))
def test_boxes_are_the_tight_boxes_of_what_is_drawn(seed):
    size = 256
    _, boxes = render(seed, size)
    objects = [s for s in scene(seed, size) if s.class_id is not None]
    assert len(objects) == len(boxes)
    for shape, box in zip(objects, boxes, strict=True):
        mask = Image.new("L", (size, size))
        ImageDraw.Draw(mask).polygon([tuple(p) for p in shape.vertices.tolist()], fill=1)
        ys, xs = np.nonzero(np.asarray(mask))
        assert len(xs), "the object is visible"
        drawn = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float32)
        assert shape.class_id == box[0]
        np.testing.assert_allclose(drawn, box[1:], atol=1.5)


def test_data_set_is_varied():
    boxes = np.concatenate([render(seed, 320)[1] for seed in range(40)])
    sides = np.maximum(boxes[:, 3] - boxes[:, 1], boxes[:, 4] - boxes[:, 2])
    assert sides.min() < 2 * MIN_OBJECT_PX and sides.max() > 100
    assert 0.3 < boxes[:, 0].mean() < 0.7, "both classes are common"
    counts = [len(render(seed, 96)[1]) for seed in range(20)]
    assert max(counts) >= 4


def test_write_dataset(tmp_path):
    data_yaml = write_dataset(tmp_path, train=3, val=2, size=64)
    data = yaml.safe_load(data_yaml.read_text())
    assert data["names"] == {0: "triangle", 1: "star"}
    train_images = sorted((tmp_path / "images" / "train").iterdir())
    assert [p.name for p in train_images] == [f"{s:07d}.png" for s in range(3)]
    val_labels = sorted((tmp_path / "labels" / "val").iterdir())
    assert val_labels[0].name == f"{SPLITS['val']:07d}.txt"
    rows = [line.split() for line in (tmp_path / "labels" / "train" / "0000000.txt").read_text().splitlines()]
    assert len(rows) == len(render(0, 64)[1])
    assert all(0 <= float(v) <= 1 for row in rows for v in row[1:])
