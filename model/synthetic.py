"""A deterministic two-class detection data set: triangles and five-pointed stars on real photos.

No data set can be downloaded here, so the project makes its own. Each sample is a function of its seed alone.
What makes it take real learning:

- two shape classes (``triangle``, ``star``) drawn with the same colour distribution, so colour never separates
  them; both are rotated, stretched (aspect ratio 0.6–1.6) and sized from 3.75% to half of the image's longer side;
- distractors that are not objects (discs, ellipses, rectangles, strokes) drawn with the same colours;
- several objects per image, partial occlusion (by later objects and distractors) and truncation at the borders;
- backgrounds cropped from the photos and textures that scikit-image ships, or procedural noise;
- Gaussian blur, sensor noise, brightness/contrast jitter and JPEG artefacts.

A box is the tight box of the object's full polygon, clipped to the image; an object is kept only if at least
half of its box is inside the image and at most 35% of its box is covered by what is drawn after it.

A sample is one scene at any resolution, as a photo is: object sizes, outline widths and blur are set for a longer
side of :data:`REFERENCE_SIDE` px and scale with it, so ``render(seed, 1280)`` is ``render(seed, 320)`` drawn four
times finer (same layout and colours; sensor noise and JPEG artefacts stay per pixel). A model with a fixed input
size sees every rendering of a scene at about the same scale. At 320 px, square, the samples are those the bundled
model was first trained on. ``aspect`` (width / height) renders the scene on a non-square canvas whose longer side
is ``size``, as the service's letterbox fits the longer side to the model's input.

Seed ranges (disjoint): training 0..N-1, validation 1_000_000.., held-out tests 2_000_000.. (see ``SPLITS``).

CLI: ``python -m model.synthetic OUT_DIR --train N --val M [--size 320 | --sizes 256 1280]`` writes an ultralytics
data set: square images of one size, or images of several sizes and aspect ratios (:func:`sample_canvas`).
"""

from __future__ import annotations

import argparse
import functools
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageDraw, ImageFilter

CLASS_NAMES = ("triangle", "star")
SPLITS = {"train": 0, "val": 1_000_000, "test": 2_000_000}  # first seed of each split
REFERENCE_SIDE = 320  # px: the longer side at which the sizes below are given; they scale with it
MIN_OBJECT_PX = 12  # smallest object's longer side at REFERENCE_SIDE
OUTLINE_PX = 2  # outline width at REFERENCE_SIDE
MAX_OBJECT_FRACTION = 0.5  # of the image's longer side
ASPECTS = (1.0, 4 / 3, 3 / 4, 16 / 9, 9 / 16)  # width / height of multi-scale data sets' images
MAX_COVERED_FRACTION = 0.35
MIN_INSIDE_FRACTION = 0.5
_PHOTOS = (
    "astronaut", "brick", "camera", "cell", "chelsea", "coffee", "coins", "grass", "gravel", "hubble_deep_field",
    "immunohistochemistry", "moon", "retina", "rocket", "text", "page", "clock",
)  # fmt: skip


@dataclass(frozen=True)
class Shape:
    """A filled polygon; ``class_id`` is None for a distractor. ``vertices`` (k, 2) are (x, y) pixels."""

    vertices: np.ndarray
    class_id: int | None
    fill: tuple[int, int, int]
    outline: tuple[int, int, int] | None

    def box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """Tight (x1, y1, x2, y2) of the polygon's part inside a ``width`` × ``height`` image; zeros when none is."""
        visible = _clip_to_rectangle(self.vertices, width, height)
        if not len(visible):
            return 0.0, 0.0, 0.0, 0.0
        visible = visible.clip(0, (width, height))  # a crossing computed at the border can land 1e-16 outside it
        (x1, y1), (x2, y2) = visible.min(axis=0), visible.max(axis=0)
        return float(x1), float(y1), float(x2), float(y2)


