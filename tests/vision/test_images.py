"""Preprocessing of real image files the tests encode: formats, modes, EXIF rotation, aspect, bad input."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from services.vision.images import ImageError, ImageLimits, decode, prepare, sha256
from tests.vision import imagegen

LIMITS = ImageLimits(max_bytes=500_000, max_pixels=4_000_000)
SIZE = 48


def halves(size: tuple[int, int] = (80, 40)) -> Image.Image:
    """Left half red, right half blue."""
    image = Image.new("RGB", size, (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, size[0] // 2, size[1]))
    return image


@pytest.mark.parametrize(
    ("fmt", "mode", "params"),
    [
        ("JPEG", "RGB", {"quality": 90}),
        ("JPEG", "L", {}),
        ("JPEG", "CMYK", {}),
        ("PNG", "RGB", {}),
        ("PNG", "RGBA", {}),
        ("PNG", "L", {}),
        ("PNG", "LA", {}),
        ("PNG", "P", {}),
        ("PNG", "I;16", {}),
        ("PNG", "1", {}),
        ("WEBP", "RGB", {"quality": 80}),
        ("WEBP", "RGBA", {"lossless": True}),
    ],
)
def test_every_format_and_mode_decodes_to_square_rgb(fmt: str, mode: str, params: dict[str, object]) -> None:
    source = imagegen.draw("circle", "red", seed=1, size=(120, 90))
    if mode == "I;16":
        source = Image.fromarray((np.asarray(source.convert("L"), dtype=np.uint16) * 257).astype(np.uint16))
    else:
        source = source.convert(mode)
    data = imagegen.encode(source, fmt, **params)
    pixels = decode(data, SIZE, LIMITS)
    assert pixels.shape == (SIZE, SIZE, 3)
    assert pixels.dtype == np.uint8
    # The centre is inside the drawn circle: dark for grayscale modes, red for colour modes.
    centre = pixels[SIZE // 2, SIZE // 2].astype(int)
    corner_gap = pixels[2, 2].astype(int)
    assert abs(centre - corner_gap).sum() > 60, (centre, corner_gap)


def test_16_bit_grayscale_is_scaled_not_clipped() -> None:
    ramp = (np.tile(np.linspace(0, 65535, 64), (64, 1))).astype(np.uint16)
    data = imagegen.encode(Image.fromarray(ramp), "PNG")
    pixels = decode(data, 64, LIMITS)
    assert pixels[0, 0, 0] < 10
    assert pixels[0, -1, 0] > 245
    assert 100 < pixels[0, 32, 0] < 160  # the middle of the ramp stays in the middle


def test_transparency_is_composited_on_white() -> None:
    image = Image.new("RGBA", (40, 40), (255, 0, 0, 0))  # fully transparent red
    image.paste((0, 0, 255, 255), (10, 10, 30, 30))  # opaque blue square
    pixels = decode(imagegen.encode(image, "PNG"), 40, LIMITS)
    assert tuple(pixels[2, 2]) == (255, 255, 255)
    assert tuple(pixels[20, 20]) == (0, 0, 255)
    webp = decode(imagegen.encode(image, "WEBP", lossless=True), 40, LIMITS)
    assert tuple(webp[2, 2]) == (255, 255, 255)


def test_palette_transparency_is_composited_on_white() -> None:
    image = Image.new("P", (40, 40), 0)
    image.putpalette([0, 255, 0, 255, 0, 0] + [0] * 762)
    image.paste(1, (10, 10, 30, 30))
    data = imagegen.encode(image, "PNG", transparency=0)
    pixels = decode(data, 40, LIMITS)
    assert tuple(pixels[2, 2]) == (255, 255, 255)
    assert tuple(pixels[20, 20]) == (255, 0, 0)


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display needs a 90 degree clockwise turn
    data = imagegen.encode(halves((80, 40)), "JPEG", quality=95, exif=exif)
    pixels = decode(data, 40, LIMITS).astype(int)
    # Upright, the picture is 40 wide x 80 tall with red on top and blue below.
    top, bottom = pixels[8, 20], pixels[32, 20]
    assert top[0] > 200 and top[2] < 60, top
    assert bottom[2] > 200 and bottom[0] < 60, bottom
    # Without the tag, red is on the left.
    plain = decode(imagegen.encode(halves((80, 40)), "JPEG", quality=95), 40, LIMITS).astype(int)
    assert plain[20, 5][0] > 200 and plain[20, 35][2] > 200


def test_any_aspect_ratio_keeps_shape_and_pads_with_border_colour() -> None:
    wide = Image.new("RGB", (400, 100), (240, 240, 240))
    wide.paste((10, 10, 10), (150, 25, 250, 75))  # a dark block in the middle
    pixels = decode(imagegen.encode(wide, "PNG"), 64, LIMITS)
    assert pixels.shape == (64, 64, 3)
    # 400x100 -> 64x16 content band in the middle rows; rows above and below are border-coloured.
    assert np.all(pixels[:20] == 240)
    assert np.all(pixels[-20:] == 240)
    assert pixels[32, 32, 0] < 40  # the block survived, undistorted in the band
    tall = decode(imagegen.encode(Image.new("RGB", (3, 900), (5, 100, 5)), "PNG"), 64, LIMITS)
    assert tall.shape == (64, 64, 3)
    assert np.all(tall == (5, 100, 5))


def test_large_jpeg_is_decoded_at_reduced_scale_to_the_same_result() -> None:
    big = imagegen.draw("square", "blue", seed=3, size=(1600, 1200))
    data = imagegen.encode(big, "JPEG", quality=90)
    pixels = decode(data, SIZE, LIMITS)
    reference = np.asarray(
        Image.open(io.BytesIO(data)).convert("RGB").resize((SIZE, 36), Image.Resampling.BICUBIC)
    ).astype(int)
    band = pixels[6:42].astype(int)
    assert np.abs(band - reference).mean() < 12


def test_prepare_hashes_the_raw_bytes() -> None:
    data = imagegen.encode(imagegen.draw("circle", "green"), "PNG")
    assert prepare(data, SIZE, LIMITS).sha256 == sha256(data)


BAD = {
    "empty": b"",
    "text": b"this is not an image at all",
    "gif": imagegen.encode(imagegen.draw("circle", "red"), "GIF"),
    "zero-size": imagegen.png_header_bomb(0, 64),
    "header-only": imagegen.encode(imagegen.draw("circle", "red"), "PNG")[:40],
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_uploads_are_refused_with_a_reason(name: str) -> None:
    with pytest.raises(ImageError) as err:
        decode(BAD[name], SIZE, LIMITS)
    assert err.value.reason
    assert not err.value.too_large


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_truncated_files_are_refused(fmt: str) -> None:
    data = imagegen.encode(imagegen.draw("stripes", "blue", size=(200, 200)), fmt)
    with pytest.raises(ImageError) as err:
        decode(data[: len(data) * 2 // 3], SIZE, LIMITS)
    assert (
        "truncated" in err.value.reason or "corrupt" in err.value.reason or "unreadable" in err.value.reason
    )


@pytest.mark.parametrize(("width", "height"), [(5000, 5000), (100_000, 100_000), (1, 2_000_000_000)])
def test_decompression_bombs_are_refused_from_the_header(width: int, height: int) -> None:
    data = imagegen.png_header_bomb(width, height)
    assert len(data) < 200  # tiny file, gigapixels if decoded
    with pytest.raises(ImageError) as err:
        decode(data, SIZE, LIMITS)
    assert "bomb" in err.value.reason


def test_pixel_limit_applies_to_real_images() -> None:
    data = imagegen.encode(imagegen.draw("circle", "red", size=(300, 300)), "PNG")
    with pytest.raises(ImageError, match="pixels"):
        decode(data, SIZE, ImageLimits(max_bytes=10**6, max_pixels=300 * 299))
    assert decode(data, SIZE, ImageLimits(max_bytes=10**6, max_pixels=300 * 300)).shape == (SIZE, SIZE, 3)


def test_oversize_upload_is_a_size_error() -> None:
    data = imagegen.encode(imagegen.draw("circle", "red", size=(64, 64)), "PNG")
    with pytest.raises(ImageError) as err:
        decode(data, SIZE, ImageLimits(max_bytes=len(data) - 1))
    assert err.value.too_large
