"""Every input the issue lists: what must work, what must fail cleanly (decode stage and model)."""

from __future__ import annotations

import base64

import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from PIL import Image

from conftest import b64, decode_images, encode, photo
from engine_fixtures import engine, image_model, text_model  # noqa: F401 - every test here runs on each engine
from clip_pyfunc.stages.decode import ImageLimits, decode_image, decode_texts, image_bytes, open_image, open_pixels
from clip_pyfunc.errors import InvalidInput


LIMITS = ImageLimits(max_bytes=50 * 1024 * 1024, max_pixels=8192 * 8192)


def _rgba_on_white():
    img = Image.new("RGBA", (20, 10), (255, 0, 0, 0))  # fully transparent red
    img.paste((0, 0, 255, 255), (0, 0, 10, 10))  # opaque blue left half
    return img


def _palette_with_alpha():
    img = Image.new("P", (10, 10), 0)
    img.putpalette([0, 255, 0] + [255, 0, 0] * 255)
    img.paste(1, (5, 0, 10, 10))
    img.info["transparency"] = 0  # index 0 (green) is transparent
    return img


def _gif_two_frames() -> bytes:
    frames = [Image.new("P", (8, 8), 0), Image.new("P", (8, 8), 1)]
    for f in frames:
        f.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)


def _sixteen_bit_png() -> bytes:
    arr = np.array([[0, 32896, 65535, 65535]], dtype=np.uint16)
    return encode(Image.fromarray(arr), "PNG")


