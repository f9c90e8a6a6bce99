"""Turn an upload into the model's square RGB input, refusing bad uploads before they cost memory.

Real uploads are JPEG, PNG or WebP in any mode (grayscale, palette, alpha, 16-bit), often rotated by
an EXIF tag, in any aspect ratio. Sizes are checked from the header before anything is decoded, so a
small file that decodes to gigapixels (a decompression bomb) is refused without allocating it.
JPEGs are decoded at a reduced DCT scale when that is still large enough for the model.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

FORMATS = ("JPEG", "PNG", "WEBP")
WHITE = (255, 255, 255)


class ImageError(ValueError):
    """Why an upload cannot be used; ``too_large`` marks a size limit (counted apart in metrics)."""

    def __init__(self, reason: str, too_large: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.too_large = too_large


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 6 * 1024 * 1024
    max_pixels: int = 50_000_000


@dataclass(frozen=True)
class Prepared:
    """A decoded, resized upload: ``pixels`` is (size, size, 3) uint8; ``sha256`` of the raw bytes."""

    pixels: np.ndarray
    sha256: str


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def open_checked(data: bytes, limits: ImageLimits) -> Image.Image:
    """Parse only the header and check bytes, format and pixel count; nothing is decoded yet."""
    if not data:
        raise ImageError("empty: no image bytes")
    if len(data) > limits.max_bytes:
        raise ImageError(f"{len(data)} bytes, over the limit of {limits.max_bytes}", too_large=True)
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        raise ImageError("not a JPEG, PNG or WebP image") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(f"decompression bomb: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"unreadable image header: {exc}") from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageError(f"zero-size image ({width}x{height})")
    if width * height > limits.max_pixels:
        raise ImageError(
            f"decodes to {width}x{height} = {width * height} pixels, over the limit of "
            f"{limits.max_pixels} (decompression bomb?)"
        )
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any mode to RGB; transparency is composited on white, as product photos are shown."""
    mode = image.mode
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        values = np.asarray(image, dtype=np.float32)
        top = float(values.max()) if values.size else 0.0
        scale = 255.0 / top if top > 255 else 1.0
        image = Image.fromarray(np.clip(values * scale, 0, 255).astype(np.uint8), "L")
        mode = "L"
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode in ("LA", "La", "PA", "RGBa") or (mode == "L" and "transparency" in image.info):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, WHITE)
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image if image.mode == "RGB" else image.convert("RGB")


def _square(image: Image.Image, size: int) -> np.ndarray:
    """Fit the longer side to ``size`` keeping the aspect ratio; pad with the image's border colour."""
    width, height = image.size
    scale = size / max(width, height)
    new = (max(1, round(width * scale)), max(1, round(height * scale)))
    if new != image.size:
        image = image.resize(new, Image.Resampling.BICUBIC, reducing_gap=3.0)
    pixels = np.asarray(image, dtype=np.uint8)
    if new == (size, size):
        return np.ascontiguousarray(pixels)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    canvas = np.empty((size, size, 3), dtype=np.uint8)
    canvas[:] = np.median(border, axis=0).astype(np.uint8)
    top, left = (size - new[1]) // 2, (size - new[0]) // 2
    canvas[top : top + new[1], left : left + new[0]] = pixels
    return canvas


def decode(data: bytes, size: int, limits: ImageLimits) -> np.ndarray:
    """Bytes -> (size, size, 3) uint8, upright (EXIF), RGB, aspect kept. Raises ImageError."""
    image = open_checked(data, limits)
    try:
        if image.format == "JPEG":
            image.draft("RGB", (size, size))  # decode at 1/2, 1/4 or 1/8 scale when still >= size
        image.load()
    except Image.DecompressionBombError as exc:
        raise ImageError(f"decompression bomb: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
        raise ImageError(f"truncated or corrupt image: {exc}") from None
    # A malformed EXIF block: keep the image as stored.
    with contextlib.suppress(OSError, SyntaxError, ValueError, KeyError, TypeError, AttributeError):
        image = ImageOps.exif_transpose(image)
    try:
        return _square(_to_rgb(image), size)
    except (OSError, ValueError) as exc:
        raise ImageError(f"cannot convert image: {exc}") from None


def prepare(data: bytes, size: int, limits: ImageLimits) -> Prepared:
    return Prepared(decode(data, size, limits), sha256(data))


def encode_png(pixels: np.ndarray) -> bytes:
    """uint8 (H, W) or (H, W, 3) array -> PNG bytes (catalogue images made from data sets)."""
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG", optimize=False)
    return out.getvalue()
