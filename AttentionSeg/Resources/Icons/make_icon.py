"""Draw the module and extension icon (128x128 PNG): an axial CT slice under an attention heat map, a
segmented organ outline, a click and a scribble.

Run from anywhere; it rewrites ``AttentionSeg.png`` beside this script::

    python AttentionSeg/Resources/Icons/make_icon.py
"""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

SIZE = 128
OUTPUT = Path(__file__).resolve().parent / "AttentionSeg.png"


def _heat(t: float) -> tuple[int, int, int]:
    """A small inferno-like ramp: black -> purple -> orange -> pale yellow."""
    stops = [(0.0, (0, 0, 4)), (0.35, (120, 28, 109)), (0.7, (237, 105, 37)), (1.0, (252, 255, 164))]
    for (t0, c0), (t1, c1) in zip(stops, stops[1:]):
        if t <= t1:
            f = (t - t0) / (t1 - t0)
            return tuple(int(round(a + f * (b - a))) for a, b in zip(c0, c1))  # type: ignore[return-value]
    return stops[-1][1]


def draw_icon() -> Image.Image:
    """The icon as an RGBA image."""
    icon = Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 0))
    # rounded dark tile
    tile = Image.new("L", (SIZE, SIZE), 0)
    ImageDraw.Draw(tile).rounded_rectangle((2, 2, SIZE - 3, SIZE - 3), radius=22, fill=255)
    icon.paste((28, 32, 44, 255), (0, 0), tile)

    # the body on an axial CT slice: soft tissue ellipse, spine, two kidneys
    body = Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 0))
    d = ImageDraw.Draw(body)
    d.ellipse((14, 26, 114, 104), fill=(112, 112, 118, 255))
    d.ellipse((56, 80, 72, 96), fill=(226, 226, 230, 255))
    d.ellipse((30, 66, 48, 86), fill=(150, 150, 156, 255))
    d.ellipse((80, 66, 98, 86), fill=(150, 150, 156, 255))
    icon.alpha_composite(body)

    # attention heat map: a Gaussian blob centred on the organ, alpha rising with the attention value
    heat = Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 0))
    pixels = heat.load()
    cx, cy, sx, sy = 66.0, 58.0, 20.0, 12.0
    for y in range(SIZE):
        for x in range(SIZE):
            t = math.exp(-(((x - cx) / sx) ** 2 + ((y - cy) / sy) ** 2) / 2)
            if t > 0.08:
                r, g, b = _heat(t)
                pixels[x, y] = (r, g, b, int(200 * t))
    icon.alpha_composite(heat.filter(ImageFilter.GaussianBlur(1.0)))

    # segmented organ (pancreas-like) outline
    organ = [(40, 62), (50, 52), (66, 50), (82, 52), (92, 56), (88, 62), (72, 64), (56, 66), (46, 68)]
    ImageDraw.Draw(icon).line(organ + organ[:1], fill=(80, 220, 120, 255), width=3, joint="curve")

    # a foreground scribble and a positive click
    d = ImageDraw.Draw(icon)
    d.line([(52, 59), (60, 57), (70, 57), (80, 56)], fill=(255, 255, 255, 255), width=3, joint="curve")
    d.ellipse((94, 22, 110, 38), fill=(60, 200, 90, 255), outline=(255, 255, 255, 255), width=2)
    d.line([(102, 26), (102, 34)], fill=(255, 255, 255, 255), width=2)
    d.line([(98, 30), (106, 30)], fill=(255, 255, 255, 255), width=2)
    return icon


def main() -> None:
    draw_icon().save(OUTPUT, optimize=True)
    print(f"wrote {OUTPUT}")


if __name__ == "__main__":
    main()
