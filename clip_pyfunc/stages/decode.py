"""Stage 1, decode: the `input` column -> RGB images or strings, with per-row errors.

Every function returns one entry per row: the decoded value, or an InvalidInput naming the
row, so that one bad row never shifts or spoils the others.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import struct
from dataclasses import dataclass
from typing import Iterable, Union

import pybase64

from clip_pyfunc.errors import InvalidInput, preview

# Formats a user's photo or screenshot comes in; everything else PIL could open is refused,
# which keeps rarely used (and rarely hardened) decoders off the request path.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # JPEG covers MPO (phone photos)
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_URL_SAFE = bytes.maketrans(b"-_", b"+/")
_ORIENTATION = 0x0112  # the EXIF tag

Decoded = Union["PIL.Image.Image", "numpy.ndarray", InvalidInput]  # noqa: F821


@dataclass(frozen=True, kw_only=True)
class ImageLimits:
    """Limits applied to each image before and while decoding it."""

    max_bytes: int
    max_pixels: int


def is_missing(value: object) -> bool:
    """True for every missing value pandas, numpy and Arrow put in a column: None, NaN (float or
    numpy float), `pd.NA`, `pd.NaT` and numpy's NaT; False for anything else, strings and bytes included."""
    if value is None:
        return True
    if isinstance(value, (str, bytes, bytearray, memoryview, list, tuple, dict)):
        return False
    import pandas as pd

    try:
        missing = pd.isna(value)
    except (TypeError, ValueError):
        return False
    import numpy as np

    return isinstance(missing, (bool, np.bool_)) and bool(missing)


def decode_texts(values: Iterable[object]) -> list[str | InvalidInput]:
    """Check that every row is a string; return the strings or a per-row error."""
    out: list[str | InvalidInput] = []
    for row, value in enumerate(values):
        if is_missing(value):
            out.append(InvalidInput("input is null; send a string (an empty string is allowed)", row, "null"))
        elif not isinstance(value, str):
            out.append(InvalidInput(f"expected a string, got {type(value).__name__} {preview(value)}", row, "type"))
        else:
            out.append(value)
    return out


def fetch_urls(values: list[object], policy) -> list[object]:
    """Replace the cells that hold an image URL with the fetched bytes, or with their InvalidInput.

    Args:
        values: The `input` cells; those that are not URLs pass through unchanged.
        policy: A clip_pyfunc.stages.fetch.UrlPolicy, or None when URLs are off (each URL is then an error
            that says how to turn them on, and nothing is fetched).
    """
    from clip_pyfunc.stages.fetch import fetch_many, is_url

    where = [i for i, v in enumerate(values) if is_url(v)]
    if not where:
        return values
    out = list(values)
    if policy is None:
        for i in where:
            out[i] = InvalidInput(f"image URLs are off: {preview(values[i], 60)}; send base64 or bytes, or set "
                                  "allow_urls: true in the model_config (https only; see the README)", kind="url")
        return out
    for i, got in zip(where, fetch_many([values[i].strip() for i in where], policy)):
        out[i] = InvalidInput(got.reason, kind="url") if isinstance(got, InvalidInput) else got
    return out


def decode_image(value: object, limits: ImageLimits, draft_edge: int | None = None) -> Decoded:
    """Decode one cell into an upright RGB image, or return (not raise) its InvalidInput, without a row.

    With `draft_edge` (the fast path), a JPEG comes back as an (H, W, 3) uint8 array (see
    `open_pixels`); everything else, and every image without it, as a PIL image.
    """
    if isinstance(value, InvalidInput):  # a URL that could not be fetched (see fetch_urls)
        return value
    try:
        data = image_bytes(value, limits.max_bytes)
        return open_pixels(data, limits, draft_edge) if draft_edge else open_image(data, limits)
    except InvalidInput as e:
        return e


def image_bytes(value: object, max_bytes: int) -> bytes:
    """Turn one cell into encoded image bytes.

    Raises:
        InvalidInput: Null, wrong type, invalid base64, empty, or over `max_bytes`.
    """
    if is_missing(value):
        raise InvalidInput("input is null; send base64 image bytes", kind="null")
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
    elif isinstance(value, str):
        data = _b64decode(value, max_bytes)
    else:
        raise InvalidInput(f"expected a base64 string or bytes, got {type(value).__name__} {preview(value)}",
                           kind="type")
    if not data:
        raise InvalidInput("input is empty; send base64 image bytes", kind="empty")
    if len(data) > max_bytes:
        raise InvalidInput(f"image is {len(data)} bytes, over the limit of {max_bytes} bytes (max_image_bytes)",
                           kind="over_limit")
    return data