CASES = {
    "jpeg": lambda: encode(photo(64, 48), "JPEG"),
    "png": lambda: encode(photo(64, 48), "PNG"),
    "webp": lambda: encode(photo(64, 48), "WEBP"),
    "gif": _gif_two_frames,
    "bmp": lambda: encode(photo(64, 48), "BMP"),
    "tiff": lambda: encode(photo(64, 48), "TIFF"),
    "rgba": lambda: encode(_rgba_on_white(), "PNG"),
    "palette_alpha": lambda: encode(_palette_with_alpha(), "PNG"),
    "grayscale": lambda: encode(photo(64, 48).convert("L"), "PNG"),
    "cmyk_jpeg": lambda: encode(photo(64, 48).convert("CMYK"), "JPEG"),
    "cmyk_tiff": lambda: encode(photo(64, 48).convert("CMYK"), "TIFF"),
    "png16": _sixteen_bit_png,
    "one_pixel": lambda: encode(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_format_decodes_to_rgb(name):
    img = open_image(CASES[name](), LIMITS)
    assert img.mode == "RGB" and img.size[0] >= 1


@pytest.mark.parametrize("name", sorted(CASES))
def test_format_embeds_through_model(image_model, name):
    v = image_model.predict(pd.DataFrame({"input": [b64(CASES[name]())]}))
    assert v.shape == (1, 32) and np.isfinite(v).all()


def test_transparency_is_composited_on_white():
    rgba = np.asarray(open_image(CASES["rgba"](), LIMITS))
    assert tuple(rgba[5, 2]) == (0, 0, 255) and tuple(rgba[5, 15]) == (255, 255, 255)
    pal = np.asarray(open_image(CASES["palette_alpha"](), LIMITS))
    assert tuple(pal[5, 2]) == (255, 255, 255) and tuple(pal[5, 7]) == (255, 0, 0)


def test_gif_uses_first_frame():
    assert tuple(np.asarray(open_image(_gif_two_frames(), LIMITS))[0, 0]) == (255, 0, 0)


def test_sixteen_bit_png_is_scaled_not_clipped():
    px = np.asarray(open_image(_sixteen_bit_png(), LIMITS))[0, :, 0]
    assert list(px) == [0, 128, 255, 255]


def test_cmyk_becomes_rgb_colours():
    img = Image.new("RGB", (8, 8), (200, 30, 30))
    got = np.asarray(open_image(encode(img.convert("CMYK"), "TIFF"), LIMITS))[4, 4]
    assert np.abs(got.astype(int) - [200, 30, 30]).max() <= 3


def test_exif_rotated_photo_is_upright():
    # Upright view: landscape 60x40, red top half, blue bottom half. Stored sideways: the
    # pixels turned 90 degrees counter-clockwise, tagged orientation 6 ("turn 90 CW to view").
    upright = Image.new("RGB", (60, 40), (220, 0, 0))
    upright.paste((0, 0, 220), (0, 20, 60, 40))
    stored = upright.rotate(90, expand=True)
    assert stored.size == (40, 60)
    exif = Image.Exif()
    exif[0x0112] = 6
    got = open_image(encode(stored, "JPEG", quality=95, exif=exif.tobytes()), LIMITS)
    assert got.size == (60, 40)
    arr = np.asarray(got).astype(int)
    assert arr[5, 30, 0] > 180 and arr[5, 30, 2] < 50  # top is red
    assert arr[35, 30, 2] > 180 and arr[35, 30, 0] < 50  # bottom is blue


@pytest.mark.parametrize("orientation", range(1, 9))
def test_fast_path_turns_jpegs_as_exif_transpose_does(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(photo(64, 48, seed=orientation), "JPEG", quality=95, exif=exif.tobytes())
    want = np.asarray(open_image(data, LIMITS)).astype(int)
    got = open_pixels(data, LIMITS, draft_edge=1000)  # no scaling: the same libjpeg decode, then turned
    assert isinstance(got, np.ndarray) and got.dtype == np.uint8 and got.flags.c_contiguous
    assert got.shape == want.shape and np.abs(got.astype(int) - want).max() <= 1


def test_fast_path_decodes_at_the_smallest_power_of_two_scale_above_the_draft_edge():
    # libjpeg-turbo's other M/8 scales (3/8, 5/8, ...) ring on grain: only 1/2, 1/4 and 1/8 are used.
    data = encode(photo(1632, 1224), "JPEG", quality=90)
    got = open_pixels(data, LIMITS, draft_edge=448)
    assert got.shape == (612, 816, 3)  # 1/2: 1224 / 2 = 612 >= 448 > 1224 / 4 (3/8 would give 459)
    portrait = open_pixels(encode(photo(1224, 1632), "JPEG", quality=90), LIMITS, draft_edge=448)
    assert portrait.shape == (816, 612, 3)
    assert open_pixels(data, LIMITS, draft_edge=300).shape == (306, 408, 3)  # 1/4
    assert open_pixels(data, LIMITS, draft_edge=1000).shape == (1224, 1632, 3)  # full size


def test_fast_path_hands_other_images_to_pil():
    cmyk = open_pixels(encode(photo(40, 30).convert("CMYK"), "JPEG"), LIMITS, draft_edge=16)
    assert isinstance(cmyk, Image.Image) and cmyk.mode == "RGB"
    png = open_pixels(encode(photo(40, 30), "PNG"), LIMITS, draft_edge=16)
    assert isinstance(png, Image.Image) and png.size == (40, 30)
    truncated = encode(photo(400, 300), "JPEG")[:2000]
    fast, exact = decode_image(truncated, LIMITS, draft_edge=100), decode_image(truncated, LIMITS)
    assert isinstance(fast, InvalidInput) and isinstance(exact, InvalidInput) and fast.reason == exact.reason
    too_big = encode(photo(300, 200), "JPEG")
    got = decode_image(too_big, ImageLimits(max_bytes=10**6, max_pixels=50000), draft_edge=16)
    assert isinstance(got, InvalidInput) and "over the limit of 50000 pixels" in got.reason


def test_damaged_exif_never_raises():
    # Hostile metadata: random bytes written over a JPEG's EXIF block (and a few elsewhere). Each
    # must give an image or a row error, on both paths; PIL's exif_transpose raised struct.error
    # and TypeError on some of these, when it re-serialised the damaged block.
    import random

    exif = Image.Exif()
    exif[0x0112], exif[0x010F] = 6, "Maker"
    exif[0x8769] = {0x9003: "2020:01:01 00:00:00"}
    data = encode(photo(80, 60), "JPEG", exif=exif.tobytes())
    start = data.index(b"Exif")
    rng = random.Random(1)
    outcomes = set()
    for _ in range(1500):
        damaged = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            at = rng.randrange(start, start + 200) if rng.random() < 0.7 else rng.randrange(2, len(damaged))
            damaged[at] = rng.randrange(256)
        if rng.random() < 0.1:
            damaged = damaged[: rng.randrange(10, len(damaged))]
        for draft_edge in (None, 32):
            got = decode_image(bytes(damaged), LIMITS, draft_edge)
            assert isinstance(got, (Image.Image, np.ndarray, InvalidInput)), type(got)
            outcomes.add("Image" if isinstance(got, Image.Image) else type(got).__name__)
    assert outcomes == {"Image", "ndarray", "InvalidInput"}


def test_large_photo_decodes_within_limits():
    data = encode(photo(6000, 4000), "JPEG", quality=85)
    img = open_image(data, LIMITS, draft_edge=224)
    assert img.mode == "RGB" and min(img.size) >= 224  # draft keeps enough pixels for the exact resize
    assert open_image(data, LIMITS).size == (6000, 4000)


@pytest.mark.parametrize("variant", ["plain", "data_url", "url_safe", "newlines", "unpadded", "DATA_URL_UPPER",
                                     "data_url_mixed"])
def test_base64_variants(variant):
    data = encode(photo(17, 13), "PNG") + b"\xfb\xff"  # trailing bytes force '+'/'/' in the alphabet
    text = base64.b64encode(data).decode()
    assert "+" in text or "/" in text
    text = {
        "plain": text,
        "data_url": "data:image/png;base64," + text,
        "url_safe": base64.urlsafe_b64encode(data).decode(),
        "newlines": "\n".join(text[i : i + 76] for i in range(0, len(text), 76)) + "\n",
        "unpadded": text.rstrip("="),
        "DATA_URL_UPPER": "DATA:IMAGE/PNG;BASE64," + text,  # RFC 2397: scheme and ;base64 are case-insensitive
        "data_url_mixed": "Data:image/png;Base64," + text,
    }[variant]
    assert image_bytes(text, LIMITS.max_bytes) == data


def test_texts_work_and_nulls_fail():
    out = decode_texts(["", "ünï ✓", None, float("nan"), 3])
    assert out[:2] == ["", "ünï ✓"]
    assert [type(o) for o in out[2:]] == [InvalidInput] * 3
    assert [o.row for o in out[2:]] == [2, 3, 4]
    assert "expected a string, got int" in str(out[4])


@pytest.mark.parametrize("value,reason", [
    ("@@not base64@@", "invalid base64"),
    ("data:image/png,abcd", "data URL must be"),
    (b64(b"GIF89a but truncated"), "not an image of an allowed format"),
    (b64(b"plain text, not an image at all"), "not an image of an allowed format"),
    (b64(encode(Image.new("RGB", (8, 8)), "PPM")), "not an image of an allowed format"),
    (b64(encode(photo(64, 64), "JPEG")[:300]), "image could not be decoded"),
    ("", "input is empty"),
    (None, "input is null"),
    (float("nan"), "input is null"),
    (12, "expected a base64 string or bytes, got int"),
])
def test_bad_images_fail_cleanly(value, reason):
    [out] = decode_images([value], LIMITS)
    assert isinstance(out, InvalidInput) and out.row == 0
    assert reason in str(out), str(out)


def test_pixel_limit_is_checked_before_decoding():
    # A 20000 x 20000 PNG of zeros is about 1 MB on disk and 400 MP once decoded.
    big = encode(Image.new("L", (20000, 20000)), "PNG", optimize=True)
    [out] = decode_images([big], ImageLimits(max_bytes=len(big) + 1, max_pixels=8192 * 8192))
    assert isinstance(out, InvalidInput) and "over the limit of 67108864 pixels" in str(out)
    assert "400000000 pixels" in str(out)
    [out] = decode_images([encode(Image.new("L", (300, 200)), "PNG")], ImageLimits(max_bytes=10**6, max_pixels=50000))
    assert "image is 300x200 = 60000 pixels, over the limit of 50000 pixels (max_image_pixels)" in str(out)


def test_byte_limit_refuses_before_decoding_base64():
    text = "A" * 4000
    with pytest.raises(InvalidInput, match="about 3000 bytes, over the limit of 1000 bytes"):
        image_bytes(text, 1000)


def test_bad_row_via_model_names_row(image_model):
    frame = pd.DataFrame({"input": [b64(CASES["png"]()), b64(b"nope")]})
    with pytest.raises(MlflowException, match=r"1 bad row: row 1: bytes are not an image"):
        image_model.predict(frame)


# --- Issue 24.1: an image is turned upright exactly once, in every container, on both paths ---

def _tagged(fmt: str, orientation: int) -> bytes:
    """A small asymmetric image in `fmt`, its EXIF orientation tag set to `orientation`."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    if fmt in ("JPEG", "MPO"):
        img = photo(64, 48, seed=orientation)
        extra = {"save_all": True, "append_images": [photo(64, 48, seed=9)]} if fmt == "MPO" else {}
        return encode(img, fmt, quality=95, exif=exif.tobytes(), **extra)
    img = Image.fromarray(np.random.default_rng(orientation).integers(0, 256, (3, 5, 3), dtype=np.uint8))
    if fmt == "TIFF":
        return encode(img, fmt, tiffinfo={0x0112: orientation})
    return encode(img, fmt, exif=exif.tobytes(), **({"lossless": True} if fmt == "WEBP" else {}))


@pytest.mark.parametrize("fmt", ["JPEG", "MPO", "PNG", "WEBP", "TIFF"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_container_is_turned_upright_exactly_once(fmt, orientation):
    import io

    from PIL import ImageOps

    data = _tagged(fmt, orientation)
    fresh = Image.open(io.BytesIO(data))
    assert fresh.format == fmt
    want = np.asarray(ImageOps.exif_transpose(fresh).convert("RGB")).astype(int)
    tolerance = 1 if fmt in ("JPEG", "MPO") else 0  # simplejpeg and PIL's libjpeg may round apart by one
    for draft_edge in (None, 1000):  # the exact path, and the fast path without scaling
        got = np.asarray(decode_image(data, LIMITS, draft_edge)).astype(int)
        assert got.shape == want.shape, (draft_edge, got.shape, want.shape)
        assert np.abs(got - want).max() <= tolerance, draft_edge


def test_tiff_orientation_3_gives_blue_red():
    # The input: a 2x1 TIFF [red, blue] tagged "turned 180 degrees" is [blue, red] upright.
    img = Image.fromarray(np.array([[[255, 0, 0], [0, 0, 255]]], dtype=np.uint8))
    got = np.asarray(open_image(encode(img, "TIFF", tiffinfo={0x0112: 3}), LIMITS))
    assert got.tolist() == [[[0, 0, 255], [255, 0, 0]]]
    column = np.asarray(open_image(encode(img, "TIFF", tiffinfo={0x0112: 6}), LIMITS))
    assert column.shape == (2, 1, 3)


# --- Issue 24.2: every mode that carries transparency composites on white as its 8-bit twin ---

def _png(width, height, bit_depth, colour_type, rows, trns=None, plte=None) -> bytes:
    """A PNG written chunk by chunk (PIL cannot write 16-bit tRNS or low bit depths with tRNS)."""
    import struct
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    out = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
    out += chunk(b"PLTE", plte) if plte else b""
    out += chunk(b"tRNS", trns) if trns is not None else b""
    pixels = zlib.compress(b"".join(b"\x00" + r for r in rows))
    return out + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def _pack(fmt, *values):
    import struct

    return struct.pack(fmt, *values)


# (16-bit or low-depth image, its 8-bit twin): the same picture, the same transparent colour.
TRANSPARENT_TWINS = {
    "grey16_trns": (_png(2, 1, 16, 0, [_pack(">HH", 0, 65535)], _pack(">H", 0)),
                    _png(2, 1, 8, 0, [bytes([0, 255])], _pack(">H", 0))),
    "grey16_trns_mid": (_png(3, 1, 16, 0, [_pack(">HHH", 0x8080, 0x2020, 0xFFFF)], _pack(">H", 0x8080)),
                        _png(3, 1, 8, 0, [bytes([0x80, 0x20, 0xFF])], _pack(">H", 0x80))),
    "rgb16_trns": (_png(2, 1, 16, 2, [_pack(">6H", 0x1212, 0, 0, 0x3434, 0x5656, 0)], _pack(">3H", 0x1212, 0, 0)),
                   _png(2, 1, 8, 2, [bytes([0x12, 0, 0, 0x34, 0x56, 0])], _pack(">3H", 0x12, 0, 0))),
    "grey1_trns": (_png(2, 1, 1, 0, [bytes([0b01000000])], _pack(">H", 0)),
                   _png(2, 1, 8, 0, [bytes([0, 255])], _pack(">H", 0))),
    "grey4_trns": (_png(2, 1, 4, 0, [bytes([0x0F])], _pack(">H", 0)),
                   _png(2, 1, 8, 0, [bytes([0, 255])], _pack(">H", 0))),
    "grey_alpha16": (_png(2, 1, 16, 4, [_pack(">4H", 0, 0, 65535, 65535)]),
                     _png(2, 1, 8, 4, [bytes([0, 0, 255, 255])])),
    "rgba16": (_png(1, 1, 16, 6, [_pack(">4H", 0, 0, 0, 0)]), _png(1, 1, 8, 6, [bytes([0, 0, 0, 0])])),
    "palette_trns": (_png(2, 1, 8, 3, [bytes([0, 1])], bytes([0]), bytes([0, 0, 0, 255, 255, 255])),
                     _png(2, 1, 8, 0, [bytes([0, 255])], _pack(">H", 0))),
}


@pytest.mark.parametrize("name", sorted(TRANSPARENT_TWINS))
def test_transparency_composites_as_the_8_bit_twin(name):
    image, twin = TRANSPARENT_TWINS[name]
    want = np.asarray(open_image(twin, LIMITS))
    for draft_edge in (None, 16):
        assert np.asarray(decode_image(image, LIMITS, draft_edge)).tolist() == want.tolist()


def test_sixteen_bit_grey_with_trns_is_white_where_transparent():
    image, _ = TRANSPARENT_TWINS["grey16_trns"]
    assert np.asarray(open_image(image, LIMITS)).tolist() == [[[255, 255, 255], [255, 255, 255]]]