def _clip_to_rectangle(vertices: np.ndarray, width: int, height: int) -> np.ndarray:
    """Sutherland-Hodgman clipping of a polygon (k, 2) to [0, width] × [0, height]."""
    polygon = [tuple(v) for v in vertices.tolist()]
    for axis, bound, keep_above in ((0, 0, True), (0, width, False), (1, 0, True), (1, height, False)):

        def inside(point, axis=axis, bound=bound, keep_above=keep_above):
            return point[axis] >= bound if keep_above else point[axis] <= bound

        def crossing(a, b, axis=axis, bound=bound):
            t = (bound - a[axis]) / (b[axis] - a[axis])
            return a[0] + t * (b[0] - a[0]), a[1] + t * (b[1] - a[1])

        clipped = []
        for previous, current in zip(polygon[-1:] + polygon[:-1], polygon, strict=True):
            if inside(current):
                if not inside(previous):
                    clipped.append(crossing(previous, current))
                clipped.append(current)
            elif inside(previous):
                clipped.append(crossing(previous, current))
        polygon = clipped
        if not polygon:
            break
    return np.asarray(polygon, dtype=float).reshape(-1, 2)


@functools.cache
def _photo(name: str) -> np.ndarray:
    import skimage.data

    image = np.asarray(getattr(skimage.data, name)())
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return np.ascontiguousarray(image[..., :3].astype(np.uint8))


def _background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    kind = rng.random()
    if kind < 0.75:
        photo = _photo(_PHOTOS[rng.integers(len(_PHOTOS))])
        photo_height, photo_width = photo.shape[:2]
        crop = rng.uniform(0.35, 1.0) * min(photo_height, photo_width)  # longer side of a crop of the image's aspect
        ratio = min(width, height) / max(width, height)
        crop_w, crop_h = (int(crop), int(crop * ratio)) if width >= height else (int(crop * ratio), int(crop))
        top, left = rng.integers(0, photo_height - crop_h + 1), rng.integers(0, photo_width - crop_w + 1)
        patch = photo[top : top + crop_h, left : left + crop_w]
        if rng.random() < 0.5:
            patch = patch[:, ::-1]
        image = Image.fromarray(np.ascontiguousarray(patch)).resize((width, height), Image.BILINEAR)
        if rng.random() < 0.3:
            invert = rng.random() < 0.5
            image = Image.fromarray(255 - np.asarray(image)) if invert else image.convert("L").convert("RGB")
        return image
    cells = int(rng.integers(2, 12))  # smooth random field: low-resolution noise, upsampled
    noise = rng.uniform(0, 255, (cells, cells, 3)).astype(np.uint8)
    return Image.fromarray(noise).resize((width, height), Image.BICUBIC)


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, 3))


def _polygon(rng: np.random.Generator, kind: str) -> np.ndarray:
    """Unit-size outline (k, 2) centred at 0, extent about [-1, 1]."""
    if kind == "triangle":
        angles = np.array([90, 210, 330]) + rng.uniform(-12, 12, 3)
        return np.stack([np.cos(np.radians(angles)), -np.sin(np.radians(angles))], axis=1)
    if kind == "star":
        inner = rng.uniform(0.38, 0.5)
        angles = np.radians(90 + 36 * np.arange(10))
        radii = np.where(np.arange(10) % 2 == 0, 1.0, inner)
        return np.stack([radii * np.cos(angles), -radii * np.sin(angles)], axis=1)
    if kind == "rectangle":
        return np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=float)
    if kind == "stroke":
        half = rng.uniform(0.04, 0.12)
        return np.array([[-1, -half], [1, -half], [1, half], [-1, half]], dtype=float)
    angles = np.linspace(0, 2 * math.pi, 48, endpoint=False)  # disc or ellipse
    return np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _place(rng: np.random.Generator, kind: str, width: int, height: int) -> np.ndarray:
    """Scale, stretch, rotate and translate a unit outline; the object's longer side is 3.75% .. 50% of the image's
    longer side (12 .. 160 px at 320 px)."""
    size = max(width, height)
    outline = _polygon(rng, kind)
    aspect = rng.uniform(0.6, 1.6) if kind != "stroke" else 1.0
    outline = outline * np.array([aspect, 1 / aspect]) ** 0.5
    angle = rng.uniform(0, 2 * math.pi)
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    outline = outline @ rotation.T
    extent = outline.max(axis=0) - outline.min(axis=0)
    smallest = MIN_OBJECT_PX * size / REFERENCE_SIDE
    longest = math.exp(rng.uniform(math.log(smallest), math.log(MAX_OBJECT_FRACTION * size)))
    outline = outline * (longest / extent.max())
    centre = rng.uniform(-0.15 * longest, np.array([width, height]) + 0.15 * longest, 2)
    return outline + centre


