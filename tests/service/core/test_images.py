import numpy as np
import pytest
import torch
from PIL import Image

from model.letterbox import letterbox_shape
from model.synthetic import render
from service.core import images
from service.core.errors import TooManyPixels, UndecodableImage, UnsupportedMediaType
from service.core.images import Decoded, decode, letterbox, unletterbox_boxes
from tests.image_files import encode

LIMIT = 10_000_000


def as_decoded(pixels: np.ndarray) -> Decoded:
    return Decoded(pixels, pixels.shape[1], pixels.shape[0])


def gradient(width=40, height=30) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.uint8)
    pixels = np.stack(
        [np.tile(x, (height, 1)), np.full((height, width), 80, np.uint8), np.zeros((height, width), np.uint8)], 2
    )
    return Image.fromarray(pixels)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "TIFF"])
def test_supported_formats_decode_to_rgb(fmt):
    pixels = decode(encode(gradient(), fmt), LIMIT).pixels
    assert pixels.shape == (30, 40, 3) and pixels.dtype == np.uint8
    assert pixels[:, -1, 0].mean() > 200 and pixels[:, 0, 0].mean() < 50


@pytest.mark.parametrize(
    "image",
    [
        gradient().convert("L"),
        gradient().convert("RGBA"),
        gradient().convert("P"),
        gradient().convert("CMYK"),
        gradient().convert("LA"),
    ],
    ids=["grayscale", "rgba", "palette", "cmyk", "gray-alpha"],
)
def test_modes_are_converted_to_rgb(image):
    fmt = "JPEG" if image.mode == "CMYK" else "PNG" if image.mode != "CMYK" else "TIFF"
    pixels = decode(encode(image, fmt), LIMIT).pixels
    assert pixels.shape == (30, 40, 3)


def test_sixteen_bit_grayscale_is_rescaled_not_clipped():
    values = np.tile(np.linspace(0, 65535, 40).astype(np.uint16), (30, 1))
    pixels = decode(encode(Image.fromarray(values), "PNG"), LIMIT).pixels
    assert pixels[0, 0, 0] == 0 and pixels[0, -1, 0] == 255 and 100 < pixels[0, 20, 0] < 160


def test_exif_orientation_is_applied():
    image = gradient(40, 30)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    pixels = decode(encode(image, "JPEG", exif=exif), LIMIT).pixels
    assert pixels.shape == (40, 30, 3)
    assert pixels[-1, :, 0].mean() > 200, "the bright right edge is now at the bottom"


@pytest.mark.parametrize("orientation", [1, 6])
def test_a_large_jpeg_decoded_for_the_model_gives_the_same_input_at_a_reduced_scale(orientation):
    """``fit``: a 1280×960 photo is decoded at 1/4 scale, just the 320×240 it is resized to; the geometry is the
    photo's own and the letterboxed input differs from the full decode's only by resampling noise."""
    photo = Image.fromarray(render(3, 1280)[0]).resize((1280, 960))
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(photo.rotate(90, expand=True) if orientation == 6 else photo, "JPEG", quality=95, exif=exif)
    full, reduced = decode(data, LIMIT), decode(data, LIMIT, fit=320)
    assert (reduced.width, reduced.height) == (full.width, full.height) == (1280, 960)
    assert reduced.pixels.shape == (240, 320, 3) and full.pixels.shape == (960, 1280, 3)
    (full_input, full_geometry), (reduced_input, reduced_geometry) = letterbox(full, 320), letterbox(reduced, 320)
    assert reduced_geometry == full_geometry
    assert (full_input.float() - reduced_input.float()).abs().mean() < 2  # of 255


def test_pixel_limit_is_checked_from_the_header():
    with pytest.raises(TooManyPixels, match="40x30"):
        decode(encode(gradient(), "PNG"), 1000)


@pytest.mark.parametrize(
    "data,error",
    [
        (b"", UndecodableImage),
        (b"definitely not an image", UnsupportedMediaType),
        (encode(gradient(), "JPEG")[:200], UndecodableImage),
        (encode(gradient(), "ICO"), UnsupportedMediaType),
    ],
    ids=["empty", "text", "truncated-jpeg", "ico"],
)
def test_bad_input_raises_typed_errors(data, error):
    with pytest.raises(error):
        decode(data, LIMIT)


@pytest.mark.parametrize(("owner", "name"), [(images.Image, "open"), (images, "_to_rgb")], ids=["header", "pixels"])
def test_a_decoders_message_is_quoted_short(monkeypatch, owner, name):
    """Pillow's messages may quote the file's own bytes; whatever their length, the error's stays short."""

    def fails(*args, **kwargs):
        raise OSError("broken chunk " + "n" * 20_000)

    monkeypatch.setattr(owner, name, fails)
    with pytest.raises(UndecodableImage) as raised:
        decode(encode(gradient(), "PNG"), LIMIT)
    assert len(raised.value.message) < 200 and raised.value.message.endswith("nnn...")


@pytest.mark.parametrize(
    ("shape", "input_shape"), [((30, 40), (64, 64)), ((20, 40), (32, 64)), ((40, 20), (64, 32)), ((500, 120), (64, 32))]
)
def test_letterbox_then_unletterbox_round_trips_boxes(shape, input_shape):
    height, width = shape
    tensor, geometry = letterbox(as_decoded(np.zeros((height, width, 3), np.uint8)), 64)
    assert tuple(tensor.shape) == (3, *input_shape) and (geometry.width, geometry.height) == (width, height)
    boxes = np.array([[0.0, 0.0, width, height], [width / 4, height / 4, width / 2, height / 2]])
    in_model = boxes * geometry.scale + [geometry.pad_x, geometry.pad_y, geometry.pad_x, geometry.pad_y]
    np.testing.assert_allclose(unletterbox_boxes(in_model, geometry), boxes, atol=1e-6)


def test_letterbox_pads_with_grey_around_the_centred_image_up_to_a_stride_multiple():
    tensor, geometry = letterbox(as_decoded(np.full((20, 64, 3), 255, np.uint8)), 64)
    assert tuple(tensor.shape) == (3, 32, 64) and geometry.pad_y == 6 and geometry.pad_x == 0
    assert tensor[:, :6].eq(114).all() and tensor[:, 6:26].eq(255).all() and tensor[:, 26:].eq(114).all()


def test_letterbox_puts_each_channel_in_its_plane_of_a_contiguous_tensor():
    pixels = np.zeros((32, 64, 3), np.uint8)
    pixels[..., 0], pixels[..., 1], pixels[..., 2] = 10, 20, 30  # R, G, B
    tensor, _ = letterbox(as_decoded(pixels), 64)
    assert tensor.is_contiguous() and tensor.dtype == torch.uint8
    assert [int(tensor[channel, 16, 32]) for channel in range(3)] == [10, 20, 30]


@pytest.mark.parametrize(
    ("width", "height", "size", "shape"),
    [
        (1280, 720, 640, (384, 640)),
        (810, 1080, 640, (640, 480)),
        (640, 480, 640, (480, 640)),
        (500, 500, 384, (384, 384)),
    ],
)
def test_letterbox_shape_is_the_smallest_stride_multiple_that_holds_the_image(width, height, size, shape):
    assert letterbox_shape(width, height, size) == shape


def test_unletterbox_clips_to_the_image():
    _, geometry = letterbox(as_decoded(np.zeros((32, 64, 3), np.uint8)), 64)
    mapped = unletterbox_boxes(np.array([[-10.0, 0.0, 80.0, 64.0]]), geometry)
    np.testing.assert_allclose(mapped, [[0, 0, 64, 32]])
