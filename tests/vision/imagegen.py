"""Product pictures the tests draw themselves: a shape of a colour on a background, in any format."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "stripes")
COLOURS = {
    "red": (200, 30, 30),
    "green": (30, 160, 60),
    "blue": (30, 60, 200),
    "yellow": (230, 200, 20),
    "black": (20, 20, 20),
}


def draw(shape: str, colour: str, seed: int = 0, size: tuple[int, int] = (96, 96)) -> Image.Image:
    """One product photo: ``shape`` in ``colour`` on an off-white background, jittered by ``seed``."""
    rng = np.random.default_rng(seed)
    w, h = size
    image = Image.new("RGB", size, tuple(int(v) for v in rng.integers(225, 256, 3)))
    pen = ImageDraw.Draw(image)
    fill = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in COLOURS[colour])
    m = int(min(w, h) * rng.uniform(0.12, 0.22))
    box = (m + int(rng.integers(-4, 5)), m + int(rng.integers(-4, 5)), w - m, h - m)
    if shape == "circle":
        pen.ellipse(box, fill=fill)
    elif shape == "square":
        pen.rectangle(box, fill=fill)
    elif shape == "triangle":
        pen.polygon([(box[0], box[3]), ((box[0] + box[2]) // 2, box[1]), (box[2], box[3])], fill=fill)
    elif shape == "stripes":
        step = max(4, w // 8)
        for x in range(box[0], box[2], step * 2):
            pen.rectangle((x, box[1], x + step, box[3]), fill=fill)
    else:
        raise ValueError(shape)
    return image


def encode(image: Image.Image, fmt: str = "PNG", **params: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **params)
    return out.getvalue()


def png_header_bomb(width: int, height: int) -> bytes:
    """A valid-looking PNG whose header claims ``width`` x ``height`` pixels: a few dozen bytes that
    would decode to gigapixels."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def catalogue(n_per: int = 2, size: tuple[int, int] = (96, 96)) -> list[tuple[str, str, str, bytes]]:
    """(product_id, category, market, PNG) for every shape x colour, ``n_per`` variants each."""
    items = []
    markets = ("DE", "FR")
    for s, shape in enumerate(SHAPES):
        for c, colour in enumerate(COLOURS):
            for v in range(n_per):
                seed = 1000 * s + 100 * c + v
                items.append(
                    (
                        f"{shape}-{colour}-{v}",
                        shape,
                        markets[(s + c + v) % 2],
                        encode(draw(shape, colour, seed, size)),
                    )
                )
    return items