def _area(box: tuple[float, float, float, float]) -> float:
    return max(box[2] - box[0], 0.0) * max(box[3] - box[1], 0.0)


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    return _area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))


def canvas_shape(size: int, aspect: float = 1.0) -> tuple[int, int]:
    """(width, height), pixels, of a canvas whose longer side is ``size`` and whose width / height is ``aspect``."""
    return (size, max(round(size / aspect), 1)) if aspect >= 1 else (max(round(size * aspect), 1), size)


def scene(seed: int, size: int = 640, aspect: float = 1.0) -> list[Shape]:
    """The shapes of sample ``seed`` in drawing order (objects and distractors interleaved), on a canvas of
    :func:`canvas_shape` ``(size, aspect)``."""
    width, height = canvas_shape(size, aspect)
    rng = np.random.default_rng(seed)
    shapes: list[Shape] = []
    wanted_objects, wanted_distractors = int(rng.integers(1, 9)), int(rng.integers(0, 6))
    kinds = ["object"] * wanted_objects + ["distractor"] * wanted_distractors
    rng.shuffle(kinds)
    for kind in kinds:
        for _attempt in range(20):
            if kind == "object":
                class_id = int(rng.integers(len(CLASS_NAMES)))
                vertices = _place(rng, CLASS_NAMES[class_id], width, height)
            else:
                class_id = None
                vertices = _place(rng, str(rng.choice(["disc", "rectangle", "stroke"])), width, height)
            candidate = Shape(vertices, class_id, _colour(rng), _colour(rng) if rng.random() < 0.4 else None)
            box = candidate.box(width, height)
            full = vertices.min(axis=0).tolist() + vertices.max(axis=0).tolist()
            if class_id is not None and _area(box) < MIN_INSIDE_FRACTION * _area(tuple(full)):
                continue  # mostly outside the image
            covers_too_much = any(
                s.class_id is not None
                and _overlap(s.box(width, height), box) > MAX_COVERED_FRACTION * _area(s.box(width, height))
                for s in shapes
            )
            if not covers_too_much:
                shapes.append(candidate)
                break
    return shapes


def draw_shape(canvas: ImageDraw.ImageDraw, shape: Shape, outline_width: int = OUTLINE_PX) -> None:
    points = [tuple(p) for p in shape.vertices.tolist()]
    canvas.polygon(points, fill=shape.fill, outline=shape.outline, width=outline_width if shape.outline else 0)


