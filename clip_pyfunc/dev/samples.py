"""Small sample inputs made in code (no files to ship): captions and base64 images.

They come from the toy checkpoint's world (one coloured shape on a background), so the demo
shows right answers with the toy checkpoint; any other checkpoint embeds them just the same.
"""

from __future__ import annotations

import base64
import io

SAMPLE_SHAPES = (("red", "circle"), ("blue", "triangle"), ("green", "square"), ("purple", "triangle"))
SAMPLE_TEXTS = tuple(f"a {colour} {shape}" for colour, shape in SAMPLE_SHAPES)


def sample_image(colour: str, shape: str, size: int = 256, fmt: str = "JPEG", seed: int = 7) -> bytes:
    """One coloured shape on a background, as an encoded photo-sized image."""
    import numpy as np
    from PIL import Image

    from clip_pyfunc.dev.toy_checkpoint import draw

    img, _ = draw(colour, shape, np.random.default_rng(seed), background="grey", size_word="large")
    buf = io.BytesIO()
    img.resize((size, size), Image.BICUBIC).save(buf, format=fmt, quality=92)
    return buf.getvalue()


def sample_names() -> list[str]:
    """What each sample image shows, in order."""
    return [f"{colour} {shape}" for colour, shape in SAMPLE_SHAPES]


def sample_images_b64() -> list[str]:
    """The sample images as base64 JPEG strings, in SAMPLE_SHAPES order."""
    return [base64.b64encode(sample_image(c, s)).decode("ascii") for c, s in SAMPLE_SHAPES]


def write_shape_dataset(folder: str, n: int = 150, seed: int = 1234) -> str:
    """Write n generated shape images as a labelled folder (one subfolder per label), the layout
    `clip-pyfunc evaluate` reads; a stand-in for your own labelled images."""
    import os

    import numpy as np

    from clip_pyfunc.dev.toy_checkpoint import LABELS, draw

    rng = np.random.default_rng(seed)
    for i in range(n):
        label = LABELS[i % len(LABELS)]
        img, _ = draw(*label.split(), rng)
        os.makedirs(os.path.join(folder, label), exist_ok=True)
        img.save(os.path.join(folder, label, f"{i:04d}.png"))
    return folder


def photo_jpeg(width: int, height: int, seed: int = 0, quality: int = 90) -> bytes:
    """A photo-like JPEG (smooth gradients, shapes, grain) of the given size."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    # Draw at a small size and upscale: smooth like a photo, and fast to make at 12 MP.
    w, h = max(1, width // 8), max(1, height // 8)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([127 + 100 * np.sin(x / w * 6 + seed), 127 + 100 * np.cos(y / h * 5),
                     127 + 80 * np.sin((x + y) / (w + h) * 9)], axis=-1)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(8):
        cx, cy, r = rng.integers(0, w), rng.integers(0, h), int(rng.integers(1, max(2, min(w, h) // 3)))
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    img = img.filter(ImageFilter.GaussianBlur(1.5)).resize((width, height), Image.BICUBIC)
    grain = rng.normal(0, 4, (height, width, 3))
    img = Image.fromarray(np.clip(np.asarray(img, dtype=np.float32) + grain, 0, 255).astype(np.uint8), "RGB")
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def camera_jpeg(width: int, height: int, seed: int = 0, quality: int = 90, subsampling: str = "4:2:0") -> bytes:
    """A JPEG with what camera files have and smooth test images lack: fine texture at every scale
    (grass, fabric, foliage-like detail) and per-pixel sensor grain, saved at camera quality.

    At 12 MP this makes a 3-5 MB file, as phones write; the grain and texture are what alias
    when a JPEG is decoded at a reduced DCT scale too close to the model's input size.
    """
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    scene = np.asarray(Image.open(io.BytesIO(photo_jpeg(width, height, seed, quality=95))), dtype=np.float32)
    texture = np.zeros((height, width), np.float32)
    for cell in (2, 5, 13, 37):  # value noise at several scales, upsampled without smoothing
        small = rng.normal(0, 1, (height // cell + 1, width // cell + 1)).astype(np.float32)
        texture += np.repeat(np.repeat(small, cell, 0), cell, 1)[:height, :width] * (12 / cell ** 0.3)
    grain = rng.normal(0, 6, (height, width, 3)).astype(np.float32)
    pixels = scene + texture[..., None] + grain
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB").save(buf, format="JPEG", quality=quality,
                                                                          subsampling=subsampling)
    return buf.getvalue()
