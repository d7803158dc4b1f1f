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

    from clip_pyfunc.toy_checkpoint import draw

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

    from clip_pyfunc.toy_checkpoint import LABELS, draw

    rng = np.random.default_rng(seed)
    for i in range(n):
        label = LABELS[i % len(LABELS)]
        img, _ = draw(*label.split(), rng)
        os.makedirs(os.path.join(folder, label), exist_ok=True)
        img.save(os.path.join(folder, label, f"{i:04d}.png"))
    return folder