def render(seed: int, size: int = 640, aspect: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Render sample ``seed`` with a longer side of ``size`` px and a width / height of ``aspect``.

    Returns:
        image: RGB uint8 array (height, width, 3), (width, height) = :func:`canvas_shape` ``(size, aspect)``.
        boxes: float32 array (n, 5) of ``[class_id, x1, y1, x2, y2]`` in pixels.
    """
    width, height = canvas_shape(size, aspect)
    detail = size / REFERENCE_SIDE  # drawn sizes scale with the image, so the scene looks the same at any size
    rng = np.random.default_rng((seed, 1))  # appearance stream, independent of the layout stream
    image = _background(rng, width, height)
    shapes = scene(seed, size, aspect)
    canvas = ImageDraw.Draw(image)
    for shape in shapes:
        draw_shape(canvas, shape, max(round(OUTLINE_PX * detail), 1))

    if rng.random() < 0.7:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.2, 1.2) * detail))
    pixels = np.asarray(image).astype(np.float32)
    pixels = pixels * rng.uniform(0.7, 1.3) + rng.uniform(-30, 30)  # contrast, brightness
    pixels += rng.normal(0, rng.uniform(0, 8), pixels.shape)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=int(rng.integers(35, 96)))
    image = np.asarray(Image.open(buffer).convert("RGB"))

    boxes = [(s.class_id, *s.box(width, height)) for s in shapes if s.class_id is not None]
    return image, np.asarray(boxes, dtype=np.float32).reshape(-1, 5)


def _xywh(x1: float, y1: float, x2: float, y2: float) -> tuple[float, float, float, float]:
    return (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1


def sample_canvas(seed: int, sizes: tuple[int, int]) -> tuple[int, float]:
    """The (size, aspect) of sample ``seed`` in a multi-scale data set: the longer side log-uniform in ``sizes``
    (min, max), pixels; the aspect one of :data:`ASPECTS`. A function of the seed alone."""
    rng = np.random.default_rng((seed, 2))  # its own stream: the scene and its appearance stay those of the seed
    size = round(math.exp(rng.uniform(math.log(sizes[0]), math.log(sizes[1]))))
    return size, float(ASPECTS[rng.integers(len(ASPECTS))])


def write_split(out_dir: Path, split: str, seeds: range, size: int | tuple[int, int]) -> None:
    """Render ``seeds`` as PNG images and YOLO labels; ``size``: a square's side, or (min, max) for
    :func:`sample_canvas`."""
    images, labels = out_dir / "images" / split, out_dir / "labels" / split
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        side, aspect = (size, 1.0) if isinstance(size, int) else sample_canvas(seed, size)
        image, boxes = render(seed, side, aspect)
        height, width = image.shape[:2]
        Image.fromarray(image).save(images / f"{seed:07d}.png", compress_level=1)  # noisy images barely compress
        scale = (width, height, width, height)
        rows = [
            f"{int(c)} " + " ".join(f"{v / s:.6f}" for v, s in zip(_xywh(*box), scale, strict=True))
            for c, *box in boxes
        ]
        (labels / f"{seed:07d}.txt").write_text("\n".join(rows) + ("\n" if rows else ""))


def write_dataset(
    out_dir: Path, train: int, val: int, size: int | tuple[int, int] = 640, first_train_seed: int = SPLITS["train"]
) -> Path:
    """Write an ultralytics data set (PNG images, YOLO labels, ``data.yaml``); returns the yaml's path.

    ``size``: every image a square of that side, or (min, max) for images of several sizes and aspect ratios
    (:func:`sample_canvas`). Training seeds start at ``first_train_seed`` (to add images a model has not seen);
    validation seeds at the split's first seed.
    """
    out_dir = Path(out_dir).resolve()
    write_split(out_dir, "train", range(first_train_seed, first_train_seed + train), size)
    write_split(out_dir, "val", range(SPLITS["val"], SPLITS["val"] + val), size)
    data = {"path": str(out_dir), "train": "images/train", "val": "images/val", "names": dict(enumerate(CLASS_NAMES))}
    data_yaml = out_dir / "data.yaml"
    data_yaml.write_text(yaml.safe_dump(data, sort_keys=False))
    return data_yaml


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--train", type=int, required=True, help="number of training images")
    parser.add_argument("--val", type=int, required=True, help="number of validation images")
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--size", type=int, default=640, help="square images of this side, pixels (default: 640)")
    sizes.add_argument(
        "--sizes", type=int, nargs=2, metavar=("MIN", "MAX"),
        help="images of several sizes and aspect ratios: the longer side log-uniform in MIN..MAX pixels",
    )  # fmt: skip
    parser.add_argument(
        "--first-train-seed", type=int, default=SPLITS["train"], help="first training seed (default: 0)"
    )
    args = parser.parse_args(argv)
    size = tuple(args.sizes) if args.sizes else args.size
    print(write_dataset(args.out_dir, args.train, args.val, size, args.first_train_seed))


if __name__ == "__main__":
    main()
