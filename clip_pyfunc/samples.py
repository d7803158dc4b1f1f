"""Small sample inputs made in code (no files to ship): captions and base64 images."""

from __future__ import annotations

import base64
import io

SAMPLE_TEXTS = ("a red square on white", "a blue circle on white")


def sample_image(kind: str, size: tuple[int, int] = (320, 240), fmt: str = "JPEG") -> bytes:
    """Draw a red square or a blue circle on white and return the encoded bytes."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    w, h = size
    box = (w // 4, h // 4, 3 * w // 4, 3 * h // 4)
    if kind == "square":
        draw.rectangle(box, fill=(220, 30, 30))
    else:
        draw.ellipse(box, fill=(30, 60, 220))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def sample_images_b64() -> list[str]:
    """The two sample images (square, circle) as base64 JPEG strings."""
    return [base64.b64encode(sample_image(k)).decode("ascii") for k in ("square", "circle")]