def _b64decode(text: str, max_bytes: int) -> bytes:
    body = text.strip()
    if body[:5].lower() == "data:":  # RFC 2397: the scheme and ";base64" are case-insensitive
        header, sep, body = body.partition(",")
        if not sep or not header.lower().endswith(";base64"):
            raise InvalidInput(f"data URL must be 'data:image/...;base64,<data>', got {preview(text)}", kind="base64")
    if len(body) // 4 * 3 <= max_bytes + 3:
        try:
            # Plain padded base64, the usual case: one SIMD pass (binascii takes ~4 ms on 12 MP).
            return pybase64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            pass  # whitespace, url-safe alphabet, no padding, or not base64: the careful path
    body = "".join(body.split())
    # 4 base64 characters carry 3 bytes: refuse oversize items before allocating them.
    if len(body) // 4 * 3 > max_bytes + 3:
        raise InvalidInput(
            f"image is about {len(body) // 4 * 3} bytes, over the limit of {max_bytes} bytes (max_image_bytes)",
            kind="over_limit")
    try:
        raw = body.encode("ascii").translate(_URL_SAFE).rstrip(b"=")
        raw += b"=" * (-len(raw) % 4)
        return base64.b64decode(raw, validate=True)
    except (UnicodeEncodeError, binascii.Error, ValueError) as e:
        raise InvalidInput(
            f"invalid base64 ({e}): {preview(text)}; send standard or url-safe base64, optionally as a data URL",
            kind="base64") from e


def open_image(data: bytes, limits: ImageLimits, draft_edge: int | None = None):
    """Decode image bytes into an upright RGB image, transparency composited on white.

    The pixel limit is checked from the header, before any pixel is decoded. With
    `draft_edge`, a JPEG is decoded by libjpeg at 1/2, 1/4 or 1/8 scale as long as its
    shorter edge stays >= draft_edge; the checkpoint's own resize then runs on that.

    Raises:
        InvalidInput: Not an image of an allowed format, over the pixel limit, or corrupt.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        width, height = img.size
        if width * height > limits.max_pixels:
            raise InvalidInput(
                f"image is {width}x{height} = {width * height} pixels, over the limit of "
                f"{limits.max_pixels} pixels (max_image_pixels)", kind="over_limit")
        if draft_edge and img.format in ("JPEG", "MPO"):
            scale = max(1, min(width, height) // draft_edge)
            if scale >= 2:
                img.draft("RGB", (math.ceil(width / scale), math.ceil(height / scale)))
        rawmode = _png_rawmode(img)
        try:
            img.load()
        except (struct.error, TypeError) as e:  # a loader that reads damaged EXIF while loading (TIFF)
            raise InvalidInput(f"image metadata could not be read ({type(e).__name__}: {e})",
                               kind="corrupt_image") from e
        # Read after loading: a loader that turns the image upright itself (Pillow 13's TIFF) also
        # removes the tag, so every container is turned exactly once, whatever Pillow does.
        turn = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
                5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                8: Image.Transpose.ROTATE_90}.get(orientation(img))  # as ImageOps.exif_transpose turns them
        return to_rgb(img if turn is None else img.transpose(turn), rawmode)
    except UnidentifiedImageError as e:
        raise InvalidInput(
            f"bytes are not an image of an allowed format {IMAGE_FORMATS}: {preview(data)}", kind="not_an_image"
        ) from e
    except Image.DecompressionBombError as e:
        raise InvalidInput(f"image is over the limit of {limits.max_pixels} pixels (max_image_pixels): {e}",
                           kind="over_limit") from e
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise InvalidInput(f"image could not be decoded ({type(e).__name__}: {e})", kind="corrupt_image") from e


def _png_rawmode(img) -> str | None:
    """The raw mode a PNG's pixels are stored in (e.g. 'RGB;16B'), read before loading clears it."""
    if img.format != "PNG" or not img.tile:
        return None
    args = img.tile[0][3]  # (codec, extents, offset, args): a tuple in every Pillow, named from 11 on
    return args[0] if isinstance(args, tuple) else args


