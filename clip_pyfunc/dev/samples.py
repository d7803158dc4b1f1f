"""Small sample inputs made in code (no files to ship): captions and base64 images.

They come from the toy checkpoint's world (one coloured shape on a background), so the demo
shows right answers with the toy checkpoint; any other checkpoint embeds them just the same.
Beside them: photo-like and camera-like JPEGs, and `varied_images`, a deterministic set of varied
photo-like pictures that int8 is judged on at registration.
"""

from __future__ import annotations

import base64
import io

# The benchmarks' image workloads: name -> (width, height) in pixels. Here, not in benchmarks/, so that the
# CLI can list them in its parser without importing the benchmarks.
IMAGE_WORKLOADS = {"jpeg_640x480": (640, 480), "jpeg_2mp": (1632, 1224), "jpeg_12mp": (4000, 3000),
                   "png_screenshot": (1440, 900),
                   # camera-like JPEGs: fine texture and sensor grain (camera_jpeg), 3-5 MB at 12 MP
                   "camera_640x480": (640, 480), "camera_2mp": (1632, 1224), "camera_12mp": (4000, 3000)}

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


VARIED_IMAGES = 48


def varied_images(n: int = VARIED_IMAGES) -> list[bytes]:
    """n varied photo-like images, encoded (varied_image(0..n-1)): the set int8 is judged on beside the
    user's own calibration images (registry.quantize), never calibrated on."""
    return [varied_image(i) for i in range(n)]


def varied_image(index: int) -> bytes:
    """One of a deterministic set of varied photo-like images, for measuring what int8 costs beyond
    the user's calibration images.

    The index picks the background (flat colour, linear or radial gradient, stripes or checks,
    soft clouds, fine grass-like texture) and the tone (full colour, greyscale, dark, bright), in
    turn, so any 24 consecutive images hold every pair; its seed picks the rest: size (160 to 800
    on the long edge) and aspect ratio (1:3 to 3:1), colours, up to a dozen shapes (ellipses,
    boxes, polygons, lines, some translucent), blur, grain, and JPEG (quality 55-95) or PNG.
    """
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(90_000 + index)
    long_edge = int(rng.choice((160, 224, 320, 480, 640, 800)))
    aspect = float(rng.choice((1 / 3, 9 / 16, 3 / 4, 1.0, 4 / 3, 16 / 9, 3.0)))
    width, height = (long_edge, max(32, round(long_edge / aspect))) if aspect >= 1 else (
        max(32, round(long_edge * aspect)), long_edge)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    x, y = x / width, y / height
    a, b = rng.uniform(0, 255, 3).astype(np.float32), rng.uniform(0, 255, 3).astype(np.float32)
    kind = index % 6
    if kind == 0:  # flat colour
        t = np.zeros_like(x)
    elif kind == 1:  # linear gradient at any angle
        angle = rng.uniform(0, 2 * np.pi)
        t = x * np.cos(angle) + y * np.sin(angle)
        t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
    elif kind == 2:  # radial gradient from anywhere
        cx, cy = rng.uniform(0, 1, 2)
        t = np.clip(np.hypot(x - cx, y - cy) / rng.uniform(0.3, 1.2), 0, 1)
    elif kind == 3:  # stripes or checks, of any period and angle
        angle, period = rng.uniform(0, np.pi), rng.uniform(0.02, 0.25)
        u = (x * np.cos(angle) + y * np.sin(angle)) / period
        v = (-x * np.sin(angle) + y * np.cos(angle)) / period
        t = (np.floor(u) + (np.floor(v) if rng.random() < 0.5 else 0)) % 2
    else:  # soft clouds (4) or fine grass-like texture (5): value noise summed over scales
        t = np.zeros_like(x)
        for cell in ((64, 32, 16) if kind == 4 else (6, 3, 1)):
            small = rng.normal(0, 1, (height // cell + 2, width // cell + 2)).astype(np.float32)
            layer = np.asarray(Image.fromarray(small).resize((width + 2 * cell, height + 2 * cell), Image.BILINEAR))
            t += layer[:height, :width] * cell ** 0.5
        t = np.clip(0.5 + t / (3 * float(t.std()) + 1e-6), 0, 1)
    pixels = a * (1 - t[..., None]) + b * t[..., None]
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img, "RGBA")
    for _ in range(int(rng.integers(0, 13))):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3)) + (int(rng.choice((110, 255))),)
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        r = rng.uniform(0.03, 0.4) * min(width, height)
        what = rng.integers(0, 4)
        if what == 0:
            draw.ellipse((cx - r, cy - r * rng.uniform(0.4, 1.6), cx + r, cy + r), fill=colour)
        elif what == 1:
            draw.rectangle((cx - r, cy - r * rng.uniform(0.3, 1.5), cx + r, cy + r), fill=colour)
        elif what == 2:
            angles = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(3, 7))))
            draw.polygon([(cx + r * np.cos(t_), cy + r * np.sin(t_)) for t_ in angles], fill=colour)
        else:
            draw.line((cx, cy, rng.uniform(0, width), rng.uniform(0, height)), fill=colour,
                      width=max(1, int(r / 6)))
    blur = float(rng.choice((0, 0, 0.8, 2.0, 4.0)))
    if blur:
        img = img.filter(ImageFilter.GaussianBlur(blur))
    pixels = np.asarray(img, dtype=np.float32)
    tone = (index // 6) % 4
    if tone == 1:  # greyscale
        pixels = np.repeat(pixels @ np.float32([0.299, 0.587, 0.114])[:, None], 3, axis=-1)
    elif tone == 2:  # dark, low key
        pixels = pixels * rng.uniform(0.25, 0.6)
    elif tone == 3:  # bright, washed out
        pixels = 255 - (255 - pixels) * rng.uniform(0.25, 0.6)
    pixels = pixels + rng.normal(0, float(rng.choice((0, 2, 6, 12, 20))), pixels.shape)
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    buf = io.BytesIO()
    if rng.random() < 0.25:
        img.save(buf, format="PNG")
    else:
        img.save(buf, format="JPEG", quality=int(rng.integers(55, 96)))
    return buf.getvalue()
