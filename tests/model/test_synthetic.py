import numpy as np
import pytest
import yaml
from PIL import Image, ImageDraw

from model.synthetic import (
    ASPECTS,
    CLASS_NAMES,
    MIN_OBJECT_PX,
    SPLITS,
    canvas_shape,
    render,
    sample_canvas,
    scene,
    write_dataset,
)


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


@pytest.mark.parametrize("aspect", [1.0, 16 / 9, 3 / 4])
@pytest.mark.parametrize("seed", range(12))
def test_boxes_are_the_tight_boxes_of_what_is_drawn(seed, aspect):
    size = 256
    _, boxes = render(seed, size, aspect)
    objects = [s for s in scene(seed, size, aspect) if s.class_id is not None]
    assert len(objects) == len(boxes)
    for shape, box in zip(objects, boxes, strict=True):
        mask = Image.new("L", canvas_shape(size, aspect))
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


@pytest.mark.parametrize(("size", "aspect", "shape"), [(1280, 16 / 9, (720, 1280)), (640, 3 / 4, (640, 480))])
def test_non_square_canvas_has_the_longer_side_at_size(size, aspect, shape):
    image, boxes = render(4, size, aspect)
    assert image.shape == (*shape, 3)
    assert np.all(boxes[:, [1, 3]] <= shape[1]) and np.all(boxes[:, [2, 4]] <= shape[0])


@pytest.mark.parametrize("size", [640, 1280])
def test_a_scene_is_the_same_at_any_size(size):
    """Rendered larger, a sample is the same scene drawn finer: the same objects, boxes scaled with the side."""
    factor = size / 320
    for seed in range(SPLITS["test"], SPLITS["test"] + 8):
        small, small_boxes = render(seed, 320)
        large, large_boxes = render(seed, size)
        assert large.shape == (size, size, 3)
        np.testing.assert_array_equal(large_boxes[:, 0], small_boxes[:, 0])
        np.testing.assert_allclose(large_boxes[:, 1:], small_boxes[:, 1:] * factor, atol=1e-3 * size)
        shrunk = np.asarray(Image.fromarray(large).resize((320, 320), Image.BILINEAR), dtype=np.float32)
        assert np.abs(shrunk - small).mean() < 12, "the same picture, not another one"


def test_objects_are_sized_by_the_longer_side():
    boxes = np.concatenate([render(seed, 1280)[1] for seed in range(40)])
    sides = np.maximum(boxes[:, 3] - boxes[:, 1], boxes[:, 4] - boxes[:, 2])
    assert sides.min() >= MIN_OBJECT_PX * 1280 / 320 * 0.5, "no object shrinks to a few pixels at the model's input"


def test_multi_scale_canvases_span_the_range_and_every_aspect():
    canvases = [sample_canvas(seed, (256, 1280)) for seed in range(400)]
    assert canvases == [sample_canvas(seed, (256, 1280)) for seed in range(400)], "a function of the seed"
    sizes = np.array([size for size, _ in canvases])
    assert 256 <= sizes.min() < 300 and 1150 < sizes.max() <= 1280
    assert 0.35 < np.mean(sizes < 572) < 0.65, "log-uniform: about half below the geometric mean"
    assert {aspect for _, aspect in canvases} == set(ASPECTS)


def test_write_dataset_of_several_sizes(tmp_path):
    data_yaml = write_dataset(tmp_path, train=6, val=2, size=(64, 160), first_train_seed=100)
    assert yaml.safe_load(data_yaml.read_text())["val"] == "images/val"
    train_images = sorted((tmp_path / "images" / "train").iterdir())
    assert [p.name for p in train_images] == [f"{s:07d}.png" for s in range(100, 106)]
    for image_path in train_images:
        size, aspect = sample_canvas(int(image_path.stem), (64, 160))
        pixels, boxes = render(int(image_path.stem), size, aspect)
        assert Image.open(image_path).size == canvas_shape(size, aspect)
        rows = np.loadtxt(tmp_path / "labels" / "train" / f"{image_path.stem}.txt", ndmin=2).reshape(-1, 5)
        height, width = pixels.shape[:2]
        centres = (boxes[:, 1:3] + boxes[:, 3:5]) / 2 / [width, height]
        np.testing.assert_allclose(rows[:, 1:3], centres, atol=1e-5)


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