def open_pixels(data: bytes, limits: ImageLimits, draft_edge: int):
    """The fast path's decode: a JPEG straight into an upright (H, W, 3) uint8 array, at the
    smallest of libjpeg-turbo's 1/1, 1/2, 1/4 and 1/8 scales whose shorter edge stays >=
    `draft_edge`; any other image as `open_image` returns it.

    simplejpeg decodes into numpy (PIL's conversion of a decoded image to an array costs about
    as much as resizing it). Its other M/8 scales (3/8, 5/8, ...) are not used: they ring on
    photo grain, up to 9 levels from the reference (docs/BENCHMARKS.md, "Fast path pixels").
    JPEGs it does not take (CMYK, 12-bit, damaged) go through `open_image`, which decodes them
    or says why not.

    Raises:
        InvalidInput: As `open_image`.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        head = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)  # header only: no pixels yet
        width, height = head.size
        fits = head.format in ("JPEG", "MPO") and head.mode in ("RGB", "L") and width * height <= limits.max_pixels
        turn = orientation(head) if fits else 1
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError, EOFError):
        fits = False
    if fits:
        import simplejpeg

        try:
            # Only 1/2, 1/4 and 1/8 (libjpeg-turbo's other M/8 scales ring on grain): asking for
            # exactly width/factor x height/factor makes simplejpeg pick that factor.
            factor = _draft_factor(width, height, draft_edge)
            pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=math.ceil(height / factor),
                                            min_width=math.ceil(width / factor))
        except ValueError:
            pass  # open_image decodes what libjpeg can recover, or names the damage
        else:
            return _upright(pixels, turn)
    return open_image(data, limits, draft_edge)


def _draft_factor(width: int, height: int, draft_edge: int) -> int:
    """The largest of 1, 2, 4, 8 that keeps the shorter edge >= draft_edge when divided by it."""
    factor = 1
    while factor < 8 and min(width, height) // (factor * 2) >= draft_edge:
        factor *= 2
    return factor


def orientation(img) -> int:
    """The EXIF orientation (1-8) of an opened image; 1 when absent or unreadable.

    Only the tag is read. PIL's `exif_transpose` also re-serialises the EXIF block, and on a
    damaged block that raises errors decoding does not (struct.error, TypeError): a photo
    must not be lost to its metadata.
    """
    try:
        value = img.getexif().get(_ORIENTATION, 1)
    except (OSError, ValueError, TypeError, KeyError, IndexError, SyntaxError, EOFError, struct.error):
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _upright(pixels, turn: int):
    """Apply an EXIF orientation (1-8) to an (H, W, 3) array, as ImageOps.exif_transpose does."""
    import numpy as np

    turned = {
        2: lambda a: a[:, ::-1],  # flipped left to right
        3: lambda a: a[::-1, ::-1],  # turned 180 degrees
        4: lambda a: a[::-1],  # flipped top to bottom
        5: lambda a: a.transpose(1, 0, 2),  # transposed
        6: lambda a: np.rot90(a, -1),  # stored 90 degrees counter-clockwise (phones held upright)
        7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],  # transversed
        8: lambda a: np.rot90(a, 1),  # stored 90 degrees clockwise
    }.get(turn)
    return pixels if turned is None else np.ascontiguousarray(turned(pixels))


def to_rgb(img, rawmode: str | None = None):
    """Return an 8-bit RGB image: 16-bit gray scaled down, transparency composited on white.

    Every way an image carries transparency composites as its 8-bit twin does: an alpha
    channel (RGBA, LA, PA), palette alpha, and a tRNS colour at any bit depth. A 16-bit grey
    tRNS value is compared with the 16-bit samples (PNG spec, 11.3.2.1). Pillow reduces 16-bit
    RGB samples to their high byte while keeping the 16-bit tRNS colour; that colour is reduced
    the same way (`rawmode` 'RGB;16B' tells), as the image's 8-bit twin would carry it. This is
    an approximation: a pixel that differs from the tRNS colour only in its low bytes is made
    transparent too, since Pillow keeps no 16-bit RGB samples to compare.
    """
    from PIL import Image

    transparency = img.info.get("transparency")
    if img.mode in _SIXTEEN_BIT_MODES:
        import numpy as np

        wide = np.asarray(img, dtype=np.float64)
        grey = Image.fromarray(np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8), "L")
        if isinstance(transparency, int):  # Image.fromarray drops info["transparency"]: keep it as alpha
            alpha = Image.fromarray(np.where(wide == transparency, 0, 255).astype(np.uint8), "L")
            img = Image.merge("LA", (grey, alpha))
        else:
            img = grey
    elif img.mode == "F":
        img = img.convert("L")
    elif img.mode == "RGB" and rawmode and rawmode.startswith("RGB;16") and isinstance(transparency, tuple):
        img.info["transparency"] = tuple(v >> 8 for v in transparency)
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode != "RGB":
        img = img.convert("RGB")
    img.load()
    return img
